"""The caption store: Parquet parts with small row groups, fetched by global id.

A batch of ids touches only the row groups that hold them (1,024 rows each), read
from part files opened on demand (a bounded LRU of open files, `OpenFiles`), so 128 random
ids never cost a scan and 40,000 parts never mean 40,000 open files. The hot path of the
methods needs no text at all: de-duplication uses `caption_hash.npy`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xm.errors import XMError
from xm.indexes.layout import STORE_ROW_GROUP, atomic_path, caption_hash
from xm.indexes.open_files import OpenFiles

# Columns every store has, whatever the source; the source's own columns follow.
CORE_COLUMNS = ("id", "caption", "url", "source_id")


def write_store_part(table: pa.Table, first_id: int, target: Path) -> np.ndarray:
    """Write one store part (adding global ids); return its caption hashes."""
    n = table.num_rows
    table = table.drop_columns([c for c in ("id",) if c in table.column_names])
    table = table.add_column(0, "id", pa.array(np.arange(first_id, first_id + n, dtype=np.int64)))
    for col in ("caption", "url", "source_id"):
        if col not in table.column_names:
            table = table.append_column(col, pa.array([None] * n, pa.string()))
    ordered = list(CORE_COLUMNS) + [c for c in table.column_names if c not in CORE_COLUMNS]
    table = table.select(ordered)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, row_group_size=STORE_ROW_GROUP, compression="zstd")
    captions = table.column("caption").to_pylist()
    return np.array([caption_hash(c or "") for c in captions], dtype=np.int64)


class CaptionStore:
    """The store's parts read by global id. Part files are opened when a fetch first needs them
    and kept in `opened`, a bounded LRU of open files (`OpenFiles`, shared with the memory's
    other readers); decoded row groups in an LRU of `cache_groups`. Neither grows with the
    number of parts. Not thread-safe (`LocalMemory` fetches under its lock)."""

    def __init__(self, files: Sequence[str | Path], rows: Sequence[int], hash_file: Path | None = None, cache_groups: int = 256,
                 opened: OpenFiles | None = None) -> None:
        self.files = list(files)
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.opened = opened if opened is not None else OpenFiles()
        self._cache: OrderedDict[tuple[int, int, tuple[str, ...] | None], pa.Table] = OrderedDict()
        self._cache_groups = cache_groups
        self.hashes = np.load(hash_file, mmap_mode="r") if hash_file is not None else None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _file(self, p: int) -> pq.ParquetFile:
        return self.opened.get(("parquet", self.files[p]), lambda: self._open(p))

    def _open(self, p: int) -> pq.ParquetFile:
        try:
            # read, not mapped: a cached row group then holds no map or descriptor of its file,
            # so `opened` alone bounds them (a group is ~100 KB; reading it is one pread)
            return pq.ParquetFile(self.files[p], memory_map=False)
        except (OSError, pa.ArrowInvalid) as exc:
            raise XMError(f"{self.files[p]}: unreadable caption store part ({exc})") from exc

    def _group(self, p: int, g: int, columns: tuple[str, ...] | None) -> pa.Table:
        key = (p, g, columns)
        table = self._cache.get(key)
        if table is None:
            table = self._file(p).read_row_group(g, columns=list(columns) if columns else None)
            self._cache[key] = table
            if len(self._cache) > self._cache_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return table

    def fetch(self, ids: Sequence[int], columns: Sequence[str] | None = None) -> list[dict]:
        """Rows for global ids, in the given order; ids out of range raise."""
        wanted = np.asarray(ids, dtype=np.int64)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= len(self)):
            raise XMError(f"caption store: id out of range 0..{len(self) - 1}")
        cols = tuple(columns) if columns else None
        part_of = np.searchsorted(self.offsets, wanted, side="right") - 1
        rows: list[dict | None] = [None] * len(wanted)
        for p in np.unique(part_of):
            sel = np.nonzero(part_of == p)[0]
            local = wanted[sel] - self.offsets[p]
            rg_size = self._file(int(p)).metadata.row_group(0).num_rows
            groups = local // rg_size
            for g in np.unique(groups):
                gsel = sel[groups == g]
                table = self._group(int(p), int(g), cols)
                picked = table.take(pa.array(local[groups == g] - g * rg_size)).to_pylist()
                for j, row in zip(gsel, picked):
                    rows[j] = row
        return rows  # type: ignore[return-value]

    def captions(self, ids: Sequence[int]) -> list[str]:
        return [r["caption"] for r in self.fetch(ids, columns=("caption",))]
