"""The one memory interface: what methods, the API, the server, the benchmark, training and
`xm texts` ask of a memory of image-caption pairs.

A memory holds `count` items, each an image and its caption, numbered by global id
(0..count-1). It can be searched by modality under an indexed encoder, gives the stored (or
computed) embeddings and norms of its items by id, their rows (caption, url, source columns)
and caption hashes, and says which encoders it holds in which roles.

Thread safety is part of the contract: every method may be called from several threads at
once (the server's request threads share one memory), so an implementation guards its own
caches; nobody wraps a memory from outside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np


class Embeddings(Protocol):
    """Embeddings of a memory's items under one encoder and modality, read by global id."""

    dim: int

    def gather(self, ids: Any) -> np.ndarray:
        """float32 rows (len(ids), dim) for global ids, any order, repeats allowed."""
        ...


class ById(Protocol):
    """Per-item values indexed by global id: `values[ids]` (norms, caption hashes)."""

    def __getitem__(self, ids: Any) -> Any: ...


class Memory(ABC):
    """A memory the methods retrieve from: a local index folder, a remote back, or a plug-in.

    `kind` names the implementation ("local", "remote", ...); `remote` says whether its kNN
    runs on another machine, so that no caller asks which class it holds.
    """

    kind: ClassVar[str]
    remote: ClassVar[bool] = False
    root: Path | str  # where it lives, a folder or a URL: what error messages name
    count: int  # the items it holds: ids are 0..count-1

    # --- what it is -------------------------------------------------------------------
    @property
    @abstractmethod
    def id(self) -> str:
        """A stable identifier of the memory's content (streams and caches are keyed by it)."""

    @property
    def items_id(self) -> str:
        """The id of the memory whose items this one's ids number: its own `id`, or for a view
        that hides some items (`memories/filtered.py`) the wrapped memory's. What was trained
        on a memory (RECO's checkpoint) fits every view of it."""
        return self.id

    @property
    def hidden_ids(self) -> np.ndarray:
        """The ids (of `items_id`'s items, sorted) this view leaves out of every search: none for
        a memory that is not a view (`memories/filtered.py` hides the test images' near-duplicates)."""
        return np.zeros(0, np.int64)

    @property
    @abstractmethod
    def roles(self) -> dict[str, Any]:
        """X-MoRe's roles: {"coarse": spec, "fine": spec, "inference": [spec, ...]}."""

    @property
    @abstractmethod
    def encoders(self) -> list[str]:
        """The encoders (ARCH:PRETRAINED) it holds embeddings or indexes for."""

    @abstractmethod
    def probe(self, spec: str) -> list[float] | None:
        """The weights fingerprint of the encoder `spec` that made its embeddings (compared with
        `Encoder.fingerprint_matches`); None where unknown or never taken (precomputed)."""

    @abstractmethod
    def default_model(self) -> str:
        """The encoder `--model` defaults to."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """A plain, JSON-ready summary: kind, location, id, count, roles, source, columns, and
        encoders ({spec: {dim, probe, embedded, norms}}, as far as the memory knows them)."""

    # --- what it can give ---------------------------------------------------------------
    @abstractmethod
    def has_embeddings(self, spec: str, modality: str) -> bool: ...

    @abstractmethod
    def has_norms(self, spec: str, modality: str) -> bool: ...

    @abstractmethod
    def has_index(self, spec: str, modality: str) -> bool: ...

    def provides(self, need: Any) -> bool:
        """Whether this memory holds what a method's `Need` asks for."""
        if need.kind == "embeddings":
            return self.has_embeddings(need.encoder, need.modality)
        if need.kind == "index":
            return self.has_index(need.encoder, need.modality)
        if need.kind == "norms":
            return self.has_norms(need.encoder, need.modality)
        if need.kind == "trained":
            return need.path is not None and Path(need.path).is_file()
        raise ValueError(need.kind)

    @abstractmethod
    def check_encoder(self, encoder: Any, role: str) -> None:
        """Refuse (XMError) an encoder whose name or weights differ from the one this memory
        holds in `role` ("coarse", "fine", "inference", ...)."""

    # --- reading it -----------------------------------------------------------------------
    @abstractmethod
    def search(self, modality: str, queries: np.ndarray, k: int, encoder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """kNN (inner product) of query embeddings under `encoder` (default: coarse) against the
        items' `modality` embeddings: (similarities, ids), each (n, k), missing ids -1."""

    @abstractmethod
    def embeddings(self, spec: str, modality: str) -> Embeddings:
        """The items' `modality` embeddings under encoder `spec` (unit length)."""

    @abstractmethod
    def norms(self, spec: str, modality: str) -> ById:
        """The items' embedding norms before normalisation (float32 by id: `norms[ids]`)."""

    @property
    @abstractmethod
    def caption_hashes(self) -> ById:
        """int64 hash of each item's caption by id (`hashes[ids]`): de-duplication without text."""

    @abstractmethod
    def rows(self, ids: Sequence[int], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The items' rows (id, caption, url, source columns) in the order given."""

    def captions(self, ids: Sequence[int]) -> list[str]:
        """The items' captions in the order given."""
        return [r["caption"] for r in self.rows(ids, columns=("caption",))]

    def preload(self) -> None:
        """Open now what searches and gathers would open on first use (a server, before requests)."""
        return None  # a memory that opens nothing lazily has nothing to do

    def close(self) -> None:
        """Release connections and write caches; the memory is not used afterwards."""
        return None  # a memory that holds no connection or cache has nothing to do
