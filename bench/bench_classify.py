"""X-MoRe per-query cost against the encoders' own cost.

    .venv/bin/python bench/bench_classify.py [--items 100000] [--batch 64] [--json]

Real-size RN50 (inference), ViT-B-32 (coarse), ViT-L-14 (fine), random init. The
index's embedding parts are synthetic unit vectors with the encoders' real dimensions
(embedding 100k captions with ViT-L-14 would take hours on this CPU); the index, store
and manifest stages are the real ones. Figure: warm latency of `xm classify`'s path (the
`xmore` method through `Classifier.classify_images`) divided by the sum of the three
image-encoder forward passes for the same images, measured alternating, `--repeats`
pairs, median and range reported: on a shared CPU a single unpaired run misleads.
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


def synthetic_index(root: Path, n: int, part_rows: int = 25_000,
                    encoders: tuple[str, str, str] | None = None) -> Path:
    """Embedding parts + metadata written as the embed stage would, then the real later stages;
    `encoders` = (coarse, fine, inference), default the real-size ones above."""
    coarse, fine, inference = encoders or (COARSE, FINE, INFERENCE)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xm.encoders import EncoderSpec, load_encoder
    from xm.indexes.layout import Layout, part_name, write_json
    from xm.pipeline import BuildConfig, build_index

    layout = Layout(root)
    rng = np.random.default_rng(0)
    dims = {spec: load_encoder(spec, quiet=True).dim for spec in (coarse, fine, inference)}
    src = root.parent / "empty-source"
    src.mkdir(exist_ok=True)
    for p, lo in enumerate(range(0, n, part_rows)):
        m = min(part_rows, n - lo)
        name = part_name(p)
        for spec, d in dims.items():
            slug = EncoderSpec.parse(spec).slug
            mods = ("image", "text") if spec == coarse else ("text",)
            for mod in mods:
                x = rng.standard_normal((m, d)).astype(np.float32)
                norms = np.linalg.norm(x, axis=1)
                x /= norms[:, None]
                path = layout.emb_file(slug, mod, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, x.astype(np.float16))
                if mod == "text":  # the raw-dot re-ranking reads the caption norms
                    norm_path = layout.norm_file(slug, "text", name)
                    norm_path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(norm_path, norms.astype(np.float32))
        meta = layout.part_rows(name)  # the embed stage's rows of the part
        meta.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image_path": [f"{lo + j}" for j in range(m)],
                                 "caption": [f"synthetic caption {lo + j}" for j in range(m)],
                                 "url": [None] * m, "source_id": [f"{lo + j}" for j in range(m)]}), meta)
        write_json(layout.done_marker("embed", name), {"part": name, "rows": m, "failures": {}})

    build_index(BuildConfig(source=str(src), out=root, coarse=coarse, fine=fine, inference=[inference],
                            stages=("index", "store", "manifest"), max_index_memory="1G"))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000, help="memory items (synthetic embeddings)")
    ap.add_argument("--batch", type=int, default=64, help="images in the batched measurement")
    ap.add_argument("--repeats", type=int, default=5, help="alternating (encoders, pipeline) pairs per measurement")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end instead of sections")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from xm.classify import Classifier
    from xm.memories import open_index
    from xm.methods.retrieval import Timings

    def say(title: str, data: dict) -> None:
        if not args.json:
            print(f"== {title}\n{json.dumps(data, indent=2)}", flush=True)

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)) for _ in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        root = synthetic_index(Path(tmp) / "idx", args.items)
        build_s = time.perf_counter() - t
        memory = open_index(root)
        clf = Classifier(memory, [f"class {i}" for i in range(10)], method="xmore", model=INFERENCE)
        m = clf.method
        encoders = {str(e.spec): e for e in (m.inference, m.coarse, m.fine)}

        def forward(n: int) -> float:
            t = time.perf_counter()
            for e in encoders.values():  # the same work the method's Queries does: preprocess + forward
                e.encode_images(images[:n])
            return time.perf_counter() - t

        def pipeline(n: int) -> tuple[float, dict]:
            timings = Timings()
            clf.state = m.new_state()
            t = time.perf_counter()
            clf.classify_images(images[:n], timings=timings)
            return time.perf_counter() - t, timings.seconds

        forward(1), pipeline(1)  # warm
        out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "index_items": memory.count, "index_key": memory.index_entry(COARSE, "image").key,
               "synthetic_index_build_s": build_s}
        say("setup", out)
        for n in (1, args.batch):
            reps = args.repeats if n == 1 else max(2, args.repeats // 2)
            ratios, fwd, pipe, steps = [], [], [], {}
            for _ in range(reps):  # alternate, so that load on a shared CPU hits both alike
                f = forward(n)
                p, steps = pipeline(n)
                fwd.append(f)
                pipe.append(p)
                ratios.append(p / f)
            out[f"batch_{n}"] = {
                "pairs": reps, "encoders_forward_s_median": float(np.median(fwd)), "xmore_s_median": float(np.median(pipe)),
                "ratio_median": float(np.median(ratios)), "ratio_min": float(min(ratios)), "ratio_max": float(max(ratios)),
                "per_image_ms": float(np.median(pipe)) / n * 1e3,
                "steps_ms_per_image_last": {k: v / n * 1e3 for k, v in steps.items()},
            }
            say(f"batch of {n}", out[f"batch_{n}"])
    if args.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
