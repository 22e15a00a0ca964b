"""Choosing an IVF index's search parameters once, for all of its shards.

autofaiss 2.18 tunes each index it writes on `reconstruct_n(0, ...)` of that index: with
`nb_indices_to_keep > 1` every shard but the first holds none of ids 0.., so it is tuned on
uninitialised memory (NaN or garbage, reproduced here), and for `IVF..._HNSW32` keys the HNSW
quantizer search on such queries was reported never to return (not reproduced here; every step
below is time-bounded regardless). Here the parameters are chosen once, on a view of all shards
together (`stacked_view`, or the unsplit index), with real query vectors (a sample of the
embeddings), under a time bound, by what the index returns only: autofaiss's coverage rule
(99% of k ids returned, or 95% of the best coverage reachable), then the smallest nprobe whose
recall of the largest nprobe's top k reaches RECALL_TARGET on held-out queries. Wall-clock
timings no longer choose (they made two builds of the same data search differently, recall@10
0.99 against 0.90); the chosen setting's query time is measured and reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xm.errors import XMError

# autofaiss's own cap on nprobe; beyond it the IVF scans most of the index anyway
NPROBE_CAP = 6144
# an HNSW quantizer is searched with efSearch = 2 x nprobe (autofaiss's choice for its
# OPQ..,IVF.._HNSW keys), bounded so one quantizer search stays cheap; faiss still returns
# nprobe lists when nprobe exceeds it (it searches with max(efSearch, k))
EF_SEARCH_MIN, EF_SEARCH_CAP = 16, 4096
COVERAGE_TARGET = 0.99  # autofaiss: min_nearest_neighbors_to_retrieve at 99% ...
COVERAGE_FALLBACK = 0.95  # ... or 95% of the best reachable when 99% is out of reach
COVERAGE_QUERIES = 100  # autofaiss measures coverage on 100 queries
# the chosen nprobe finds this share of the top k that the ladder's largest finds, measured on
# RECALL_QUERIES queries held out from the coverage ones (a deterministic choice: see tune_ivf)
RECALL_TARGET = 0.95
RECALL_QUERIES = 200
DEFAULT_DEADLINE_S = 120.0


@dataclass
class Tuned:
    params: str
    nprobe: int
    coverage: float
    ms_per_query: float
    target_coverage: float
    evaluated: list[dict[str, float]] = field(default_factory=list)
    stopped_by_deadline: bool = False
    recall: float = 1.0  # of the top k found at the ladder's largest nprobe
    target_recall: float = 1.0
    over_budget: bool = False  # its measured query time exceeds --max-query-time-ms (reported, not chosen on)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ivf_of(index: Any) -> Any:
    """The IndexIVF inside `index` (through OPQ/pre-transforms), or None for a non-IVF index."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def has_hnsw_quantizer(index: Any) -> bool:
    import faiss

    ivf = ivf_of(index)
    return ivf is not None and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)


def param_string(index: Any, nprobe: int) -> str:
    """The one search-parameter string for `nprobe` lists (faiss ParameterSpace syntax)."""
    if has_hnsw_quantizer(index):
        ef = min(EF_SEARCH_CAP, max(EF_SEARCH_MIN, 2 * nprobe))
        return f"nprobe={nprobe},quantizer_efSearch={ef}"
    return f"nprobe={nprobe}"


