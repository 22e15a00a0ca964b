"""xm benchmark end to end over the near-duplicate memory, and ensembles on synthetic streams."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from test_classify_e2e import CLASSES, TEMPLATES, build_memory
from xm.evaluation.datasets import load_dataset
from xm.evaluation.runner import DEFAULT_METHODS as METHODS, BenchmarkConfig, run_benchmark, write_outputs
from xm.evaluation.synthetic import informative_vs_noise
from xm.memories import open_index


@pytest.fixture(scope="module")
def bench_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    index, queries, labels = build_memory(root)
    data = root / "dataset"
    for q, y in zip(queries, labels):
        target = data / CLASSES[y] / q.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(q.read_bytes())
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root, index, data


def _config(root: Path, index: Path, data: Path, **kw) -> BenchmarkConfig:
    # the tiny random text tower is no CLIP: the authors' caption prefix swamps what its captions say
    # (the prefix itself is tested in test_authors_protocol.py)
    options = {"k_coarse": 3, "k_fine": kw.pop("k_fine", 2), "caption_prefix": ""}
    return BenchmarkConfig(dataset="imagefolder", data_dir=data, index=index, model=TINY, templates=str(root / "templates.txt"),
                           cache_dir=root / "cache", options=options, **kw)


def test_xmore_beats_clip_and_outputs(bench_setup) -> None:
    root, index, data = bench_setup
    ds = load_dataset("imagefolder", data)
    memory = open_index(index)
    result = run_benchmark(_config(root, index, data), ds, memory)
    acc = {m: r["metrics"]["acc1"] for m, r in result["methods"].items()}
    assert set(acc) == set(METHODS)
    assert acc["xmore"] >= acc["clip"] + 0.4 and acc["captions"] >= 0.75, acc
    assert result["images_evaluated"] == 36 and result["seeds"] == [0, 1, 2] and result["protocol"] == "authors"
    # clip and captions do not depend on the stream order; the adjusted ensembles do
    assert result["methods"]["clip"]["std"]["acc1"] == 0.0
    cases = result["diagnostics"]["l1_weight_ratio_by_case"]
    # Table 8's cases split the images the ensemble got right under the first seed, each in exactly one case
    assert sum(v["n"] for v in cases.values()) == round(36 * result["methods"]["xmore"]["per_seed"][0]["acc1"])
    assert result["diagnostics"]["mean_entropy"]["image"] > 0
    assert not any(result["timing"]["cache_hits"].values())

    again = run_benchmark(_config(root, index, data, methods=["clip", "xmore"], seeds=[0]), ds, memory)
    assert all(again["timing"]["cache_hits"].values()) and again["methods"]["xmore"]["per_seed"][0] == result["methods"]["xmore"]["per_seed"][0]
    other_k = run_benchmark(_config(root, index, data, methods=["xmore"], seeds=[0], k_fine=1), ds, memory)
    assert not any(other_k["timing"]["cache_hits"].values())

    files = write_outputs(result, root / "out")
    record = json.loads(files["xmore"].read_text())
    assert record["task"] == "zeroshot_classification" and record["method"] == "xmore"
    assert {"acc1", "acc5", "mean_per_class_recall"} <= set(record["metrics"]) and record["images"] == 36
    assert record["index_manifest_id"] == memory.id and record["split_source"]
    rows = list(csv.DictReader(open(files["csv"])))
    assert len(rows) == len(METHODS) and {r["method"] for r in rows} == set(METHODS)
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_benchmark_json(bench_setup) -> None:
    root, index, data = bench_setup
    out = subprocess.run([sys.executable, "-m", "xm.cli", "benchmark", "--dataset", "imagefolder", "--data-dir", str(data),
                          "--index", str(index), "--model", TINY, "--templates", str(root / "templates.txt"), "--k-coarse", "3",
                          "--k-fine", "2", "--methods", "clip,xmore", "--seeds", "1,2", "--limit", "20",
                          "--cache-dir", str(root / "cache"), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert list(result["methods"]) == ["clip", "xmore"] and result["images_evaluated"] == 20
    bad = subprocess.run([sys.executable, "-m", "xm.cli", "benchmark", "--dataset", "imagefolder", "--data-dir", str(data),
                          "--index", str(index), "--model", TINY, "--methods", "clip,reco9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "'reco9': unknown" in bad.stderr


def test_synthetic_streams_one_informative_modality() -> None:
    table = informative_vs_noise(n=600, classes=10, seed=0)
    for informative in ("image", "text"):
        rows = table[informative]
        alone = rows["informative alone"]
        assert alone > 0.8 and rows["noise alone"] < 0.2
        for mode in ("modal", "l1", "raw", "equal"):
            assert rows["noise alone"] + 0.3 < rows[mode] < alone, (mode, rows)
    # the ensemble treats the modalities symmetrically: swapping which one is informative changes nothing
    assert table["image"] == table["text"]
