"""`xm benchmark --suite NAME`: one published table's datasets x methods, run through the
benchmark runner, printed in the paper's layout beside the published figures.

A suite is a data file, `evaluation/published/<name>.json`, transcribed from the paper
(it cites file, table and lines): the columns (the paper's dataset labels, each with the
xm dataset it is, or null where xm has no loader), the averages the paper prints, and row
groups per encoder (each row: the paper's label, the xm method that is it, or null where
xm has no such method, and the published figures). Datasets are found as `xm benchmark`
finds them (`$XM_DATA/<dataset>`, then `$XM_HOME/data/<dataset>`); the missing ones are
named in one line and left out. xm's figures are compared with the rows of the group whose
encoder xm ran (else the first group, said so).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from xm.errors import XMError
from xm.evaluation.datasets import load_dataset
from xm.evaluation.decontaminate import Decontamination
from xm.evaluation.runner import BenchmarkConfig, run_benchmark
from xm.indexes.home import find_dataset
from xm.indexes.layout import atomic_path
from xm.memories import Memory
from xm.methods.protocols import protocol
from xm.methods.registry import get

PUBLISHED = Path(__file__).with_name("published")
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class Column:
    label: str  # the paper's
    dataset: str | None  # xm's dataset name; None: no loader in xm


@dataclass(frozen=True)
class Row:
    label: str
    method: str | None  # the xm method that is this row; None: not in xm
    values: dict[str, float]  # published, by column or average label


@dataclass(frozen=True)
class Group:
    model: str  # the paper's encoder name (RN50, ViT-B/16, ...)
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    source: dict[str, str]
    metric: str
    protocol: str
    templates: str | None
    columns: tuple[Column, ...]
    averages: tuple[tuple[str, tuple[str, ...]], ...]  # (label, columns averaged)
    groups: tuple[Group, ...]
    notes: tuple[str, ...]


def suite_names() -> list[str]:
    return sorted(p.stem for p in PUBLISHED.glob("*.json"))


def load_suite(name: str) -> Suite:
    path = PUBLISHED / f"{name}.json"
    if name not in suite_names():
        raise XMError(f"--suite {name!r}: unknown; choose from {', '.join(suite_names())}")
    d = json.loads(path.read_text(encoding="utf-8"))
    return Suite(
        name=d["suite"], title=d["title"], source=d["source"], metric=d["metric"], protocol=d["protocol"],
        templates=d.get("templates"),
        columns=tuple(Column(c["label"], c["dataset"]) for c in d["columns"]),
        averages=tuple((a["label"], tuple(a["over"])) for a in d["averages"]),
        groups=tuple(Group(g["model"], tuple(Row(r["label"], r["method"], dict(r["values"])) for r in g["rows"]))
                     for g in d["groups"]),
        notes=tuple(d.get("notes", ())))


def _arch(model: str) -> str:
    """`ViT-B-32:openai` and the paper's `ViT-B/32` compare as `vit-b-32`."""
    return model.split(":")[0].replace("/", "-").lower()


def compared_group(suite: Suite, model: str | None) -> tuple[Group, str | None]:
    """The row group of xm's encoder, or the first group and a line saying so."""
    for g in suite.groups:
        if model and _arch(g.model) == _arch(model):
            return g, None
    g = suite.groups[0]
    return g, (f"xm ran {model or 'no encoder'}; the paper has no rows for it: compared with its {g.model} rows"
               if len(suite.groups) > 1 or not model or _arch(g.model) != _arch(model) else None)


def locate(suite: Suite) -> tuple[dict[str, Path], dict[str, str]]:
    """Each column's data folder, and why each missing one is missing."""
    found: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for c in suite.columns:
        if c.dataset is None:
            missing[c.label] = "no loader in xm"
            continue
        try:
            found[c.label] = find_dataset(c.dataset, None)
        except XMError:
            missing[c.label] = f"not found ({c.dataset})"
    return found, missing


@dataclass
class SuiteConfig:
    """What the suite's benchmark runs share (the rest comes from the suite file)."""

    index: Path | None = None
    model: str | None = None
    limit: int | None = None
    seeds: list[int] | None = None
    options: dict[str, Any] | None = None
    batch_size: int = 32
    precision: str = "fp32"
    cache_dir: Path | None = None
    device: Any = None  # a Device or its text (None: auto), parsed by run_benchmark
    decontaminate: Decontamination = field(default_factory=Decontamination)  # per dataset, as `xm benchmark`


