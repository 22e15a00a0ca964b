"""CODER, CODER-rerank, CODER-Adapter and Tip-Adapter against zero-shot CLIP on EuroSAT
(the figures of docs/coder.md), with any encoder, random-init ones included.

    .venv/bin/python bench/bench_coder.py --data-dir /work/shared/data/eurosat --model ViT-B-32:random \
        --out /tmp/coder-bench [--shots 1,2,4,8,16] [--test-per-class 50] [--val-per-class 20] [--augment-passes 4]

What it does, end to end through xm's own code:

1. writes a descriptions file for EuroSAT in xm's sectioned DCLIP form (hand-written
   attributes and analogous classes; one-vs-one differences made from them: there is no
   LLM offline), and builds a small memory of land-use captions (and distractors) with
   `build_index` (tiny coarse/fine encoders: the memory is only searched text to text);
2. runs `xm texts` (sources names,descriptions,wordnet,memory) to write the text sets;
3. classifies a stratified subset of the test split with clip, coder and coder-rerank
   (`--texts-file`), and, per shot count, fits coder-adapter and tip-adapter on a support
   set drawn from the train split (seeded per shot count) with α and β searched on a
   stratified subset of the validation split;
4. writes results.json and results.md: accuracy per method and shot count, the α and β
   chosen, texts per class by source, CODER vector length, per-image time and search time.

Images are encoded once per split (features shared by every method); a method's time
per image is its own work on top of that encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from xm.evaluation.datasets import load_dataset  # noqa: E402
from xm.methods.base import Context, Example, Queries, Support  # noqa: E402
from xm.methods.registry import create  # noqa: E402

# --- EuroSAT descriptions (written by hand; label order of xm's EuroSAT names) -------------------
ATTRIBUTES = {
    "annual crop land": ["rectangular fields in strips of different colours", "bare brown soil between green rows",
                         "straight field boundaries", "a patchwork of ploughed parcels", "tractor tracks in parallel lines"],
    "forest": ["a dense dark green canopy", "the rough texture of tree crowns", "no visible buildings or roads",
               "a uniform deep green colour", "shadows between tall trees"],
    "brushland or shrubland": ["scattered low bushes", "patchy green and brown vegetation", "an irregular texture with bare ground",
                               "dry grass between shrubs", "no regular field pattern"],
    "highway or road": ["a long straight grey strip", "lanes crossing the image", "road junctions and ramps",
                        "green verges on both sides of a road", "thin bright lines of asphalt"],
    "industrial buildings or commercial buildings": ["large flat grey or white roofs", "warehouses and parking lots",
                                                     "big rectangular buildings", "paved areas with few trees",
                                                     "storage yards and loading areas"],
    "pasture land": ["smooth light green grass", "large fields of uniform texture", "a few trees along hedges",
                     "grazing meadows", "a soft green colour without rows"],
    "permanent crop land": ["orderly rows of trees or vines", "a regular dotted pattern of plants", "orchards and vineyards",
                            "small parcels with a striped texture", "green rows on lighter soil"],
    "residential buildings or homes or apartments": ["dense small houses with red roofs", "a grid of streets",
                                                     "gardens between houses", "mixed colours of roofs and trees",
                                                     "suburban blocks"],
    "river": ["a winding dark band of water", "river banks lined with trees", "a narrow channel of water crossing fields",
              "meanders and bends", "a sinuous line through green land"],
    "lake or sea": ["a large uniform dark blue area", "a smooth water surface", "a shoreline at one edge",
                    "no texture over most of the image", "a deep blue or black colour"],
}
ANALOGOUS = {
    "annual crop land": ["farmland", "wheat field"], "forest": ["woodland", "jungle"],
    "brushland or shrubland": ["heath", "savanna"], "highway or road": ["motorway", "railway"],
    "industrial buildings or commercial buildings": ["factory", "shopping mall"], "pasture land": ["meadow", "grassland"],
    "permanent crop land": ["orchard", "vineyard"], "residential buildings or homes or apartments": ["suburb", "village"],
    "river": ["canal", "stream"], "lake or sea": ["ocean", "reservoir"],
}


def eurosat_descriptions() -> dict:
    diffs = {c: {o: [f"a satellite photo of {c} showing {ATTRIBUTES[c][0]}, unlike {o} with {ATTRIBUTES[o][0]}",
                     f"{c} has {ATTRIBUTES[c][1]} where {o} has {ATTRIBUTES[o][1]}"]
                 for o in ATTRIBUTES if o != c} for c in ATTRIBUTES}
    return {"descriptors": ATTRIBUTES, "analogous": ANALOGOUS, "differences": diffs}


# --- a small memory of land-use captions and distractors --------------------------------------
LAND_USE = ["wheat field", "corn field", "ploughed farmland", "pine forest", "oak woodland", "scrubland", "heathland",
            "motorway", "country road", "roundabout", "factory", "warehouse", "business park", "sheep meadow",
            "cattle pasture", "vineyard", "olive grove", "apple orchard", "suburb", "housing estate", "village",
            "river bend", "stream", "canal", "lake", "coastline", "sea", "reservoir"]
PHRASES = ["aerial view of a {}", "satellite image of a {}", "a {} seen from above", "drone photo of a {} in summer",
           "a {} in the countryside", "photo of a {}"]
DISTRACTORS = ["birthday cake with candles", "a cat asleep on a sofa", "a red sports car", "portrait of a smiling woman",
               "a plate of pasta", "a guitar on a stage", "two dogs playing in snow", "a laptop on a desk",
               "a bowl of fruit", "a man riding a bicycle"]


def build_memory(work: Path, model: str) -> Path:
    from PIL import Image

    from xm.pipeline import BuildConfig, build_index

    src, idx = work / "memory_src", work / "memory_idx"
    if (idx / "manifest.json").is_file():
        return idx
    src.mkdir(parents=True, exist_ok=True)
    caps = [p.format(n) for n in LAND_USE for p in PHRASES] + [f"{d}, photo {i}" for d in DISTRACTORS for i in range(6)]
    rng = np.random.default_rng(0)
    for i, cap in enumerate(caps):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64)).save(src / f"m{i:04d}.jpg")
        (src / f"m{i:04d}.txt").write_text(cap)
    build_index(BuildConfig(source=str(src), out=idx, coarse="xm-tiny-vit:random", fine="xm-tiny-vit-wide:random",
                            inference=[model]))
    return idx


def stratified(items, per_class: int | None, seed: int) -> list:
    if not per_class:
        return list(items)
    rng = np.random.default_rng(seed)
    by: dict[int, list] = {}
    for it in items:
        by.setdefault(it.label, []).append(it)
    return [by[y][i] for y in sorted(by) for i in sorted(rng.permutation(len(by[y]))[:per_class])]


def examples(items) -> list[Example]:
    return [Example(load=it.image, label=it.label, key=it.key) for it in items]


def timed(method, queries: Queries, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    t0 = time.perf_counter()
    d = method.decide(method.evidence(queries))
    secs = time.perf_counter() - t0
    pred = np.argmax(d.probs, axis=1)
    return float(np.mean(pred == y)), secs / len(y), pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--model", default="ViT-B-32:random")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shots", default="1,2,4,8,16")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--test-per-class", type=int, default=50, help="0 = the whole test split")
    ap.add_argument("--val-per-class", type=int, default=20, help="0 = the whole validation split")
    ap.add_argument("--augment-passes", type=int, default=4, help="the authors use 20 (the option's default)")
    ap.add_argument("--sources", default="names,descriptions,wordnet,memory")
    ap.add_argument("--template-set", default="coop", help="zero-shot CLIP templates of the dataset (paper | coop | clip_benchmark)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shots = [int(s) for s in args.shots.split(",") if s]

    test = load_dataset("eurosat", args.data_dir, "test")
    train = load_dataset("eurosat", args.data_dir, "train")
    val = load_dataset("eurosat", args.data_dir, "validation")
    classes, templates = test.classnames, test.templates[args.template_set]
    test_items = stratified(test.items, args.test_per_class, 0)
    val_items = stratified(val.items, args.val_per_class, 0)
    y = np.array([it.label for it in test_items])

    desc = out / "eurosat_descriptions.json"
    desc.write_text(json.dumps(eurosat_descriptions(), indent=1))
    labels = out / "classes.txt"
    labels.write_text("\n".join(classes) + "\n")
    t0 = time.perf_counter()
    index = build_memory(out, args.model) if "memory" in args.sources else None
    memory_seconds = time.perf_counter() - t0
    texts = out / "texts.json"
    cmd = [sys.executable, "-m", "xm.cli", "texts", "--labels", str(labels), "--out", str(texts), "--model", args.model,
           "--dataset", "eurosat", "--descriptions", str(desc), "--sources", args.sources, "--json"]
    if index is not None:
        cmd += ["--index", str(index)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"xm texts failed: {run.stderr.strip().splitlines()[-1]}")
    texts_summary = json.loads(run.stdout.strip().splitlines()[-1])
    texts_summary["seconds"] = round(time.perf_counter() - t0, 2)
    ts_json = json.loads(texts.read_text())
    per_class = {c: {} for c in classes}
    for c in classes:
        for t in ts_json["texts"][c]:
            per_class[c][f"{t['source']}:{t['kind']}"] = per_class[c].get(f"{t['source']}:{t['kind']}", 0) + 1

    ctx = Context(None, args.model, classes, templates, dataset="eurosat")
    queries = Queries([it.image() for it in test_items])
    t0 = time.perf_counter()
    queries.features(ctx.encoder(args.model))
    encode_per_image = (time.perf_counter() - t0) / len(y)
    print(f"encoded {len(y)} test images: {encode_per_image * 1000:.1f} ms/image", file=sys.stderr)

    rows, timing = [], {"encode_ms_per_image": round(encode_per_image * 1000, 2)}
    for name, kw in [("clip", {}), ("coder", {"texts_file": str(texts)}), ("coder-rerank", {"texts_file": str(texts)})]:
        m = create(name, ctx, **kw)
        acc, per, pred = timed(m, queries, y)
        extra = {}
        if name == "coder-rerank":
            d = m.decide(m.evidence(queries))
            extra = {"threshold": m.threshold, "reranked": int(sum(bool(i.get("reranked")) for i in d.info)),
                     "changed_vs_coder": int(np.sum(pred != rows[-1]["_pred"]))}
        rows.append({"method": name, "shots": 0, "seed": None, "acc1": acc, "ms_per_image": per * 1000, "_pred": pred, **extra})
        print(f"{name}: acc {acc:.4f}", file=sys.stderr)
    n_texts = create("coder", ctx, texts_file=str(texts)).coded.emb.shape[0]

    val_ex = examples(val_items)
    for k in shots:
        seed = args.seed * 1000 + k  # seeded per shot count
        support_items = stratified(train.items, k, seed)
        support = Support(train=examples(support_items), val=val_ex, shots=k, seed=seed)
        for name, kw in [("coder-adapter", {"texts_file": str(texts)}), ("tip-adapter", {})]:
            m = create(name, ctx, augment_passes=args.augment_passes, **kw)
            t0 = time.perf_counter()
            chosen = m.fit(support)
            fit_seconds = time.perf_counter() - t0
            acc, per, pred = timed(m, queries, y)
            rows.append({"method": name, "shots": k, "seed": seed, "acc1": acc, "ms_per_image": per * 1000, "_pred": pred,
                         "alpha": chosen["alpha"], "beta": chosen["beta"], "val_accuracy": chosen["val_accuracy"],
                         "search_seconds": chosen["search_seconds"], "evaluations": chosen["evaluations"],
                         "fit_seconds": round(fit_seconds, 2), "support_feature_seconds": chosen["support_feature_seconds"]})
            print(f"{name} {k}-shot: acc {acc:.4f} alpha {chosen['alpha']:.4g} beta {chosen['beta']:.4g} "
                  f"val {chosen['val_accuracy']:.4f} search {chosen['search_seconds']:.3f}s", file=sys.stderr)

    for r in rows:
        r.pop("_pred")
    result = {"dataset": "eurosat", "model": args.model, "test_images": len(y), "val_images": len(val_items),
              "test_per_class": args.test_per_class, "val_per_class": args.val_per_class,
              "augment_passes": args.augment_passes, "templates": templates, "sources": args.sources,
              "texts": texts_summary, "texts_per_class": per_class, "coder_vector_length": n_texts,
              "memory_build_seconds": round(memory_seconds, 2), "timing": timing, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    lines = [f"EuroSAT, {args.model}, {len(y)} test images ({args.test_per_class or 'all'}/class), "
             f"validation {len(val_items)}, augment passes {args.augment_passes}", "",
             "| method | shots | seed | acc@1 | α | β | val acc | search s | ms/image |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(k: str, fmt: str = "{:.4g}", r: dict = r) -> str:
            return fmt.format(r[k]) if r.get(k) is not None else ""
        lines.append(f"| {r['method']} | {r['shots']} | {r['seed'] or ''} | {r['acc1']:.4f} | {f('alpha')} | {f('beta')} | "
                     f"{f('val_accuracy', '{:.4f}')} | {f('search_seconds', '{:.3f}')} | {r['ms_per_image']:.3f} |")
    lines += ["", f"CODER vector length: {n_texts}; encoding {timing['encode_ms_per_image']} ms/image (shared)",
              f"texts by source: {json.dumps(texts_summary['by_source'])}; dropped {texts_summary['dropped']}"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
