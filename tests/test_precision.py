"""Inference precisions (`--precision fp32|bf16|int8`): agreement with fp32 on a fixed set,
the fp32 weights fingerprint, indexes built at one precision and queried at another, and
one line for an unknown precision."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, TINY_ROLES, TINY_WIDE, make_image, write_caption_folder
from xm.encoders import load_encoder
from xm.encoders.loader import MIN_COSINE
from xm.errors import XMError
from xm.memories import open_index
from xm.methods.base import Queries
from xm.methods.retrieval import search_memory
from xm.pipeline import BuildConfig, build_index

IMAGES = [make_image(seed) for seed in range(8)]
CAPTIONS = ["a photo of a dog.", "a red tram in the snow", "caption number 3", "two cats on a sofa",
            "", "a very long caption " * 6, "ünïcödé text", "a photo of a {}."]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "int8"])
@pytest.mark.parametrize("spec", [TINY, TINY_WIDE])
def test_embeddings_within_stated_cosine_of_fp32(spec: str, precision: str) -> None:
    ref, low = load_encoder(spec), load_encoder(spec, precision=precision)
    assert low.precision == precision and ref.precision == "fp32" and low is not ref
    assert load_encoder(spec, precision=precision) is low  # cached per precision
    bound = MIN_COSINE[precision]
    for a, b in ((ref.encode_images(IMAGES), low.encode_images(IMAGES)), (ref.encode_texts(CAPTIONS), low.encode_texts(CAPTIONS))):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
        cos = (a * b).sum(1)
        assert cos.min() >= bound, (spec, precision, cos.min())
    # the weights fingerprint is computed in fp32 whatever the precision
    assert low.probe() == ref.probe() and low.fingerprint_matches(ref.probe())


def test_queries_preprocess_once_per_distinct_preprocessing() -> None:
    a, b, a16 = load_encoder(TINY), load_encoder(TINY_WIDE), load_encoder(TINY, precision="bf16")
    assert repr(a.preprocess) == repr(b.preprocess)
    calls = []

    class Counting:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, im):
            calls.append(im)
            return self.fn(im)

        def __repr__(self) -> str:
            return repr(self.fn)

    q = Queries(IMAGES)
    saved = a.preprocess, b.preprocess, a16.preprocess
    try:
        a.preprocess, b.preprocess, a16.preprocess = (Counting(p) for p in saved)
        fa, fb, f16 = q.features(a), q.features(b), q.features(a16)
    finally:
        a.preprocess, b.preprocess, a16.preprocess = saved
    assert len(calls) == len(IMAGES)  # decoded/resized once for three encoders
    np.testing.assert_allclose(fa, a.encode_images(IMAGES), atol=1e-6)
    np.testing.assert_allclose(fb, b.encode_images(IMAGES), atol=1e-6)
    assert not np.array_equal(fa, f16) and (fa * f16).sum(1).min() >= MIN_COSINE["bf16"]  # own entry per precision


@pytest.mark.parametrize("built, queried", [("fp32", "bf16"), ("bf16", "fp32"), ("fp32", "int8"), ("fp16", "fp32")])
def test_index_built_at_one_precision_finds_its_items_at_another(tmp_path, built: str, queried: str) -> None:
    src = write_caption_folder(tmp_path / "pairs", 10)
    build_index(BuildConfig(source=str(src), out=tmp_path / "idx", precision=built, **TINY_ROLES))
    memory = open_index(tmp_path / "idx")
    assert {e.precision for e in memory.manifest.encoders.values()} == {built}
    for i in range(10):
        hits = search_memory(memory, image=src / f"im{i:03d}.jpg", k=3, precision=queried)
        assert hits[0]["caption"] == f"caption number {i}", (built, queried, i, hits)
        text_hits = search_memory(memory, text=f"caption number {i}", k=3, modality="text", precision=queried)
        assert text_hits[0]["caption"] == f"caption number {i}"


def test_unknown_precision_is_one_line(tmp_path) -> None:
    with pytest.raises(XMError, match=r"^--precision 'fp8': unknown precision; choose from fp32, bf16, fp16, int8$"):
        load_encoder(TINY, precision="fp8")
    with pytest.raises(XMError, match="unknown precision"):
        BuildConfig(source="x", out=tmp_path / "o", precision="int4").validate()
    r = subprocess.run([sys.executable, "-m", "xm.cli", "search", str(tmp_path / "none"), "--text", "x", "--precision", "fp8"],
                       capture_output=True, text=True)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "--precision 'fp8': unknown precision" in lines[0], r.stderr
