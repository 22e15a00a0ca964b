"""RECO figures for docs/reco.md.

    # training speed of the fusion step (synthetic embeddings, batch 4096, k 10)
    python bench/bench_reco.py speed --dims 512,768 --steps 3 --threads 1
    # neighbour tables over a synthetic memory (flat inner-product search)
    python bench/bench_reco.py tables --items 100000 --dim 512 --threads 1
    # EuroSAT image embeddings, once (resumable; ~10 images/s/core for ViT-B-32 on CPU)
    python bench/bench_reco.py embed --encoder ViT-B-32:random --out /tmp/xm-reco-bench
    # end to end on EuroSAT: memories of training images captioned with class prompts,
    # trained with `xm train reco`, scored on the test split
    python bench/bench_reco.py e2e --emb /tmp/xm-reco-bench/ViT-B-32_random --sizes 1000,4000,10000 --epochs 10 --batch-size 128 --lr 1e-3 --work /tmp/xm-reco-e2e

A memory captioned with the dataset's own training labels is a labelled nearest-neighbour
setting, not zero-shot: these figures measure whether the fusion learns to use what it
retrieves, not zero-shot transfer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ------------------------------------------------------------------------ speed

def speed(a: argparse.Namespace) -> None:
    import torch

    from xm.training.reco import _optimizer, build_model, peak_rss_mb, reco_loss

    _threads(a.threads)
    f = torch.nn.functional.normalize
    for d in [int(x) for x in a.dims.split(",")]:
        torch.manual_seed(0)
        model = build_model(d)
        opt = _optimizer(model, 1e-3, 1e-5)
        b, k = a.batch, a.k
        v, t = f(torch.randn(b, d), dim=-1), f(torch.randn(b, d), dim=-1)
        vn, tn = f(torch.randn(b, k, d), dim=-1), f(torch.randn(b, k, d), dim=-1)
        valid = torch.ones(b, k, dtype=torch.bool)
        times = []
        for i in range(a.steps + 1):
            t0 = time.perf_counter()
            loss, _ = reco_loss(model, v, t, vn, valid, tn, valid)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
        print(json.dumps({"bench": "speed", "dim": d, "params": model.parameter_count(), "batch": b, "k": k,
                          "threads": a.threads, "s_per_step": float(np.median(times)),
                          "pairs_per_s": b / float(np.median(times)), "peak_rss_mb": peak_rss_mb()}), flush=True)


# ------------------------------------------------------------------------ tables

class _Matrix:
    def __init__(self, x: np.ndarray) -> None:
        self.x, self.dim = x, x.shape[1]

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(ids)].astype(np.float32)


class SyntheticMemory:
    """The part of a memory that the neighbour tables use, over generated embeddings
    (clustered, so that neighbours are meaningful), with flat inner-product search."""

    def __init__(self, n: int, d: int, seed: int = 0) -> None:
        import faiss

        rng = np.random.default_rng(seed)
        centres = rng.normal(size=(max(1, n // 50), d)).astype(np.float32)
        lab = rng.integers(0, len(centres), n)

        def emb(scale: float) -> np.ndarray:
            x = centres[lab] + scale * rng.normal(size=(n, d)).astype(np.float32)
            return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

        self.m = {"image": _Matrix(emb(1.0)), "text": _Matrix(emb(1.5))}
        self.idx = {}
        for mod, mat in self.m.items():
            ix = faiss.IndexFlatIP(d)
            ix.add(mat.x.astype(np.float32))
            self.idx[mod] = ix
        self.count, self.id, self.root = n, f"synthetic-{n}-{d}", Path("/synthetic")
        self.caption_hashes = np.arange(n, dtype=np.int64)

    def embeddings(self, spec: str, modality: str) -> _Matrix:
        return self.m[modality]

    def search(self, modality: str, q: np.ndarray, k: int, encoder: str | None = None):
        return self.idx[modality].search(np.ascontiguousarray(q, np.float32), k)


def tables(a: argparse.Namespace) -> None:
    import faiss

    from xm.training.reco import NeighbourRule, build_tables, peak_rss_mb

    _threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    mem = SyntheticMemory(a.items, a.dim)
    out = Path(a.work) / f"tables-{a.items}-{a.dim}"
    t0 = time.perf_counter()
    build_tables(mem, mem, "synthetic", a.k, NeighbourRule(a.dup_threshold), out)
    secs = time.perf_counter() - t0
    meta = json.loads((out / "neighbours.json").read_text())
    print(json.dumps({"bench": "tables", "items": a.items, "dim": a.dim, "k": a.k, "threads": a.threads, "index": "Flat IP",
                      "seconds": secs, "seconds_by_modality": meta["seconds"],
                      "seconds_per_100k": secs * 100_000 / a.items, "peak_rss_mb": peak_rss_mb()}), flush=True)


# ------------------------------------------------------------------------ embed

def embed(a: argparse.Namespace) -> None:
    """EuroSAT splits' image embeddings under one encoder (float16), once, resumable in chunks:
    the one pass that decodes images; `e2e` reads only these."""
    import pandas as pd
    from PIL import Image

    from xm.encoders import load_encoder

    _threads(a.threads)
    enc = load_encoder(a.encoder)
    out = Path(a.out) / enc.spec.slug
    out.mkdir(parents=True, exist_ok=True)
    for split in a.splits.split(","):
        df = pd.read_csv(Path(a.data) / f"{split}.csv")
        files = df.Filename.tolist()
        chunks = []
        for c, lo in enumerate(range(0, len(files), a.chunk)):
            f = out / f"{split}-{c:04d}.npy"
            if not f.is_file():
                t = time.time()
                ims = [Image.open(Path(a.data) / p).convert("RGB") for p in files[lo:lo + a.chunk]]
                tmp = out / f".{split}-{c:04d}.tmp.npy"
                np.save(tmp, enc.encode_images(ims).astype(np.float16))
                tmp.rename(f)
                print(f"{split} {lo + len(ims)}/{len(files)} {len(ims) / (time.time() - t):.1f} img/s", flush=True)
            chunks.append(np.load(f))
        np.save(out / f"{split}.npy", np.concatenate(chunks))
        np.save(out / f"{split}-labels.npy", df.Label.to_numpy(np.int64))


# ------------------------------------------------------------------------ e2e

def _write_parts(folder: Path, img: np.ndarray, labels: np.ndarray, classnames: list[str], templates: list[str],
                 text_of: dict[str, np.ndarray]) -> None:
    """LAION's precomputed-embedding layout (images/ texts/ metadata/), one part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("images", "texts", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    captions = [templates[i % len(templates)].format(classnames[y]) for i, y in enumerate(labels)]
    np.save(folder / "images" / "img_emb_0.npy", img.astype(np.float16))
    np.save(folder / "texts" / "text_emb_0.npy", np.stack([text_of[c] for c in captions]).astype(np.float16))
    pq.write_table(pa.table({"caption": captions, "url": [f"eurosat-train-{i}" for i in range(len(labels))],
                             "key": [str(i) for i in range(len(labels))]}), folder / "metadata" / "metadata_0.parquet")


