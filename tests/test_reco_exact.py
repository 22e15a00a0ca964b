"""RECO's neighbour tables by exact kNN on the device (`--neighbours exact`, training/exact_knn.py):
the same ids and order as a brute-force numpy computation (ties by id), the same tables as the
index search where the index is exact (flat), the exclusion rule and hidden items applied inside
the search, resumable, recorded in neighbours.json and the checkpoint."""

from __future__ import annotations

import json
from typing import Any

import faiss
import numpy as np
import pytest
import torch

from xm.encoders.device import CPU
from xm.errors import XMError
from xm.memories.base import Memory
from xm.training.exact_knn import DeviceBlocks, exact_knn
from xm.training.neighbours_option import Neighbours
from xm.training.reco import Hidden, NeighbourRule, build_tables

SPEC = "ViT-B-32:openai"


class Rows:
    """An `Embeddings` over an array (what `memory.embeddings(spec, modality)` gives)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.dim, self.gathers = a, a.shape[1], 0

    def gather(self, ids: Any) -> np.ndarray:
        self.gathers += 1
        return self.a[np.asarray(ids, np.int64)].astype(np.float32)


class ArrayMemory(Memory):
    """A memory of given image and text embeddings (float16, unit length, as the stored parts),
    its search a faiss flat index (exact) over the same float32 rows."""

    kind = "arrays"

    def __init__(self, image: np.ndarray, text: np.ndarray, hashes: np.ndarray | None = None, name: str = "arrays") -> None:
        def unit(a: np.ndarray) -> np.ndarray:
            return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float16)

        self.arrays = {"image": unit(image), "text": unit(text)}
        self.count, self.root, self._id = len(image), name, name
        self.hashes = hashes if hashes is not None else np.arange(len(image), dtype=np.int64)
        self.flat = {}
        for m, a in self.arrays.items():
            self.flat[m] = faiss.IndexFlatIP(a.shape[1])
            self.flat[m].add(a.astype(np.float32))

    @property
    def id(self) -> str:
        return self._id

    roles: Any = {"coarse": SPEC}
    encoders: Any = [SPEC]

    @property
    def caption_hashes(self) -> Any:
        return self.hashes

    def probe(self, spec): return None
    def default_model(self): return SPEC
    def describe(self): return {"kind": self.kind}
    def has_embeddings(self, spec, modality): return True
    def has_norms(self, spec, modality): return False
    def has_index(self, spec, modality): return True
    def check_encoder(self, encoder, role): return None
    def norms(self, spec, modality): raise NotImplementedError
    def rows(self, ids, columns=None): return [{"id": int(i)} for i in ids]

    def embeddings(self, spec, modality):
        return Rows(self.arrays[modality])

    def search(self, modality, queries, k, encoder=None):
        return self.flat[modality].search(np.ascontiguousarray(queries, np.float32), k)


def _memory(n: int = 300, d: int = 24, seed: int = 0, dups: int = 0) -> ArrayMemory:
    """Random pairs; with `dups`, the first `dups` images re-posted (near-copies) later on."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, d))
    text = image + 1.5 * rng.standard_normal((n, d))  # captions correlated with their images
    for j in range(dups):
        image[n - 1 - j] = image[j] + 0.02 * rng.standard_normal(d)
    hashes = rng.integers(0, 40, n).astype(np.int64)  # many shared captions
    return ArrayMemory(image, text, hashes)


def _brute(memory: ArrayMemory, pairs: ArrayMemory, modality: str, k: int, rule: NeighbourRule,
           hidden: np.ndarray | None = None) -> np.ndarray:
    """The table by numpy in float64: every allowed item, by similarity then id."""
    q = pairs.arrays[modality].astype(np.float64)
    base = memory.arrays[modality].astype(np.float64)
    sims = q @ base.T
    bad = np.zeros(sims.shape, bool)
    if pairs.id == memory.id:
        np.fill_diagonal(bad, True)
    if rule.dup_threshold <= 1:
        bad |= pairs.arrays["image"].astype(np.float64) @ memory.arrays["image"].astype(np.float64).T >= rule.dup_threshold
    if rule.exclude_same_caption:
        bad |= pairs.hashes[:, None] == memory.hashes[None, :]
    if hidden is not None:
        bad[:, hidden] = True
    out = np.full((len(q), k), -1, np.int64)
    ids = np.arange(memory.count)
    for r in range(len(q)):
        ok = ~bad[r]
        order = np.lexsort((ids[ok], -sims[r][ok]))[:k]
        out[r, : len(order)] = ids[ok][order]
    return out