def apply_params(index: Any, params: str) -> None:
    import faiss

    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def nprobe_ladder(nlist: int) -> list[int]:
    """Candidate nprobe values, about 1.5x apart (1, 2, 3, 4, 6, 8, 12, 16, ...) up to the cap:
    a binary search over them takes ~2 log2(nlist) evaluations, each bounded."""
    top = max(1, min(nlist, NPROBE_CAP))
    values, p = {top}, 1
    while p < top:
        values |= {v for v in (p, p + p // 2) if v < top}
        p *= 2
    return sorted(values)


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the first row) of an open .npy file."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype, f.tell()


def npy_shape(location: str | Path) -> tuple[int, ...]:
    """The shape of the .npy at `location` (a path or an fsspec URL), from its header alone."""
    import fsspec

    with fsspec.open(str(location), "rb") as fh:
        return tuple(int(n) for n in _npy_header(fh)[0])


def sample_queries(files: Sequence[str | Path], n: int, seed: int = 0) -> np.ndarray:
    """`n` rows drawn evenly over embedding parts (.npy; local paths or fsspec URLs, read by row
    offset, so a part in a bucket is not downloaded whole), float32, finite only."""
    import fsspec

    heads = []
    for f in files:
        with fsspec.open(str(f), "rb") as fh:
            heads.append(_npy_header(fh))
    counts = [int(shape[0]) for shape, _, _ in heads]
    total = sum(counts)
    if not total:
        raise XMError(f"{str(files[0]).rsplit('/', 1)[0] if files else '?'}: no embeddings to tune the index on")
    ids = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    out, start = [], 0
    for f, c, (shape, dtype, offset) in zip(files, counts, heads):
        mine = ids[(ids >= start) & (ids < start + c)] - start
        if len(mine):
            row = int(np.prod(shape[1:])) * dtype.itemsize
            with fsspec.open(str(f), "rb") as fh:
                rows = []
                for i in mine:
                    fh.seek(offset + int(i) * row)
                    rows.append(np.frombuffer(fh.read(row), dtype=dtype))
            out.append(np.asarray(np.stack(rows), dtype=np.float32).reshape(len(mine), *shape[1:]))
        start += c
    q = np.concatenate(out)
    q = q[np.isfinite(q).all(axis=1)]  # a NaN query is what sends an HNSW search into a loop
    if not len(q):
        raise XMError(f"{str(files[0]).rsplit('/', 1)[0]}: every sampled embedding is NaN or infinite")
    return np.ascontiguousarray(q)


def coverage(index: Any, queries: np.ndarray, k: int) -> float:
    """Mean fraction of the k requested ids a search returns (the rest are -1)."""
    _, ids = index.search(queries, k)
    return float(1 - np.mean(ids < 0))


def ms_per_query(index: Any, queries: np.ndarray, k: int, budget_s: float = 1.0) -> float:
    """Milliseconds per query searched one at a time (autofaiss's measure), stopping after
    `budget_s` so a slow setting costs at most about that much."""
    t0 = time.perf_counter()
    n = 0
    for row in queries:
        index.search(row[None], k)
        n += 1
        if time.perf_counter() - t0 > budget_s:
            break
    return (time.perf_counter() - t0) / n * 1e3


def recall_at_k(found: np.ndarray, reference: np.ndarray) -> float:
    """Mean fraction of each row's reference ids (ignoring -1) that `found` also returned."""
    hits, total = 0, 0
    for got, ref in zip(found, reference):
        want = ref[ref >= 0]
        total += len(want)
        hits += len(np.intersect1d(got[got >= 0], want, assume_unique=False))
    return hits / total if total else 1.0


def tune_ivf(index: Any, queries: np.ndarray, k: int, max_ms: float, *, deadline_s: float = DEFAULT_DEADLINE_S,
             speed_k: int = 40) -> Tuned:
    """Search parameters for an IVF index (or a stacked view of its shards), chosen by what
    the index returns, never by how fast it ran: the smallest nprobe that (1) reaches the
    coverage target for `k` (autofaiss's rule) and (2) finds RECALL_TARGET of the top k that
    the ladder's largest nprobe finds, on queries held out from the coverage ones. The same
    data and queries give the same choice whatever the machine's load (two builds of one
    memory searched differently when nprobe was raised while under a measured time budget).
    The query time of the choice is measured and reported (`ms_per_query`, `over_budget`
    against `max_ms`), not used to choose. Every evaluation is bounded; past `deadline_s`
    the search stops and keeps the smallest setting known to meet both (reported)."""
    ivf = ivf_of(index)
    if ivf is None:
        return Tuned("", 0, 1.0, 0.0, 1.0)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    q = q[np.isfinite(q).all(axis=1)]
    if not len(q):
        raise XMError("tuning: no finite query vectors")
    k = max(1, min(k, int(index.ntotal)))
    ladder = nprobe_ladder(int(ivf.nlist))
    cov_q = q[:COVERAGE_QUERIES]
    held_out = q[COVERAGE_QUERIES : COVERAGE_QUERIES + RECALL_QUERIES]
    rec_q = held_out if len(held_out) else cov_q
    t_end = time.perf_counter() + deadline_s
    evaluated: list[dict[str, float]] = []
    cov_cache: dict[int, float] = {}
    rec_cache: dict[int, float] = {}
    late = False

    def cov(rank: int) -> float:
        if rank not in cov_cache:
            apply_params(index, param_string(index, ladder[rank]))
            cov_cache[rank] = coverage(index, cov_q, k)
            evaluated.append({"nprobe": ladder[rank], "coverage": cov_cache[rank]})
        return cov_cache[rank]

    def smallest(lo: int, hi: int, ok: Callable[[int], bool]) -> tuple[int, bool]:
        """The smallest rank in [lo, hi] for which `ok` holds (it holds at hi), or hi if late."""
        while lo < hi:
            if time.perf_counter() > t_end:
                return hi, True
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid + 1
        return hi, False

    top = len(ladder) - 1
    best_cov = cov(top)
    target = COVERAGE_TARGET if best_cov >= COVERAGE_TARGET else COVERAGE_FALLBACK * best_cov
    min_rank, late = smallest(0, top, lambda r: cov(r) >= target)  # the top meets the target by construction

    apply_params(index, param_string(index, ladder[top]))
    _, reference = index.search(rec_q, k)

    def rec(rank: int) -> float:
        if rank not in rec_cache:
            apply_params(index, param_string(index, ladder[rank]))
            _, ids = index.search(rec_q, k)
            rec_cache[rank] = recall_at_k(ids, reference)
            evaluated.append({"nprobe": ladder[rank], "recall": rec_cache[rank]})
        return rec_cache[rank]

    chosen = min_rank
    if not late:
        chosen, late = smallest(min_rank, top, lambda r: rec(r) >= RECALL_TARGET)
    params = param_string(index, ladder[chosen])
    apply_params(index, params)
    speed = ms_per_query(index, q, min(speed_k, k), budget_s=min(1.0, 15 * max_ms / 1e3))
    evaluated.append({"nprobe": ladder[chosen], "ms_per_query": speed})
    return Tuned(params=params, nprobe=ladder[chosen], coverage=cov_cache.get(chosen, float("nan")),
                 ms_per_query=speed, target_coverage=target, evaluated=evaluated, stopped_by_deadline=late,
                 recall=rec_cache.get(chosen, 1.0 if chosen == top else float("nan")), target_recall=RECALL_TARGET,
                 over_budget=speed > max_ms)


def stacked_view(files: Sequence[Path]) -> Any:
    """One searchable index over IVF shards that share a trained quantizer: a memory-mapped
    copy of the first shard whose inverted lists are replaced by a `HStackInvertedLists` over
    every shard's (memory-mapped) lists. Its ids are the shards' global ids; nothing is copied."""
    import faiss

    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    shards = [faiss.read_index(str(f), flags) for f in files]
    view = faiss.read_index(str(files[0]), flags)
    vivf = ivf_of(view)
    if vivf is None:
        raise XMError(f"{files[0]}: not an IVF index; only IVF shards can be stacked")
    lists = faiss.InvertedListsPtrVector()
    for f, s in zip(files, shards):
        sivf = ivf_of(s)
        if sivf is None or sivf.nlist != vivf.nlist or sivf.code_size != vivf.code_size:
            raise XMError(f"{f}: its inverted lists do not match {files[0]}'s; not shards of one trained index")
        lists.push_back(sivf.invlists)
    stacked = faiss.HStackInvertedLists(lists.size(), lists.data())
    vivf.replace_invlists(stacked, False)
    total = sum(int(s.ntotal) for s in shards)
    vivf.ntotal = total
    view.ntotal = total  # an IndexPreTransform (OPQ) keeps its own count
    view.referenced_objects = [shards, lists, stacked]  # the view reads their memory
    return view
