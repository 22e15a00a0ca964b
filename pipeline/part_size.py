"""How many rows a part holds: sized for the memory, so that a 400M memory has hundreds of parts,
not tens of thousands, and a 1,000-item one has one.

A part is the unit of every stage after the download (one embedding file per encoder and
modality, one store part, one embed task), and every reader of a memory pays per part. With a
fixed 10,000 rows a part, 400M items made 40,000 parts: 40,000 tasks of seconds each, 200,000
files, and a manifest listing each. Here, by default (`--shard-size` not given), a part holds
`auto_part_rows(total)` rows: the memory's size over TARGET_PARTS, between MIN_PART_ROWS and
MAX_PART_ROWS. An explicit `--shard-size N` keeps the old rule (N rows a part, one part per
download shard).

* downloaded sources (img2dataset, and an img2dataset folder given as the source): img2dataset
  still writes shards of DOWNLOAD_SHARD_ROWS (a shard is its unit of retry); a part is a run
  of consecutive whole shards (`ShardGroups.per_part`);
* an image folder: a part is a run of `auto_part_rows` images in path order;
* DataComp pairs and LAION's embedding parts are the pool's own files, taken as they are.

What a build chose is pinned under `_work/` (`parts.json`, the folder's `select/images.parquet`)
the first time: a rerun, a Spark task and `--add-encoder` derive the same parts without listing
anything, whatever the source folder holds since. A build folder begun before parts were sized
(embed markers, no pin) keeps one part per shard.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from xm.indexes.layout import Layout, write_json

TARGET_PARTS = 500
MIN_PART_ROWS = 10_000  # below this a part costs more in files and tasks than it holds
MAX_PART_ROWS = 1_000_000  # a part's embeddings stay a few GB in an embed task's memory
DOWNLOAD_SHARD_ROWS = 10_000  # img2dataset's shard when --shard-size is not given (its own default)


def auto_part_rows(total: int) -> int:
    """Rows a part holds in a memory of `total` items: 1,000 -> 10,000 (one part), 40M ->
    80,000 (500 parts), 400M -> 800,000 (500 parts), 1B -> 1,000,000 (1,000 parts)."""
    return min(MAX_PART_ROWS, max(MIN_PART_ROWS, math.ceil(max(0, total) / TARGET_PARTS)))


@dataclass(frozen=True)
class ShardGroups:
    """Download shards per part, and the width of the shard numbers in their file names
    (img2dataset zero-pads them), so that a task finds its shards without listing them."""

    per_part: int
    digits: int

    def shard_names(self, part: int) -> list[str]:
        return [f"{j:0{self.digits}d}" for j in range(part * self.per_part, (part + 1) * self.per_part)]


def groups_file(layout: Layout) -> Path:
    """Where the build pins its grouping."""
    return layout.work / "parts.json"


def read_groups(layout: Layout) -> ShardGroups | None:
    """The grouping the build pinned (None before the driver first listed its parts)."""
    path = groups_file(layout)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return ShardGroups(per_part=int(data["shards_per_part"]), digits=int(data["digits"]))


def shard_groups(layout: Layout, shard_size: int | None, shards: int, digits: int) -> ShardGroups:
    """The build's grouping of `shards` download shards into parts: pinned if it was, else chosen
    now (one shard a part under an explicit --shard-size or in a build begun before grouping)
    and pinned."""
    pinned = read_groups(layout)
    if pinned is not None:
        return pinned
    done = layout.done_dir("embed")
    legacy = done.is_dir() and any(done.glob("*.json"))
    per_part = 1 if shard_size is not None or legacy else \
        max(1, auto_part_rows(shards * DOWNLOAD_SHARD_ROWS) // DOWNLOAD_SHARD_ROWS)
    groups = ShardGroups(per_part=per_part, digits=digits)
    write_json(groups_file(layout), {"shards_per_part": groups.per_part, "digits": groups.digits})
    return groups
