"""Three one-line faults the suite once let through, each with a test that fails under it
(checked by applying the fault by hand): the text modality's formula in `XMoRe.evidence`,
the runner scoring skipped images, CODER-Adapter's min-max affinity."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import TINY
from test_classify_e2e import CLASSES, DUPS, TEMPLATES, build_memory
from xm.evaluation.datasets import load_dataset
from xm.evaluation.runner import BenchmarkConfig, run_benchmark
from xm.memories import open_index
from xm.methods import registry
from xm.methods.base import Context, Decision, Method, Queries


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    return build_memory(tmp_path_factory.mktemp("faults"))


def test_text_modality_is_the_mean_of_the_captions_distributions(memory) -> None:
    """p_txt = mean_j softmax(s t_j W^T) over the kept captions; p_txt_logits = softmax of the
    mean logits; recomputed here from the captions' text, the inference encoder and the prompts."""
    index, queries, _ = memory
    ctx = Context(open_index(index), TINY, CLASSES, TEMPLATES)
    xmore = registry.create("xmore", ctx, k_coarse=DUPS + 3, k_fine=4)
    images = [Image.open(q).convert("RGB") for q in queries[:8]]
    ev = xmore.evidence(Queries(images))
    enc = ctx.encoder(TINY)
    prompts = enc.encode_texts([t.format(c) for c in CLASSES for t in TEMPLATES]).reshape(len(CLASSES), len(TEMPLATES), -1).mean(1)
    weights = prompts / np.linalg.norm(prompts, axis=1, keepdims=True)
    for row in range(len(images)):
        ids = ev["ids"][row][ev["ids"][row] >= 0]
        assert len(ids) == 4
        logits = enc.logit_scale * enc.encode_texts(ctx.memory.captions(ids.tolist())).astype(np.float64) @ weights.T
        per_caption = np.exp(logits - logits.max(1, keepdims=True))
        per_caption /= per_caption.sum(1, keepdims=True)
        mean_logits = np.exp(logits.mean(0) - logits.mean(0).max())
        np.testing.assert_allclose(ev["p_txt"][row], per_caption.mean(0), atol=2e-3)  # float16 caption embeddings on disk
        np.testing.assert_allclose(ev["p_txt_logits"][row], mean_logits / mean_logits.sum(), atol=2e-3)
    assert not np.allclose(ev["p_txt"], ev["p_txt_logits"], atol=2e-3)  # the two formulas differ on these captions


class SkipDark(Method):
    """A toy stream method: predicts class 0 everywhere, and skips the dark images."""

    name = "skip-dark"
    summary = "test toy: class 0 everywhere, dark images skipped"
    needs_memory = False

    def evidence(self, queries: Queries) -> dict[str, np.ndarray]:
        return {"dark": np.array([np.asarray(im).mean() < 128 for im in queries.images])}

    def decide(self, evidence: dict[str, np.ndarray], state: Any = None) -> Decision:
        n = len(evidence["dark"])
        probs = np.tile(np.eye(len(self.ctx.classnames))[0], (n, 1))
        return Decision(probs=probs, info=[{} for _ in range(n)], skipped=evidence["dark"].astype(bool))


def test_skipped_images_are_not_scored(tmp_path) -> None:
    """Dark images (skipped) are labelled with the class the toy predicts, bright ones (scored)
    with another: counting the skipped would lift accuracy above 0."""
    data = tmp_path / "data"
    for label, shade, n in (("a dark", 20, 5), ("b bright", 230, 3)):
        (data / label).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (shade, shade + i, shade)).save(data / label / f"{i}.png")
    registry.register(SkipDark)
    try:
        cfg = BenchmarkConfig(dataset="imagefolder", data_dir=data, index=None, model=TINY, methods=["skip-dark"],
                              seeds=[0, 1], cache_dir=tmp_path / "cache")
        r = run_benchmark(cfg, load_dataset("imagefolder", data), None)["methods"]["skip-dark"]
    finally:
        registry.unregister("skip-dark")
    assert r["images_scored"] == 3 and r["images_skipped"] == 5
    assert r["metrics"]["acc1"] == 0.0 and all(s["acc1"] == 0.0 for s in r["per_seed"])
    assert r["predictions"].count(-1) == 5


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_coder_adapter_affinity_is_min_max_over_each_querys_keys(temperature: float) -> None:
    ctx = Context(None, TINY, CLASSES, ["a photo of a {}."])
    m = registry.create("coder-adapter", ctx, temperature=temperature)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((5, 12)), rng.standard_normal((9, 12))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    cos = q @ k.T
    expect = np.array([(row - row.min()) / (row.max() - row.min()) for row in cos]) / temperature
    a = m.affinity(q.astype(np.float32), k.astype(np.float32))
    np.testing.assert_allclose(a, expect, atol=1e-6)
    np.testing.assert_allclose(a.max(1), 1 / temperature) and np.testing.assert_allclose(a.min(1), 0.0, atol=1e-12)
    plain = registry.create("coder-adapter", ctx, temperature=temperature, affinity="cosine")
    np.testing.assert_allclose(plain.affinity(q.astype(np.float32), k.astype(np.float32)), cos / temperature, atol=1e-6)
