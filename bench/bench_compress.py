"""Compressed caption embeddings (`--text-codec`): what each codec costs against float16.

    nice -n 19 .venv/bin/python bench/bench_compress.py encode --spec ViT-B-32:random  # once, cached in /tmp
    nice -n 19 .venv/bin/python bench/bench_compress.py run [--items 100000] [--queries 300] [--train-rows 12000]
    .venv/bin/python bench/bench_compress.py table bench/out/bench_compress.json   # reprint a run

`--codecs "SQ8;PQ64;..."`; an item TEXT+image:IMAGE (TEXT "-" for none) also compresses the
image (refine) embeddings, with `--max-index-memory` small enough for an IVF-PQ index whose
refine step reads them (on this CPU autofaiss' OPQ training alone ran past 30 minutes: not
measured yet).

Machine: 2 shared CPU cores, no GPU, random-init weights (no pretrained weights are
reachable here), one torch and one faiss thread.

The memory: `--items` distinct synthetic captions (a fixed permutation of a combinatorial
grid) embedded by a real-size random-init encoder (ViT-B-32:random's text tower, the fastest
real one here), written as the embed stage writes them (float16 parts + float32 norms); the
memory's image embeddings are random unit vectors (only the coarse kNN pool reads them, the
same in every configuration). That encoder holds every role (coarse, fine, inference: one
text embedding per caption), so a codec acts on the fine re-ranking and the text modality
at once. The real later stages build one float16 index; each codec is then a real index
(`--stages compress,manifest --text-codec SPEC=CODEC` on a hard-linked copy) opened with
`open_index` and run through the `xmore` method (`Classifier`), so what is measured is the
product's read path (`memory.embeddings(...).gather`, decoded by `CodedEmbeddingMatrix`).

Queries: EuroSAT test images (../shared/data/eurosat, the first `--queries`/10 per class of
test.csv, not the CoOp split), embedded once by the same random-init encoder; classes:
EuroSAT's 10 class names with one satellite-photo prompt. Per codec, against float16:
(a) the mean (and min) overlap of the 16 captions the fine re-ranking keeps out of each
query's 128-candidate pool, (b) X-MoRe decision agreement (argmax of the method's decision)
and the text modality's agreement, (c) bytes per memory item per role, measured from the
built index's files, and projected to 400M items with the product's roles (ViT-B-32 coarse,
ViT-L-14 fine, RN50 inference) against the 1.5 KB/item goal.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("XM_BENCH_CACHE", "/tmp/xm-bench-compress"))
CHUNK = 5_000

# EuroSAT's classes appear among the words so that the text modality votes for something
_ADJ = ("", "small", "large", "old", "new", "green", "brown", "grey", "wide", "narrow", "dry", "wet",
        "dense", "sparse", "bright", "dark", "flooded", "sunny", "cloudy", "rural", "urban", "aerial")
_NOUN = ("annual crop land", "forest", "herbaceous vegetation", "highway", "road", "industrial buildings",
         "pasture land", "permanent crop land", "residential buildings", "river", "sea", "lake", "field",
         "farm", "village", "town", "harbour", "bridge", "parking lot", "meadow", "vineyard", "orchard",
         "factory", "warehouse", "motorway", "canal", "coast", "beach", "hill", "valley", "marsh", "park",
         "railway", "airport", "quarry", "stadium", "school", "church", "suburb", "island")
_PREP = ("near", "beside", "behind", "along", "above", "across", "around", "below", "next to", "far from")
_PLACE = ("the mountains", "a city", "the sea", "a river", "the motorway", "a forest", "the fields", "a lake",
          "the coast", "a village", "the border", "a valley", "the hills", "an airport", "a harbour", "the desert",
          "a railway", "the suburbs", "a factory", "the plains")
_FRAME = ("a photo of {a} {n} {p} {q}", "satellite image of {a} {n} {p} {q}", "{a} {n} {p} {q} seen from above",
          "view of {a} {n} {p} {q} in summer")


def synthetic_captions(n: int) -> list[str]:
    """n distinct captions, the same on every run: a fixed permutation of a combinatorial grid."""
    grid = list(itertools.product(_FRAME, _ADJ, _NOUN, _PREP, _PLACE))
    if n > len(grid):
        raise SystemExit(f"at most {len(grid)} synthetic captions")
    order = np.random.default_rng(0).permutation(len(grid))[:n]
    out = []
    for i in order:
        f, a, noun, p, q = grid[i]
        out.append(" ".join(f.format(a=a, n=noun, p=p, q=q).split()))
    return out


def cache_path(spec: str, n: int) -> Path:
    return CACHE / f"{spec.replace(':', '_').replace('/', '_')}-{n}.npz"


def encode(spec: str, n: int, reverse: bool = False) -> Path:
    """Caption embeddings (normalised float32) and norms of the n captions under `spec`, in
    chunks saved as they finish, so a killed encode resumes; a second worker with `reverse`
    takes the chunks from the end (two cores, one torch thread each)."""
    import torch

    from xm.encoders import load_encoder

    torch.set_num_threads(1)
    final = cache_path(spec, n)
    if final.is_file():
        return final
    caps = synthetic_captions(n)
    enc = load_encoder(spec, quiet=True)
    chunks = CACHE / f"{final.stem}.chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    starts = list(range(0, n, CHUNK))
    for lo in reversed(starts) if reverse else starts:
        f = chunks / f"{lo:08d}.npz"
        if f.is_file():
            continue
        emb, norms = enc.encode_texts_with_norms(caps[lo : lo + CHUNK])
        tmp = chunks / f".{lo:08d}.{os.getpid()}.tmp.npz"
        np.savez(tmp, emb=emb, norms=norms)
        os.replace(tmp, f)
        print(f"{spec}: {lo + CHUNK}/{n} captions, {time.perf_counter() - t0:.0f} s", flush=True)
    if reverse:
        return final  # the forward worker concatenates
    parts = [np.load(chunks / f"{lo:08d}.npz") for lo in range(0, n, CHUNK)]
    tmp = CACHE / f".{final.stem}.tmp.npz"
    np.savez(tmp, emb=np.concatenate([p["emb"] for p in parts]), norms=np.concatenate([p["norms"] for p in parts]))
    os.replace(tmp, final)
    return final


SPEC = "ViT-B-32:random"
CODECS = ("SQ8", "SQ4", "PQ128", "PQ64", "PQ32", "OPQ64,PQ64", "OPQ32,PQ32")
PART_ROWS = 25_000
EUROSAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "eurosat"
CLASSNAMES = ("annual crop land", "forest", "herbaceous vegetation land", "highway or road", "industrial buildings",
              "pasture land", "permanent crop land", "residential buildings", "river", "sea or lake")
TEMPLATE = "a centered satellite photo of {}."
GOAL_BYTES = 1536  # 1.5 KB per memory item, every role counted


def cached_embeddings(spec: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    f = cache_path(spec, n)
    if not f.is_file():
        raise SystemExit(f"{f}: missing; run `bench_compress.py encode --spec {spec} --items {n}` first")
    data = np.load(f)
    return data["emb"], data["norms"]


def base_index(root: Path, n: int, max_index_memory: str = "1G") -> Path:
    """The float16 index: embed-stage output written directly, then the real index/store/manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xm.encoders import EncoderSpec
    from xm.indexes.layout import Layout, part_name, write_json
    from xm.pipeline import BuildConfig, build_index

    if (root / "manifest.json").is_file():
        return root
    emb, norms = cached_embeddings(SPEC, n)
    caps = synthetic_captions(n)
    layout, slug = Layout(root), EncoderSpec.parse(SPEC).slug
    rng = np.random.default_rng(0)
    for p, lo in enumerate(range(0, n, PART_ROWS)):
        hi, name = min(n, lo + PART_ROWS), part_name(p)
        img = rng.standard_normal((hi - lo, emb.shape[1])).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        for path, arr in ((layout.emb_file(slug, "image", name), img.astype(np.float16)),
                          (layout.emb_file(slug, "text", name), emb[lo:hi].astype(np.float16)),
                          (layout.norm_file(slug, "text", name), norms[lo:hi].astype(np.float32))):
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, arr)
        meta = layout.part_rows(name)  # the embed stage's rows of the part
        meta.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image_path": [str(i) for i in range(lo, hi)], "caption": caps[lo:hi],
                                 "url": [None] * (hi - lo), "source_id": [str(i) for i in range(lo, hi)]}), meta)
        write_json(layout.done_marker("embed", name), {"part": name, "rows": hi - lo, "failures": {}})
    build_index(BuildConfig(source=str(_empty_source(root)), out=root, coarse=SPEC, fine=SPEC, inference=[SPEC],
                            stages=("index", "store", "manifest"), max_index_memory=max_index_memory))
    return root


