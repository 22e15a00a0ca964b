"""On a CUDA machine (marked `gpu`; skipped where torch sees no GPU): the README's main job reduced
(a folder built with small encoders, then a benchmark), a classify, and a short `xm train reco`, all
with `--device cuda`; an index built on the GPU is accepted by a CPU query and the other way round,
and GPU results agree with the CPU's within the stated bounds. Run: pytest -m gpu tests/test_gpu.py"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, TINY_WIDE, make_image
from test_classify_e2e import CLASSES, TEMPLATES, build_memory
from xm.encoders import CPU, Device, load_encoder
from xm.encoders.loader import MIN_COSINE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")]
ROLES = ["--coarse", TINY, "--fine", TINY_WIDE, "--inference", TINY]


def _xm(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "xm.cli", *args, "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """The memory built twice through the CLI, on the GPU (decoding workers, pinned memory) and on the CPU."""
    root = tmp_path_factory.mktemp("gpu")
    build_memory(root)  # writes the memory folder and queries (its own index is not used here)
    src = root / "memory"
    gpu = _xm("build-index", "--source", str(src), "--out", str(root / "idx-gpu"), *ROLES, "--device", "cuda",
              "--num-workers", "2", "--batch-size", "16")
    cpu = _xm("build-index", "--source", str(src), "--out", str(root / "idx-cpu"), *ROLES, "--device", "cpu")
    return {"root": root, "gpu": gpu, "cpu": cpu}


def test_build_on_cuda_is_recorded_and_agrees_with_the_cpu(job) -> None:
    root = job["root"]
    assert job["gpu"]["device"].startswith("cuda:0 (") and job["cpu"]["device"].startswith("cpu (")
    assert job["gpu"]["count"] == job["cpu"]["count"] > 0
    g, c = (json.loads((root / f"idx-{d}" / "manifest.json").read_text()) for d in ("gpu", "cpu"))
    assert "device" not in json.dumps(g["encoders"])  # artefacts do not depend on the device
    for spec, entry in g["encoders"].items():
        assert np.allclose(entry["probe"], c["encoders"][spec]["probe"], atol=2e-3)  # fp32 fingerprint on the CPU
    for emb in sorted((root / "idx-gpu" / "embeddings").rglob("*.npy")):
        if "_norm" in emb.name or "norm" in emb.parent.name:
            continue
        other = root / "idx-cpu" / emb.relative_to(root / "idx-gpu")
        a, b = np.load(emb).astype(np.float32), np.load(other).astype(np.float32)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() >= 0.999, (emb, cos.min())


def test_an_index_from_one_device_is_searched_from_the_other(job) -> None:
    from xm.methods.retrieval import search_memory

    root = job["root"]
    cuda = Device.parse("cuda")
    for built, queried in (("gpu", CPU), ("cpu", cuda)):
        for i in range(4):
            hits = search_memory(root / f"idx-{built}", image=root / "memory" / f"m{i:03d}_0.jpg", k=1, device=queried)
            assert hits[0]["id"] is not None and hits[0]["caption"] == TEMPLATES[0].format(CLASSES[i % len(CLASSES)]), (built, i, hits)


def test_classify_on_cuda_agrees_with_the_cpu(job) -> None:
    root = job["root"]
    queries = [str(p) for p in sorted((root / "queries").glob("*.jpg"))[:12]]
    preds = {}
    for device in ("cuda", "cpu"):
        r = subprocess.run([sys.executable, "-m", "xm.cli", "classify", *queries, "--labels", str(root / "classes.txt"),
                            "--index", str(root / "idx-gpu"), "--device", device, "--json"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
        assert {row["device"] for row in rows} == {"cuda:0" if device == "cuda" else "cpu"}
        preds[device] = [row["prediction"] for row in rows]
    agree = np.mean([a == b for a, b in zip(preds["cuda"], preds["cpu"])])
    assert agree >= 0.9, preds


def test_benchmark_on_cuda(job) -> None:
    root = job["root"]
    data = root / "dataset"
    labels = [int(i % len(CLASSES)) for i in range(len(list((root / "queries").glob("*.jpg"))))]
    for q, y in zip(sorted((root / "queries").glob("*.jpg")), labels):
        (data / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        (data / CLASSES[y] / q.name).write_bytes(q.read_bytes())
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    results = {}
    for device in ("cuda", "cpu"):
        results[device] = _xm("benchmark", "--dataset", "imagefolder", "--data-dir", str(data), "--index", str(root / "idx-gpu"),
                              "--model", TINY, "--templates", str(root / "templates.txt"), "--k-coarse", "3", "--k-fine", "2",
                              "--methods", "clip,xmore", "--seeds", "0", "--batch-size", "16", "--device", device,
                              "--cache-dir", str(root / f"cache-{device}"))
    assert results["cuda"]["device"] == "cuda:0" and results["cuda"]["timing"]["device"].startswith("cuda:0 (")
    for method in ("clip", "xmore"):
        a, b = (results[d]["methods"][method]["metrics"]["acc1"] for d in ("cuda", "cpu"))
        assert abs(a - b) <= 0.1, (method, a, b)
    assert results["cuda"]["methods"]["xmore"]["metrics"]["acc1"] > results["cuda"]["methods"]["clip"]["metrics"]["acc1"]


def test_train_reco_on_cuda_and_use_it_on_the_cpu(job) -> None:
    from xm.memories import open_index
    from xm.methods.base import Context, Queries
    from xm.methods.registry import create

    root = job["root"]
    out = root / "reco"
    summary = _xm("train", "reco", "--index", str(root / "idx-gpu"), "--out", str(out), "--epochs", "2", "--k", "3",
                  "--batch-size", "64", "--dup-threshold", "1.01", "--device", "cuda")
    assert summary["epochs_done"] == 2 and summary["device"].startswith("cuda:0") and "autocast" in summary["device"]
    assert np.isfinite(summary["losses"]).all()
    meta = json.loads((out / "reco.json").read_text())
    assert meta["device"] == "cuda:0" and meta["amp"] in ("bf16", "fp16")
    # the checkpoint is CPU-readable: the method runs from it on the CPU
    ctx = Context(open_index(root / "idx-gpu"), TINY, CLASSES, TEMPLATES, device=CPU)
    method = create("reco", ctx, checkpoint=str(out))
    probs = method.decide(method.evidence(Queries([make_image(i) for i in range(4)]))).probs
    assert probs.shape == (4, len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_on_cuda_within_the_stated_cosine(precision: str) -> None:
    cuda = Device.parse("cuda")
    ref = load_encoder(TINY)
    low = load_encoder(TINY, precision=precision, device=cuda)
    assert low.device == "cuda:0" and low.probe() == ref.probe()
    images = [make_image(i) for i in range(8)]
    cos = (ref.encode_images(images) * low.encode_images(images)).sum(1)
    assert cos.min() >= MIN_COSINE[precision], cos.min()
    texts = ["a photo of a dog.", "a red tram in the snow", "two cats"]
    assert (ref.encode_texts(texts) * low.encode_texts(texts)).sum(1).min() >= MIN_COSINE[precision]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_share_the_parts(job, tmp_path) -> None:
    summary = _xm("build-index", "--source", str(job["root"] / "memory"), "--out", str(tmp_path / "idx"), *ROLES,
                  "--device", "cuda:0,1", "--shard-size", "20")
    assert set(summary["parts_per_device"]) == {"cuda:0", "cuda:1"} and summary["count"] == job["gpu"]["count"]


def test_this_file_runs_where_cuda_is(tmp_path: Path) -> None:
    assert Device.parse("auto").kind == "cuda"  # auto picks the GPU


def test_exact_neighbour_tables_on_cuda(tmp_path) -> None:
    """RECO's neighbour tables by exact kNN on the GPU (`--neighbours auto` there) equal the CPU's
    exact tables, over a memory of several device blocks, the rule and hidden items applied."""
    from test_reco_exact import SPEC, ArrayMemory
    from xm.training.neighbours_option import Neighbours
    from xm.training.reco import Hidden, NeighbourRule, build_tables

    cuda = Device.parse("cuda")
    assert Neighbours.parse("auto").resolve(cuda) == "exact"
    rng = np.random.default_rng(5)
    n, d = 70_000, 24  # two blocks of 65,536 rows on CUDA, five of 16,384 on the CPU
    image = rng.standard_normal((n, d))
    image[n - 50:] = image[:50] + 0.02 * rng.standard_normal((50, d))  # re-posted images
    memory = ArrayMemory(image, image + 1.5 * rng.standard_normal((n, d)), rng.integers(0, 400, n))
    pairs = ArrayMemory(image[:600], (image + 1.5 * rng.standard_normal((n, d)))[:600], name="pairs")
    hidden = Hidden(np.arange(100, 60_000, 997), np.array([3, 7]))
    for rule in (NeighbourRule(0.95), NeighbourRule(0.95, exclude_same_caption=True)):
        on_gpu = build_tables(memory, pairs, SPEC, 10, rule, tmp_path / "g", search="exact", device=cuda, hidden=hidden)
        on_cpu = build_tables(memory, pairs, SPEC, 10, rule, tmp_path / "c", search="exact", device=CPU, hidden=hidden)
        for m in ("image", "text"):
            np.testing.assert_array_equal(on_gpu[m], on_cpu[m])
            assert (on_gpu[m][[3, 7]] == -1).all() and not np.isin(on_gpu[m], hidden.memory).any()
        assert json.loads((tmp_path / "g" / "neighbours.json").read_text())["device"] == "cuda:0"
