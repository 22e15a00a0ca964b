"""`xm benchmark`: every method side by side, on the same images and the same retrieved captions.

1. Evidence (cached): the images' embeddings under the inference, coarse and fine
   encoders and the captions kept by direct and indirect retrieval, computed with the
   very code `xm classify` runs. The cache key is (dataset, split, images, index id,
   K, k, encoders); re-running with other methods, seeds or templates does not search again.
2. Per method and seed: the stream in a seeded random order through the one ensemble.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from xm.errors import XMError
from xm.evaluation.datasets import DatasetSplit
from xm.evaluation.metrics import modality_entropy, weight_ratios, zeroshot_metrics
from xm.indexes import MemoryIndex
from xm.indexes.layout import atomic_path
from xm.methods.ensemble import run_stream
from xm.methods.retrieval import Retriever
from xm.methods.xmore import XMoRe


@dataclass(frozen=True)
class Method:
    """A benchmark method: which retrieval's captions it reads, and how it ensembles.

    RECO and CODER join as more entries of METHODS with their own `run`.
    """

    name: str
    retrieval: str  # "direct" | "indirect"
    mode: str  # an ensemble mode of methods/ensemble.py
    description: str

    def run(self, ev: "Evidence", order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p_txt = ev.p_txt[self.retrieval]
        return run_stream(ev.p_img, p_txt, self.mode, order=order)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("clip", "direct", "image", "zero-shot CLIP, image only"),
    Method("captions", "direct", "text", "caption ensemble, text only"),
    Method("xmore", "direct", "modal", "X-MoRe, modal confidence, min-max (paper)"),
    Method("xmore-l1", "direct", "l1", "X-MoRe, L1 over the history (authors' code)"),
    Method("xmore-equal", "direct", "equal", "X-MoRe, equal confidence (Table 5)"),
    Method("xmore-raw", "direct", "raw", "X-MoRe, unadjusted confidence (Table 7)"),
    Method("xmore-indirect", "indirect", "modal", "X-MoRe without fine re-ranking (Table 3)"),
]}


@dataclass
class Evidence:
    labels: np.ndarray
    p_img: np.ndarray
    p_txt: dict[str, np.ndarray]  # by retrieval kind


@dataclass
class BenchmarkConfig:
    dataset: str
    data_dir: Path
    index: Path
    model: str = "RN50:openai"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    split: str = "test"
    split_file: Path | None = None
    classnames_file: Path | None = None
    templates: str = "paper"  # a template set name, or a file of templates
    limit: int | None = None
    k_coarse: int = 128
    k_fine: int = 16
    batch_size: int = 32
    cache_dir: Path = field(default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xm" / "benchmark")


def resolve_templates(ds: DatasetSplit, templates: str) -> list[str]:
    if templates in ds.templates:
        return ds.templates[templates]
    path = Path(templates)
    if path.is_file():
        from xm.methods.zeroshot import check_templates

        return check_templates([l.strip() for l in path.read_text(encoding="utf-8-sig").splitlines() if l.strip() and not l.startswith("#")])
    raise XMError(f"--templates {templates!r}: neither a template set ({', '.join(ds.templates)}) nor a file")


def _subset(ds: DatasetSplit, limit: int | None) -> DatasetSplit:
    if limit is None or limit >= len(ds.items):
        return ds
    keep = np.sort(np.random.default_rng(0).choice(len(ds.items), limit, replace=False))
    return DatasetSplit(ds.dataset, ds.split, ds.split_source, ds.classnames, [ds.items[i] for i in keep], ds.templates)


def _cache_key(ds: DatasetSplit, memory: MemoryIndex, method: XMoRe, cfg: BenchmarkConfig) -> str:
    keys = hashlib.sha256("\n".join(i.key for i in ds.items).encode()).hexdigest()
    parts = [ds.dataset, ds.split, ds.split_source, keys, memory.id, cfg.k_coarse, cfg.k_fine,
             str(method.inference.spec), str(method.coarse.spec), str(method.fine.spec)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def compute_evidence(ds: DatasetSplit, memory: MemoryIndex, method: XMoRe, cfg: BenchmarkConfig,
                     progress: Callable[[str, int], Callable[[int], None]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Image features and kept caption ids (direct and indirect), from the cache when it is current."""
    key = _cache_key(ds, memory, method, cfg)
    cache = cfg.cache_dir / f"{ds.dataset}-{key}.npz"
    info = {"cache": str(cache), "cache_hit": cache.is_file()}
    if cache.is_file():
        with np.load(cache) as data:
            return {k: data[k] for k in data.files}, info
    indirect = Retriever(memory, method.coarse, method.fine, cfg.k_coarse, cfg.k_fine, direct=False)
    arrays: dict[str, list[np.ndarray]] = {"inference": [], "ids_direct": [], "ids_indirect": [], "failed": []}
    tick = progress("retrieval", len(ds.items))
    t0 = time.perf_counter()
    for lo in range(0, len(ds.items), cfg.batch_size):
        batch = ds.items[lo : lo + cfg.batch_size]
        images, ok = [], []
        for j, item in enumerate(batch):
            try:
                images.append(item.image())
                ok.append(lo + j)
            except XMError:
                arrays["failed"].append(np.array([lo + j]))
        if images:
            feats = method.encode(images)
            coarse, fine = feats[str(method.coarse.spec)], feats[str(method.fine.spec)]
            direct = method.retriever.retrieve(coarse, fine)
            indir = indirect.retrieve(coarse, fine)
            pad = lambda rs: np.stack([np.pad(r.ids, (0, cfg.k_fine - len(r.ids)), constant_values=-1) for r in rs])
            arrays["inference"].append(feats[str(method.inference.spec)])
            arrays["ids_direct"].append(pad(direct))
            arrays["ids_indirect"].append(pad(indir))
            arrays.setdefault("index", []).append(np.array(ok))
        tick(len(batch))
    info["evidence_seconds"] = time.perf_counter() - t0
    out = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in arrays.items()}
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **out)
    return out, info


