"""Encoder inference precisions (fp32 eager, bf16, fp16, int8) on this CPU: speed, agreement, retrieval.

    .venv/bin/python bench/bench_precision.py [--images 8] [--captions 64] [--repeats 2] [--json]

For real-size RN50, ViT-B-32 and ViT-L-14 (random init: no pretrained weights are
reachable here), each section printed as soon as it is measured:

* images/s and captions/s per precision, and the ratio to fp32 eager. Measurements
  alternate precisions within each repeat (a shared CPU's load hits all alike); the best
  of `--repeats` is kept.
* the cosine of each embedding to its fp32 embedding (min and mean, images and captions)
  against the stated bound `xm.encoders.loader.MIN_COSINE`.
* self-retrieval: memory images embedded at fp32, queried at each precision (and memory at
  each precision queried at fp32): the share whose own item is the top hit.
* X-MoRe: the latency of `xm classify`'s path (Classifier over a synthetic index with the
  real encoders' dimensions, see bench_classify.py) at each precision, divided by the fp32
  eager forward passes of its three image encoders for the same images (goal <= 0.5).

Random-init weights: the speed figures do not depend on the weights; the agreement figures
are those of these weights (pretrained weights have larger activations, so measure again
with them before changing the default).
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

ENCODERS = ("RN50:random", "ViT-B-32:random", "ViT-L-14:random")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def machine() -> str:
    import torch

    flags = ""
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "")
        have = set(next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags")), []))
        flags = " ".join(f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in have)
    except (OSError, StopIteration):
        model = platform.processor()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model or platform.machine()}, {os.cpu_count()} cores ({flags}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load:.2f} at start")


def test_images(n: int, size: int = 300, seed: int = 0) -> list:
    """Distinct block images (like tests/conftest.make_image), decoded PIL RGB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
            for _ in range(n)]


def captions(n: int) -> list[str]:
    words = "dog cat tram snow red blue photo of a the on in two small large old new street beach forest".split()
    rng = np.random.default_rng(1)
    return [" ".join(rng.choice(words, rng.integers(3, 18))) for _ in range(n)]


