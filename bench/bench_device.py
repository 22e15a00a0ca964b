"""Figures per device (`--device`): the embed stage's images/s against a bare open_clip loop on the
same device (decoding included in both), what `--num-workers` buys (ratio of two runs in this one
process), query latency per method, RECO training pairs/s, and RECO's neighbour tables in pairs/s
by exact kNN on the device (`--neighbours exact`) against the memory's index on the CPU, with the
index tables' recall of the exact ones.

    .venv/bin/python bench/bench_device.py [--device auto] [--model ViT-B-32:random] [--images 256]
                                           [--workers 0,1,2] [--methods clip,captions,xmore] [--json]
    .venv/bin/python bench/bench_device.py --tables-only [--tables-memory 100000 --tables-pairs 4096]

The goal (issue 18): the embed stage at >= 0.9 of the bare loop's images/s on a GPU. Random weights
(no pretrained weights are reachable offline): throughput does not depend on the weights. The
figures land in bench/out/bench_device.json with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_build import _images  # noqa: E402  (the same synthetic 256-px JPEGs as bench_build)


def bare_loop(model: str, files: list[Path], batch: int, device: Any) -> float:
    """images/s of the plainest loop: open_clip's model and transform, PIL decoding in this
    thread, one forward per batch on the device, the embeddings back on the CPU."""
    import open_clip
    import torch
    from PIL import Image

    arch = model.split(":")[0]
    with torch.random.fork_rng(devices=[]):
        net, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    net = net.eval().to(device.torch)
    with torch.inference_mode():
        net.encode_image(torch.stack([preprocess(Image.open(files[0]).convert("RGB"))]).to(device.torch)).cpu()  # warm-up
        device.sync()
        t = time.perf_counter()
        for i in range(0, len(files), batch):
            pixels = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files[i : i + batch]])
            torch.nn.functional.normalize(net.encode_image(pixels.to(device.torch)).float(), dim=-1).cpu()
        device.sync()
    return len(files) / (time.perf_counter() - t)


def embed_stage(model: str, src: Path, n: int, batch: int, workers: int, device: Any) -> float:
    """images/s of xm's embed stage (loader + encoder + files), image embeddings only."""
    from xm.encoders import load_encoder
    from xm.indexes.layout import Layout
    from xm.pipeline.embed import embed_part
    from xm.pipeline.sources.folder import folder_parts

    enc = load_encoder(model, quiet=True, device=device)
    part = folder_parts(src, n)[0]
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        marker = embed_part(part, {model: enc}, {model: ("image",)}, Layout(Path(out)), batch, num_workers=workers)
        device.sync()
        secs = time.perf_counter() - t
    assert marker["rows"] == n, marker
    return n / secs


def query_latency(model: str, src: Path, n_queries: int, methods: list[str], device: Any, root: Path) -> dict[str, Any]:
    """ms per image of `xm classify` (the API) per method over an index of the images, batch of 8."""
    from xm.classify import Classifier
    from xm.pipeline import BuildConfig, build_index

    idx = root / "idx"
    build_index(BuildConfig(source=str(src), out=idx, coarse=model, fine=model, inference=[model], device=device))
    queries = sorted(src.glob("*.jpg"))[:n_queries]
    out = {}
    for method in methods:
        clf = Classifier(idx, ["cat", "dog", "tram", "kite", "bridge"], method=method, device=device,
                         options={"k_coarse": 16, "k_fine": 4} if method.startswith(("xmore", "captions")) else None)
        list(clf.run(queries[:8], batch_size=8))  # warm-up: caches, first kNN
        t = time.perf_counter()
        rows = list(clf.run(queries, batch_size=8))
        device.sync()
        out[method] = {"ms_per_image": 1e3 * (time.perf_counter() - t) / len(rows), "images": len(rows)}
    return {"index": str(idx), "methods": out}


def reco_pairs_per_s(idx: Path, device: Any, root: Path) -> dict[str, Any]:
    from xm.training.reco import TrainConfig, train_reco

    s = train_reco(TrainConfig(index=idx, out=root / "reco", k=8, epochs=2, batch_size=128, dup_threshold=1.01, device=device))
    return {"pairs_per_s": s.pairs_per_s, "pairs": s.pairs, "epochs": s.epochs_done, "device": s.device}