def run_benchmark(cfg: BenchmarkConfig, ds: DatasetSplit, memory: MemoryIndex,
                  progress: Callable[[str, int], Callable[[int], None]] = lambda label, total: (lambda n: None)) -> dict[str, Any]:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise XMError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    ds = _subset(ds, cfg.limit)
    templates = resolve_templates(ds, cfg.templates)
    method = XMoRe(memory, cfg.model, ds.classnames, templates, cfg.k_coarse, cfg.k_fine)
    t0 = time.perf_counter()
    arrays, cache_info = compute_evidence(ds, memory, method, cfg, progress)
    evidence_s = time.perf_counter() - t0
    idx = arrays["index"].astype(np.int64)
    labels = np.array([ds.items[i].label for i in idx])
    p_img = method.image_modality(arrays["inference"])
    p_txt = {kind: np.stack([method.text_modality(ids)[0] for ids in arrays[f"ids_{kind}"]]) for kind in ("direct", "indirect")}
    ev = Evidence(labels, p_img, p_txt)

    results, xmore_weights = {}, None
    for name in cfg.methods:
        m = METHODS[name]
        per_seed, t = [], time.perf_counter()
        for seed in cfg.seeds:
            order = np.random.default_rng(seed).permutation(len(labels))
            probs, weights = m.run(ev, order)
            per_seed.append(zeroshot_metrics(probs, labels))
            if name == "xmore" and xmore_weights is None:
                xmore_weights = weights
        keys = per_seed[0].keys()
        results[name] = {
            "description": m.description,
            "metrics": {k: float(np.mean([s[k] for s in per_seed])) for k in keys},
            "std": {k: float(np.std([s[k] for s in per_seed])) for k in keys},
            "per_seed": per_seed,
            "ensemble_seconds": time.perf_counter() - t,
        }
    if xmore_weights is None:
        _, xmore_weights = run_stream(p_img, p_txt["direct"], "modal", order=np.random.default_rng(cfg.seeds[0]).permutation(len(labels)))
    n = len(ds.items)
    return {
        **ds.describe(),
        "images_evaluated": int(len(labels)),
        "images_failed": int(n - len(labels)),
        "failed_keys": [ds.items[int(i)].key for i in arrays["failed"]][:20],
        "model": cfg.model,
        "index": str(cfg.index),
        "index_manifest_id": memory.id,
        "encoders": {"inference": cfg.model, "coarse": memory.roles["coarse"], "fine": memory.roles["fine"]},
        "k_coarse": cfg.k_coarse,
        "k_fine": cfg.k_fine,
        "templates": templates,
        "seeds": cfg.seeds,
        "methods": results,
        "diagnostics": {
            "mean_entropy": modality_entropy(p_img, p_txt["direct"]),
            "xmore_weights_by_case": weight_ratios(p_img, p_txt["direct"], xmore_weights, labels),
        },
        "timing": {"evidence_seconds": evidence_s, "images_per_second": n / evidence_s if evidence_s > 0 else None,
                   **cache_info},
    }


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """JSON per method (CLIP_benchmark fields plus ours), a CSV merging every run in `out`, a PNG chart."""
    out.mkdir(parents=True, exist_ok=True)
    run_id = hashlib.sha256(json.dumps([result["index_manifest_id"], result["model"], result["seeds"], result["images_evaluated"],
                                        result["split_source"], result["templates"]]).encode()).hexdigest()[:10]
    arch, _, pretrained = result["model"].partition(":")
    written = {}
    for name, r in result["methods"].items():
        record = {
            "dataset": result["dataset"], "model": arch, "pretrained": pretrained, "task": "zeroshot_classification",
            "metrics": r["metrics"], "language": "en",
            "method": name, "std": r["std"], "per_seed": r["per_seed"], "seeds": result["seeds"], "split": result["split"],
            "split_source": result["split_source"], "images": result["images_evaluated"], "index": result["index"],
            "index_manifest_id": result["index_manifest_id"], "encoders": result["encoders"],
            "k_coarse": result["k_coarse"], "k_fine": result["k_fine"], "templates": result["templates"], "run_id": run_id,
        }
        path = out / f"{result['dataset']}_{name}_{run_id}.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
        written[name] = path
    written["csv"] = merge_csv(out)
    written["png"] = plot(result, out / f"{result['dataset']}_{run_id}.png")
    return written


