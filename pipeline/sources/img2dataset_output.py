"""`--source FOLDER` holding img2dataset's output (webdataset tars or its `files` format);
also how the downloaded sources (`downloaded.py`) read their own download folder."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from xm.encoders.images import IMAGE_SUFFIXES
from xm.errors import XMError
from xm.indexes import object_store
from xm.indexes.layout import Layout, part_name
from xm.pipeline.part_size import ShardGroups, groups_file, read_groups, shard_groups
from xm.pipeline.sources.base import Part, Sample, Source, SourceOptions


def _tar_samples(path: Path | str) -> Iterator[Sample]:
    """Samples of a webdataset tar, grouped by key (img2dataset writes key.jpg/.txt/.json); a
    str: the tar's URL on object storage, streamed."""
    groups: dict[str, dict[str, bytes]] = {}
    with _open_tar(path) as tar:
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


@contextlib.contextmanager
def _open_tar(path: Path | str) -> Iterator[tarfile.TarFile]:
    if isinstance(path, Path):
        with tarfile.open(path) as tar:
            yield tar
        return
    import fsspec  # a tar in the bucket: only a build whose tasks write there reads one this way

    with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        yield tar


def _runs(stems: list[str], grouping: Callable[[int, int], ShardGroups] | None) -> list[tuple[str, list[str]]]:
    """(part name, its shards' names) of the shards `stems` (sorted): one shard a part, or runs
    of `grouping(shards, digits).per_part` consecutive shards (`pipeline/part_size.py`)."""
    groups = grouping(len(stems), len(stems[0])) if grouping is not None and all(s.isdigit() for s in stems) else None
    if groups is None or groups.per_part == 1:
        return [(s, [s]) for s in stems]
    runs: dict[int, list[str]] = {}
    for s in stems:
        runs.setdefault(int(s) // groups.per_part, []).append(s)
    return [(part_name(i), run) for i, run in sorted(runs.items())]


def img2dataset_parts(folder: Path, grouping: Callable[[int, int], ShardGroups] | None = None) -> list[Part]:
    """The folder's parts: its shards, or runs of `grouping(shards, digits).per_part` consecutive
    shards (`pipeline/part_size.py`)."""
    tars = sorted(folder.glob("*.tar"))
    if tars:
        return [_run_part(name, [folder / f"{s}.tar" for s in run]) for name, run in _runs([t.stem for t in tars], grouping)]
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


def _run_samples(tars: list[Path] | list[str]) -> Iterator[Sample]:
    for t in tars:
        yield from _tar_samples(t)


def _tar_part(tar: Path) -> Part:
    return Part(name=tar.stem, samples=functools.partial(_tar_samples, tar), size=_shard_successes(tar.with_suffix(".parquet")))


def _shard_successes(sidecar: Path) -> int | None:
    """Samples img2dataset wrote into a shard, from its parquet sidecar (None if unknown)."""
    try:
        return _successes(sidecar.read_bytes())
    except OSError:
        return None


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


def bucket_parts(url: str, grouping: Callable[[int, int], ShardGroups] | None = None) -> list[Part]:
    """The parts of img2dataset's output at `url` on object storage (the download of a build whose
    tasks write to the bucket), as `img2dataset_parts` gives a folder's: the shards are listed
    and only their parquet sidecars are read (for the parts' sizes), all at once, never a tar."""
    fs, path = object_store.filesystem(url, "--out")
    stems = sorted(Path(p).stem for p in _glob(fs, url, f"{path}/*.tar"))
    sidecars = _cat(fs, url, [f"{path}/{s}.parquet" for s in stems])
    sizes = {s: _successes(sidecars.get(f"{path}/{s}.parquet")) for s in stems}
    parts = []
    for name, run in _runs(stems, grouping) if stems else []:
        known = [sizes[s] for s in run if sizes[s] is not None]
        parts.append(Part(name=name, samples=functools.partial(_run_samples, [f"{url}/{s}.tar" for s in run]),
                          size=sum(n for n in known if n is not None) if len(known) == len(run) else None))
    return parts


def _glob(fs: Any, url: str, pattern: str) -> list[str]:
    try:
        return list(fs.glob(pattern, refresh=True))
    except Exception as exc:  # botocore, aiohttp and fsspec raise many types
        raise XMError(f"--out {url}: cannot list img2dataset's shards ({str(exc).splitlines()[0][:200]})") from exc


def _cat(fs: Any, url: str, paths: list[str]) -> dict[str, bytes]:
    """The small files `paths` (those that exist), fetched concurrently."""
    if not paths:
        return {}
    try:
        found = fs.cat(paths, on_error="return")
    except Exception as exc:
        raise XMError(f"--out {url}: cannot read img2dataset's sidecar files ({str(exc).splitlines()[0][:200]})") from exc
    return {p: v for p, v in found.items() if isinstance(v, bytes)}


def _successes(sidecar: bytes | None) -> int | None:
    """Samples img2dataset wrote into a shard, from its parquet sidecar's bytes (None: no
    sidecar, or unreadable)."""
    if sidecar is None:
        return None
    try:
        status = pq.read_table(pa.BufferReader(sidecar), columns=["status"]).column("status").to_pylist()
    except (OSError, KeyError, pa.ArrowInvalid):
        return None
    return sum(1 for s in status if s == "success")


def download_failures(folder: Path | str) -> dict[str, int]:
    """Failures by reason, from img2dataset's per-shard stats (a str: their folder's URL on
    object storage, the stats fetched all at once)."""
    if isinstance(folder, Path):
        found = [p.read_bytes() for p in sorted(folder.glob("*_stats.json"))]
    else:
        fs, path = object_store.filesystem(folder, "--out")
        found = list(_cat(fs, folder, sorted(_glob(fs, folder, f"{path}/*_stats.json"))).values())
    counts: dict[str, int] = {}
    for raw in found:
        data = json.loads(raw)
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

    def task_inputs(self, cfg: SourceOptions, layout: Layout, name: str) -> list[str] | None:
        # the pinned grouping; the shards are read from the source folder (executors see it, as an image folder)
        return [layout.rel(groups_file(layout))]

    def failures(self, cfg: SourceOptions, layout: Layout) -> dict[str, int]:
        return download_failures(Path(cfg.source))
