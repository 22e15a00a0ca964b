"""X-MoRe on the authors' protocol: the ensemble transcribed from their computation, the pool
order, raw-dot re-ranking, the caption prefix, short retrievals, shuffled labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from test_classify_e2e import CLASSES, DUPS, TEMPLATES, build_memory
from xm.classify import Classifier
from xm.evaluation.datasets import load_dataset
from xm.evaluation.runner import BenchmarkConfig, run_benchmark
from xm.memories import open_index
from xm.methods.base import Context
from xm.methods.registry import create
from xm.methods.retrieval import Retriever, caption_pool


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    return build_memory(tmp_path_factory.mktemp("protocol"))


@pytest.fixture(scope="module")
def xmore(memory):
    index, _, _ = memory
    ctx = Context(open_index(index), TINY, CLASSES, TEMPLATES)
    return create("xmore", ctx, k_coarse=DUPS, k_fine=2)


def authors_stream(img_logits: torch.Tensor, cap_logits: torch.Tensor) -> torch.Tensor:
    """The authors' ensemble, written out from its description: per image, the text
    distribution is the mean over caption rows, its entropy taken through logsumexp;
    confidence 1 - H/H_uniform; each modality's weight its confidence over the sum of
    that modality's confidences so far (p=1 normalisation, current included); the
    combination is a broadcast weighted sum, not renormalised."""
    n, k, c = cap_logits.shape
    h_uniform = torch.log(torch.tensor(float(c), dtype=img_logits.dtype))
    hist_img, hist_txt, preds = [], [], []
    for i in range(n):
        logp_img = torch.log_softmax(img_logits[i], -1)
        logp_txt = torch.logsumexp(torch.log_softmax(cap_logits[i], -1), dim=0) - torch.log(torch.tensor(float(k), dtype=img_logits.dtype))
        conf_img = 1 - (-(logp_img.exp() * logp_img).sum()) / h_uniform
        conf_txt = 1 - (-(logp_txt.exp() * logp_txt).sum()) / h_uniform
        hist_img.append(conf_img)
        hist_txt.append(conf_txt)
        w = torch.nn.functional.normalize(torch.stack([torch.stack(hist_img), torch.stack(hist_txt)]), p=1, dim=1)[:, -1]
        p = w[:, None] * torch.stack([logp_img.exp(), logp_txt.exp()])
        preds.append(int(p.sum(0).argmax()))
    return torch.tensor(preds)


@pytest.mark.parametrize("classes", [10, 47, 102, 1000])
def test_authors_ensemble_transcription_agrees(xmore, classes: int) -> None:
    rng = np.random.default_rng(classes)
    n, k = 150, 16
    img_logits = rng.standard_normal((n, classes)) * rng.uniform(1, 6, (n, 1))
    cap_logits = rng.standard_normal((n, k, classes)) * rng.uniform(1, 6, (n, 1, 1)) + 2 * rng.standard_normal((n, 1, classes))
    def softmax(z):
        return np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
    evidence = {"p_img": softmax(img_logits), "p_txt": softmax(cap_logits).mean(1), "p_txt_logits": softmax(cap_logits.mean(1)),
                "ids": np.zeros((n, 2), np.int64), "fine_sims": np.zeros((n, 2), np.float32),
                "neighbours": np.full(n, 1000), "pool": np.full(n, 128)}
    ours = xmore.decide(evidence, xmore.new_state()).probs.argmax(1)
    f32 = authors_stream(torch.tensor(img_logits, dtype=torch.float32), torch.tensor(cap_logits, dtype=torch.float32)).numpy()
    assert (ours == f32).mean() == 1.0
    f16 = authors_stream(torch.tensor(img_logits, dtype=torch.float16), torch.tensor(cap_logits, dtype=torch.float16)).numpy()
    print(f"{classes} classes: float16 agreement {(ours == f16).mean():.4f}")


def test_pool_truncates_then_dedupes() -> None:
    ids = np.array([5, 6, 7, 8, 9, 10, -1])
    hashes = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4])  # by id: 5,6 share a caption; 7,8 share one
    assert caption_pool(ids, hashes, 4, "truncate-dedupe").tolist() == [5, 7]  # first 4, then duplicates dropped
    assert caption_pool(ids, hashes, 4, "dedupe-truncate").tolist() == [5, 7, 9, 10]  # first 4 distinct


class _Memory:
    """Just what Retriever reads, for a ranking that can be computed by hand."""

    def __init__(self, fine_caps: np.ndarray, norms: np.ndarray) -> None:
        self.fine_caps, self.fine_norms, self.count = fine_caps, norms, len(norms)
        self.caption_hashes = np.arange(len(norms))
        self.root = "memory"

    def check_encoder(self, encoder, role) -> None:
        pass

    def has_embeddings(self, spec, modality) -> bool:
        return True

    def embeddings(self, spec, modality):
        caps = self.fine_caps
        return type("M", (), {"gather": staticmethod(lambda ids: caps[ids])})()

    def norms(self, spec, modality) -> np.ndarray:
        return self.fine_norms

    def search(self, modality, queries, k, encoder=None):
        return np.zeros((len(queries), k)), np.tile(np.arange(k), (len(queries), 1))


def test_raw_dot_and_cosine_rank_differently() -> None:
    rng = np.random.default_rng(0)
    d, n = 8, 40
    query = np.eye(d, dtype=np.float32)[0]
    caps = rng.standard_normal((n, d)).astype(np.float32)
    caps /= np.linalg.norm(caps, axis=1, keepdims=True)
    cos = caps @ query
    # the captions most similar in angle get the smallest norms: raw dot prefers others
    norms = np.empty(n, np.float32)
    norms[np.argsort(-cos)] = np.linspace(0.2, 3.0, n)
    enc = type("E", (), {"spec": "fine"})()
    top = {}
    for rerank in ("cosine", "dot"):
        r = Retriever(_Memory(caps, norms), enc, enc, k_coarse=n, k_fine=16, rerank=rerank, pool="truncate-dedupe")
        top[rerank] = r.retrieve(query[None], query[None])[0].ids.tolist()
    assert top["cosine"] == np.argsort(-cos, kind="stable")[:16].tolist()
    assert top["dot"] == np.argsort(-(cos * norms), kind="stable")[:16].tolist()
    assert top["cosine"] != top["dot"]


def test_caption_prefix_is_encoded(memory) -> None:
    index, queries, _ = memory
    ctx = Context(open_index(index), TINY, CLASSES, TEMPLATES)
    plain = create("xmore", ctx, k_coarse=DUPS, k_fine=2)
    prefixed = create("xmore", ctx, k_coarse=DUPS, k_fine=2, caption_prefix="a_photo_of_a ")
    ids = np.array([0, 5, 9])
    captions = ctx.memory.store.captions(ids.tolist())
    enc = ctx.encoder(TINY)
    np.testing.assert_allclose(prefixed.captions.gather(ids), enc.encode_texts(["a_photo_of_a " + c for c in captions]), atol=1e-6)
    np.testing.assert_allclose(plain.captions.gather(ids), enc.encode_texts(captions), atol=2e-3)  # float16 on disk
    assert not np.allclose(prefixed.captions.gather(ids), plain.captions.gather(ids), atol=1e-2)


def test_short_retrievals_are_skipped_counted_and_left_out_of_the_history(xmore) -> None:
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(6), (5, 2))
    ev = {"p_img": p[:, 0], "p_txt": p[:, 1], "p_txt_logits": p[:, 1], "ids": np.zeros((5, 2), np.int64),
          "fine_sims": np.zeros((5, 2), np.float32), "neighbours": np.array([DUPS, 1, DUPS, DUPS, 0]), "pool": np.full(5, DUPS)}
    d = xmore.decide(ev, xmore.new_state())
    assert d.skipped.tolist() == [False, True, False, False, True]
    assert "fewer than k_coarse" in d.info[1]["skipped"]
    keep = [0, 2, 3]
    alone = xmore.decide({k: v[keep] for k, v in ev.items()}, xmore.new_state())
    assert [d.info[i]["weights"] for i in keep] == [alone.info[j]["weights"] for j in range(3)]
    # and a classify stream on an index too small for K says so per image
    clf = Classifier(xmore.ctx.memory, CLASSES, model=TINY, options={"k_coarse": 10_000})
    r = clf.classify_images([Image.new("RGB", (32, 32))])[0]
    assert r["prediction"] is None and "fewer than k_coarse=10000" in r["skipped"]


def test_shuffled_test_labels_give_identical_predictions(memory, tmp_path) -> None:
    index, queries, labels = memory
    data = tmp_path / "data"
    for q, y in zip(queries, labels):
        (data / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        (data / CLASSES[y] / q.name).write_bytes(q.read_bytes())
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES))
    ds = load_dataset("imagefolder", data)
    def cfg(cache):
        return BenchmarkConfig(dataset="imagefolder", data_dir=data, index=index, model=TINY, templates=str(tmp_path / "t.txt"),
                               methods=["clip", "xmore", "xmore-minmax"], options={"k_coarse": DUPS, "k_fine": 2},
                               cache_dir=tmp_path / cache)
    memory_index = open_index(index)
    a = run_benchmark(cfg("c1"), ds, memory_index)
    perm = np.random.default_rng(0).permutation(len(ds.items))
    for item, j in zip(ds.items, perm):
        item.label = labels[j]  # labels shuffled, images and order unchanged
    b = run_benchmark(cfg("c2"), ds, memory_index)
    for m in ("clip", "xmore", "xmore-minmax"):
        assert a["methods"][m]["predictions"] == b["methods"][m]["predictions"]
    assert a["methods"]["xmore"]["metrics"]["acc1"] != b["methods"]["xmore"]["metrics"]["acc1"]
