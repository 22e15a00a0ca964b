"""The X-MoRe formulas against hand-computed values, and against a transcription of the authors' code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xm.errors import XMError
from xm.methods.ensemble import StreamState, Weights, adjust, combine, confidence, run_stream
from xm.methods.zeroshot import class_weights, read_labels


def test_confidence_from_entropy() -> None:
    assert confidence(np.array([0.25, 0.25, 0.25, 0.25])) == pytest.approx(0.0, abs=1e-12)
    assert confidence(np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    # H([.5,.5,0,0]) = log 2, C = 4 -> 1 - log2/log4 = 0.5
    assert confidence(np.array([0.5, 0.5, 0.0, 0.0])) == pytest.approx(0.5)
    p = np.array([0.7, 0.2, 0.1])
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert confidence(p) == pytest.approx(1 - h / math.log(3))


def test_minmax_over_stream_first_query_and_ties() -> None:
    s = StreamState()
    # first query: max == min, the weight is the raw confidence (documented choice)
    w = adjust(s, 0.4, 0.8, "modal")
    assert (w.img, w.txt) == (0.4, 0.8)
    # second: img range [0.4, 0.6] -> 1.0; txt range [0.2, 0.8] -> 0.0
    w = adjust(s, 0.6, 0.2, "modal")
    assert (w.img, w.txt) == pytest.approx((1.0, 0.0))
    # third: img 0.5 -> (0.5-0.4)/0.2 = 0.5; txt 0.5 -> (0.5-0.2)/0.6 = 0.5
    w = adjust(s, 0.5, 0.5, "modal")
    assert (w.img, w.txt) == pytest.approx((0.5, 0.5))
    # the current query is included: a new maximum gives weight 1
    w = adjust(s, 0.9, 0.1, "modal")
    assert (w.img, w.txt) == pytest.approx((1.0, 0.0))
    assert s.count == 4 and s.min == {"img": 0.4, "txt": 0.1} and s.max == {"img": 0.9, "txt": 0.8}
    # ties all along: weights stay the raw confidences
    t = StreamState()
    for _ in range(3):
        w = adjust(t, 0.3, 0.3, "modal")
    assert (w.img, w.txt) == (0.3, 0.3)


def test_l1_variant_and_raw_equal() -> None:
    s = StreamState()
    assert adjust(s, 0.2, 0.6, "l1") == Weights(1.0, 1.0)
    w = adjust(s, 0.6, 0.2, "l1")
    assert (w.img, w.txt) == pytest.approx((0.6 / 0.8, 0.2 / 0.8))
    assert adjust(StreamState(), 0.2, 0.6, "raw") == Weights(0.2, 0.6)
    assert adjust(StreamState(), 0.2, 0.6, "equal") == Weights(0.5, 0.5)
    assert adjust(StreamState(), 0.2, 0.6, "image") == Weights(1.0, 0.0)
    assert adjust(StreamState(), 0.2, 0.6, "text") == Weights(0.0, 1.0)


def test_final_mixture() -> None:
    p_img, p_txt = np.array([0.6, 0.3, 0.1]), np.array([0.1, 0.1, 0.8])
    # 0.25*p_img + 0.75*p_txt = [0.225, 0.15, 0.625] (already sums to 1)
    np.testing.assert_allclose(combine(p_img, p_txt, Weights(0.25, 0.75)), [0.225, 0.15, 0.625])
    # weights 0.2/0.2 mix equally after renormalisation
    np.testing.assert_allclose(combine(p_img, p_txt, Weights(0.2, 0.2)), [0.35, 0.2, 0.45])
    # both zero (both at their stream minimum): equal weights, never a zero vector
    np.testing.assert_allclose(combine(p_img, p_txt, Weights(0.0, 0.0)), [0.35, 0.2, 0.45])


class _FakeEncoder:
    """Maps each text to a fixed vector, to check template averaging by hand."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def encode_texts(self, texts):
        v = np.array([self.table[t] for t in texts], dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_template_averaging_the_clip_way() -> None:
    enc = _FakeEncoder({"a cat": [1, 0], "the cat": [0, 1], "a dog": [3, 4], "the dog": [3, 4]})
    w = class_weights(enc, ["cat", "dog"], ["a {}", "the {}"])
    np.testing.assert_allclose(w[0], [1 / math.sqrt(2), 1 / math.sqrt(2)], atol=1e-6)  # mean of unit vectors, renormalised
    np.testing.assert_allclose(w[1], [0.6, 0.8], atol=1e-6)


def test_label_files(tmp_path) -> None:
    f = tmp_path / "labels.txt"
    f.write_bytes("\ufeffcat\r\n\r\n# a comment\r\ndog\r\n  tram  \n".encode("utf-8"))
    assert read_labels(f) == ["cat", "dog", "tram"]
    f.write_text("cat\ndog\ncat\n")
    with pytest.raises(XMError, match="duplicate label 'cat' on lines 1 and 3"):
        read_labels(f)
    f.write_text("# nothing\n\n")
    with pytest.raises(XMError, match="no labels"):
        read_labels(f)
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(XMError, match="not UTF-8"):
        read_labels(f)
    with pytest.raises(XMError, match="not found"):
        read_labels(tmp_path / "missing.txt")


def _authors_transcription(img, caps, W, scale=100.0):
    """The authors' computation, written out in torch: softmax image logits, mean of per-caption
    softmaxes, entropy confidences, L1-normalised over the history, weighted sum."""
    img, W = torch.tensor(img, dtype=torch.float64), torch.tensor(W, dtype=torch.float64)
    hist_img, hist_txt, out = [], [], []
    for i in range(len(img)):
        p_img = torch.softmax(scale * img[i] @ W.T, dim=-1)
        p_txt = torch.softmax(scale * torch.tensor(caps[i], dtype=torch.float64) @ W.T, dim=-1).mean(0)
        n = W.shape[0]
        ent_i = -(p_img * torch.log(p_img)).sum()
        ent_t = -(p_txt * torch.log(p_txt)).sum()
        hist_img.append(1 - ent_i / math.log(n))
        hist_txt.append(1 - ent_t / math.log(n))
        a_img = hist_img[-1] / sum(hist_img)
        a_txt = hist_txt[-1] / sum(hist_txt)
        final = a_img * p_img + a_txt * p_txt
        out.append((final / final.sum()).numpy())
    return np.array(out)


def test_equivalent_to_authors_code_l1() -> None:
    rng = np.random.default_rng(0)
    C, d, n, k = 7, 16, 25, 16
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    W = unit(rng.standard_normal((C, d)))
    img = unit(rng.standard_normal((n, d)))
    caps = unit(rng.standard_normal((n, k, d)))
    from xm.methods.zeroshot import class_probs

    p_img = class_probs(img, W, 100.0)
    p_txt = np.stack([class_probs(c, W, 100.0).mean(0) for c in caps])
    ours, _ = run_stream(p_img, p_txt, "l1")
    np.testing.assert_allclose(ours, _authors_transcription(img, caps, W), atol=1e-6)


def test_stream_order_matters_and_is_respected() -> None:
    rng = np.random.default_rng(1)
    p_img = rng.dirichlet(np.ones(5) * 0.5, 12)
    p_txt = rng.dirichlet(np.ones(5) * 0.5, 12)
    a, wa = run_stream(p_img, p_txt, "modal", order=np.arange(12))
    b, wb = run_stream(p_img, p_txt, "modal", order=np.arange(12)[::-1])
    assert not np.allclose(wa, wb)
    # the last query in an order sees the whole stream: same weights either way
    np.testing.assert_allclose(wa[11], run_stream(p_img, p_txt, "modal", order=np.r_[np.arange(11), 11])[1][11])
