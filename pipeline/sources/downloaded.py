"""What the sources img2dataset downloads for have in common (`laion400m`, `table`): the select
stage writes their URL list (`_work/select/urls`), the download stage fetches it into
`_work/download`, and the parts are its shards.

Where the Spark tasks write the build to object storage themselves (`cfg.bucket`,
`pipeline/task_mirror.py`), `_work/download` is the bucket's: img2dataset's executors write the
shards there through fsspec, the driver lists them and reads only their small sidecars
(`.parquet` for the parts' sizes, `_stats.json` for the failures), and each embed task pulls
its own part's shards (`task_inputs`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from xm.indexes.layout import Layout, write_json
from xm.pipeline.part_size import DOWNLOAD_SHARD_ROWS, ShardGroups, groups_file, read_groups, shard_groups
from xm.pipeline.pins import pin_params
from xm.pipeline.sources.base import Part, Source, SourceOptions
from xm.pipeline.sources.img2dataset_output import bucket_parts, download_failures, img2dataset_parts, shard_part

SELECT_FILE_ROWS = 1_000_000  # about what img2dataset's driver holds at once, per file


class DownloadedSource(Source):
    """A source of URLs and captions; subclasses say how to read them (`url_table`)."""

    needs_download = True

    def url_table(self, cfg: SourceOptions, layout: Layout) -> pa.Table:
        """The URLs (`url`) and captions (`caption`) to download, other columns carried along,
        `--limit` not yet applied."""
        raise NotImplementedError

    def screen(self, cfg: SourceOptions, table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
        """The rows img2dataset may fetch, and the others counted by reason (failures of the
        build, as img2dataset counts its own); all rows by default."""
        return table, {}

    def select(self, cfg: SourceOptions, layout: Layout) -> int:
        """Write the URL list img2dataset reads; return its row count."""
        params = {"source": cfg.source, "limit": cfg.limit, "parts": cfg.parts, "url_col": cfg.url_col,
                  "caption_col": cfg.caption_col, "nsfw_filter": cfg.nsfw_filter}
        params_file = layout.selection.with_name("params.json")
        if layout.selection.is_dir():
            pin_params(params_file, params, "selection")
            return sum(pq.read_metadata(f).num_rows for f in layout.selection_files()) + sum(_screened(layout).values())
        table = self.url_table(cfg, layout)
        if cfg.limit:
            table = table.slice(0, cfg.limit)
        selected = table.num_rows
        table, screened = self.screen(cfg, table)
        pin_params(params_file, params, "selection")  # only once a selection exists to resume
        write_json(_screened_file(layout), screened)  # before the selection, whose folder says "selected"
        _write_selection(layout.selection, table, cfg.shard_size or DOWNLOAD_SHARD_ROWS)
        return selected

    def parts(self, cfg: SourceOptions, layout: Layout) -> list[Part]:
        # grouped by the selection's shard count, not the shards found: a shard img2dataset
        # could not write must not change which shards the others are grouped with
        selected = sum(pq.read_metadata(f).num_rows for f in layout.selection_files())
        shard_rows = cfg.shard_size or DOWNLOAD_SHARD_ROWS
        def grouping(shards: int, digits: int) -> ShardGroups:
            return shard_groups(layout, cfg.shard_size, max(shards, math.ceil(selected / shard_rows)), digits)

        if cfg.bucket is not None:
            return bucket_parts(download_folder(cfg, layout), grouping)
        return img2dataset_parts(layout.download, grouping)

    def part_named(self, cfg: SourceOptions, layout: Layout, name: str) -> Part | None:
        groups = read_groups(layout)
        direct = shard_part(layout.download, name, groups)
        # once the driver pinned the grouping, the shards' names are the whole answer
        return direct if direct is not None or groups is not None else super().part_named(cfg, layout, name)

    def task_inputs(self, cfg: SourceOptions, layout: Layout, name: str) -> list[str] | None:
        """The pinned grouping and the part's shards with their sidecars (a shard img2dataset
        could not write is simply not there); asked once the driver listed the parts."""
        groups = read_groups(layout)
        shards = groups.shard_names(int(name)) if groups is not None and groups.per_part > 1 and name.isdigit() else [name]
        folder = layout.rel(layout.download)
        return [layout.rel(groups_file(layout)), *(f"{folder}/{s}{ext}" for s in shards for ext in (".tar", ".parquet"))]

    def failures(self, cfg: SourceOptions, layout: Layout) -> dict[str, int]:
        counts = download_failures(layout.download if cfg.bucket is None else download_folder(cfg, layout))
        for reason, n in _screened(layout).items():
            counts[reason] = counts.get(reason, 0) + n
        return counts


def download_folder(cfg: SourceOptions, layout: Layout) -> str:
    """Where img2dataset writes the build's shards: its download folder, or that folder in the
    bucket where the tasks write the build there themselves (`cfg.bucket`)."""
    return f"{cfg.bucket}/{layout.rel(layout.download)}" if cfg.bucket else str(layout.download)


def _screened_file(layout: Layout) -> Path:
    return layout.selection.with_name("screened.json")


def _screened(layout: Layout) -> dict[str, int]:
    """The rows the select stage kept from img2dataset, by reason."""
    path = _screened_file(layout)
    return {str(k): int(v) for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def _write_selection(folder: Path, table: pa.Table, shard_size: int) -> None:
    """The selection as files of a whole number of shards each: img2dataset numbers shards on
    across files, so the download's shards are the same as from one file. Written into a
    sibling folder and renamed, so a selection exists whole or not at all."""
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
