"""X-MoRe per-query cost against the encoders' own cost.

    .venv/bin/python bench/bench_classify.py [--items 100000] [--batch 64] [--json]

Real-size RN50 (inference), ViT-B-32 (coarse), ViT-L-14 (fine), random init. The
index's embedding parts are synthetic unit vectors with the encoders' real dimensions
(embedding 100k captions with ViT-L-14 would take hours on this CPU); the index, store
and manifest stages are the real ones. Figure: warm latency of `XMoRe.classify` for
an image divided by the sum of the three image-encoder forward passes for it.
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

INFERENCE, COARSE, FINE = "RN50:random", "ViT-B-32:random", "ViT-L-14:random"


def synthetic_index(root: Path, n: int, part_rows: int = 25_000) -> Path:
    """Embedding parts + metadata written as the embed stage would, then the real later stages."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xm.encoders import EncoderSpec, load_encoder
    from xm.indexes.layout import Layout, part_name, write_json
    from xm.pipeline import BuildConfig, build_index

    layout = Layout(root)
    rng = np.random.default_rng(0)
    dims = {spec: load_encoder(spec, quiet=True).dim for spec in (COARSE, FINE, INFERENCE)}
    src = root.parent / "empty-source"
    src.mkdir(exist_ok=True)
    for p, lo in enumerate(range(0, n, part_rows)):
        m = min(part_rows, n - lo)
        name = part_name(p)
        for spec, d in dims.items():
            slug = EncoderSpec.parse(spec).slug
            mods = ("image", "text") if spec == COARSE else ("text",)
            for mod in mods:
                x = rng.standard_normal((m, d)).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                path = layout.emb_file(slug, mod, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, x.astype(np.float16))
        meta = layout.metadata_file(EncoderSpec.parse(COARSE).slug, name)
        meta.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image_path": [f"{lo + j}" for j in range(m)],
                                 "caption": [f"synthetic caption {lo + j}" for j in range(m)],
                                 "url": [None] * m, "source_id": [f"{lo + j}" for j in range(m)]}), meta)
        write_json(layout.done_marker("embed", name), {"part": name, "rows": m, "failures": {}})

    build_index(BuildConfig(source=str(src), out=root, coarse=COARSE, fine=FINE, inference=[INFERENCE],
                            stages=("index", "store", "manifest"), max_index_memory="1G"))
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from xm.indexes import open_index
    from xm.methods.ensemble import StreamState
    from xm.methods.retrieval import Timings
    from xm.methods.xmore import XMoRe

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)) for _ in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        root = synthetic_index(Path(tmp) / "idx", args.items)
        build_s = time.perf_counter() - t
        memory = open_index(root)
        method = XMoRe(memory, INFERENCE, [f"class {i}" for i in range(10)], k_coarse=128, k_fine=16)
        encoders = method._encoders()
        pixels = {s: torch.stack([e.preprocess(im) for im in images]) for s, e in encoders.items()}

        def forward(n: int) -> float:
            t = time.perf_counter()
            for s, e in encoders.items():
                e.encode_pixels(pixels[s][:n])
            return time.perf_counter() - t

        def pipeline(n: int) -> tuple[float, dict]:
            timings = Timings()
            t = time.perf_counter()
            method.classify(images[:n], StreamState(), "modal", timings)
            return time.perf_counter() - t, timings.seconds

        forward(1), pipeline(1)  # warm
        out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "index_items": memory.count, "index_key": memory.manifest["indexes"]["image"]["key"],
               "synthetic_index_build_s": build_s}
        for n in (1, args.batch):
            reps = args.repeats if n == 1 else 1
            f = min(forward(n) for _ in range(reps))
            runs = [pipeline(n) for _ in range(reps)]
            p, steps = min(runs, key=lambda r: r[0])
            out[f"batch_{n}"] = {
                "encoders_forward_s": f, "xmore_s": p, "ratio": p / f,
                "per_image_ms": p / n * 1e3, "steps_ms_per_image": {k: v / n * 1e3 for k, v in steps.items()},
            }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
