"""xm benchmark's result files and evidence: a Ctrl-C mid-pass resumes from the chunks already
done (and ends equal to an uninterrupted run), result files are keyed by everything that
changes a result, and CLIP_benchmark's `build` keeps xm's methods apart."""

from __future__ import annotations

import ast
import csv
import dataclasses
import importlib.util
import json
import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from test_classify_e2e import CLASSES, TEMPLATES, build_memory
from xm.evaluation.datasets import load_dataset
from xm.evaluation.results import write_outputs
from xm.evaluation.runner import BenchmarkConfig, run_benchmark
from xm.memories import open_index
from xm.methods.registry import get

METHODS = ["clip", "xmore"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-results")
    index, queries, labels = build_memory(root)
    data = root / "dataset"
    for q, y in zip(queries, labels):
        target = data / CLASSES[y] / q.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(q.read_bytes())
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root, index, data


def _config(root: Path, index: Path, data: Path, cache: str, **kw) -> BenchmarkConfig:
    options = {"k_coarse": 3, "k_fine": kw.pop("k_fine", 2)}
    kw.setdefault("batch_size", 4)
    return BenchmarkConfig(dataset="imagefolder", data_dir=data, index=index, model=TINY, templates=str(root / "templates.txt"),
                           cache_dir=root / cache, options=options, methods=METHODS, seeds=[0], **kw)


# ------------------------------------------------------------------ resume

def test_interrupted_benchmark_resumes_from_its_finished_chunks(setup, monkeypatch) -> None:
    root, index, data = setup
    ds, memory = load_dataset("imagefolder", data), open_index(index)
    reference = run_benchmark(_config(root, index, data, "cache-whole"), ds, memory)

    # Ctrl-C in the second chunk (chunks of 4 batches of 4 images: 16, 16, 4 of the 36 images)
    done = [0]

    def interrupting(label: str, total: int):
        def tick(n: int) -> None:
            done[0] += n
            if done[0] >= 20:
                raise KeyboardInterrupt
        return tick

    with pytest.raises(KeyboardInterrupt):
        run_benchmark(_config(root, index, data, "cache"), ds, memory, progress=interrupting)
    kept = sorted((root / "cache").glob("*.parts/*.npz"))
    assert len(kept) == len(METHODS), kept  # the first chunk, once per method; the second was lost
    assert not list((root / "cache").glob("*-ev-*.npz")) and not list((root / "cache").glob("**/*.tmp*"))

    seen: dict[str, int] = {}
    for name in METHODS:
        cls = get(name).method
        original = cls.evidence

        def counting(self, queries, _original=original, _name=name):
            seen[_name] = seen.get(_name, 0) + len(queries)
            return _original(self, queries)

        monkeypatch.setattr(cls, "evidence", counting)
    labels: list[tuple[str, int]] = []

    def recording(label: str, total: int):
        labels.append((label, total))
        return lambda n: None

    resumed = run_benchmark(_config(root, index, data, "cache"), ds, memory, progress=recording)
    assert seen == {"clip": 20, "xmore": 20}, seen  # the 16 images of the kept chunk were not recomputed
    assert labels == [("evidence (resumed: 16 of 36 images already done)", 20)], labels  # the bar counts what is left
    assert resumed["timing"]["resumed_images"] == {"clip": 16, "xmore": 16}
    assert not list((root / "cache").glob("*.parts"))  # gone once the whole evidence is saved
    for name in METHODS:
        a, b = resumed["methods"][name], reference["methods"][name]
        assert a["predictions"] == b["predictions"] and a["per_seed"] == b["per_seed"], name
    for whole in (root / "cache-whole").glob("*-ev-*.npz"):
        with np.load(whole) as x, np.load(root / "cache" / whole.name) as y:
            assert set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files), whole.name


# ------------------------------------------------------------------ result keys

