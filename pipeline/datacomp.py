"""Where DataComp's metadata lives and what it holds (CommonPool small/medium/large/xlarge
and DataComp-1B): the layout knowledge only; `sources/datacomp.py` turns it into parts.

The layout, as mlfoundations/datacomp writes and reads it:

* `download_upstream.py --scale S --download_npz --skip_shards` snapshots the Hugging Face
  dataset `mlfoundations/datacomp_S` (or `mlfoundations/datacomp_1b`) into
  `$data_dir/metadata/` (or `--metadata_dir`): `<stem>.parquet` files and, with
  `--download_npz`, a `<stem>.npz` of the same stem beside each (xlarge's `part_*/`
  subfolders are flattened into that one folder). The stems are 32-hex-digit hashes.
* Each parquet row is one sample: `uid` (32 hex digits), `url`, `text` (the caption),
  `original_width`, `original_height`, `clip_b32_similarity_score`,
  `clip_l14_similarity_score`, `face_bboxes` (a list of boxes), `sha256` (of the image).
* The npz beside it holds OpenAI CLIP features, row i for parquet row i: the baselines
  read `f"{path_root}.npz"` next to `f"{path_root}.parquet"` and mask the array with the
  parquet's boolean filter (baselines/apply_filter.py, baselines/image_based_clustering.py).
  Keys: `b32_img`, `b32_txt` (ViT-B/32, 512-d), `l14_img`, `l14_txt` (ViT-L/14, 768-d),
  and `dedup` (not used here).
* The README does not say the dtype or whether the features are normalised. The sizes it
  gives (75 GB of npz for small's 12.8M samples, ~5.9 kB a sample) fit float16. xm reads
  float16 or float32 and checks that every stored row is finite and unit-norm
  (`embed.read_array`): an array that were not would be refused in one line, not indexed
  as if it were. Unit-norm arrays carry no norms, so none are recorded for them.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from xm.errors import XMError

SOURCE = "datacomp"
B32, L14 = "ViT-B-32:openai", "ViT-L-14:openai"  # the encoders that produced the pool's arrays
# (encoder, modality) -> npz key
ARRAYS: dict[tuple[str, str], str] = {(B32, "image"): "b32_img", (B32, "text"): "b32_txt",
                                      (L14, "image"): "l14_img", (L14, "text"): "l14_txt"}
DIMS = {B32: 512, L14: 768}
REQUIRED_COLUMNS = ("uid", "url", "text")
EXTRA_COLUMNS = ("original_width", "original_height", "clip_b32_similarity_score", "clip_l14_similarity_score", "sha256")
HOW = ("download a pool's metadata with its embeddings on a connected machine (mlfoundations/datacomp: "
       "python download_upstream.py --scale small --data_dir DIR --download_npz --skip_shards) "
       "and pass --metadata-root DIR/metadata")


def problem(root: str | None) -> str | None:
    """Why `--metadata-root` cannot be read as DataComp metadata (one line), or None."""
    if root is None:
        return f"--source datacomp: no --metadata-root; {HOW}"
    if "://" in root:
        return (f"--metadata-root {root}: DataComp metadata is read from a local folder (its files are named by "
                f"hashes, with no listing to fetch over HTTP); {HOW}")
    try:
        folder(root)
    except XMError as exc:
        return str(exc)
    return None


def folder(root: str) -> Path:
    """The folder holding the pairs: --metadata-root itself, or its `metadata/` (the layout
    download_upstream.py writes under --data_dir)."""
    path = Path(root)
    if not path.is_dir():
        raise XMError(f"--metadata-root {root}: no such folder; {HOW}")
    for candidate in (path, path / "metadata"):
        if candidate.is_dir() and any(_parquets(candidate)):
            return candidate
    raise XMError(f"--metadata-root {root}: no DataComp metadata (.parquet files with their .npz) here or in its metadata/; {HOW}")


def _parquets(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))


def pairs(root: str) -> list[Path]:
    """Every metadata parquet, in stem order (the order of global ids). A stem becomes the
    part's name, so it must sort the same way inside every file name it ends up in
    (`img_emb_<stem>.npy`, `<stem>.json`): letters, digits and `_` only, which all sort after
    the `.` of a suffix. DataComp's own stems are hex."""
    found = _parquets(folder(root))
    for p in found:
        if not all(c.isascii() and (c.isalnum() or c == "_") for c in p.stem):
            raise XMError(f"{p}: a DataComp metadata file's name must be letters, digits and _ (DataComp's own are hex "
                          "hashes), so that parts sort the same everywhere; rename it")
    return found


def choose(found: list[Path], parts: list[int] | None) -> list[Path]:
    """`--parts` picks pairs by their position in stem order (0-based); none: all of them."""
    if parts is None:
        return found
    bad = [i for i in parts if not 0 <= i < len(found)]
    if bad:
        raise XMError(f"--parts {bad[0]}: {found[0].parent} holds {len(found)} DataComp metadata pair(s), "
                      f"numbered 0-{len(found) - 1} in file-name order")
    return [found[i] for i in parts]


def npz_of(parquet: Path) -> Path:
    npz = parquet.with_suffix(".npz")
    if not npz.is_file():
        raise XMError(f"{npz}: missing; the embeddings of {parquet.name} (download_upstream.py --download_npz fetches "
                      "them beside the parquet), or leave this pair out with --parts")
    return npz


def num_rows(parquet: Path) -> int:
    try:
        return pq.read_metadata(parquet).num_rows
    except (OSError, pa.ArrowException) as exc:
        raise XMError(f"{parquet}: unreadable DataComp metadata ({str(exc).splitlines()[0][:200]})") from exc


def read_rows(parquet: Path) -> list[dict]:
    """The samples' metadata columns, row by row (face_bboxes, a list, is left out)."""
    try:
        names = pq.read_schema(parquet).names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise XMError(f"{parquet}: no column {missing[0]!r} (columns: {', '.join(names)}); not DataComp metadata")
        return pq.read_table(parquet, columns=[c for c in (*REQUIRED_COLUMNS, *EXTRA_COLUMNS) if c in names]).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise XMError(f"{parquet}: unreadable DataComp metadata ({str(exc).splitlines()[0][:200]})") from exc
