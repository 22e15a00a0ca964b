"""X-MoRe's retrieval asks again, for more, when fewer than K neighbours came back (the
authors' client: 200, then 1000), and only then; what it counts as neighbours, what it says
on stderr, and the time it reports. Written for mutants of methods/retrieval.py that the
suite let through (bench/mutation.py), and more of them below."""

from __future__ import annotations

import numpy as np

from xm.methods.retrieval import CaptionEmbeddings, Retriever, Timings

D = 4


class ShortBack:
    """A memory whose kNN, like a filtering remote back, returns fewer valid ids than asked:
    query 0 gets 100 of 200 (500 of 1000), query 1 exactly 128 of 200 (300 of 1000)."""

    count = 5000
    root = "back"
    items_id = "back-items"
    caption_hashes = np.arange(5000)
    available = {200: (100, 128), 1000: (500, 300)}

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (queries, k) per search

    def check_encoder(self, encoder, role) -> None:
        pass

    def has_embeddings(self, spec, modality) -> bool:
        return True

    def embeddings(self, spec, modality):
        rows = np.eye(D, dtype=np.float32)[np.arange(self.count) % D]
        return type("E", (), {"gather": staticmethod(lambda ids: rows[np.asarray(ids, np.int64)])})()

    def norms(self, spec, modality) -> np.ndarray:
        return np.ones(self.count, np.float32)

    def search(self, modality, queries, k, encoder=None):
        self.calls.append((len(queries), k))
        ids = np.full((len(queries), k), -1, np.int64)
        for r, q in enumerate(queries):
            valid = self.available[k][int(q[0])]
            ids[r, :valid] = np.arange(valid) + 7 * r
        return np.where(ids >= 0, 0.5, -np.inf).astype(np.float32), ids


def _retrieve(refetch: int) -> tuple[list, ShortBack, Timings]:
    back = ShortBack()
    enc = type("Enc", (), {"spec": "fine"})()
    r = Retriever(back, enc, enc, k_coarse=128, k_fine=16, overfetch=200, refetch=refetch)
    queries = np.array([[0, 0, 0, 0], [1, 0, 0, 0]], np.float32)  # first coordinate: which query (see ShortBack)
    timings = Timings()
    return r.retrieve(queries, np.ones((2, D), np.float32) / 2, timings), back, timings


def test_short_rows_and_only_they_are_asked_again() -> None:
    out, back, timings = _retrieve(1000)
    assert back.calls == [(2, 200), (1, 1000)]  # query 1 had exactly K: not short
    assert [r.neighbours for r in out] == [500, 128]
    assert 0 <= timings.seconds["knn"] < 60 and 0 <= timings.seconds["rerank"] < 60


def test_no_second_search_when_refetch_adds_nothing() -> None:
    out, back, _ = _retrieve(200)
    assert back.calls == [(2, 200)]
    assert [r.neighbours for r in out] == [100, 128]


def test_on_the_fly_captions_are_announced_once(capsys) -> None:
    back = ShortBack()
    back.captions = lambda ids: [f"caption {i}" for i in ids]  # type: ignore[attr-defined]
    enc = type("Enc", (), {"spec": "inference", "dim": D, "encode_texts": staticmethod(lambda t: np.ones((len(t), D)))})()
    CaptionEmbeddings(back, enc)  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""  # precomputed: nothing to say
    prefixed = CaptionEmbeddings(back, enc, "a_photo_of_a ")  # type: ignore[arg-type]
    assert "captions prefixed with 'a_photo_of_a '" in capsys.readouterr().err
    assert prefixed.gather(np.array([3, 3])).shape == (2, D)
    # a second method of the run with the same encoder and prefix: said once, encoded once
    encoded: list[str] = []
    enc.encode_texts = lambda t: (encoded.extend(t), np.ones((len(t), D)))[1]  # type: ignore[attr-defined]
    again = CaptionEmbeddings(back, enc, "a_photo_of_a ")  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""
    assert again.gather(np.array([3, 4])).shape == (2, D) and encoded == ["a_photo_of_a caption 4"]
    other = CaptionEmbeddings(back, enc, "another ")  # type: ignore[arg-type]
    assert "captions prefixed with 'another '" in capsys.readouterr().err and other.gather(np.array([3])).shape == (1, D)
    assert encoded[-1] == "another caption 3"


# ------------------------------------------------------------------ X-MoRe and the adapters' survivors

def test_caption_votes_use_every_valid_id_and_uniform_when_none(tmp_path) -> None:
    """Id 0 is a caption like any other (only -1 is padding); an image the memory returns no
    caption for gets the uniform text distribution, whatever the classes."""
    from PIL import Image

    from conftest import TINY
    from test_classify_e2e import CLASSES, DUPS, TEMPLATES, build_memory
    from xm.memories import open_index
    from xm.memories.filtered import FilteredMemory
    from xm.methods.base import Context, Queries
    from xm.methods.registry import create

    index, queries, _ = build_memory(tmp_path)
    memory = open_index(index)
    xmore = create("xmore", Context(memory, TINY, CLASSES, TEMPLATES), k_coarse=DUPS, k_fine=2)
    logits = xmore.caption_logits(np.array([0, 5, -1]))
    expect = xmore.scale * xmore.captions.gather(np.array([0, 5])).astype(np.float64) @ xmore.weights.T.astype(np.float64)
    assert logits.shape == (2, len(CLASSES)) and np.allclose(logits, expect)
    nothing = FilteredMemory(memory, range(memory.count))  # every item hidden: no neighbour at all
    bare = create("xmore", Context(nothing, TINY, CLASSES, TEMPLATES), k_coarse=DUPS, k_fine=2, skip_short=False)
    ev = bare.evidence(Queries([Image.open(q).convert("RGB") for q in queries[:2]]))
    assert (ev["ids"] == -1).all() and (ev["neighbours"] == 0).all()
    assert np.allclose(ev["p_txt"], 1 / len(CLASSES)) and np.allclose(ev["p_txt_logits"], 1 / len(CLASSES))


def test_support_labels_out_of_range_are_refused() -> None:
    import pytest

    from xm.errors import XMError
    from xm.methods.tip_adapter import one_hot

    assert one_hot([0, 2, 1], 3).tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    for bad in ([0, 3], [-1, 1]):
        with pytest.raises(XMError, match="out of range 0..2"):
            one_hot(bad, 3)