def merge_csv(folder: Path) -> Path:
    import csv

    rows = []
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("task") != "zeroshot_classification":
            continue
        rows.append({"dataset": r["dataset"], "method": r["method"], "model": r["model"], "pretrained": r["pretrained"],
                     "split": r["split"], "split_source": r["split_source"], "images": r["images"],
                     **{k: r["metrics"].get(k) for k in ("acc1", "acc5", "mean_per_class_recall")},
                     **{f"{k}_std": r["std"].get(k) for k in ("acc1", "acc5", "mean_per_class_recall")},
                     "seeds": " ".join(map(str, r["seeds"])), "index_manifest_id": r["index_manifest_id"], "run_id": r["run_id"]})
    target = folder / "results.csv"
    with atomic_path(target) as tmp:
        with open(tmp, "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    return target


def plot(result: dict[str, Any], target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    metrics = [m for m in ("acc1", "acc5", "mean_per_class_recall") if m in result["methods"][names[0]]["metrics"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    width = 0.8 / len(metrics)
    x = np.arange(len(names))
    for j, metric in enumerate(metrics):
        vals = [100 * result["methods"][n]["metrics"][metric] for n in names]
        errs = [100 * result["methods"][n]["std"][metric] for n in names]
        bars = ax.bar(x + (j - (len(metrics) - 1) / 2) * width, vals, width, yerr=errs, capsize=3, label=metric)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"{result['dataset']} ({result['split']}, {result['images_evaluated']} images, seeds {result['seeds']})\n"
                 f"inference {result['model']}, index {result['index_manifest_id']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target