def _runnable(methods: list[str], memory: Memory | None) -> tuple[list[str], dict[str, str]]:
    ok, notes = [], {}
    for m in methods:
        if memory is None and get(m).method.needs_memory:
            notes[m] = "needs an index (--index)"
        else:
            ok.append(m)
    return ok, notes


def run_suite(suite: Suite, cfg: SuiteConfig, memory: Memory | None,
              progress: Progress = lambda label, total: (lambda n: None)) -> dict[str, Any]:
    """Run every found dataset with every xm method of the suite; the published figures beside."""
    proto = protocol(suite.protocol)
    model = cfg.model or (memory.default_model() if memory is not None else None)
    if model is None:
        raise XMError("--model: required without an index (the suite's methods need an encoder)")
    group, group_note = compared_group(suite, model)
    wanted = list(dict.fromkeys(r.method for g in suite.groups for r in g.rows if r.method))
    methods, method_notes = _runnable(wanted, memory)
    takes = {o.name for m in methods for o in get(m).method.options}
    unknown = sorted(set(cfg.options or {}) - takes)
    if unknown:
        raise XMError(f"--opt {', '.join(unknown)}: no method of suite {suite.name} ({', '.join(methods)}) takes it")
    found, missing = locate(suite)
    xm: dict[str, dict[str, float]] = {}  # method -> column -> top-1 %
    runs: dict[str, Any] = {}
    for col in suite.columns:
        if col.label not in found or not methods:
            continue
        assert col.dataset is not None  # found only for columns with a loader
        try:
            ds = load_dataset(col.dataset, found[col.label], "test", names=proto["classnames"])
        except XMError as exc:  # a folder of that name, but not the dataset's layout
            missing[col.label] = str(exc)
            continue
        base = BenchmarkConfig(dataset=col.dataset, data_dir=found[col.label], index=cfg.index, model=model,
                               methods=methods, protocol=suite.protocol, seeds=cfg.seeds, templates=suite.templates,
                               limit=cfg.limit, options=dict(cfg.options or {}), batch_size=cfg.batch_size,
                               precision=cfg.precision, device=cfg.device, decontaminate=cfg.decontaminate)
        if cfg.cache_dir is not None:
            base.cache_dir = cfg.cache_dir
        results: dict[str, Any] = {}
        images = 0
        run: dict[str, Any] = {}
        try:
            run = run_benchmark(base, ds, memory, progress)
            results, images = run["methods"], run["images_evaluated"]
        except XMError:
            # a method cannot run here (no checkpoint, no one-vs-one texts...): each tried alone on one image,
            # its reason kept, then the others together (one pass over the images, as above)
            ok = []
            for m in methods:
                takes = {o.name for o in get(m).method.options}
                alone = replace(base, methods=[m], limit=1, options={k: v for k, v in base.options.items() if k in takes})
                try:
                    run_benchmark(alone, ds, memory)
                    ok.append(m)
                except XMError as exc:
                    method_notes.setdefault(m, str(exc))
            if ok:
                taken = {o.name for m in ok for o in get(m).method.options}
                run = run_benchmark(replace(base, methods=ok, options={k: v for k, v in base.options.items() if k in taken}),
                                    ds, memory, progress)
                results, images = run["methods"], run["images_evaluated"]
        for name, r in results.items():
            xm.setdefault(name, {})[col.label] = 100.0 * r["metrics"]["acc1"]
        runs[col.label] = {"dataset": col.dataset, "images": images, "split_source": ds.split_source,
                           "decontamination": {k: v for k, v in (run.get("decontamination") or {}).items() if k != "hidden_ids"},
                           "methods": {n: {"acc1": r["metrics"]["acc1"], "std": r["std"]["acc1"], "fit": r.get("fit")}
                                       for n, r in results.items()}}
    rows = []
    for g in suite.groups:
        for r in g.rows:
            mine = xm.get(r.method, {}) if r.method and g is group else {}
            mine = {**mine, **_averages(suite, mine)}
            delta = {k: mine[k] - r.values[k] for k in mine if k in r.values}
            rows.append({"group": g.model, "label": r.label, "method": r.method, "published": r.values, "xm": mine,
                         "delta": delta, "note": method_notes.get(r.method or "") if g is group else None})
    notes = list(suite.notes)
    if group_note:
        notes.append(group_note)
    if model.endswith(":random"):
        notes.append(f"{model} has random weights: xm's figures are far from the paper's by construction and "
                     f"say nothing about the methods' published accuracy")
    if cfg.limit:
        notes.append(f"at most {cfg.limit} test images per dataset (--limit): not the paper's test sets")
    hidden = {label: r["decontamination"] for label, r in runs.items() if r["decontamination"]}
    if hidden:
        notes.append("decontamination (test near-duplicates hidden from the memory for the run): " + "; ".join(
            f"{label} {d['hidden']} hidden" if d.get("enabled") else f"{label} off ({d.get('why')})"
            for label, d in hidden.items()))
    return {"suite": suite.name, "title": suite.title, "source": suite.source, "metric": suite.metric,
            "protocol": suite.protocol, "model": model, "compared_with": group.model,
            "index_manifest_id": getattr(memory, "id", None),
            "columns": [c.label for c in suite.columns], "averages": [a for a, _ in suite.averages],
            "datasets": runs, "missing": missing, "rows": rows, "notes": notes}