def e2e(a: argparse.Namespace) -> None:
    from xm.encoders import load_encoder
    from xm.evaluation.classnames import _CLIP_BENCHMARK, _CLIP_BENCHMARK_NAMES
    from xm.memories import open_index
    from xm.methods.base import Context, Queries
    from xm.methods.registry import create
    from xm.pipeline import BuildConfig, build_index

    _threads(a.threads)
    emb = Path(a.emb)
    classnames, templates = _CLIP_BENCHMARK_NAMES["eurosat"], _CLIP_BENCHMARK["eurosat"]
    enc = load_encoder(a.encoder)
    text_of = dict(zip([t.format(c) for c in classnames for t in templates],
                       enc.encode_texts([t.format(c) for c in classnames for t in templates])))
    pool_img, pool_lab = [], []
    for split in a.memory_splits.split(","):
        x = np.load(emb / f"{split}.npy") if (emb / f"{split}.npy").is_file() else \
            np.concatenate([np.load(f) for f in sorted(emb.glob(f"{split}-[0-9]*.npy"))])
        pool_img.append(x)
        pool_lab.append(np.load(emb / f"{split}-labels.npy") if (emb / f"{split}-labels.npy").is_file() else
                        _labels(a.data, split)[:len(x)])
    pool_img, pool_lab = np.concatenate(pool_img), np.concatenate(pool_lab)
    test = np.load(emb / "test.npy").astype(np.float32)
    test_lab = np.load(emb / "test-labels.npy")
    # the split CSVs are already in random order: a memory of n items is the first n rows,
    # the same whichever share of the pool has been encoded
    results = []
    for size in [int(s) for s in a.sizes.split(",")]:
        if size > len(pool_img):
            print(json.dumps({"bench": "e2e", "size": size, "skipped": f"only {len(pool_img)} encoded images"}), flush=True)
            continue
        sel = np.arange(size)
        work = Path(a.work) / f"m{size}"
        idx = work / "idx"
        t0 = time.perf_counter()
        if not (idx / "manifest.json").is_file():
            _write_parts(work / "parts", pool_img[sel], pool_lab[sel], classnames, templates, text_of)
            build_index(BuildConfig(source="laion400m-embeddings", embeddings_root=str(work / "parts"), parts=[0],
                                    out=idx, coarse=a.encoder, fine=a.encoder, inference=[a.encoder]))
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "xm.cli", "train", "reco", "--index", str(idx), "--encoder", a.encoder,
               "--threads", str(a.threads), "--dup-threshold", str(a.dup_threshold), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
               "--lr", str(a.lr), "--out", str(work / f"reco-e{a.epochs}-b{a.batch_size}-lr{a.lr:g}"), "--json"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        train_s = time.perf_counter() - t0
        memory = open_index(idx)
        ctx = Context(memory, a.encoder, classnames, templates, dataset="eurosat")
        # the test images' embeddings, encoded once (`embed`)
        q = Queries([None] * len(test), features={Queries.feature_key(enc): test})
        acc = {}
        for name in ("clip", "reco", "reco-image", "reco-text", "reco-mean"):
            m = create(name, ctx, **({"checkpoint": summary["out"]} if name in ("reco", "reco-image", "reco-text") else {}))
            acc[name] = float(np.mean(m.decide(m.evidence(q)).probs.argmax(axis=1) == test_lab))
        knn = _knn_vote(memory, a.encoder, test, test_lab, pool_lab[sel], len(classnames), 10)
        row = {"bench": "e2e", "size": size, "accuracy": acc, "knn10_vote": knn, "train": {k: summary[k] for k in
               ("pairs", "parameters", "steps", "losses", "pairs_per_s", "table_seconds", "peak_rss_mb", "short_rows")},
               "build_s": build_s, "train_s": train_s, "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr,
               "dup_threshold": a.dup_threshold}
        results.append(row)
        print(json.dumps(row), flush=True)


