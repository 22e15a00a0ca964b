"""Sources of image-text pairs, each turned into parts of samples for the embed stage.

Kinds:
  laion400m              LAION-400M metadata parts -> select -> img2dataset download
  laion400m-embeddings   LAION's precomputed ViT-B/32 embedding parts (no images)
  table                  parquet/csv/tsv/jsonl of URLs and captions -> img2dataset
  images                 a folder of images with same-name .txt captions
  img2dataset            an img2dataset output folder (webdataset tars or files)
  datacomp               DataComp's metadata parquet + npz pairs (`--metadata-root`): OpenAI
                         CLIP ViT-B/32 and ViT-L/14 image and caption embeddings, no images

Precomputed arrays: a part of `laion400m-embeddings` or `datacomp` carries, per (encoder,
modality), a reference to an array of its rows (`ArrayRef`); `provided_arrays(cfg)` says
which (encoder, modality) a source provides. The plan embeds every provided array of a
planned encoder (`BuildConfig.plan`), the embed stage copies them instead of computing
(checked: rows, dim, finite, unit norm), and an encoder all of whose embeddings are
provided is never loaded (`encoders_to_load`): its manifest entry records the source
arrays and no weights probe. Images under any other encoder cannot be made (no images).

`--limit` and `--parts`:
  laion400m              --parts picks metadata parts; --limit cuts the selection
  table                  --limit: the first N rows
  images, img2dataset    --limit: the first N samples over the parts in order (the last cut)
  laion400m-embeddings   --parts picks embedding parts; they are taken whole (no --limit)
  datacomp               --parts picks pairs by position in file-name order (0-based);
                         --limit: the first N rows over the chosen pairs (the last pair cut,
                         its arrays with it), pinned for the build folder. A part is one pair,
                         named by its file stem (DataComp's are hex hashes, sorted = id order).
"""

from __future__ import annotations

import itertools
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from xm.encoders.images import IMAGE_SUFFIXES
from xm.errors import XMError
from xm.indexes.layout import Layout, part_name
from xm.pipeline.config import BuildConfig, pin_params
from xm.pipeline import datacomp, laion

TABLE_SUFFIXES = {".parquet", ".csv", ".tsv", ".jsonl", ".json", ".txt"}


@dataclass
class Sample:
    key: str
    caption: str
    url: str | None = None
    image: bytes | None = None
    image_path: str | None = None
    extra: dict = field(default_factory=dict)

    def read_image(self) -> bytes:
        if self.image is not None:
            return self.image
        return Path(self.image_path).read_bytes()  # type: ignore[arg-type]


@dataclass(frozen=True)
class ArrayRef:
    """One precomputed array of a part's rows, in a .npy file or under a key of an .npz."""

    path: Path
    key: str | None  # the .npz member; None: `path` is a .npy
    label: str  # what the manifest records as its origin, e.g. "datacomp:b32_img"
    dim: int | None = None  # the width it must have; None: the same as the encoder's other arrays
    rows: int | None = None  # rows it must have (its metadata's); None: the part's sample count
    meta: Path | None = None  # the metadata file it is row-aligned with (named in errors)

    def __str__(self) -> str:
        return f"{self.path}" + (f" [{self.key}]" if self.key else "")


@dataclass
class Part:
    name: str
    samples: Callable[[], Iterator[Sample]]
    # precomputed embeddings the part brings, by (encoder spec, modality); None: none, images to embed
    precomputed: dict[tuple[str, str], ArrayRef] | None = None
    size: int | None = None  # samples in the part, where known without reading it (progress totals)


# kinds whose parts are precomputed arrays and metadata, with no images
PRECOMPUTED_KINDS = ("laion400m-embeddings", datacomp.SOURCE)
# OpenAI CLIP's learned logit scale (clamped at 100): both kinds' arrays are OpenAI CLIP's
OPENAI_LOGIT_SCALE = 100.0


