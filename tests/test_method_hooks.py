"""The method hooks the commands use instead of naming methods (explanations, diagnostics,
thread safety), `methods/`'s layering, and `--precision` parsed once at each edge."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xm.methods.base as base
from conftest import TINY
from test_benchmark import _config, bench_setup  # noqa: F401  (a module fixture, shared)
from test_classify_e2e import CLASSES, DUPS, TEMPLATES
from xm.classify import Classifier
from xm.errors import XMError
from xm.evaluation.datasets import load_dataset
from xm.evaluation.runner import BenchmarkConfig, run_benchmark
from xm.memories import open_index
from xm.methods.registry import variants
from xm.methods.xmore import XMoRe

PRECISION_ERROR = "--precision 'fp8': unknown precision; choose from fp32, bf16, fp16, int8"


def test_methods_import_nothing_from_training_evaluation_or_server() -> None:
    forbidden = ("xm.training", "xm.evaluation", "xm.server")
    found = []
    for path in sorted(Path(base.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):  # function-local imports too
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.startswith(forbidden)]
    assert not found, found


def _runnable() -> dict[type, str]:
    """One variant per registered method that `xm classify` runs without training or support images."""
    out: dict[type, str] = {}
    for name, v in variants().items():
        if v.method.few_shot or v.method.trains_for(v.method.resolve_options(v.preset)) or v.method in out:
            continue
        out[v.method] = name
    return out


def test_every_method_explanation_renders_in_classify_text(bench_setup) -> None:  # noqa: F811
    from typer.testing import CliRunner

    from xm.cli.app import _register, app

    _register()
    root, index, data = bench_setup
    image = next((data / CLASSES[0]).glob("*.jpg"))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    runnable = _runnable()
    assert {"xmore", "reco-mean", "coder", "clip"} <= set(runnable.values())
    shown = set()
    for method, name in runnable.items():
        options = {"k_coarse": DUPS, "k_fine": 2} if method is XMoRe else {}
        clf = Classifier(index, CLASSES, method=name, model=TINY, templates=TEMPLATES, options=options)
        plain = clf.classify_images([_load(image)])[0]
        row = clf.classify_images([_load(image)], explain=True)[0]
        explained = set(row) - set(plain)
        sections = clf.method.explanation_view(row)
        assert bool(sections) == bool(explained), (name, explained, sections)
        args = ["classify", str(image), "--labels", str(root / "classes.txt"), "--index", str(index), "--model", TINY,
                "--method", name, "--explain", *[a for t in TEMPLATES for a in ("--template", t)],
                *[f"--opt={k}={v}" for k, v in options.items()]]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, (name, r.output, r.exception)
        words = " ".join(r.output.split())  # a long title wraps
        for s in sections:
            assert " ".join(s.title.split()) in words, (name, s.title, r.output)
            cells = [c for row_ in s.rows for c in row_ if isinstance(c, str) and len(c) < 40]
            assert all(c in r.output for c in cells), (name, r.output)
            shown.add(name)
        if method is XMoRe:  # X-MoRe's explanation exactly as before the hook
            assert [(s.title, s.columns) for s in sections] == [
                ("captions used (fine re-ranked)", ("id", "fine sim", "vote", "vote p", "caption"))]
            assert sections[0].rows == tuple((c["id"], c["fine_similarity"], c["vote"], c["vote_prob"], c["caption"])
                                             for c in row["captions"])
    assert {"xmore", "reco-mean", "coder"} <= shown


def _load(path: Path):
    from xm.encoders import load_image

    return load_image(path)


def test_runner_asks_every_method_for_diagnostics_after_its_decisions(bench_setup, monkeypatch) -> None:  # noqa: F811
    root, index, data = bench_setup
    events: list[tuple[str, str]] = []
    calls: dict[str, tuple] = {}
    real_decide, real_diag = XMoRe.decide, XMoRe.diagnostics

    def decide(self, evidence, state=None):
        events.append(("decide", self.variant))
        return real_decide(self, evidence, state)

    def diagnostics(self, decision, labels):
        events.append(("diagnostics", self.variant))
        out = real_diag(self, decision, labels)
        calls[self.variant] = (decision, labels, out)
        return out

    def base_diagnostics(self, decision, labels):
        events.append(("diagnostics", self.variant))
        calls[self.variant] = (decision, labels, {})
        return {}

    monkeypatch.setattr(XMoRe, "decide", decide)
    monkeypatch.setattr(XMoRe, "diagnostics", diagnostics)
    monkeypatch.setattr(base.Method, "diagnostics", base_diagnostics)
    ds = load_dataset("imagefolder", data)
    result = run_benchmark(_config(root, index, data, methods=["clip", "xmore-minmax", "xmore"], seeds=[0, 1]), ds,
                           open_index(index))
    assert set(calls) == {"clip", "xmore-minmax", "xmore"}
    for name in ("xmore-minmax", "xmore"):  # every decision of a method before its diagnostics
        mine = [e for e in events if e[1] == name]
        assert mine[-1] == ("diagnostics", name) and mine.count(("diagnostics", name)) == 1
    decision, labels, out = calls["xmore"]
    assert np.array_equal(labels, [it.label for it in ds.items]) and len(decision.probs) == len(labels)
    assert calls["xmore-minmax"][2] == {} and calls["clip"][2] == {}  # the paper's tables are of plain xmore
    assert out and result["diagnostics"] == out
    assert set(out) == {"mean_entropy", "l1_weight_ratio_by_case"}


def test_thread_safety_is_declared_by_the_method() -> None:
    declared = {name for name, v in variants().items() if v.method.thread_safe_evidence}
    assert {"clip", "xmore", "captions"} <= declared and not declared & {"reco", "coder", "tip-adapter"}


@pytest.mark.parametrize("args", [["classify", "x.jpg", "--labels", "l.txt"], ["benchmark", "--dataset", "imagefolder"],
                                  ["build-index", "--source", "s"], ["build-index", "--out", "o", "--add-encoder", "A:B=image"],
                                  ["search", "none", "--text", "x"], ["serve", "none"]])
def test_bad_precision_is_one_line_at_each_cli_edge(args, tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "xm.cli", *args, "--precision", "fp8"], capture_output=True, text=True,
                       cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and lines == [f"xm: error: {PRECISION_ERROR}"], r.stderr


def test_bad_precision_is_one_line_at_each_api_edge(tmp_path) -> None:
    from xm.pipeline import BuildConfig
    from xm.server.service import Service

    exact = f"^{PRECISION_ERROR}$"
    with pytest.raises(XMError, match=exact):
        Classifier(None, CLASSES, method="clip", model=TINY, precision="fp8")
    with pytest.raises(XMError, match=exact):
        Service([("a", tmp_path / "none")], precision="fp8")
    with pytest.raises(XMError, match=exact):
        BuildConfig(source="x", out=tmp_path / "o", precision="fp8").validate()
    with pytest.raises(XMError, match=exact):
        run_benchmark(BenchmarkConfig(dataset="imagefolder", data_dir=tmp_path, index=None, model=TINY, precision="fp8"),
                      None, None)  # type: ignore[arg-type]


def test_precision_is_a_string_where_it_is_stored() -> None:
    import json

    from xm.encoders import Precision

    p = Precision.parse(" BF16 ")
    assert p is Precision.bf16 and p == "bf16" and f"{p}" == str(p) == "bf16" and json.dumps({"p": p}) == '{"p": "bf16"}'
    assert {"bf16": 1}[p] == 1 and Precision.parse(p) is p and Precision.parse(None) is Precision.fp32
