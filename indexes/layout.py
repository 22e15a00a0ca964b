"""The one place that knows the on-disk format of an xm index (format 2).

    <root>/
      manifest.json                          what is here; written last
      embeddings/<encoder-slug>/             clip-retrieval's embedding folder layout
          img_emb/img_emb_<part>.npy         float16, row-aligned across every encoder
          text_emb/text_emb_<part>.npy
          text_norm/text_norm_<part>.npy     float32 norm of each caption embedding before
                                             normalisation (X-MoRe's raw-dot re-ranking)
          text_code/text_code_<part>.npy     instead of text_emb/ for an encoder built with
          text_code/codec.faiss              `--text-codec SPEC=CODEC`: uint8 codes (n, code_size)
                                             of a FAISS standalone codec (SQ8, PQ64, OPQ32,PQ32...)
                                             trained once on a deterministic sample of the float16
                                             parts, stored with faiss.write_index; read through
                                             `embeddings.CodedEmbeddingMatrix` (sa_decode). The
                                             manifest's encoder entry says `"codecs": {"text": ...}`;
                                             (img_code/ likewise for images; norms stay float32)
          metadata/metadata_<part>.parquet   (memories built before the store shards only: first
                                             encoder, image_path, caption, url, ...; now the rows
                                             are in the store alone)
      index/<encoder-slug>/<modality>/shard-<i>.index   FAISS shards, global ids
      index/<encoder-slug>/<modality>/build.json        autofaiss' choice and the shard id ranges
      store/rows-<i>.arrow                   the caption store (the one owner of captions, URLs and
                                             the source's columns): Arrow IPC, uncompressed, ids
                                             i·R .. (i+1)·R-1 for the manifest's `store.shard_rows` R
                                             (`indexes/store.py`), memory-mapped by id
      store/part-<part>.parquet              the caption store of memories built before (no `store`
                                             in the manifest): Parquet, small row groups
      store/caption_hash.npy                 int64 hash of each caption, by global id
      _work/                                 resumable stage state (select, download, markers;
                                             done/compress-<slug>-<modality>/: the codec's record
                                             and one marker per coded part; checkpoint/embed/<part>/:
                                             a part's embeddings so far, `pipeline/checkpoint.py`;
                                             rows/rows_<part>.parquet: a part's rows as the embed
                                             stage wrote them, the store stage's input)

The manifest declares, per encoder, which modalities are embedded and which are indexed.
Format 1 (index/<modality>/, coarse encoder only, no norms) is still read: see
`manifest.upgrade_v1`. A global id is the running row offset over parts in sorted part
order, as in clip-retrieval. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMAT = "xm-index/2"
FORMAT_V1 = "xm-index/1"  # still read (see manifest.upgrade_v1)
MANIFEST = "manifest.json"
PART_DIGITS = 5
STORE_ROW_GROUP = 1024


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# mkstemp creates 0600 files; artefacts get the mode a plain open() would give them
FILE_MODE = _file_mode()


def part_name(i: int) -> str:
    return f"{i:0{PART_DIGITS}d}"


class Layout:
    """Paths inside one index folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def work(self) -> Path:
        return self.root / "_work"

    @property
    def download(self) -> Path:
        return self.work / "download"

    @property
    def selection(self) -> Path:
        """The URL list img2dataset reads: a folder of parquet files, each a whole number of
        download shards (its driver reads each file whole, so none may be LAION-sized)."""
        return self.work / "select" / "urls"

    def selection_files(self) -> list[Path]:
        return sorted(self.selection.glob("part-*.parquet")) if self.selection.is_dir() else []

    def done_dir(self, stage: str) -> Path:
        return self.work / "done" / stage

    def done_marker(self, stage: str, part: str) -> Path:
        return self.done_dir(stage) / f"{part}.json"

    def checkpoint_dir(self, stage: str, part: str) -> Path:
        return self.work / "checkpoint" / stage / part

    def embeddings(self, slug: str) -> Path:
        return self.root / "embeddings" / slug

    def emb_file(self, slug: str, modality: str, part: str) -> Path:
        kind = "img_emb" if modality == "image" else "text_emb"
        return self.embeddings(slug) / kind / f"{kind}_{part}.npy"

    def emb_dir(self, slug: str, modality: str) -> Path:
        return self.embeddings(slug) / ("img_emb" if modality == "image" else "text_emb")

    def code_dir(self, slug: str, modality: str) -> Path:
        return self.embeddings(slug) / ("img_code" if modality == "image" else "text_code")

    def code_file(self, slug: str, modality: str, part: str) -> Path:
        kind = self.code_dir(slug, modality).name
        return self.code_dir(slug, modality) / f"{kind}_{part}.npy"

    def codec_file(self, slug: str, modality: str) -> Path:
        return self.code_dir(slug, modality) / "codec.faiss"

    def compress_done_dir(self, slug: str, modality: str) -> Path:
        return self.done_dir(f"compress-{slug}-{modality}")

    def norm_file(self, slug: str, modality: str, part: str) -> Path:
        kind = "img_norm" if modality == "image" else "text_norm"
        return self.embeddings(slug) / kind / f"{kind}_{part}.npy"

    def metadata_file(self, slug: str, part: str) -> Path:
        return self.embeddings(slug) / "metadata" / f"metadata_{part}.parquet"

    def part_rows(self, part: str) -> Path:
        """A part's rows (image_path, caption, url, the source's columns) as the embed stage wrote
        them: build state that the store stage turns into the memory's store shards."""
        return self.work / "rows" / f"rows_{part}.parquet"

    def index_dir(self, slug: str, modality: str) -> Path:
        return self.root / "index" / slug / modality

    def shard_file(self, slug: str, modality: str, i: int) -> Path:
        return self.index_dir(slug, modality) / f"shard-{i:03d}.index"

    def index_build_info(self, slug: str, modality: str) -> Path:
        return self.index_dir(slug, modality) / "build.json"

    @property
    def store(self) -> Path:
        return self.root / "store"

    def store_part(self, part: str) -> Path:
        return self.store / f"part-{part}.parquet"

    def store_shard(self, i: int) -> Path:
        return self.store / f"rows-{i:0{PART_DIGITS}d}.arrow"

    @property
    def caption_hash(self) -> Path:
        return self.store / "caption_hash.npy"

    def part_files(self, folder: Path, prefix: str, suffix: str, parts: list[str]) -> list[str]:
        """`folder/<prefix><part><suffix>` for every part, as strings: a reader of 40,000 parts
        builds these on open, and pathlib would spend seconds on it."""
        base = str(folder)
        return [f"{base}/{prefix}{p}{suffix}" for p in parts]

    def emb_files(self, slug: str, modality: str, parts: list[str]) -> list[str]:
        kind = "img_emb" if modality == "image" else "text_emb"
        return self.part_files(self.emb_dir(slug, modality), f"{kind}_", ".npy", parts)

    def code_files(self, slug: str, modality: str, parts: list[str]) -> list[str]:
        folder = self.code_dir(slug, modality)
        return self.part_files(folder, f"{folder.name}_", ".npy", parts)

    def norm_files(self, slug: str, modality: str, parts: list[str]) -> list[str]:
        kind = "img_norm" if modality == "image" else "text_norm"
        return self.part_files(self.embeddings(slug) / kind, f"{kind}_", ".npy", parts)

    def store_parts(self, parts: list[str]) -> list[str]:
        return self.part_files(self.store, "part-", ".parquet", parts)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(target: Path, data: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def caption_hash(text: str) -> int:
    """A stable signed 64-bit hash of a caption: exact-string de-duplication without the text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