def provided_arrays(cfg: BuildConfig) -> dict[tuple[str, str], str]:
    """(encoder spec, modality) -> the source array that provides it (a label for the manifest).
    LAION's embedding parts are attributed to the coarse encoder, as the user names it; DataComp's
    arrays to the encoders that produced them, whatever the roles."""
    if cfg.source == "laion400m-embeddings":
        return {(cfg.coarse, "image"): "laion400m-embeddings:img_emb", (cfg.coarse, "text"): "laion400m-embeddings:text_emb"}
    if cfg.source == datacomp.SOURCE:
        return {key: f"{datacomp.SOURCE}:{name}" for key, name in datacomp.ARRAYS.items()}
    return {}


def encoders_to_load(cfg: BuildConfig, plan: dict[str, tuple[str, ...]]) -> list[str]:
    """The plan's encoders that compute something; one whose every embedding the source
    provides needs no weights and is not loaded."""
    given = provided_arrays(cfg)
    return [spec for spec, parts in plan.items() if any(m in parts and (spec, m) not in given for m in ("image", "text"))]


def precomputed_record(cfg: BuildConfig, spec: str, embedded: list[str]) -> dict[str, dict[str, str]]:
    """The manifest's note of which source array each provided embedding set of `spec` is."""
    given = provided_arrays(cfg)
    arrays = {m: given[(spec, m)] for m in embedded if (spec, m) in given}
    return {"precomputed": arrays} if arrays else {}


def source_problems(cfg: BuildConfig, kind: str, plan: dict[str, tuple[str, ...]]) -> list[str]:
    """What a source cannot give this plan, each in one line (for the build's preflight)."""
    problems = []
    if kind == datacomp.SOURCE and (p := datacomp.problem(cfg.metadata_root)):
        problems.append(p)
    if kind in PRECOMPUTED_KINDS:
        given = provided_arrays(cfg)
        need = [spec for spec, parts in plan.items() if "image" in parts and (spec, "image") not in given]
        if need:
            have = sorted({spec for spec, _ in given})
            problems.append(f"--source {cfg.source}: precomputed embeddings with no images, so image embeddings under "
                            f"{', '.join(need)} cannot be made (its arrays are {' and '.join(have)}'s)")
    return problems


def source_kind(source: str) -> str:
    if source in ("laion400m", "laion400m-embeddings", datacomp.SOURCE):
        return source
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() in TABLE_SUFFIXES or path.name.endswith((".csv.gz", ".jsonl.gz", ".tsv.gz")):
            return "table"
        raise XMError(f"{source}: unsupported table type (expected parquet, csv, tsv, jsonl)")
    if path.is_dir():
        if any(path.glob("*_stats.json")) or any(path.glob("*.tar")):
            return "img2dataset"
        return "images"
    raise XMError(f"{source}: no such file or folder, and not one of laion400m, laion400m-embeddings, datacomp")


def needs_download(kind: str) -> bool:
    return kind in ("laion400m", "table")


# ---------------------------------------------------------------- select

def _read_table(path: Path, url_col: str, caption_col: str) -> pa.Table:
    import pandas as pd

    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    try:
        if suffix.startswith(".parquet"):
            df = pd.read_parquet(path)
        elif suffix.startswith(".csv"):
            df = pd.read_csv(path)
        elif suffix.startswith(".tsv"):
            df = pd.read_csv(path, sep="\t")
        elif suffix.startswith((".jsonl", ".json")):
            df = pd.read_json(path, lines=True)
        else:  # .txt: one URL a line, no captions
            df = pd.DataFrame({url_col: path.read_text().split()})
    except Exception as exc:  # pandas raises many types for a bad file
        raise XMError(f"{path}: unreadable table ({str(exc).splitlines()[0][:200]})") from exc
    if url_col not in df.columns:
        raise XMError(f"{path}: no column {url_col!r} (columns: {', '.join(map(str, df.columns))}); use --url-col")
    if caption_col not in df.columns:
        if suffix != ".txt":
            raise XMError(f"{path}: no column {caption_col!r} (columns: {', '.join(map(str, df.columns))}); use --caption-col")
        df[caption_col] = ""
    df = df.rename(columns={url_col: "url", caption_col: "caption"})
    df["caption"] = df["caption"].fillna("").astype(str)
    df = df[df["url"].notna()]
    return pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)