def test_runs_that_differ_in_options_or_class_names_do_not_overwrite_each_other(setup) -> None:
    root, index, data = setup
    ds, memory = load_dataset("imagefolder", data), open_index(index)
    out = root / "out"
    fast = dict(limit=12, batch_size=32)
    runs = [
        run_benchmark(_config(root, index, data, "cache-keys", k_fine=2, **fast), ds, memory),
        run_benchmark(_config(root, index, data, "cache-keys", k_fine=1, **fast), ds, memory),  # another method option
        run_benchmark(_config(root, index, data, "cache-keys", **fast),  # other class names
                      dataclasses.replace(ds, classnames=[f"{c} (animal or object)" for c in ds.classnames]), memory),
    ]
    files = [write_outputs(r, out) for r in runs]
    # clip takes no k_fine: runs 1 and 2 give it the same result, written once; every xmore result has its file
    assert files[0]["clip"] == files[1]["clip"] != files[2]["clip"]
    assert len({f["xmore"] for f in files}) == 3
    assert len(list(out.glob("*.json"))) == 5 and len(list(out.glob("*.png"))) == 3
    for f, r in zip(files, runs):
        rec = json.loads(f["xmore"].read_text())
        assert rec["options"]["k_fine"] == r["methods"]["xmore"]["options"]["k_fine"] and rec["classnames"] == r["classnames"]

    rows = list(csv.DictReader(open(files[2]["csv"])))
    assert len(rows) == 5
    xmore = [r for r in rows if r["method"] == "xmore"]
    assert sorted(r["opt.k_fine"] for r in xmore) == ["1", "2", "2"]
    assert len({r["classnames_sha256"] for r in xmore}) == 2 and {r["classes"] for r in rows} == {"6"}
    assert all(r["opt.k_fine"] == "" for r in rows if r["method"] == "clip")  # clip has no such option
    assert len({r["result_key"] for r in rows}) == 5
    for col in ("protocol", "templates_sha256", "precision", "index_manifest_id", "encoders", "opt.k_coarse"):
        assert col in rows[0], col

    # the same run again rewrites its own files, nothing new; a damaged JSON in the folder is left out of the CSV
    (out / "damaged.json").write_text('{"task": "zeroshot_classification", "method": "x", "metrics": 3}')
    write_outputs(runs[0], out)
    assert len(list(out.glob("*.json"))) == 6 and len(list(csv.DictReader(open(files[0]["csv"])))) == 5


# ------------------------------------------------------------------ CLIP_benchmark's build

def test_clip_benchmark_build_keeps_methods_apart(setup) -> None:
    """CLIP_benchmark's `build` (cli.main_build, 1.6.1) reads `metrics` and every top-level field
    of each JSON and names the model `model + ' ' + pretrained` (`model_fullname`)."""
    root, index, data = setup
    ds, memory = load_dataset("imagefolder", data), open_index(index)
    out = root / "out-cb"
    files = write_outputs(run_benchmark(_config(root, index, data, "cache-keys", limit=12, batch_size=32), ds, memory), out)
    records = [json.loads(files[m].read_text()) for m in METHODS]
    for rec in records:
        assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(rec)
        assert rec["task"] == "zeroshot_classification" and rec["arch"] == TINY.partition(":")[0]
    fullnames = {rec["model"] + " " + rec["pretrained"] for rec in records}
    assert len(fullnames) == len(METHODS), fullnames
    assert fullnames == {f"xm-tiny-vit+{m} random" for m in METHODS}


def _clip_benchmark_build():
    """CLIP_benchmark's own `main_build`, from its installed cli.py, without importing the
    module (which imports its dataset and captioning dependencies)."""
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "cli.py"
    tree = ast.parse(source.read_text())
    fn = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main_build")
    namespace: dict = {"json": json, "os": os, "csv": csv}
    exec(compile(ast.Module([fn], []), str(source), "exec"), namespace)
    return namespace["main_build"]


def test_clip_benchmark_build_itself_merges_xm_results(setup, tmp_path) -> None:
    main_build = _clip_benchmark_build()
    if main_build is None:
        pytest.skip("clip_benchmark not installed (pip install --no-deps clip-benchmark==1.6.1)")
    root, index, data = setup
    ds, memory = load_dataset("imagefolder", data), open_index(index)
    result = run_benchmark(_config(root, index, data, "cache-keys", limit=12, batch_size=32), ds, memory)
    write_outputs(result, tmp_path / "res")
    main_build(Namespace(files=[str(tmp_path / "res")], output=str(tmp_path / "benchmark.csv")))
    rows = list(csv.DictReader(open(tmp_path / "benchmark.csv")))
    by_model = {r["model_fullname"]: r for r in rows}
    assert len(rows) == len(by_model) == len(METHODS)
    for name in METHODS:
        row = by_model[f"xm-tiny-vit+{name} random"]
        assert row["method"] == name and float(row["acc1"]) == result["methods"][name]["metrics"]["acc1"]