def _averages(suite: Suite, values: dict[str, float]) -> dict[str, float]:
    """The paper's averages, only where xm has every column averaged (a partial mean is not the paper's)."""
    return {label: sum(values[c] for c in over) / len(over)
            for label, over in suite.averages if all(c in values for c in over)}


# ------------------------------------------------------------------ the table, three ways

def _cell(v: float | None, signed: bool = False) -> str:
    if v is None or math.isnan(v):
        return "–"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The paper's layout: a line per published row, and for rows xm ran its figures and the difference."""
    cols = result["columns"] + result["averages"]
    header = ["method", *cols]
    out = []
    for r in result["rows"]:
        tag = f" [{r['group']}]" if len({x["group"] for x in result["rows"]}) > 1 else ""
        out.append([f"{r['label']}{tag} (paper)", *[_cell(r["published"].get(c)) for c in cols]])
        if r["group"] != result["compared_with"]:
            continue
        if r["method"] is None:
            out.append(["  xm: no such method", *["" for _ in cols]])
        elif r["xm"]:
            out.append([f"  xm {r['method']}", *[_cell(r["xm"].get(c)) for c in cols]])
            out.append(["  Δ (xm − paper)", *[_cell(r["delta"].get(c), signed=True) for c in cols]])
        else:
            out.append([f"  xm {r['method']}: {r['note'] or 'not run (no dataset found)'}", *["" for _ in cols]])
    return header, out


def missing_line(result: dict[str, Any]) -> str | None:
    if not result["missing"]:
        return None
    return "missing datasets: " + ", ".join(f"{k} ({v})" for k, v in result["missing"].items())


def to_markdown(result: dict[str, Any]) -> str:
    header, rows = table_rows(result)
    src = result["source"]
    lines = [f"# {result['title']}", "",
             f"Published: {src['paper']}, {src['table']} ({src['file']}, lines {src['lines']}). {result['metric']}.",
             f"xm: {result['model']}, protocol {result['protocol']}, index {result['index_manifest_id']}; "
             f"compared with the paper's {result['compared_with']} rows.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines.append("")
    for label, run in result["datasets"].items():
        lines.append(f"- {label}: {run['images']} test images ({run['split_source']})")
    if missing_line(result):
        lines.append(f"- {missing_line(result)}")
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot_suite(result: dict[str, Any], target: Path) -> Path:
    """Grouped bars per dataset: each compared row's published figure beside xm's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in result["rows"] if r["group"] == result["compared_with"] and r["method"]]
    cols = result["columns"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cols) * max(1, len(rows)) ** 0.5), 4.2))
    width = 0.8 / max(1, 2 * len(rows))
    x = np.arange(len(cols))
    for j, r in enumerate(rows):
        for k, (kind, values, hatch) in enumerate((("paper", r["published"], ""), ("xm", r["xm"], "//"))):
            vals = [values.get(c, np.nan) for c in cols]
            pos = x + (2 * j + k - (2 * len(rows) - 1) / 2) * width
            ax.bar(pos, vals, width, label=f"{r['label']} ({kind})", hatch=hatch, color=f"C{j}", alpha=1.0 if k == 0 else 0.55)
    ax.set_xticks(x, cols, rotation=20)
    ax.set_ylabel(result["metric"])
    ax.set_ylim(0, 100)
    ax.set_title(f"{result['title']}\nxm {result['model']} vs the paper's {result['compared_with']} rows", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target


def write_suite(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """`<suite>.md`, `<suite>.json` and `<suite>.png` in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{result['suite']}.md", "json": out / f"{result['suite']}.json"}
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(to_markdown(result), encoding="utf-8")
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["png"] = plot_suite(result, out / f"{result['suite']}.png")
    return paths
