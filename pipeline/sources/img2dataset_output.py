"""`--source FOLDER` holding img2dataset's output (webdataset tars or its `files` format);
also how the downloaded sources (`downloaded.py`) read their own download folder."""

from __future__ import annotations

import functools
import itertools
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from xm.encoders.images import IMAGE_SUFFIXES
from xm.errors import XMError
from xm.indexes.layout import Layout, part_name
from xm.pipeline.part_size import ShardGroups, read_groups, shard_groups
from xm.pipeline.sources.base import Part, Sample, Source, SourceOptions


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


def img2dataset_parts(folder: Path, grouping: Callable[[int, int], ShardGroups] | None = None) -> list[Part]:
    """The folder's parts: its shards, or runs of `grouping(shards, digits).per_part` consecutive
    shards (`pipeline/part_size.py`)."""
    tars = sorted(folder.glob("*.tar"))
    if tars:
        groups = grouping(len(tars), len(tars[0].stem)) if grouping is not None and all(t.stem.isdigit() for t in tars) else None
        if groups is None or groups.per_part == 1:
            return [_tar_part(t) for t in tars]
        runs: dict[int, list[Path]] = {}
        for t in tars:
            runs.setdefault(int(t.stem) // groups.per_part, []).append(t)
        return [_run_part(part_name(i), run) for i, run in sorted(runs.items())]
    dirs = sorted(d for d in folder.iterdir() if d.is_dir() and d.name.isdigit())
    if not dirs:
        for fmt, pattern in (("tfrecord", "*.tfrecord"), ("parquet", "*.parquet")):
            if any(f for f in folder.glob(pattern) if not f.name.startswith("_")):
                raise XMError(f"{folder}: an img2dataset folder in its {fmt!r} output format, which xm does not read; "
                              "download with --output_format webdataset (or files)")
    return [Part(name=d.name, samples=functools.partial(_files_dir_samples, d)) for d in dirs]


def shard_part(folder: Path, name: str, groups: ShardGroups | None = None) -> Part | None:
    """A downloaded shard (or run of shards, `groups`) opened directly (a Spark task per part
    must not list or read every shard's sidecar: that is quadratic in parts); None if not here."""
    if groups is not None and groups.per_part > 1:
        if not name.isdigit():
            return None
        run = [t for t in (folder / f"{s}.tar" for s in groups.shard_names(int(name))) if t.is_file()]
        return _run_part(name, run) if run else None
    tar = folder / f"{name}.tar"
    return _tar_part(tar) if tar.is_file() else None


def _run_part(name: str, tars: list[Path]) -> Part:
    sizes = [_shard_successes(t.with_suffix(".parquet")) for t in tars]
    known = [n for n in sizes if n is not None]
    return Part(name=name, samples=functools.partial(_run_samples, tars), size=sum(known) if len(known) == len(sizes) else None)


def _run_samples(tars: list[Path]) -> Iterator[Sample]:
    for t in tars:
        yield from _tar_samples(t)


def _tar_part(tar: Path) -> Part:
    return Part(name=tar.stem, samples=functools.partial(_tar_samples, tar), size=_shard_successes(tar.with_suffix(".parquet")))


def _shard_successes(sidecar: Path) -> int | None:
    """Samples img2dataset wrote into a shard, from its parquet sidecar (None if unknown)."""
    try:
        status = pq.read_table(sidecar, columns=["status"]).column("status").to_pylist()
    except (OSError, KeyError, pa.ArrowInvalid):
        return None
    return sum(1 for s in status if s == "success")


def limit_parts(parts: list[Part], limit: int | None) -> list[Part]:
    """The first `limit` samples over the parts in order (later parts dropped, the last cut).
    A part's count comes from its sidecar where img2dataset wrote one (`Part.size`); only a
    part without one is read to count it. Parts past the limit are never read."""
    if limit is None:
        return parts
    out, left = [], limit
    for part in parts:
        if left <= 0:
            break
        n = part.size if part.size is not None else sum(1 for _ in part.samples())
        if n <= left:
            out.append(Part(part.name, part.samples, part.precomputed, n))
        else:
            out.append(Part(part.name, functools.partial(_first, part.samples, left), part.precomputed, left))
            left = 0
            continue
        left -= n
    return out


def _first(samples: Callable[[], Iterator[Sample]], n: int) -> Iterator[Sample]:
    return itertools.islice(samples(), n)


def download_failures(folder: Path) -> dict[str, int]:
    """Failures by reason, from img2dataset's per-shard stats."""
    counts: dict[str, int] = {}
    for stats in sorted(folder.glob("*_stats.json")):
        data = json.loads(stats.read_text())
        for reason, n in (data.get("status_dict") or {}).items():
            if reason != "success":
                counts[reason] = counts.get(reason, 0) + int(n)
    return counts


class Img2datasetOutput(Source):
    """A folder img2dataset wrote: its shards are the parts; its download failures count too."""

    name = "img2dataset"
    by_name = False

    def recognises(self, value: str) -> bool:
        path = Path(value)
        return path.is_dir() and (any(path.glob("*_stats.json")) or any(path.glob("*.tar")))

    def parts(self, cfg: SourceOptions, layout: Layout) -> list[Part]:
        grouping = (lambda shards, digits: shard_groups(layout, cfg.shard_size, shards, digits)) if cfg.limit is None else None
        return limit_parts(img2dataset_parts(Path(cfg.source), grouping), cfg.limit)

    def part_named(self, cfg: SourceOptions, layout: Layout, name: str) -> Part | None:
        # a cut (--limit) part is only known by counting the parts before it (the limit bounds how many)
        if cfg.limit is not None:
            return super().part_named(cfg, layout, name)
        groups = read_groups(layout)
        direct = shard_part(Path(cfg.source), name, groups)
        # once the driver pinned the grouping, the shards' names are the whole answer
        return direct if direct is not None or groups is not None else super().part_named(cfg, layout, name)

    def failures(self, cfg: SourceOptions, layout: Layout) -> dict[str, int]:
        return download_failures(Path(cfg.source))
