"""kNN recall@128 against exact search, per ms/query: nprobe x refine (exact re-scoring of the
top k*F IVF-PQ candidates with the float16 embeddings on disk, as `LocalMemory.search` does).

    .venv/bin/python bench/bench_knn.py [--vectors 1000000] [--key IVF4096,PQ64] [--json]

Data: bench_build.py's synthetic clustered unit vectors (2000 centres, 512-d), written as
float16 parts and memory-mapped; queries are perturbed memory items. The index is built
directly with faiss (`--key`, trained on `--train` vectors) instead of through autofaiss:
autofaiss's 1M build takes ~25 min here; its key under 200M (bench_build) is an IVF-PQ too,
and what refine adds does not depend on the coarse quantizer. Timing: the queries searched
as one batch (as bench_build measures), per query; each point best of `--repeats`.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--key", default="IVF4096,PQ64",
                    help="faiss index_factory key (inner product); autofaiss chose OPQ128_640,IVF16384_HNSW32,PQ128x8 at 1M/200M")
    ap.add_argument("--train", type=int, default=100_000, help="training vectors")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--nprobe", default="16,32,64,128,256")
    ap.add_argument("--refine", default="0,2,4,8", help="k factors re-scored exactly (0: none)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import faiss

    from xm.indexes.embeddings import EmbeddingMatrix
    from xm.memories.local import rescore

    def say(title: str, data) -> None:
        if not args.json:
            print(f"== {title}\n{json.dumps(data)}", flush=True)

    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}, "
                            f"{faiss.omp_get_max_threads()} threads, load average {os.getloadavg()[0]:.2f} at start"}
    say("machine", out)
    n, dim, k = args.vectors, args.dim, args.k
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((2000, dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        files, data = [], np.empty((n, dim), np.float32)
        for p, lo in enumerate(range(0, n, 250_000)):
            m = min(250_000, n - lo)
            x = centers[rng.integers(0, len(centers), m)] + 0.6 * rng.standard_normal((m, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            f = Path(tmp) / f"img_emb_{p:05d}.npy"
            np.save(f, x.astype(np.float16))
            files.append(f)
            data[lo : lo + m] = x.astype(np.float16).astype(np.float32)
        q = data[rng.choice(n, args.queries, replace=False)] + 0.05 * rng.standard_normal((args.queries, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        t = time.perf_counter()
        exact = np.empty((len(q), k), np.int64)
        for lo in range(0, len(q), 50):
            s = q[lo : lo + 50] @ data.T
            part = np.argpartition(-s, k, axis=1)[:, :k]
            exact[lo : lo + 50] = part
        out["exact_s"] = time.perf_counter() - t
        t = time.perf_counter()
        index = faiss.index_factory(dim, args.key, faiss.METRIC_INNER_PRODUCT)
        index.train(data[rng.choice(n, min(args.train, n), replace=False)])
        index.add(data)
        out["build_s"] = time.perf_counter() - t
        out |= {"vectors": n, "dim": dim, "key": args.key, "k": k, "queries": len(q)}
        del data
        say("setup", {k2: v for k2, v in out.items() if k2 != "machine"})
        matrix = EmbeddingMatrix(files)
        ivf = faiss.extract_index_ivf(index)
        curve = []
        for nprobe in [int(v) for v in args.nprobe.split(",")]:
            ivf.nprobe = nprobe
            if "HNSW" in args.key:  # an HNSW coarse quantizer must look at least as far as nprobe lists
                faiss.ParameterSpace().set_index_parameters(index, f"quantizer_efSearch={2 * nprobe}")
            for factor in [int(v) for v in args.refine.split(",")]:
                best = float("inf")
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    _, ids = index.search(q, k * max(1, factor))
                    if factor > 1:
                        _, ids = rescore(q, ids, matrix, k)
                    best = min(best, time.perf_counter() - t)
                recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact)]))
                row = {"nprobe": nprobe, "refine_k_factor": factor, "recall_at_128": round(recall, 4),
                       "ms_per_query": round(best / len(q) * 1e3, 3)}
                curve.append(row)
                say("point", row)
        out["curve"] = curve
        ok = [r for r in curve if r["recall_at_128"] >= 0.95 and r["ms_per_query"] <= 10]
        out["fastest_meeting_0.95_within_10ms"] = min(ok, key=lambda r: r["ms_per_query"]) if ok else None
        say("chosen", out["fastest_meeting_0.95_within_10ms"])
    if args.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