def neighbour_tables(device: Any, memory_n: int, pairs_n: int, dim: int, factory: str, nprobe: int, k: int,
                     root: Path) -> dict[str, Any]:
    """RECO's neighbour tables, pairs/s (both tables, the rule applied), by exact kNN on the
    device (`--neighbours exact`) and by the memory's index on the CPU (`--neighbours index`),
    over a synthetic memory of `memory_n` float16 unit vectors per modality, its first `pairs_n`
    items the training pairs; and the index tables' recall of the exact ones."""
    import faiss
    import numpy as np

    from xm.memories.base import Memory
    from xm.training.reco import NeighbourRule, build_tables

    rng = np.random.default_rng(0)
    arrays = {}
    for m in ("image", "text"):
        a = rng.standard_normal((memory_n, dim)).astype(np.float32)
        arrays[m] = (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float16)
    t = time.perf_counter()
    indexes = {}
    for m, a in arrays.items():
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(a.astype(np.float32))
        index.add(a.astype(np.float32))
        if "IVF" in factory:
            faiss.ParameterSpace().set_index_parameters(index, f"nprobe={nprobe}")
        indexes[m] = index
    index_build_s = time.perf_counter() - t

    class Rows:
        def __init__(self, a: np.ndarray) -> None:
            self.a, self.dim = a, a.shape[1]

        def gather(self, ids: Any) -> np.ndarray:
            return self.a[np.asarray(ids, np.int64)].astype(np.float32)

    class Synthetic(Memory):
        kind = "synthetic"
        roles: Any = {"coarse": "bench"}
        encoders: Any = ["bench"]

        def __init__(self, count: int, name: str) -> None:
            self.count, self.root, self._id = count, name, name

        @property
        def id(self) -> str:
            return self._id

        @property
        def caption_hashes(self) -> Any:
            return np.arange(self.count, dtype=np.int64)

        def probe(self, spec: str) -> Any: return None
        def default_model(self) -> str: return "bench"
        def describe(self) -> dict[str, Any]: return {"kind": self.kind}
        def has_embeddings(self, spec: str, modality: str) -> bool: return True
        def has_norms(self, spec: str, modality: str) -> bool: return False
        def has_index(self, spec: str, modality: str) -> bool: return True
        def check_encoder(self, encoder: Any, role: str) -> None: return None
        def norms(self, spec: str, modality: str) -> Any: raise NotImplementedError
        def rows(self, ids: Any, columns: Any = None) -> list[dict[str, Any]]: return [{"id": int(i)} for i in ids]
        def embeddings(self, spec: str, modality: str) -> Any: return Rows(arrays[modality][: self.count])

        def search(self, modality: str, queries: Any, k: int, encoder: Any = None) -> Any:
            return indexes[modality].search(np.ascontiguousarray(queries, np.float32), k)

    memory = Synthetic(memory_n, "memory")
    pairs = Synthetic(pairs_n, "pairs")  # the memory's first items, under another id (the item itself is not excluded)
    rule = NeighbourRule(0.95)
    out: dict[str, Any] = {"memory": memory_n, "pairs": pairs_n, "dim": dim, "k": k, "index": factory,
                           "nprobe": nprobe, "index_build_s": index_build_s}
    tables = {}
    for search in ("exact", "index"):
        t = time.perf_counter()
        tables[search] = build_tables(memory, pairs, "bench", k, rule, root / f"tables-{search}", search=search,
                                      device=device if search == "exact" else None)
        device.sync()
        secs = time.perf_counter() - t
        out[search] = {"pairs_per_s": pairs_n / secs, "seconds": secs,
                       "where": str(device) if search == "exact" else f"cpu ({factory}, nprobe {nprobe})"}
    hits = sum(len(np.intersect1d(a[a >= 0], b[b >= 0])) for m in ("image", "text")
               for a, b in zip(tables["exact"][m], tables["index"][m]))
    out["index_recall_of_exact"] = hits / max(1, sum(int((tables["exact"][m] >= 0).sum()) for m in ("image", "text")))
    out["exact_over_index"] = out["exact"]["pairs_per_s"] / out["index"]["pairs_per_s"]
    return out


