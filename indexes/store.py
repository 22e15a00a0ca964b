"""The caption store: every item's row (caption, url, source_id, image_path, the source's own
columns), fetched by global id. It is the one owner of captions and URLs in a memory; exports
that want clip-retrieval's `metadata/` parts write them from it.

Two layouts, told apart by the manifest's `store` entry (`records.StoreEntry`):

* **Shards** (`xm-store/2`): `store/rows-<i>.arrow`, Arrow IPC files, uncompressed, each holding
  the ids `i·R .. (i+1)·R-1` (R = `shard_rows`, by default a million: hundreds of files at 400M,
  one for a laptop's memory, whatever the embedding parts are). A shard is memory-mapped when a
  fetch first needs it (kept in the memory's bounded LRU of open files, `OpenFiles`) and its rows
  are taken where they lie: no footer of a part parsed, no row group decoded per id, so 128
  random ids cost one `take` per shard they fall in.
* **Parquet parts** (memories built before, no `store` entry): `store/part-<part>.parquet` with
  1,024-row row groups, one file per embedding part (`PartsStore`). Still read; never written by
  a build (`write_store_part` remains for tests and the bench that make such memories).

The hot path of the methods needs no text at all: de-duplication uses `caption_hash.npy`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xm.errors import XMError
from xm.indexes.layout import STORE_ROW_GROUP, Layout, atomic_path, caption_hash
from xm.indexes.open_files import OpenFiles
from xm.indexes.records import STORE_SHARDS, Manifest, StoreEntry

# Columns every store has, whatever the source; the source's own columns follow.
CORE_COLUMNS = ("id", "caption", "url", "source_id")
# ids per shard file: 400 files at 400M (each ~100-200 MB of LAION rows), one below a million
SHARD_ROWS = 1_000_000
SHARD_BATCH = 1 << 16  # rows per record batch of a shard


def store_rows(table: pa.Table, first_id: int) -> pa.Table:
    """A part's rows as the store keeps them: global ids first, then the core columns (null where
    the source has none), then the source's own."""
    n = table.num_rows
    table = table.drop_columns([c for c in ("id",) if c in table.column_names])
    table = table.add_column(0, "id", pa.array(np.arange(first_id, first_id + n, dtype=np.int64)))
    for col in ("caption", "url", "source_id"):
        if col not in table.column_names:
            table = table.append_column(col, pa.array([None] * n, pa.string()))
    ordered = list(CORE_COLUMNS) + [c for c in table.column_names if c not in CORE_COLUMNS]
    return table.select(ordered)


def _hashes(table: pa.Table) -> np.ndarray:
    return np.array([caption_hash(c or "") for c in table.column("caption").to_pylist()], dtype=np.int64)


def write_store_part(table: pa.Table, first_id: int, target: Path) -> np.ndarray:
    """Write one Parquet store part, the layout of memories built before the shards (tests and
    the bench make such memories with it); return its caption hashes."""
    table = store_rows(table, first_id)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, row_group_size=STORE_ROW_GROUP, compression="zstd")
    return _hashes(table)


def shard_ranges(count: int, shard_rows: int = SHARD_ROWS) -> list[tuple[int, int]]:
    """The id range [start, stop) of every shard of a store of `count` items."""
    return [(start, min(start + shard_rows, count)) for start in range(0, count, shard_rows)]


def write_store_shard(pieces: Sequence[pa.Table], first_id: int, target: Path) -> np.ndarray:
    """Write one store shard from the rows of its id range (`pieces`: slices of consecutive parts,
    in order, starting at `first_id`); return its caption hashes. A column that is null in one
    part and typed in another takes the type (`promote_options`)."""
    # one contiguous table written in batches of SHARD_BATCH rows: parts of a few rows would
    # otherwise make as many record batches, each a little metadata read when the shard opens
    table = store_rows(pa.concat_tables(pieces, promote_options="default"), first_id)
    try:
        table = table.combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowCapacityError):
        pass  # a column of over 2 GB of text (hostile rows): written in the parts' chunks as they are
    with atomic_path(target) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=SHARD_BATCH)
    return _hashes(table)