# ------------------------------------------------------------------ the kNN itself

@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_exact_knn_is_brute_force_with_ties_by_id(rows: int) -> None:
    """Dyadic values (every dot product exact, whatever the summation order) with many exact
    ties, some crossing the k-th place: ids and order equal numpy's (similarity, then id)."""
    rng = np.random.default_rng(1)
    base = rng.integers(-2, 3, (150, 6)).astype(np.float32) / 4
    base[100:110] = base[3]  # the same row ten times
    queries = rng.integers(-2, 3, (40, 6)).astype(np.float32) / 4
    queries[0] = base[3]
    k = 12
    sims, ids = exact_knn(queries, DeviceBlocks(Rows(base), len(base), CPU, rows=rows), k)
    full = queries.astype(np.float64) @ base.T.astype(np.float64)
    for r in range(len(queries)):
        expect = np.lexsort((np.arange(len(base)), -full[r]))[:k]
        assert ids[r].tolist() == expect.tolist()
        np.testing.assert_array_equal(sims[r], full[r][expect].astype(np.float32))
    assert ids[0][:11].tolist() == [3, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109]


def test_exclusion_and_short_rows() -> None:
    base = np.eye(5, dtype=np.float32)
    q = np.eye(5, dtype=np.float32)[:2]

    def exclude(lo: int, hi: int, sims: torch.Tensor) -> torch.Tensor:
        return sims > 0.5  # every query's own row

    sims, ids = exact_knn(q, DeviceBlocks(Rows(base), 5, CPU, rows=2), 6, exclude)
    assert ids[0].tolist() == [1, 2, 3, 4, -1, -1] and ids[1].tolist() == [0, 2, 3, 4, -1, -1]
    assert np.isneginf(sims[0, 4:]).all()


def test_blocks_stay_on_the_device_within_the_budget() -> None:
    rows = Rows(np.ones((100, 4), np.float32))
    kept = DeviceBlocks(rows, 100, CPU, rows=10)
    for _ in range(3):
        list(kept)
    assert kept.reads == 10  # read once, then kept
    tight = DeviceBlocks(Rows(np.ones((100, 4), np.float32)), 100, CPU, rows=10, budget=4 * 4 * 10 * 3)
    for _ in range(3):
        list(tight)
    assert tight.reads == 10 + 2 * 7  # three kept, the other seven read again on every pass


def test_neighbours_option() -> None:
    assert Neighbours.parse(None).resolve(CPU) == "index"
    assert Neighbours.parse("EXACT").resolve(CPU) == "exact"
    with pytest.raises(XMError, match=r"^--neighbours 'flat': choose from auto, exact, index$"):
        Neighbours.parse("flat")

    class Gpu:
        is_accelerator = True

    assert Neighbours.parse("auto").resolve(Gpu()) == "exact"
    assert Neighbours.parse("index").resolve(Gpu()) == "index"


# ------------------------------------------------------------------ RECO's tables

RULES = [NeighbourRule(1.01), NeighbourRule(0.95), NeighbourRule(0.95, exclude_same_caption=True)]


@pytest.mark.parametrize("rule", RULES, ids=["self-only", "near-duplicates", "and-captions"])
def test_exact_tables_equal_brute_force(rule: NeighbourRule, tmp_path) -> None:
    m = _memory(dups=12)
    k = 7
    tables = build_tables(m, m, SPEC, k, rule, tmp_path / "t", chunk=64, search="exact")
    for modality in ("image", "text"):
        np.testing.assert_array_equal(tables[modality], _brute(m, m, modality, k, rule))
    if rule.dup_threshold <= 1:  # a re-posted image never hands its caption to its copy
        assert 299 not in tables["image"][0] and 0 not in tables["text"][299]
    meta = json.loads((tmp_path / "t" / "neighbours.json").read_text())
    assert meta["search"] == "exact" and meta["key"]["search"] == "exact" and meta["device"] == "cpu"


def test_exact_tables_equal_the_flat_index_search(tmp_path) -> None:
    """On a memory whose index is exact (flat), both searches give the same tables."""
    m = _memory(dups=12)
    rule = NeighbourRule(0.95)
    exact = build_tables(m, m, SPEC, 6, rule, tmp_path / "e", search="exact")
    index = build_tables(m, m, SPEC, 6, rule, tmp_path / "i", search="index")
    for modality in ("image", "text"):
        np.testing.assert_array_equal(exact[modality], index[modality])
    assert "search" not in json.loads((tmp_path / "i" / "neighbours.json").read_text())["key"]  # as before the option