def _laion_metadata(cfg: BuildConfig, layout: Layout) -> pa.Table:
    root = cfg.metadata_root or laion.METADATA_ROOT
    parts = cfg.parts or list(range(laion.METADATA_PARTS))
    tables, have = [], 0
    for i in parts:
        name = laion.metadata_part_name(i)
        path = laion.fetch(root, name, layout.work / "select" / name, f"LAION-400M metadata part {i}", "--metadata-root")
        table = pq.read_table(path)
        if cfg.nsfw_filter and "NSFW" in table.column_names:
            import pyarrow.compute as pc

            table = table.filter(pc.equal(table["NSFW"], "UNLIKELY"))
        tables.append(table)
        have += table.num_rows
        if cfg.limit and have >= cfg.limit:
            break
    table = pa.concat_tables(tables)
    return table.rename_columns(["url" if c == "URL" else "caption" if c == "TEXT" else c for c in table.column_names])


def select(cfg: BuildConfig, layout: Layout, kind: str) -> int:
    """Write the URL list img2dataset reads; return its row count."""
    params = {"source": cfg.source, "limit": cfg.limit, "parts": cfg.parts, "url_col": cfg.url_col,
              "caption_col": cfg.caption_col, "nsfw_filter": cfg.nsfw_filter}
    params_file = layout.selection.with_name("params.json")
    if layout.selection.is_dir():
        pin_params(params_file, params, "selection")
        return sum(pq.read_metadata(f).num_rows for f in layout.selection_files())
    if kind == "laion400m":
        table = _laion_metadata(cfg, layout)
    else:
        table = _read_table(Path(cfg.source), cfg.url_col, cfg.caption_col)
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    if kind == "table":
        _check_schemes(Path(cfg.source), table, cfg.allow_file_urls)
    pin_params(params_file, params, "selection")  # only once a selection exists to resume
    _write_selection(layout.selection, table, cfg.shard_size)
    return table.num_rows


SELECT_FILE_ROWS = 1_000_000  # about what img2dataset's driver holds at once, per file