class CaptionStore:
    """What both layouts answer: rows by id, captions by id, the caption hashes, id ranges whole."""

    def __init__(self, count: int, hash_file: Path | None) -> None:
        self.count = count
        self.hashes = np.load(hash_file, mmap_mode="r") if hash_file is not None else None

    def __len__(self) -> int:
        return self.count

    def _checked(self, ids: Sequence[int]) -> np.ndarray:
        wanted = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= self.count):
            raise XMError(f"caption store: id out of range 0..{self.count - 1}")
        return wanted

    def fetch(self, ids: Sequence[int], columns: Sequence[str] | None = None) -> list[dict]:
        """Rows (dicts of `columns`, every column if None) for global ids, in the given order;
        ids out of range raise."""
        raise NotImplementedError

    def table(self, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
        """The rows of ids start..stop-1 in order, as one table (exports, `--add-encoder`)."""
        raise NotImplementedError

    def columns(self) -> list[str]:
        raise NotImplementedError

    def captions(self, ids: Sequence[int]) -> list[str]:
        return [r["caption"] for r in self.fetch(ids, columns=("caption",))]


class ShardStore(CaptionStore):
    """The store's Arrow IPC shards read by global id; a shard is mapped on first use and kept in
    `opened` (shared with the memory's other readers), so neither maps nor descriptors grow with
    the number of shards. Reading a mapped shard changes nothing: safe from several threads."""

    def __init__(self, files: Sequence[str | Path], count: int, shard_rows: int, hash_file: Path | None = None,
                 opened: OpenFiles | None = None) -> None:
        super().__init__(count, hash_file)
        self.files = [str(f) for f in files]
        self.shard_rows = shard_rows
        if len(self.files) != len(shard_ranges(count, shard_rows)):
            raise XMError(f"caption store: {len(self.files)} shard files for {count} ids of {shard_rows} a shard")
        self.opened = opened if opened is not None else OpenFiles()

    def _shard(self, s: int) -> pa.Table:
        return self.opened.get(("arrow", self.files[s]), lambda: self._open(s))

    def _open(self, s: int) -> pa.Table:
        start, stop = s * self.shard_rows, min((s + 1) * self.shard_rows, self.count)
        try:
            # zero-copy: the table's buffers point into the map, which closes with the last of them
            with pa.memory_map(self.files[s], "r") as source:
                table = pa.ipc.open_file(source).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise XMError(f"{self.files[s]}: unreadable caption store shard ({exc})") from exc
        if table.num_rows != stop - start:
            raise XMError(f"{self.files[s]}: {table.num_rows} rows, the manifest's count says {stop - start}")
        return table

    def fetch(self, ids: Sequence[int], columns: Sequence[str] | None = None) -> list[dict]:
        wanted = self._checked(ids)
        shard_of = wanted // self.shard_rows
        rows: list[dict | None] = [None] * len(wanted)
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            table = self._shard(int(s))
            names = list(columns) if columns else table.column_names
            missing = [c for c in names if c not in table.column_names]
            if missing:
                raise XMError(f"{self.files[int(s)]}: the caption store has no column {missing[0]!r}")
            cols = [(name, table.column(name)) for name in names]
            # cell by cell from the map: a few µs each, and no compute kernel (a process's first
            # `take` spends ~0.3 s setting Arrow's kernels up)
            for j, local in zip(sel.tolist(), (wanted[sel] - int(s) * self.shard_rows).tolist()):
                rows[j] = {name: col[local].as_py() for name, col in cols}
        return rows  # type: ignore[return-value]

    def table(self, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
        pieces = []
        for s in range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1 if stop > start else 0):
            lo = max(start, s * self.shard_rows) - s * self.shard_rows
            hi = min(stop, (s + 1) * self.shard_rows) - s * self.shard_rows
            shard = self._shard(s)
            pieces.append((shard.select(list(columns)) if columns else shard).slice(lo, hi - lo))
        if not pieces:
            return self._shard(0).schema.empty_table() if self.files else pa.table({"id": pa.array([], pa.int64())})
        return pa.concat_tables(pieces, promote_options="default").combine_chunks()

    def columns(self) -> list[str]:
        return self._shard(0).schema.names if self.files else list(CORE_COLUMNS)


class PartsStore(CaptionStore):
    """The Parquet store parts of memories built before the shards, read by global id. Part files
    are opened when a fetch first needs them and kept in `opened`; decoded row groups in an LRU
    of `cache_groups`. Not thread-safe (`LocalMemory` fetches under its lock)."""

    def __init__(self, files: Sequence[str | Path], rows: Sequence[int], hash_file: Path | None = None, cache_groups: int = 256,
                 opened: OpenFiles | None = None) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        super().__init__(int(self.offsets[-1]), hash_file)
        self.files = list(files)
        self.opened = opened if opened is not None else OpenFiles()
        self._cache: OrderedDict[tuple[int, int, tuple[str, ...] | None], pa.Table] = OrderedDict()
        self._cache_groups = cache_groups

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
        wanted = self._checked(ids)
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

    def table(self, start: int, stop: int, columns: Sequence[str] | None = None) -> pa.Table:
        first = int(np.searchsorted(self.offsets, start, side="right") - 1)
        pieces = []
        for p in range(first, len(self.files)):
            lo, hi = int(self.offsets[p]), int(self.offsets[p + 1])
            if lo >= stop:
                break
            whole = self._file(p).read(columns=list(columns) if columns else None)
            pieces.append(whole.slice(max(start, lo) - lo, min(stop, hi) - max(start, lo)))
        if not pieces:
            return pa.table({"id": pa.array([], pa.int64())})
        return pa.concat_tables(pieces, promote_options="default").combine_chunks()

    def columns(self) -> list[str]:
        return self._file(0).schema_arrow.names if self.files else list(CORE_COLUMNS)


def open_store(layout: Layout, manifest: Manifest, opened: OpenFiles | None = None) -> CaptionStore:
    """The memory's caption store in the layout its manifest records (no file opened yet)."""
    hashes = layout.caption_hash
    entry: StoreEntry | None = manifest.store
    if entry is None:
        parts = [p.name for p in manifest.parts]
        return PartsStore(layout.store_parts(parts), [p.rows for p in manifest.parts], hashes, opened=opened)
    assert entry.format == STORE_SHARDS  # StoreEntry.from_json refuses any other
    n = len(shard_ranges(manifest.count, entry.shard_rows))
    return ShardStore([layout.store_shard(i) for i in range(n)], manifest.count, entry.shard_rows, hashes, opened=opened)