def test_exact_tables_for_other_pairs(tmp_path) -> None:
    memory, pairs = _memory(200, seed=3), _memory(90, seed=4)
    pairs._id = "other"
    rule = NeighbourRule(0.9)
    tables = build_tables(memory, pairs, SPEC, 5, rule, tmp_path / "t", search="exact")
    for modality in ("image", "text"):
        np.testing.assert_array_equal(tables[modality], _brute(memory, pairs, modality, 5, rule))


def test_exact_tables_resume_after_a_kill(tmp_path) -> None:
    m = _memory()
    rule = NeighbourRule(0.95)
    whole = build_tables(m, m, SPEC, 4, rule, tmp_path / "whole", search="exact")

    def killing(label, total):
        def tick(n):
            if label.startswith("neighbours text") and n:
                raise KeyboardInterrupt
        return tick

    with pytest.raises(KeyboardInterrupt):
        build_tables(m, m, SPEC, 4, rule, tmp_path / "r", killing, chunk=50, search="exact")
    meta = json.loads((tmp_path / "r" / "neighbours.json").read_text())
    assert meta["complete"] == {"image": True, "text": False} and meta["rows_done"]["text"] == 50
    again = build_tables(m, m, SPEC, 4, rule, tmp_path / "r", chunk=50, search="exact")
    for modality in ("image", "text"):
        np.testing.assert_array_equal(whole[modality], again[modality])
    # the index search's tables are other tables: recomputed, never mixed with the exact ones
    build_tables(m, m, SPEC, 4, rule, tmp_path / "r", search="index")
    assert json.loads((tmp_path / "r" / "neighbours.json").read_text())["search"] == "index"


@pytest.mark.parametrize("search", ["exact", "index"])
def test_hidden_items_leave_the_tables_and_nothing_else_changes(search: str, tmp_path) -> None:
    """Decontamination: hidden memory items are in no row; hidden pairs' rows are empty; every
    other row is the undecontaminated ranking with the hidden items taken out."""
    m = _memory(dups=12)
    rule = NeighbourRule(0.95)
    hidden_ids = np.array([0, 5, 17, 18, 19, 250, 298], np.int64)
    k = 6
    tables = build_tables(m, m, SPEC, k, rule, tmp_path / "h", search=search, hidden=Hidden(hidden_ids, hidden_ids, ({"dataset": "x"},)))
    wide = build_tables(m, m, SPEC, k + len(hidden_ids), rule, tmp_path / "w", search="exact")
    keep = np.setdiff1d(np.arange(m.count), hidden_ids)
    for modality in ("image", "text"):
        t = tables[modality]
        assert not np.isin(t, hidden_ids).any()
        assert (t[hidden_ids] == -1).all()
        for r in keep:
            expect = [int(i) for i in wide[modality][r] if i not in set(hidden_ids.tolist())][:k]
            assert t[r].tolist() == expect
        np.testing.assert_array_equal(t[keep], _brute(m, m, modality, k, rule, hidden_ids)[keep])
    meta = json.loads((tmp_path / "h" / "neighbours.json").read_text())
    assert meta["hidden"]["memory_ids"] == hidden_ids.tolist() and meta["key"]["hidden"]


def test_out_of_memory_halves_the_chunk(tmp_path, monkeypatch) -> None:
    """A device out of memory on a chunk of pairs: the chunk is searched in halves, same tables;
    a single pair that does not fit is one line naming --neighbours index."""
    import xm.training.reco as reco

    m = _memory()
    rule = NeighbourRule(0.95)
    real = reco.exact_neighbours_for
    sizes = []

    def small_device(*args, **kw):
        rows = args[4]
        sizes.append(len(rows))
        if len(rows) > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kw)

    monkeypatch.setattr(reco, "exact_neighbours_for", small_device)
    tables = build_tables(m, m, SPEC, 5, rule, tmp_path / "t", chunk=100, search="exact")
    assert max(s for s in sizes if s <= 16) == 13 and 100 in sizes  # 100 -> 50 -> 25 -> 12, 13
    for modality in ("image", "text"):
        np.testing.assert_array_equal(tables[modality], _brute(m, m, modality, 5, rule))

    def no_device(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(reco, "exact_neighbours_for", no_device)
    with pytest.raises(XMError, match=r"^cpu: out of memory searching one pair .* use --neighbours index or another --device$"):
        build_tables(m, m, SPEC, 5, rule, tmp_path / "u", chunk=100, search="exact")
