"""The inputs of docs/scale.md: what the IVF-PQ index autofaiss picks at 1M and 5M items costs
here, per step (driver training, adding per core, searching against nprobe, bytes per vector).

    OMP_NUM_THREADS=2 nice .venv/bin/python bench/bench_ivfpq_scale.py [--sizes 1000000,5000000]

Data: synthetic unit vectors (512-d) around 2000 random centres, generated chunk by chunk from
a seed per chunk (deterministic; at most one chunk in memory), rounded through float16 as the
stored embeddings are. Queries are perturbed items of the first chunk; exact top-k is kept
incrementally over the chunks as they are added, so each size has its own ground truth.

The key is `get_optimal_index_keys_v2(N, 512, --budget, memory-mappable)[0]` (autofaiss's
choice; OPQ256_768,IVF16384_HNSW32,PQ256x8 at 1M and 5M under 16G). One index is trained once
and filled to each size in turn (the key is the same for all sizes, checked).

Training is measured on `--train` points (fewer than autofaiss samples, to fit the time here) and
extrapolated to autofaiss's training-set size: OPQ and PQ training subsample to a fixed 65,536
points in faiss, so only the IVF k-means (with its HNSW assignment, as autofaiss builds it) scales
with the number of training points; the JSON has both the measured parts and the extrapolation.
Search parameters are `xm.indexes.tuning.param_string` (nprobe, quantizer efSearch = 2 x nprobe),
the same strings a build stores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 200_000
N_CENTRES = 2000


def centres(dim: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N_CENTRES, dim)).astype(np.float32)


def chunk(c: int, size: int, cen: np.ndarray) -> np.ndarray:
    """Chunk `c` of the stream: the same rows whatever else was generated before."""
    rng = np.random.default_rng(1000 + c)
    x = cen[rng.integers(0, len(cen), size)] + 0.6 * rng.standard_normal((size, cen.shape[1]), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)


def merge_exact(best_s, best_i, q, x, offset, k):
    """Running exact top-k (inner product) of queries over the rows seen so far."""
    s = q @ x.T
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
    cand_i = np.concatenate([best_i, top + offset], axis=1)
    order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,5000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--budget", default="16G", help="autofaiss max_index_memory_usage the key is chosen under")
    ap.add_argument("--current-memory", default="16G", help="autofaiss current_memory_available (sets its training size)")
    ap.add_argument("--train", type=int, default=131_072, help="training points actually used here")
    ap.add_argument("--opq-iters", type=int, default=2,
                    help="OPQ iterations actually run (faiss runs 50); the time is scaled to 50")
    ap.add_argument("--queries", type=int, default=128)
    ap.add_argument("--batch1-queries", type=int, default=32)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--nprobe", default="1,2,4,8,16,32,64,128,256,512,1024")
    ap.add_argument("--slow-ms", type=float, default=250.0, help="stop raising nprobe past this ms/query at batch 1")
    ap.add_argument("--rate-rows", type=int, default=100_000, help="rows added to measure the 1- and 2-thread rates")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "ivfpq_scale.json"))
    args = ap.parse_args()

    import faiss
    from autofaiss.external.optimize import get_optimal_index_keys_v2, get_optimal_train_size
    from autofaiss.indices.index_factory import index_factory

    from xm.indexes.tuning import apply_params, ivf_of, param_string

    sizes = sorted(int(s) for s in args.sizes.split(","))
    dim, k = args.dim, args.k
    keys = {n: get_optimal_index_keys_v2(n, dim, args.budget, should_be_memory_mappable=True)[0] for n in sizes}
    if len(set(keys.values())) != 1:
        raise SystemExit(f"autofaiss picks different keys for these sizes ({keys}); run them separately")
    key = keys[sizes[0]]
    cores = os.cpu_count()
    out: dict = {
        "machine": f"{platform.machine()}, {cores} cores shared with other work, no GPU, faiss {faiss.__version__}; "
                   f"load average {os.getloadavg()[0]:.2f} at start",
        "key": key, "budget": args.budget, "dim": dim, "k": k, "sizes": {},
    }
    print(f"== {out['machine']}\n== key {key} (autofaiss, {args.budget}, memory-mappable)", flush=True)
    faiss.omp_set_num_threads(min(2, cores or 1))
    cen = centres(dim)

    # --- training on the driver ---
    first = chunk(0, CHUNK, cen)
    rng = np.random.default_rng(7)
    qsrc = first[rng.choice(CHUNK, args.queries, replace=False)]
    q = qsrc + 0.05 * rng.standard_normal(qsrc.shape, dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q = np.ascontiguousarray(q, dtype=np.float32)
    parts, need, c = [], args.train, 0
    while need > 0:
        x = first if c == 0 else chunk(c, CHUNK, cen)
        parts.append(x[:need])
        need -= len(parts[-1])
        c += 1
    train = np.concatenate(parts)
    del parts
    index = index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    ivf = ivf_of(index)
    t0 = time.perf_counter()
    xt = train
    opq_full_iters = 0
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):  # OPQ's cost is linear in its iterations: run a few, scale
                opq_full_iters, vt.niter = int(vt.niter), min(int(vt.niter), args.opq_iters)
            vt.train(xt)
            xt = vt.apply(xt)
    t_opq = time.perf_counter() - t0
    if opq_full_iters:
        t_opq *= opq_full_iters / min(opq_full_iters, args.opq_iters)
    t0 = time.perf_counter()
    ivf.train_q1(len(xt), faiss.swig_ptr(np.ascontiguousarray(xt)), False, ivf.metric_type)
    t_kmeans = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf.train(np.ascontiguousarray(xt))  # the quantizer is trained: this trains the PQ codebooks only
    t_pq = time.perf_counter() - t0
    index.is_trained = True
    del train, xt
    niter = int(ivf.cp.niter)
    training = {"points_used": args.train, "kmeans_iterations": niter, "opq_iterations_run": args.opq_iters,
                "opq_iterations_faiss": opq_full_iters, "opq_s_scaled_to_faiss_iterations": round(t_opq, 1),
                "kmeans_s": round(t_kmeans, 1), "pq_s": round(t_pq, 1),
                "kmeans_s_per_point_iteration": t_kmeans / (args.train * niter), "threads": faiss.omp_get_max_threads()}
    out["training"] = training
    print(f"== training on {args.train} points: OPQ {t_opq:.0f}s (scaled), k-means {t_kmeans:.0f}s ({niter} it), PQ {t_pq:.0f}s", flush=True)

    # --- adding, size by size ---
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    added, c = 0, 0
    add_s = {1: 0.0, 2: 0.0}
    add_n = {1: 0, 2: 0}
    for n in sizes:
        while added < n:
            x = first if c == 0 else chunk(c, CHUNK, cen)
            x = x[: n - added]
            best_s, best_i = merge_exact(best_s, best_i, q, x, added, k)
            # the first --rate-rows on one thread (the per-core rate), every later row on two
            m1 = max(0, min(len(x), args.rate_rows - added))
            for piece, threads in ((x[:m1], 1), (x[m1:], 2)):
                if len(piece):
                    faiss.omp_set_num_threads(threads)
                    t0 = time.perf_counter()
                    index.add(piece)
                    add_s[threads] += time.perf_counter() - t0
                    add_n[threads] += len(piece)
            added += len(x)
            c += 1
        faiss.omp_set_num_threads(2)
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "i.index"
            faiss.write_index(index, str(f))
            nbytes = f.stat().st_size
        train_af = get_optimal_train_size(n, key, args.current_memory, dim)
        train_est = t_opq + t_pq + training["kmeans_s_per_point_iteration"] * train_af * niter
        row: dict = {
            "vectors": n,
            "autofaiss_train_points": train_af,
            "train_s_estimated_at_autofaiss_size": round(train_est, 1),
            "add_vectors_per_s_1_thread": round(add_n[1] / add_s[1]) if add_s[1] else None,
            "add_vectors_per_s_2_threads": round(add_n[2] / add_s[2]) if add_s[2] else None,
            "index_bytes": nbytes, "bytes_per_vector": round(nbytes / n, 2),
            "search": [],
        }
        print(f"== N={n}: train est {train_est:.0f}s at {train_af} points; add {row['add_vectors_per_s_1_thread']}/s "
              f"(1 thread), {row['add_vectors_per_s_2_threads']}/s (2); {row['bytes_per_vector']} B/vector", flush=True)
        print(f"{'nprobe':>7} {'ms/q b1':>9} {'ms/q b64':>9} {'R@' + str(k):>8} {'R@10':>6}", flush=True)
        exact_i = best_i
        for nprobe in [int(v) for v in args.nprobe.split(",") if int(v) <= ivf.nlist]:
            params = param_string(index, nprobe)
            apply_params(index, params)
            t0 = time.perf_counter()
            ids = np.concatenate([index.search(q[lo : lo + 64], k)[1] for lo in range(0, len(q), 64)])
            ms64 = (time.perf_counter() - t0) / len(q) * 1e3
            t0 = time.perf_counter()
            for row_q in q[: args.batch1_queries]:
                index.search(row_q[None], k)
            ms1 = (time.perf_counter() - t0) / args.batch1_queries * 1e3
            rec = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_i)]))
            rec10 = float(np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(ids, exact_i)]))
            pt = {"nprobe": nprobe, "params": params, "ms_per_query_batch1": round(ms1, 3),
                  "ms_per_query_batch64": round(ms64, 3), f"recall_at_{k}": round(rec, 4), "recall_at_10": round(rec10, 4)}
            row["search"].append(pt)
            print(f"{nprobe:>7} {ms1:>9.2f} {ms64:>9.2f} {rec:>8.3f} {rec10:>6.3f}", flush=True)
            if ms1 > args.slow_ms:
                break
        out["sizes"][str(n)] = row
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))  # after each size: a slow 5M keeps the 1M numbers
    print(f"== wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