def _empty_source(root: Path) -> Path:
    src = root.parent / "empty-source"
    src.mkdir(parents=True, exist_ok=True)
    return src


def codec_index(base: Path, codec: str, max_index_memory: str = "1G") -> tuple[Path, float]:
    """A hard-linked copy of the float16 index, compressed by the real build (every file of the
    build is written to a new name and renamed, so the copy never alters the base). `codec` is
    TEXT, or TEXT+image:IMAGE for the image (refine) embeddings too; TEXT "-" for none."""
    from xm.pipeline import BuildConfig, build_index

    text, _, image = codec.partition("+image:")
    root = base.parent / f"idx-{codec.replace(',', '_').replace('+image:', '+img-')}"
    if (root / "_work" / "done" / "compressed.ok").is_file():
        return root, float((root / "_work" / "done" / "compressed.ok").read_text())
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["cp", "-al", str(base), str(root)], check=True)
    t = time.perf_counter()
    build_index(BuildConfig(source=str(_empty_source(base)), out=root, coarse=SPEC, fine=SPEC, inference=[SPEC],
                            stages=("compress", "manifest"), max_index_memory=max_index_memory,
                            text_codecs=[f"{SPEC}={text}"] if text != "-" else [],
                            image_codecs=[f"{SPEC}={image}"] if image else []))
    secs = time.perf_counter() - t
    (root / "_work" / "done" / "compressed.ok").write_text(str(secs))
    return root, secs


