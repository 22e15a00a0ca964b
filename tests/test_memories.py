"""The memory interface: a local index and a remote back answer it alike, and a memory kind
registered from outside xm opens through `open_memory` and classifies through a method."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from conftest import TINY, make_image
from test_server import CLASSES, Server, memory  # noqa: F401  (the served index, built once here)
from xm.classify import Classifier
from xm.encoders import load_encoder
from xm.errors import XMError
from xm.indexes.layout import caption_hash
from xm.memories import LocalMemory, Memory, RemoteMemory, open_memory, register_memory
from xm.memories.registry import unregister_memory

DESCRIBED = {"kind", "location", "id", "count", "roles", "encoders", "source", "columns"}


@pytest.fixture(scope="module")
def served(memory):  # noqa: F811
    _, index, _, _ = memory
    s = Server(f"mem={index}")
    yield s
    log = s.stop()
    assert "Traceback" not in log, log


def test_local_and_remote_answer_the_interface_alike(memory, served, monkeypatch, tmp_path) -> None:  # noqa: F811
    monkeypatch.setenv("XM_CACHE_DIR", str(tmp_path))
    _, index, _, _ = memory
    local = open_memory(index)
    remote = open_memory(f"{served.url}/?indice_name=mem")
    assert isinstance(local, LocalMemory) and isinstance(remote, RemoteMemory)
    assert (local.kind, local.remote, remote.kind, remote.remote) == ("local", False, "remote", True)
    coarse, fine = local.roles["coarse"], local.roles["fine"]
    for m in (local, remote):
        assert isinstance(m, Memory) and m.count == local.count and m.roles["coarse"] == coarse
        assert coarse in m.encoders and m.default_model() == local.default_model()
        assert m.has_index(coarse, "image") and m.has_embeddings(TINY, "text") and m.has_norms(fine, "text")
        info = m.describe()
        assert DESCRIBED <= set(info) and info["kind"] == m.kind and json.loads(json.dumps(info)) == info
    assert remote.id == f"remote-{local.id}"
    with_token = open_memory(f"{served.url}/?indice_name=mem&token=not-to-be-shown")
    assert "not-to-be-shown" not in json.dumps(with_token.describe())  # described without its token
    with_token.close()

    query = local.embeddings(coarse, "image").gather(np.array([4, 17]))
    sims_l, ids_l = local.search("image", query, 5)
    sims_r, ids_r = remote.search("image", query, 5)
    assert np.array_equal(ids_l, ids_r) and np.allclose(sims_l, sims_r, atol=1e-5)

    ids = ids_l[0]
    assert local.rows(ids) == remote.rows(ids) and local.captions(ids) == remote.captions(ids)
    assert local.rows(ids, columns=("id", "caption")) == remote.rows(ids, columns=("id", "caption"))
    assert np.array_equal(np.asarray(local.caption_hashes[ids]), np.asarray(remote.caption_hashes[ids]))
    assert [caption_hash(c) for c in local.captions(ids)] == np.asarray(local.caption_hashes[ids]).tolist()
    # caption embeddings and norms: stored here, computed from the captions there
    np.testing.assert_allclose(remote.embeddings(TINY, "text").gather(ids), local.embeddings(TINY, "text").gather(ids), atol=2e-3)
    np.testing.assert_allclose(remote.norms(fine, "text")[ids], local.norms(fine, "text")[ids], rtol=1e-3)

    tiny = load_encoder(TINY)
    for m in (local, remote):
        m.check_encoder(tiny, "inference")
        with pytest.raises(XMError, match="coarse encoder"):
            m.check_encoder(tiny, "coarse")  # the served index's coarse encoder is a checkpoint file
    with pytest.raises(XMError, match="image embeddings"):
        remote.embeddings(TINY, "image")
    remote.close()
    local.close()


def test_local_memory_serves_concurrent_readers(memory) -> None:  # noqa: F811
    _, index, _, _ = memory
    m = open_memory(index)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, m.count, 9) for _ in range(64)]
    want = [[r["caption"] for r in open_memory(index).rows(b)] for b in batches]
    got: list[Any] = [None] * len(batches)

    def read(i: int) -> None:
        got[i] = m.captions(batches[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


class ToyMemory(Memory):
    """A memory that is neither a folder nor a back: a few generated images and their captions,
    embedded when opened, searched by brute force."""

    kind = "toy"

    def __init__(self, location: str) -> None:
        self.root = location
        self.captions_ = [f"a photo of a {c}" for c in CLASSES for _ in range(3)]
        self.count = len(self.captions_)
        enc = load_encoder(TINY)
        self.image = enc.encode_images([make_image(i // 3) for i in range(self.count)])
        self.text, self.text_norms = enc.encode_texts_with_norms(self.captions_)
        self.opened = location

    @property
    def id(self) -> str:
        return "toy-" + self.opened

    @property
    def roles(self) -> dict[str, Any]:
        return {"coarse": TINY, "fine": TINY, "inference": [TINY]}

    @property
    def encoders(self) -> list[str]:
        return [TINY]

    def probe(self, spec: str) -> list[float] | None:
        return None  # embedded here, by the encoder itself: nothing to compare

    def default_model(self) -> str:
        return TINY

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": self.root, "id": self.id, "count": self.count, "roles": self.roles,
                "encoders": {TINY: {"dim": int(self.image.shape[1]), "probe": None, "embedded": ["image", "text"], "norms": ["text"]}},
                "source": {}, "columns": ["caption"]}

    def has_embeddings(self, spec: str, modality: str) -> bool:
        return spec == TINY

    def has_norms(self, spec: str, modality: str) -> bool:
        return spec == TINY and modality == "text"

    def has_index(self, spec: str, modality: str) -> bool:
        return spec == TINY

    def check_encoder(self, encoder: Any, role: str) -> None:
        if str(encoder.spec) != TINY:
            raise XMError(f"{self.root}: holds {TINY} embeddings only")

    def _matrix(self, modality: str) -> np.ndarray:
        return self.image if modality == "image" else self.text

    def search(self, modality: str, queries: np.ndarray, k: int, encoder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        sims = np.atleast_2d(queries) @ self._matrix(modality).T
        ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, ids, 1).astype(np.float32), ids.astype(np.int64)

    def embeddings(self, spec: str, modality: str) -> Any:
        matrix = self._matrix(modality)

        class Rows:
            dim = matrix.shape[1]

            def gather(self, ids: Any) -> np.ndarray:
                return matrix[np.asarray(ids, np.int64)].astype(np.float32)

        return Rows()

    def norms(self, spec: str, modality: str) -> np.ndarray:
        return self.text_norms

    @property
    def caption_hashes(self) -> np.ndarray:
        return np.array([caption_hash(c) for c in self.captions_], np.int64)

    def rows(self, ids: Sequence[int], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        out = [{"id": int(i), "caption": self.captions_[int(i)], "url": None} for i in ids]
        return [{c: r[c] for c in columns} for r in out] if columns else out


@pytest.fixture
def toy_kind():
    register_memory("toy", ToyMemory)
    yield
    unregister_memory("toy")


def test_a_registered_memory_kind_opens_and_classifies(toy_kind) -> None:
    toy = open_memory("toy://four-classes")
    assert isinstance(toy, ToyMemory) and toy.opened == "toy://four-classes"
    assert toy.describe()["kind"] == "toy"
    # X-MoRe through the interface only: coarse kNN, caption pool by hash, fine re-ranking by norms
    clf = Classifier("toy://four-classes", CLASSES, method="xmore", options={"k_coarse": 3, "k_fine": 2})
    assert isinstance(clf.memory, ToyMemory)
    images = [make_image(c) for c in range(len(CLASSES))]
    rows = clf.classify_images(images, explain=True)
    # each image retrieved its own items' caption (the random-init text encoder decides the rest)
    assert [[cap["caption"] for cap in r["captions"]] for r in rows] == [[f"a photo of a {c}"] for c in CLASSES]
    assert all(r["prediction"] in CLASSES and r["captions_used"] == 1 for r in rows)


def test_unregistered_locations_stay_local_folders(tmp_path) -> None:
    with pytest.raises(XMError):
        open_memory(tmp_path / "no-index-here")
    with pytest.raises(XMError):
        open_memory("toy://nothing-registered")  # no kind claims it: read as a folder, which does not exist
