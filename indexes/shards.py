"""FAISS index shards with global ids, and a search that merges them as one index would.

An index trained once is split into contiguous id ranges. IVF shards keep the
trained quantizer and codebooks and their stored ids are already global, so the
union of the shards' candidates (same probed lists, same codes, same distances) is
exactly what the unsplit index scores; the merge keeps the top k by similarity.
Flat/HNSW shards store local ids and carry an `id_offset`.

Shards are searched in parallel threads: faiss releases the GIL during a search, so shards
on one machine overlap; each shard's answer is the same as searched alone, and the merge
does not depend on which finished first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xm.errors import XMError
from xm.indexes.layout import atomic_path


@dataclass
class ShardInfo:
    file: str
    ntotal: int
    id_offset: int
    id_range: tuple[int, int]


def _is_ivf(index: Any) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    n_shards = max(1, min(n_shards, n)) if n else 1
    edges = np.linspace(0, n, n_shards + 1).round().astype(np.int64)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(n_shards)]


def write_shards(index: Any, n_shards: int, path_for: Callable[[int], str | Path]) -> list[ShardInfo]:
    """Split a populated index into `n_shards` id ranges, each written atomically."""
    import faiss

    n = index.ntotal
    infos = []
    ivf = _is_ivf(index)
    for i, (lo, hi) in enumerate(shard_bounds(n, n_shards)):
        if ivf:
            shard = faiss.clone_index(index)
            shard.remove_ids(faiss.IDSelectorNot(faiss.IDSelectorRange(lo, hi)))
            offset = 0
        else:
            shard = faiss.clone_index(index)
            shard.reset()
            if hi > lo:
                shard.add(index.reconstruct_n(lo, hi - lo))
            offset = lo
        if shard.ntotal != hi - lo:
            raise RuntimeError(f"shard {i}: expected {hi - lo} vectors, got {shard.ntotal}")
        target = Path(path_for(i))
        with atomic_path(target) as tmp:
            faiss.write_index(shard, str(tmp))
        infos.append(ShardInfo(file=target.name, ntotal=int(shard.ntotal), id_offset=offset, id_range=(lo, hi)))
        del shard
    return infos


def read_shard(path: Path) -> Any:
    import faiss

    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except (RuntimeError, MemoryError):
        try:
            return faiss.read_index(str(path))
        except (RuntimeError, MemoryError) as exc:
            raise XMError(f"{path}: damaged index shard ({str(exc).splitlines()[0][:120]})") from exc


# Checking every stored id is O(n); above this many per shard only the list layout is checked
# (sizes and offsets against the file), and ids are checked on each search's results instead.
ID_CHECK_LIMIT = 5_000_000


def validate_shard(index: Any, path: Path, id_range: tuple[int, int] | None = None) -> None:
    """Refuse, in one line, a shard whose inverted lists do not fit its own file (a crafted or
    damaged shard: faiss reads memory-mapped lists without bound checks) or whose stored ids
    fall outside its id range. Cheap: O(number of lists), plus the ids up to ID_CHECK_LIMIT."""
    import faiss

    if not _is_ivf(index):
        return
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    entry = 8 + lists.code_size  # an id and a code per vector
    total = 0
    for i in range(lists.nlist):
        n = lists.list_size(i)
        if isinstance(lists, faiss.OnDiskInvertedLists):
            li = lists.lists.at(i)
            if li.size > li.capacity or li.offset + li.capacity * entry > lists.totsize:
                raise XMError(f"{path}: inverted list {i} ({li.size} vectors at byte {li.offset}) lies outside the file; "
                              "the shard is damaged")
        if n < 0 or n > index.ntotal:
            raise XMError(f"{path}: inverted list {i} claims {n} vectors in a shard of {index.ntotal}; the shard is damaged")
        total += n
    if total != index.ntotal:
        raise XMError(f"{path}: inverted lists hold {total} vectors, the shard says {index.ntotal}; the shard is damaged")
    if id_range is not None and index.ntotal <= ID_CHECK_LIMIT:
        lo, hi = id_range
        for i in range(lists.nlist):
            n = lists.list_size(i)
            if n:
                ids = np.asarray(faiss.rev_swig_ptr(lists.get_ids(i), n))
                if ids.min() < lo or ids.max() >= hi:
                    raise XMError(f"{path}: stores ids outside its range {lo}..{hi - 1}; the shard is damaged")


def ivf_id_span(index: Any, path: Path) -> tuple[int, int]:
    """(lowest, highest + 1) of the ids an IVF shard stores, refusing a shard whose ids do not
    fill that range exactly once per vector by count (a shard of a split by id range must).
    Reads every stored id once (8 bytes a vector), list by list."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    lo, hi = np.iinfo(np.int64).max, -1
    for i in range(lists.nlist):
        n = lists.list_size(i)
        if n:
            ids = np.asarray(faiss.rev_swig_ptr(lists.get_ids(i), n))
            lo, hi = min(lo, int(ids.min())), max(hi, int(ids.max()))
    if hi < 0:
        raise XMError(f"{path}: an empty shard")
    if hi + 1 - lo != index.ntotal:
        raise XMError(f"{path}: stores {index.ntotal} vectors with ids {lo}..{hi}; not one contiguous id range")
    return lo, hi + 1


def set_params(index: Any, params: str) -> None:
    import faiss

    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


class ShardedIndex:
    """Search over all shards of one (encoder, modality) index; results carry global ids."""

    def __init__(self, files: Sequence[Path], offsets: Sequence[int], params: str = "",
                 id_ranges: Sequence[tuple[int, int]] | None = None) -> None:
        self.shards = [read_shard(f) for f in files]
        for i, (f, shard) in enumerate(zip(files, self.shards)):
            validate_shard(shard, Path(f), id_ranges[i] if id_ranges else None)
        self.offsets = list(offsets)
        self.params = params
        for s in self.shards:
            set_params(s, params)
        self.ntotal = sum(s.ntotal for s in self.shards)
        self.dim = self.shards[0].d if self.shards else 0
        # one thread per shard, up to the cores: more would only queue behind faiss's own threads
        self._pool = ThreadPoolExecutor(max(1, min(len(self.shards), os.cpu_count() or 1)), thread_name_prefix="xm-shard") \
            if len(self.shards) > 1 else None

    def _search_one(self, shard: Any, offset: int, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        d, i = shard.search(q, k)
        return np.where(i < 0, -np.inf, d).astype(np.float32), np.where(i < 0, -1, i + offset)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def search(self, queries: np.ndarray, k: int, parallel: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, global ids), each (n, k); missing results are id -1, similarity -inf.
        `parallel=False` searches the shards one after another (the same answer; for tests)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if parallel and self._pool is not None:
            futures = [self._pool.submit(self._search_one, s, o, q, k) for s, o in zip(self.shards, self.offsets)]
            results = [f.result() for f in futures]  # in shard order, whatever order they finished in
        else:
            results = [self._search_one(s, o, q, k) for s, o in zip(self.shards, self.offsets)]
        all_d, all_i = [r[0] for r in results], [r[1] for r in results]
        d = np.concatenate(all_d, axis=1)
        ids = np.concatenate(all_i, axis=1)
        if len(self.shards) == 1:
            return d, ids
        return top_k(d, ids, k)


def top_k(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (similarity descending, ties by id ascending, missing ids -1 last),
    as one index scanning ids in order would rank them."""
    keep = min(k, sims.shape[1])
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -sims), axis=1)[:, :keep]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