def _knn_vote(memory, spec: str, test: np.ndarray, test_lab: np.ndarray, labels: np.ndarray, c: int, k: int) -> float:
    """Reference: majority vote of the labels of the k nearest memory images."""
    _, ids = memory.search("image", test, k, encoder=spec)
    votes = np.zeros((len(test), c))
    for j in range(k):
        np.add.at(votes, (np.arange(len(test)), labels[ids[:, j]]), 1)
    return float(np.mean(votes.argmax(axis=1) == test_lab))


def _labels(data: str, split: str) -> np.ndarray:
    import pandas as pd

    return pd.read_csv(Path(data) / f"{split}.csv").Label.to_numpy(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--dims", default="512,768")
    s.add_argument("--batch", type=int, default=4096)
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("tables")
    t.add_argument("--items", type=int, default=100_000)
    t.add_argument("--dim", type=int, default=512)
    t.add_argument("--k", type=int, default=10)
    t.add_argument("--dup-threshold", type=float, default=0.95)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--work", default="/tmp/xm-reco-bench")
    m = sub.add_parser("embed")
    m.add_argument("--data", default="/work/shared/data/eurosat")
    m.add_argument("--encoder", default="ViT-B-32:random")
    m.add_argument("--out", default="/tmp/xm-reco-bench")
    m.add_argument("--splits", default="test,train,validation")
    m.add_argument("--chunk", type=int, default=512)
    m.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("e2e")
    e.add_argument("--emb", default="/tmp/xm-reco-bench/ViT-B-32_random")
    e.add_argument("--data", default="/work/shared/data/eurosat")
    e.add_argument("--memory-splits", default="train")
    e.add_argument("--encoder", default="ViT-B-32:random")
    e.add_argument("--sizes", default="1000,10000")
    e.add_argument("--epochs", type=int, default=10)
    e.add_argument("--batch-size", type=int, default=4096)
    e.add_argument("--lr", type=float, default=1e-3)
    e.add_argument("--dup-threshold", type=float, default=1.01)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--work", default="/tmp/xm-reco-e2e")
    a = ap.parse_args()
    {"speed": speed, "tables": tables, "embed": embed, "e2e": e2e}[a.cmd](a)


if __name__ == "__main__":
    main()
