"""What `xm benchmark --out` writes: a JSON per method result, `results.csv` merging every result
in the folder, a PNG chart per run.

A result file is named by its **result key**, a digest of everything that changes the result
(`result_identity`): the dataset, split and the exact image list (so `--limit`), the protocol
and seeds, the index, encoders and precision, the class names and templates, the method, its
options (shots for few-shot methods) and its evidence key (which adds trained or fitted
state, e.g. a RECO checkpoint's digest). Two runs into one folder that differ in any of these
write two files; the same run again rewrites its own.

The JSON is CLIP_benchmark's record (`dataset`, `model`, `pretrained`, `task`, `metrics`,
`language`) plus xm's fields. CLIP_benchmark's `build` merges records into one table and
names a row's model `model + ' ' + pretrained` (`model_fullname`, what its tables group
by), so `model` carries the method, `ARCH+METHOD` (`RN50+xmore`): methods that share an
inference encoder stay apart there. `arch` and `inference_model` keep the encoder itself.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from xm.indexes.layout import atomic_path

METRICS = ("acc1", "acc5", "mean_per_class_recall")


def _digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def result_identity(result: dict[str, Any], name: str) -> dict[str, Any]:
    """Everything that changes method `name`'s result in a `run_benchmark` result."""
    r = result["methods"][name]
    return {
        "dataset": result["dataset"], "split": result["split"], "split_source": result["split_source"],
        "images_key": result.get("images_key"), "images": result["images_evaluated"], "limit": result.get("limit"),
        "protocol": result["protocol"], "seeds": result["seeds"], "index_manifest_id": result["index_manifest_id"],
        "model": result["model"], "encoders": result["encoders"], "precision": result.get("precision", "fp32"),
        "classnames": result["classnames"], "templates": result["templates"],
        "method": name, "options": r["options"], "shots": r.get("shots"), "evidence_key": r.get("evidence_key"),
    }


def result_key(result: dict[str, Any], name: str) -> str:
    return _digest(result_identity(result, name))


def record(result: dict[str, Any], name: str) -> dict[str, Any]:
    """The JSON written for one method's result (CLIP_benchmark's fields first)."""
    r = result["methods"][name]
    arch, _, pretrained = result["model"].partition(":")
    return {
        "dataset": result["dataset"], "model": f"{arch}+{name}", "pretrained": pretrained, "task": "zeroshot_classification",
        "metrics": r["metrics"], "language": "en",
        "method": name, "arch": arch, "inference_model": result["model"],
        "std": r["std"], "per_seed": r["per_seed"], "seeds": result["seeds"], "split": result["split"],
        "split_source": result["split_source"], "images": result["images_evaluated"], "limit": result.get("limit"),
        "images_key": result.get("images_key"), "index": result["index"],
        "index_manifest_id": result["index_manifest_id"], "encoders": result["encoders"],
        "precision": result.get("precision", "fp32"), "protocol": result["protocol"], "options": r["options"],
        "classnames": result["classnames"], "templates": result["templates"],
        "evidence_key": r.get("evidence_key"), "result_key": result_key(result, name), "run_id": run_id(result),
        "images_scored": r["images_scored"], "images_skipped": r["images_skipped"],
        "stream_order": result.get("protocol_settings", {}).get("stream_order"),
        "decontamination": {k: v for k, v in (result.get("decontamination") or {}).items() if k != "hidden_ids"},
        **({"shots": r["shots"], "fit": r["fit"]} if "shots" in r else {"fit": r["fit"]} if "fit" in r else {}),
    }


def run_id(result: dict[str, Any]) -> str:
    """One run's methods together (its chart's name): a digest of their result keys."""
    return _digest(sorted(result_key(result, name) for name in result["methods"]), 10)


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """JSON per method, `results.csv` merging every result in `out`, a PNG chart of this run."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in result["methods"]:
        rec = record(result, name)
        label = f"{name.replace('@', '_')}shot" if "@" in name else name
        path = out / f"{result['dataset']}_{label}_{rec['result_key']}.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(rec, indent=2))
        written[name] = path
    written["csv"] = merge_csv(out)
    written["png"] = plot(result, out / f"{result['dataset']}_{run_id(result)}.png")
    return written


def _cell(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else json.dumps(value, sort_keys=True)


def csv_row(r: dict[str, Any]) -> dict[str, Any]:
    """One CSV row of a result JSON: what it measured and every setting that changes it
    (options one column each, `opt.NAME`; class names and templates as count and digest)."""
    classnames, templates = r.get("classnames"), r.get("templates")
    return {
        "dataset": r["dataset"], "method": r["method"], "shots": r.get("shots", ""), "protocol": r.get("protocol", ""),
        "model": r.get("arch", r["model"]), "pretrained": r["pretrained"], "precision": r.get("precision", ""),
        "split": r["split"], "split_source": r["split_source"], "images": r["images"], "limit": r.get("limit") or "",
        **{k: r["metrics"].get(k) for k in METRICS},
        **{f"{k}_std": r["std"].get(k) for k in METRICS},
        "seeds": " ".join(map(str, r["seeds"])),
        "classes": len(classnames) if classnames is not None else "",
        "classnames_sha256": _digest(classnames) if classnames is not None else "",
        "templates": len(templates) if templates is not None else "",
        "templates_sha256": _digest(templates) if templates is not None else "",
        "index_manifest_id": r["index_manifest_id"],
        "encoders": _cell(r.get("encoders", "")),
        **{f"opt.{k}": _cell(v) for k, v in sorted((r.get("options") or {}).items())},
        "result_key": r.get("result_key", ""), "run_id": r.get("run_id", ""),
    }


def merge_csv(folder: Path) -> Path:
    """`results.csv`: one row per result JSON in `folder`; the columns are the union of the rows'
    (a method without an option leaves its column empty)."""
    rows = []
    for f in sorted(folder.glob("*.json")):
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # not a result of ours
        if not isinstance(r, dict) or r.get("task") != "zeroshot_classification" or "method" not in r:
            continue
        try:
            rows.append(csv_row(r))
        except (KeyError, TypeError, AttributeError):
            continue  # damaged or foreign: the run's own results are still merged
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    # option columns after the settings, before the keys
    tail = ["result_key", "run_id"]
    columns = [c for c in columns if not c.startswith("opt.") and c not in tail] + \
              sorted(c for c in columns if c.startswith("opt.")) + [c for c in tail if c in columns]
    target = folder / "results.csv"
    with atomic_path(target) as tmp:
        with open(tmp, "w", newline="") as stream:
            if rows:
                w = csv.DictWriter(stream, fieldnames=columns, restval="")
                w.writeheader()
                w.writerows(rows)
    return target


def plot(result: dict[str, Any], target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    metrics = [m for m in METRICS if m in result["methods"][names[0]]["metrics"]]
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