def query_features(n: int) -> np.ndarray:
    """ViT-B-32:random image embeddings of EuroSAT test images, n/10 per class (cached)."""
    import csv

    from PIL import Image

    from xm.encoders import load_encoder

    f = CACHE / f"eurosat-{SPEC.replace(':', '_')}-{n}.npy"
    if f.is_file():
        return np.load(f)
    per = max(1, n // 10)
    rows: dict[str, list[str]] = {}
    with open(EUROSAT / "test.csv") as fh:
        for r in csv.DictReader(fh):
            rows.setdefault(r["ClassName"], []).append(r["Filename"])
    files = [EUROSAT / name for cls in sorted(rows) for name in rows[cls][:per]]
    images = [Image.open(p).convert("RGB") for p in files]
    feats = load_encoder(SPEC, quiet=True).encode_images(images)
    np.save(f, feats)
    return feats


def run_method(root: Path, feats: np.ndarray) -> dict:
    """The `xmore` method on one index: evidence (retrieval, re-ranking, text modality) + decisions."""
    from xm.classify import Classifier
    from xm.memories import open_index
    from xm.methods.base import Queries

    memory = open_index(root)
    clf = Classifier(memory, list(CLASSNAMES), method="xmore", model=SPEC, templates=[TEMPLATE])
    m = clf.method
    queries = Queries([None] * len(feats), features={Queries.feature_key(m.coarse): feats})
    t = time.perf_counter()
    ev = m.evidence(queries)
    secs = time.perf_counter() - t
    dec = m.decide(ev, m.new_state())
    return {"ids": ev["ids"], "pred": np.argmax(dec.probs, 1), "pred_txt": np.argmax(ev["p_txt"], 1),
            "skipped": dec.skipped, "evidence_s": secs, "pool": ev["pool"]}


ROLE_OF = (("index/", "/image/", "coarse image kNN index (codes + ids)"),
           ("embeddings/", "/img_code/", "image refine embeddings, codes + codec"),
           ("index/", "/text/", "coarse text kNN index"),
           ("embeddings/", "/img_emb/", "image refine embeddings (float16)"),
           ("embeddings/", "/text_emb/", "caption embeddings, float16 (fine + inference + text refine)"),
           ("embeddings/", "/text_code/", "caption embeddings, codes + codec (fine + inference + text refine)"),
           ("embeddings/", "/text_norm/", "caption norms (float32)"))


def bytes_per_item(root: Path) -> dict[str, float]:
    """Bytes per memory item per role, from the manifest's file list (what the index holds)."""
    from xm.indexes.manifest import read_manifest

    manifest = read_manifest(root)
    out: dict[str, float] = {}
    for rel, e in manifest.files.items():
        role = next((name for a, b, name in ROLE_OF if rel.startswith(a) and b in rel), "not an embedding role: captions store, metadata")
        out[role] = out.get(role, 0.0) + e.bytes / manifest.count
    out["total (every embedding role)"] = sum(v for k, v in out.items() if not k.startswith("not an"))
    return out


def projection_400m() -> list[dict]:
    """Bytes per item at 400M with the product's roles, per codec choice. Assumed, not measured:
    kNN indexes of PQ64 codes + 8-byte ids (72 B each). Codecs: (image refine, coarse text,
    fine, inference); the coarse text embeddings serve only the text kNN index's refine step."""
    from xm.indexes.codecs import code_size

    dims = {"image refine (ViT-B-32)": 512, "coarse text (ViT-B-32, text-index refine)": 512,
            "fine (ViT-L-14)": 768, "inference (RN50)": 1024}
    fixed = {"image kNN index (PQ64 + id)": 72, "text kNN index (PQ64 + id)": 72, "norms (3 text encoders, float32)": 12}

    def size(codec: str, d: int) -> int:
        return 2 * d if codec == "float16" else code_size(codec, d)

    configs = [("float16 (today)", ("float16",) * 4), ("SQ8 text", ("float16", "SQ8", "SQ8", "SQ8")),
               ("SQ4 text", ("float16", "SQ4", "SQ4", "SQ4")),
               ("PQ64 / PQ192 / PQ128 text", ("float16", "PQ64", "PQ192", "PQ128")),
               ("PQ64 / PQ96 / PQ128 text", ("float16", "PQ64", "PQ96", "PQ128")),
               ("image SQ8, SQ4 / SQ4 / PQ128", ("SQ8", "SQ4", "SQ4", "PQ128")),
               ("image SQ4, PQ64 / SQ4 / SQ4", ("SQ4", "PQ64", "SQ4", "SQ4")),
               ("image SQ8, SQ8 everywhere", ("SQ8",) * 4)]
    out = []
    for name, codecs in configs:
        roles = {**fixed, **{f"{r}: {c}": size(c, d) for (r, d), c in zip(dims.items(), codecs)}}
        total = sum(roles.values())
        out.append({"config": name, "roles": roles, "total_bytes": total, "tb_at_400m": round(total * 400e6 / 1e12, 2),
                    "meets_1_5_kb": total <= GOAL_BYTES})
    return out


def run(args: argparse.Namespace) -> dict:
    import faiss
    import torch

    from xm.indexes import codecs
    from xm.indexes.manifest import read_manifest

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    codecs.TRAIN_ROWS = args.train_rows  # the product's default is 65,536 (a minute per PQ here, more under load)
    work = CACHE / (f"indexes-{args.items}" + ("" if args.max_index_memory == "1G" else f"-{args.max_index_memory}"))
    t = time.perf_counter()
    base = base_index(work / "idx-float16", args.items, args.max_index_memory)
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} shared cores, no GPU, random-init weights, "
                            f"1 torch + 1 faiss thread, torch {torch.__version__}, faiss {faiss.__version__}",
                 "items": args.items, "encoder": SPEC, "queries": args.queries, "codec_train_rows": args.train_rows,
                 "max_index_memory": args.max_index_memory,
                 "kNN_indexes": {e.modality: {"key": e.key, "params": e.params, "refine_k_factor": e.refine_k_factor}
                                 for e in read_manifest(base).indexes},
                 "float16_index_build_s": time.perf_counter() - t}
    feats = query_features(args.queries)
    ref = run_method(base, feats)
    out["float16"] = {"bytes_per_item": bytes_per_item(base), "evidence_s": ref["evidence_s"],
                      "skipped": int(ref["skipped"].sum()), "mean_pool": float(ref["pool"].mean())}
    print(f"float16: {out['float16']}", flush=True)
    rows = []
    for codec in args.codecs.split(";"):
        root, build_s = codec_index(base, codec, args.max_index_memory)
        r = run_method(root, feats)
        keep = ~(ref["skipped"] | r["skipped"])
        overlap = np.array([len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum()) for a, b in zip(r["ids"], ref["ids"])])
        row = {"codec": codec, "compress_build_s": round(build_s, 1), "evidence_s": round(r["evidence_s"], 2),
               "top16_overlap_mean": float(overlap.mean()), "top16_overlap_min": float(overlap.min()),
               "top16_identical_share": float((overlap == 1).mean()),
               "decision_agreement": float((r["pred"] == ref["pred"])[keep].mean()),
               "text_modality_agreement": float((r["pred_txt"] == ref["pred_txt"])[keep].mean()),
               "bytes_per_item": bytes_per_item(root)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "bytes_per_item"}), flush=True)
        _write_json(args.json_out, {**out, "codecs": rows, "partial": True})  # a long run leaves what it measured
    out["codecs"] = rows
    out["projection_400m"] = projection_400m()
    return out


