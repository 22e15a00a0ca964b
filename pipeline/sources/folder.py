"""`--source FOLDER` of images with same-name .txt captions; parts of `--shard-size` images
in path order, `--limit` the first N."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

from xm.encoders.images import IMAGE_SUFFIXES
from xm.errors import XMError
from xm.indexes.layout import Layout, part_name
from xm.pipeline.sources.base import Part, Sample, Source, SourceOptions


class ImageFolder(Source):
    name = "images"
    by_name = False
    empty_caption_hint = " (no .txt beside the image)"

    def recognises(self, value: str) -> bool:
        return Path(value).is_dir()  # any folder that no more specific source claimed

    def parts(self, cfg: SourceOptions, layout: Layout) -> list[Part]:
        return folder_parts(Path(cfg.source), cfg.shard_size, cfg.limit)


def folder_parts(folder: Path, part_size: int, limit: int | None = None) -> list[Part]:
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
    return [Part(name=part_name(i), samples=functools.partial(samples, c), size=len(c)) for i, c in enumerate(chunks)]
