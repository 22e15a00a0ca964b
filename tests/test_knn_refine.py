"""The kNN refine step: candidates of the approximate index re-scored exactly with the
float16 embeddings on disk (`refine_k_factor`, applied by `LocalMemory.search`)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import TINY_ROLES, write_caption_folder
from xm.errors import XMError
from xm.indexes.embeddings import EmbeddingMatrix
from xm.memories import open_index
from xm.memories.local import rescore
from xm.pipeline import BuildConfig, build_index


def test_rescore_is_exact_over_candidates(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "a.npy", x[:120].astype(np.float16))
    np.save(tmp_path / "b.npy", x[120:].astype(np.float16))
    matrix = EmbeddingMatrix([tmp_path / "a.npy", tmp_path / "b.npy"])
    q = x[:5] + 0.01
    cand = np.stack([rng.permutation(300)[:40] for _ in range(5)])
    cand[0, -3:] = -1  # padding from the index
    sims, ids = rescore(q, cand, matrix, 10)
    full = q @ x.astype(np.float16).astype(np.float32).T
    for r in range(5):
        pool = [int(i) for i in cand[r] if i >= 0]
        want = sorted(pool, key=lambda i: -full[r, i])[:10]
        assert ids[r].tolist() == want
        np.testing.assert_allclose(sims[r], full[r, want], rtol=1e-5, atol=1e-5)


def test_memory_search_applies_recorded_refine(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 12)
    build_index(BuildConfig(source=str(src), out=tmp_path / "idx", **TINY_ROLES))
    info = json.loads(next((tmp_path / "idx").rglob("build.json")).read_text())
    assert info["refine_k_factor"] == (0 if "Flat" in info["key"] else 4)
    memory = open_index(tmp_path / "idx")
    spec = memory.roles["coarse"]
    entry = memory.index_entry(spec, "image")
    q = memory.embeddings(spec, "image").gather(np.arange(12))[:4]
    before = memory.search("image", q, 3)
    # as a compressed index's manifest entry records it
    memory.manifest = replace(memory.manifest, indexes=[replace(e, refine_k_factor=2) if e is entry else e
                                                        for e in memory.manifest.indexes])
    sims, ids = memory.search("image", q, 3)
    exact = q @ memory.embeddings(spec, "image").gather(np.arange(12)).T
    assert ids[:, 0].tolist() == [0, 1, 2, 3] and ids.shape == before[1].shape
    np.testing.assert_allclose(sims, np.take_along_axis(exact, ids, 1), atol=1e-5)
    with pytest.raises(XMError, match="refine-k-factor"):
        BuildConfig(source="x", out=tmp_path / "o", refine_k_factor=-1).validate()
