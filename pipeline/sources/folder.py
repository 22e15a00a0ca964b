"""`--source FOLDER` of images with same-name .txt captions; parts of `--shard-size` images in
path order (default: sized for the folder, `pipeline/part_size.py`), `--limit` the first N.

The folder is listed once, by the build's first run: the sorted image paths are pinned in
`_work/select/images.parquet`, one row group a part, so a task reads its own part's paths
(one row group) instead of listing the whole folder, and a rerun or `--add-encoder` finds the
same parts whatever the folder holds since."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from xm.encoders.images import IMAGE_SUFFIXES
from xm.errors import XMError
from xm.indexes.layout import Layout, atomic_path, part_name
from xm.pipeline.part_size import auto_part_rows
from xm.pipeline.pins import pin_params
from xm.pipeline.sources.base import Part, Sample, Source, SourceOptions

# the part size of a build folder begun before parts were sized (embed markers, no listing)
_LEGACY_PART_ROWS = 10_000


class ImageFolder(Source):
    name = "images"
    by_name = False
    empty_caption_hint = " (no .txt beside the image)"

    def recognises(self, value: str) -> bool:
        return Path(value).is_dir()  # any folder that no more specific source claimed

    def parts(self, cfg: SourceOptions, layout: Layout) -> list[Part]:
        folder = Path(cfg.source)
        listing = _listing_file(layout)
        if not listing.is_file():
            done = layout.done_dir("embed")
            if done.is_dir() and any(done.glob("*.json")):  # begun before listings: parts as they were
                return folder_parts(folder, cfg.shard_size or _LEGACY_PART_ROWS, cfg.limit)
            _write_listing(listing, folder, cfg.shard_size, cfg.limit)
        # the listing is what was asked the first time: a rerun asking other parts is refused
        pin_params(listing.with_suffix(".json"), {"source": str(folder.resolve()), "limit": cfg.limit, "shard_size": cfg.shard_size},
                   "--source/--limit/--shard-size")
        meta = pq.read_metadata(listing)
        return [_listed_part(folder, listing, g) for g in range(meta.num_row_groups)]

    def part_named(self, cfg: SourceOptions, layout: Layout, name: str) -> Part | None:
        listing = _listing_file(layout)
        if not listing.is_file() or not name.isdigit():
            return super().part_named(cfg, layout, name)
        g = int(name)
        return _listed_part(Path(cfg.source), listing, g) if g < pq.read_metadata(listing).num_row_groups else None

    def task_inputs(self, cfg: SourceOptions, layout: Layout, name: str) -> list[str] | None:
        return [layout.rel(_listing_file(layout))]  # the pinned listing; the images are read from the folder


def _listing_file(layout: Layout) -> Path:
    return layout.work / "select" / "images.parquet"


def _images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise XMError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def _write_listing(target: Path, folder: Path, part_size: int | None, limit: int | None) -> None:
    images = _images(folder)
    images = images[:limit] if limit else images
    rows = part_size or auto_part_rows(len(images))
    table = pa.table({"path": pa.array([p.relative_to(folder).as_posix() for p in images], pa.string())})
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, row_group_size=rows)


def _listed_part(folder: Path, listing: Path, group: int) -> Part:
    rels = pq.ParquetFile(listing).read_row_group(group, columns=["path"]).column("path").to_pylist()
    return Part(name=part_name(group), samples=functools.partial(_samples, folder, [folder / r for r in rels]), size=len(rels))


def _samples(folder: Path, chunk: list[Path]) -> Iterator[Sample]:
    for img in chunk:
        txt = img.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
        rel = img.relative_to(folder).as_posix()
        yield Sample(key=rel, caption=caption, url=None, image_path=str(img))


def folder_parts(folder: Path, part_size: int, limit: int | None = None) -> list[Part]:
    """The folder's parts of `part_size` images in path order, listed now (not pinned)."""
    images = _images(folder)
    images = images[:limit] if limit else images
    chunks = [images[i : i + part_size] for i in range(0, len(images), part_size)]
    return [Part(name=part_name(i), samples=functools.partial(_samples, folder, c), size=len(c)) for i, c in enumerate(chunks)]