def _write_selection(folder: Path, table: pa.Table, shard_size: int) -> None:
    """The selection as files of a whole number of shards each: img2dataset numbers shards on
    across files, so the download's shards are the same as from one file. Written into a
    sibling folder and renamed, so a selection exists whole or not at all."""
    import os
    import shutil
    import tempfile

    rows = shard_size * max(1, SELECT_FILE_ROWS // shard_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".urls.", dir=folder.parent))
    try:
        for i, start in enumerate(range(0, max(table.num_rows, 1), rows)):
            pq.write_table(table.slice(start, rows), tmp / f"part-{i:05d}.parquet")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would hide it from executors run as others
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_schemes(path: Path, table: pa.Table, allow_file: bool) -> None:
    """An untrusted table must not read the local disk into the memory: http(s) only."""
    import pyarrow.compute as pc

    urls = pc.utf8_lower(pc.cast(table["url"], pa.string()))
    ok = pc.starts_with(urls, "http://")
    for scheme in ["https"] + (["file"] if allow_file else []):
        ok = pc.or_kleene(ok, pc.starts_with(urls, f"{scheme}://"))
    bad = pc.invert(pc.fill_null(ok, False))
    n = pc.sum(bad).as_py() or 0
    if n:
        example = table["url"].filter(bad)[0].as_py()
        raise XMError(f"{path}: {n} URL(s) are not http(s) (e.g. {str(example)[:80]!r}); only http and https are fetched"
                      + ("" if allow_file else " unless --allow-file-urls"))


# ---------------------------------------------------------------- parts

def _tar_samples(path: Path) -> Iterator[Sample]:
    """Samples of a webdataset tar, grouped by key (img2dataset writes key.jpg/.txt/.json)."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            groups.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    for key in sorted(groups):
        yield _sample_from_files(key, groups[key])


def _sample_from_files(key: str, files: dict[str, bytes]) -> Sample:
    image_ext = next((e for e in files if f".{e}" in IMAGE_SUFFIXES), None)
    meta = json.loads(files["json"]) if "json" in files else {}
    caption = files["txt"].decode("utf-8", "replace") if "txt" in files else (meta.get("caption") or "")
    extra = {k: v for k, v in meta.items() if k not in ("caption", "url", "key") and isinstance(v, (str, int, float, bool))}
    return Sample(
        key=Path(key).name,
        caption=caption,
        url=meta.get("url"),
        image=files[image_ext] if image_ext else None,
        extra=extra,
    )


def _files_dir_samples(path: Path) -> Iterator[Sample]:
    groups: dict[str, dict[str, bytes]] = {}
    for f in sorted(path.iterdir()):
        if f.is_file():
            groups.setdefault(f.stem, {})[f.suffix.lstrip(".")] = f.read_bytes()
    for key in sorted(groups):
        yield _sample_from_files(key, groups[key])


def img2dataset_parts(folder: Path) -> list[Part]:
    tars = sorted(folder.glob("*.tar"))
    if tars:
        return [_tar_part(t) for t in tars]
    dirs = sorted(d for d in folder.iterdir() if d.is_dir() and d.name.isdigit())
    if not dirs:
        for fmt, pattern in (("tfrecord", "*.tfrecord"), ("parquet", "*.parquet")):
            if any(f for f in folder.glob(pattern) if not f.name.startswith("_")):
                raise XMError(f"{folder}: an img2dataset folder in its {fmt!r} output format, which xm does not read; "
                              "download with --output_format webdataset (or files)")
    return [Part(name=d.name, samples=lambda d=d: _files_dir_samples(d)) for d in dirs]


def _tar_part(tar: Path) -> Part:
    return Part(name=tar.stem, samples=lambda: _tar_samples(tar), size=_shard_successes(tar.with_suffix(".parquet")))


def _shard_successes(sidecar: Path) -> int | None:
    """Samples img2dataset wrote into a shard, from its parquet sidecar (None if unknown)."""
    try:
        status = pq.read_table(sidecar, columns=["status"]).column("status").to_pylist()
    except (OSError, KeyError, pa.ArrowInvalid):
        return None
    return sum(1 for s in status if s == "success")


def limit_parts(parts: list[Part], limit: int | None) -> list[Part]:
    """The first `limit` samples over the parts in order (later parts dropped, the last cut)."""
    if limit is None:
        return parts
    out, left = [], limit
    for part in parts:
        if left <= 0:
            break
        n = sum(1 for _ in part.samples())
        if n <= left:
            out.append(Part(part.name, part.samples, part.precomputed, n))
        else:
            out.append(Part(part.name, lambda p=part, k=left: itertools.islice(p.samples(), k), part.precomputed, left))
            left = 0
            continue
        left -= n
    return out


def _folder_parts(folder: Path, part_size: int, limit: int | None = None) -> list[Part]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise XMError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")

    def samples(chunk: list[Path]) -> Iterator[Sample]:
        for img in chunk:
            txt = img.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
            rel = img.relative_to(folder).as_posix()
            yield Sample(key=rel, caption=caption, url=None, image_path=str(img))

    images = images[:limit] if limit else images
    chunks = [images[i : i + part_size] for i in range(0, len(images), part_size)]
    return [Part(name=part_name(i), samples=lambda c=c: samples(c), size=len(c)) for i, c in enumerate(chunks)]


def _laion_embedding_parts(cfg: BuildConfig, layout: Layout) -> list[Part]:
    root = cfg.embeddings_root or laion.EMBEDDINGS_ROOT
    parts = cfg.parts if cfg.parts is not None else list(range(laion.EMBEDDING_PARTS))
    out = []
    for i in parts:
        files = {
            kind: laion.fetch(root, rel, layout.work / "laion" / Path(rel).name, f"LAION-400M embedding part {i} ({kind})", "--embeddings-root")
            for kind, rel in laion.embedding_part_names(i).items()
        }

        def samples(meta: Path = files["metadata"]) -> Iterator[Sample]:
            table = pq.read_table(meta)
            cols = table.column_names
            cap = "caption" if "caption" in cols else "TEXT"
            url = "url" if "url" in cols else "URL"
            extra_cols = [c for c in cols if c not in (cap, url)]
            for j, row in enumerate(table.to_pylist()):
                yield Sample(
                    key=str(row.get("key") or row.get("SAMPLE_ID") or j),
                    caption=row.get(cap) or "",
                    url=row.get(url),
                    extra={c: row[c] for c in extra_cols if isinstance(row[c], (str, int, float, bool))},
                )

        arrays = {(cfg.coarse, "image"): "img_emb", (cfg.coarse, "text"): "text_emb"}
        refs = {key: ArrayRef(files[name], None, f"laion400m-embeddings:{name}", meta=files["metadata"])
                for key, name in arrays.items()}
        out.append(Part(name=part_name(i), samples=samples, precomputed=refs))
    return out


def _datacomp_parts(cfg: BuildConfig, layout: Layout) -> list[Part]:
    """One part per metadata pair, named by its stem; `--limit` cuts the last one (with its arrays)."""
    if cfg.metadata_root is None or "://" in cfg.metadata_root:
        raise XMError(datacomp.problem(cfg.metadata_root) or "--metadata-root: required")
    out, left = [], cfg.limit
    for parquet in datacomp.choose(datacomp.pairs(cfg.metadata_root), cfg.parts):
        if left is not None and left <= 0:
            break
        npz, rows = datacomp.npz_of(parquet), datacomp.num_rows(parquet)
        refs = {key: ArrayRef(npz, name, f"{datacomp.SOURCE}:{name}", datacomp.DIMS[key[0]], rows, parquet)
                for key, name in datacomp.ARRAYS.items()}
        take = rows if left is None else min(rows, left)

        def samples(parquet: Path = parquet, take: int = take) -> Iterator[Sample]:
            for row in itertools.islice(datacomp.read_rows(parquet), take):
                yield Sample(key=str(row["uid"]), caption=row["text"] or "", url=row["url"],
                             extra={c: v for c, v in row.items() if c not in datacomp.REQUIRED_COLUMNS
                                    and isinstance(v, (str, int, float, bool))})

        out.append(Part(name=parquet.stem, samples=samples, precomputed=refs, size=take))
        left = None if left is None else left - take
    # a part once embedded is kept: a later run with another --limit would mix two selections
    # (pinned once the pairs are found usable, so a first run refused here may be retried)
    pin_params(layout.work / "datacomp.json", {"limit": cfg.limit, "parts": cfg.parts}, "--limit/--parts")
    return out


def parts_for(cfg: BuildConfig, layout: Layout, kind: str) -> list[Part]:
    """The source's parts, from the config alone (a Spark executor re-derives a part by name);
    `--limit` as the module docstring says."""
    if kind in ("laion400m", "table"):
        return img2dataset_parts(layout.download)
    if kind == "img2dataset":
        return limit_parts(img2dataset_parts(Path(cfg.source)), cfg.limit)
    if kind == "images":
        return _folder_parts(Path(cfg.source), cfg.shard_size, cfg.limit)
    if kind == datacomp.SOURCE:
        return _datacomp_parts(cfg, layout)
    if cfg.limit is not None:
        raise XMError("--limit: LAION's precomputed embedding parts are taken whole; choose how many with --parts")
    return _laion_embedding_parts(cfg, layout)


def part_named(cfg: BuildConfig, layout: Layout, kind: str, name: str) -> Part | None:
    """One part by name, as `parts_for` would give it. A downloaded shard is opened directly
    (a Spark task per part must not read every shard's sidecar: that is quadratic in parts);
    other kinds list their parts."""
    folder = layout.download if kind in ("laion400m", "table") else Path(cfg.source) if kind == "img2dataset" else None
    if folder is not None and (cfg.limit is None or kind != "img2dataset"):
        tar = folder / f"{name}.tar"
        if tar.is_file():
            return _tar_part(tar)
    return next((p for p in parts_for(cfg, layout, kind) if p.name == name), None)


def download_failures(folder: Path) -> dict[str, int]:
    """Failures by reason, from img2dataset's per-shard stats."""
    counts: dict[str, int] = {}
    for stats in sorted(folder.glob("*_stats.json")):
        data = json.loads(stats.read_text())
        for reason, n in (data.get("status_dict") or {}).items():
            if reason != "success":
                counts[reason] = counts.get(reason, 0) + int(n)
    return counts