def bench_encoder(spec: str, images: list, texts: list[str], repeats: int, batch: int, say) -> dict:
    import torch

    from xm.encoders import load_encoder
    from xm.encoders.loader import MIN_COSINE

    t = time.perf_counter()
    encs = {p: load_encoder(spec, quiet=True, precision=p) for p in PRECISIONS}
    load_s = time.perf_counter() - t
    pixels = torch.stack([encs["fp32"].preprocess(im) for im in images])
    for e in encs.values():  # warm-up (oneDNN primitive creation, quantization)
        e.encode_pixels(pixels[:1]), e.encode_texts(texts[:2])
    img_s = {p: [] for p in PRECISIONS}
    txt_s = {p: [] for p in PRECISIONS}
    img_out, txt_out = {}, {}
    for _ in range(repeats):
        for p, e in encs.items():
            t = time.perf_counter()
            img_out[p] = np.concatenate([e.encode_pixels(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])
            img_s[p].append(time.perf_counter() - t)
            t = time.perf_counter()
            txt_out[p] = e.encode_texts(texts)
            txt_s[p].append(time.perf_counter() - t)
    speed = {p: {"images_per_s": len(images) / min(img_s[p]), "captions_per_s": len(texts) / min(txt_s[p]),
                 "images_vs_fp32": min(img_s["fp32"]) / min(img_s[p]), "captions_vs_fp32": min(txt_s["fp32"]) / min(txt_s[p])}
             for p in PRECISIONS}
    say(f"{spec}: speed (best of {repeats}, {len(images)} images in batches of {batch}, {len(texts)} captions; "
        f"loading all three precisions {load_s:.1f} s)", speed)
    agree = {}
    for p in PRECISIONS[1:]:
        ci = (img_out[p] * img_out["fp32"]).sum(1)
        ct = (txt_out[p] * txt_out["fp32"]).sum(1)
        agree[p] = {"image_cos_min": float(ci.min()), "image_cos_mean": float(ci.mean()),
                    "caption_cos_min": float(ct.min()), "caption_cos_mean": float(ct.mean()),
                    "bound": MIN_COSINE[p], "within_bound": bool(min(ci.min(), ct.min()) >= MIN_COSINE[p])}
    say(f"{spec}: cosine to fp32", agree)
    # self-retrieval: the memory is these images embedded at one precision, queried at another
    retr = {}
    for p in PRECISIONS:
        q_at_p = float(np.mean(np.argmax(img_out[p] @ img_out["fp32"].T, 1) == np.arange(len(images))))
        mem_at_p = float(np.mean(np.argmax(img_out["fp32"] @ img_out[p].T, 1) == np.arange(len(images))))
        retr[p] = {"memory_fp32_query_at_p_top1": q_at_p, "memory_at_p_query_fp32_top1": mem_at_p}
    say(f"{spec}: self-retrieval of {len(images)} memory images (own item is the top hit)", retr)
    return {"speed": speed, "agreement": agree, "self_retrieval": retr, "load_s": load_s}


def bench_xmore(items: int, pairs: int, batch: int, say) -> dict:
    import bench_classify

    from xm.classify import Classifier
    from xm.memories import open_index
    from xm.methods.retrieval import Timings

    images = test_images(batch, seed=7)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        root = bench_classify.synthetic_index(Path(tmp) / "idx", items)
        out["synthetic_index_items"], out["synthetic_index_build_s"] = items, time.perf_counter() - t
        memory = open_index(root)
        clfs = {p: Classifier(memory, [f"class {i}" for i in range(10)], method="xmore", model=bench_classify.INFERENCE,
                              precision=p) for p in PRECISIONS}
        ref = clfs["fp32"].method
        eager = [ref.inference, ref.coarse, ref.fine]

        def forward(n: int) -> float:  # fp32 eager: each encoder preprocesses and runs its forward pass
            t = time.perf_counter()
            for e in eager:
                e.encode_images(images[:n])
            return time.perf_counter() - t

        def pipeline(p: str, n: int) -> tuple[float, dict]:
            clf = clfs[p]
            clf.state = clf.method.new_state()
            timings = Timings()
            t = time.perf_counter()
            clf.classify_images(images[:n], timings=timings)
            return time.perf_counter() - t, timings.seconds

        forward(1)
        for p in PRECISIONS:
            pipeline(p, 1)  # warm
        for n in sorted({1, batch}):
            fwd, pipe, ratios, steps = [], {p: [] for p in PRECISIONS}, {p: [] for p in PRECISIONS}, {}
            for _ in range(pairs):  # alternate: the fp32 forward passes, then each precision's pipeline
                f = forward(n)
                fwd.append(f)
                for p in PRECISIONS:
                    s, steps[p] = pipeline(p, n)
                    pipe[p].append(s)
                    ratios[p].append(s / f)
            res = {"pairs": pairs, "fp32_eager_forward_s_median": float(np.median(fwd))}
            for p in PRECISIONS:
                res[p] = {"xmore_s_median": float(np.median(pipe[p])), "ratio_to_fp32_forward_median": float(np.median(ratios[p])),
                          "ratio_min": float(min(ratios[p])), "ratio_max": float(max(ratios[p])),
                          "steps_ms_per_image_last": {k: round(v / n * 1e3, 1) for k, v in steps[p].items()}}
            out[f"batch_{n}"] = res
            say(f"X-MoRe latency / fp32 eager forward passes (RN50 + ViT-B-32 + ViT-L-14), batch of {n}, "
                f"{items} memory items", res)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", default=",".join(ENCODERS), help="comma-separated ARCH:random specs")
    ap.add_argument("--images", type=int, default=8, help="images per speed measurement (also the self-retrieval memory)")
    ap.add_argument("--captions", type=int, default=64, help="captions per speed measurement")
    ap.add_argument("--batch", type=int, default=8, help="images per forward pass")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats per speed measurement (best kept)")
    ap.add_argument("--xmore-items", type=int, default=20_000, help="synthetic memory items of the X-MoRe measurement")
    ap.add_argument("--xmore-pairs", type=int, default=3, help="alternating (fp32 forward, pipelines) rounds")
    ap.add_argument("--xmore-batch", type=int, default=1, help="largest query batch of the X-MoRe measurement")
    ap.add_argument("--skip-xmore", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end instead of sections")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def say(title: str, data: dict) -> None:
        if not args.json:
            print(f"== {title}\n{json.dumps(data, indent=2)}", flush=True)

    out: dict = {"machine": machine()}
    say("machine", {"machine": out["machine"]})
    images, texts = test_images(args.images), captions(args.captions)
    for spec in [s.strip() for s in args.encoders.split(",") if s.strip()]:
        out[spec] = bench_encoder(spec, images, texts, args.repeats, args.batch, say)
    if not args.skip_xmore:
        out["xmore"] = bench_xmore(args.xmore_items, args.xmore_pairs, args.xmore_batch, say)
    if args.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