def main() -> None:
    import torch

    from xm.encoders.device import Device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="ViT-B-32:random")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", default="0,1,2", help="--num-workers values to time")
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--methods", default="clip,captions,xmore")
    ap.add_argument("--skip-queries", action="store_true")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    ap.add_argument("--tables-only", action="store_true", help="time RECO's neighbour tables only")
    ap.add_argument("--tables-memory", type=int, default=100_000, help="neighbour tables: memory items")
    ap.add_argument("--tables-pairs", type=int, default=4096, help="neighbour tables: training pairs")
    ap.add_argument("--tables-dim", type=int, default=512)
    ap.add_argument("--tables-index", default="IVF256,Flat", help="the memory's index (faiss factory string)")
    ap.add_argument("--tables-nprobe", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = Device.parse(args.device)
    workers = [int(w) for w in args.workers.split(",")]
    result: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "device": device.describe(), "torch": torch.__version__,
                    "python": platform.python_version(), "note": args.note},
        "model": args.model, "images": args.images, "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result["neighbour_tables"] = neighbour_tables(device, args.tables_memory, args.tables_pairs, args.tables_dim,
                                                      args.tables_index, args.tables_nprobe, 10, root)
        if args.tables_only:
            _report(result, args, [])
            return
        src = root / "src"
        src.mkdir()
        _images(src, args.images)
        files = sorted(src.glob("*.jpg"))
        embed_stage(args.model, src, min(args.images, args.batch_size), args.batch_size, 0, device)  # load + warm-up
        bare = bare_loop(args.model, files, args.batch_size, device)
        stage = {w: embed_stage(args.model, src, args.images, args.batch_size, w, device) for w in workers}
        result["embed"] = {
            "bare_open_clip_images_per_s": bare,
            "embed_stage_images_per_s": {str(w): v for w, v in stage.items()},
            "stage_over_bare": {str(w): v / bare for w, v in stage.items()},
            "num_workers_ratio_over_0": {str(w): v / stage[workers[0]] for w, v in stage.items()},
        }
        if not args.skip_queries:
            q = query_latency(args.model, src, args.queries, [m.strip() for m in args.methods.split(",")], device, root)
            result["query_latency"] = q["methods"]
            result["reco"] = reco_pairs_per_s(Path(q["index"]), device, root)
    _report(result, args, workers)


def _report(result: dict[str, Any], args: Any, workers: list[int]) -> None:
    out = Path(__file__).parent / "out" / ("bench_device_tables.json" if args.tables_only else "bench_device.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['machine']['device']} · {result['machine']['cores']} cores · {args.model} · {args.images} images")
    nt = result["neighbour_tables"]
    print(f"RECO neighbour tables ({nt['pairs']} pairs x {nt['memory']} memory items, d={nt['dim']}, k={nt['k']}): "
          f"exact on {nt['exact']['where']} {nt['exact']['pairs_per_s']:.0f} pairs/s, index on {nt['index']['where']} "
          f"{nt['index']['pairs_per_s']:.0f} pairs/s ({nt['exact_over_index']:.2f}x); "
          f"the index's tables hold {nt['index_recall_of_exact']:.1%} of the exact neighbours")
    if "embed" not in result:
        return
    e = result["embed"]
    print(f"bare open_clip loop: {e['bare_open_clip_images_per_s']:.1f} images/s")
    for w in e["embed_stage_images_per_s"]:
        print(f"embed stage, --num-workers {w}: {e['embed_stage_images_per_s'][w]:.1f} images/s "
              f"({e['stage_over_bare'][w]:.2f} of bare; {e['num_workers_ratio_over_0'][w]:.2f}x --num-workers {workers[0]})")
    for m, v in result.get("query_latency", {}).items():
        print(f"query latency {m}: {v['ms_per_image']:.1f} ms/image")
    if "reco" in result:
        print(f"RECO training: {result['reco']['pairs_per_s']:.0f} pairs/s")


if __name__ == "__main__":
    main()