def _write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def print_tables(out: dict) -> None:
    f16 = out["float16"]["bytes_per_item"]
    print(f"\n{out['items']} items, {out['queries']} EuroSAT queries, {out['encoder']} every role; {out['machine']}")
    print(f"{'codec':<12} {'caption B/item':>14} {'total B/item':>12} {'top16 overlap':>13} {'min':>5} {'identical':>9} "
          f"{'X-MoRe agree':>12} {'text agree':>10} {'evidence s':>10}")
    def cap(b: dict) -> float:
        return sum(v for k, v in b.items() if k.startswith("caption embeddings"))
    print(f"{'float16':<12} {cap(f16):>14.1f} {f16['total (every embedding role)']:>12.1f} {1:>13.3f} {1:>5.2f} {1:>9.2f} "
          f"{1:>12.3f} {1:>10.3f} {out['float16']['evidence_s']:>10.2f}")
    for r in out["codecs"]:
        b = r["bytes_per_item"]
        print(f"{r['codec']:<12} {cap(b):>14.1f} {b['total (every embedding role)']:>12.1f} {r['top16_overlap_mean']:>13.3f} "
              f"{r['top16_overlap_min']:>5.2f} {r['top16_identical_share']:>9.2f} {r['decision_agreement']:>12.3f} "
              f"{r['text_modality_agreement']:>10.3f} {r['evidence_s']:>10.2f}")
    print("\nbytes per item per role, measured (float16 index):")
    for k, v in f16.items():
        print(f"  {k:<72} {v:>8.1f}")
    print(f"\nprojected to 400M items, product roles (goal <= {GOAL_BYTES} B/item):")
    for p in out["projection_400m"]:
        print(f"  {p['config']:<28} {p['total_bytes']:>6} B/item  {p['tb_at_400m']:>5} TB  {'meets' if p['meets_1_5_kb'] else 'over'}")
        for k, v in p["roles"].items():
            print(f"      {k:<48} {v:>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="encode the synthetic captions under one encoder (cached)")
    e.add_argument("--spec", required=True)
    e.add_argument("--items", type=int, default=100_000)
    e.add_argument("--reverse", action="store_true", help="take chunks from the end (a second worker)")
    r = sub.add_parser("run", help="build the indexes and measure (needs the encode cache)")
    r.add_argument("--items", type=int, default=100_000)
    r.add_argument("--queries", type=int, default=300)
    r.add_argument("--codecs", default=";".join(CODECS), help="';'-separated FAISS codec strings")
    r.add_argument("--max-index-memory", default="1G", help="autofaiss budget of the kNN indexes (small: IVF-PQ + refine)")
    r.add_argument("--train-rows", type=int, default=65_536, help="codec training rows (the product's TRAIN_ROWS)")
    r.add_argument("--json-out", default=str(Path(__file__).parent / "out" / "bench_compress.json"))
    t = sub.add_parser("table", help="print the tables of a written JSON (the projection recomputed)")
    t.add_argument("json_in")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cmd == "table":
        out = json.loads(Path(args.json_in).read_text())
        out["projection_400m"] = projection_400m()
        print_tables(out)
        _write_json(args.json_in, out)
        return
    if args.cmd == "encode":
        print(encode(args.spec, args.items, args.reverse))
        return
    out = run(args)
    print_tables(out)
    _write_json(args.json_out, out)
    print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
