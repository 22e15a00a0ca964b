"""A memory with some of its items hidden: a per-run id filter over another memory's kNN
search, not a rebuild (`xm benchmark --decontaminate` hides the near-duplicates of the test
images this way, for every method at once).

Ids keep their meaning (`count` is the wrapped memory's, so every by-id reader is the
wrapped one's, unchanged); only `search` differs: it never returns a hidden id. It asks the
wrapped memory for a few more neighbours than wanted, drops the hidden ones and, for a row
that still comes out short while the wrapped memory had more to give, asks again for
k + (number hidden), which cannot come out short: the answer is exactly the wrapped memory's
ranking with the hidden items removed. The `id` names the hidden set, so caches keyed by
a memory's id (the benchmark's evidence) never mix a filtered memory with the full one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from xm.memories.base import ById, Embeddings, Memory


class FilteredMemory(Memory):
    """`inner` with the items `hidden` (global ids) left out of every search."""

    kind: ClassVar[str] = "filtered"

    def __init__(self, inner: Memory, hidden: Iterable[int]) -> None:
        self.inner = inner
        self.root = inner.root
        self.count = inner.count
        self.hidden = np.unique(np.asarray(list(hidden), dtype=np.int64))
        if len(self.hidden) and (self.hidden[0] < 0 or self.hidden[-1] >= inner.count):
            raise ValueError(f"{inner.root}: hidden ids must lie in 0..{inner.count - 1}")
        self._mask = np.zeros(inner.count, bool)
        self._mask[self.hidden] = True
        digest = hashlib.sha256(self.hidden.tobytes()).hexdigest()[:12]
        self._id = f"{inner.id}-hiding-{len(self.hidden)}-{digest}" if len(self.hidden) else inner.id

    # --- what it is: the wrapped memory's, under its own id ------------------------------
    @property
    def id(self) -> str:
        return self._id

    @property
    def items_id(self) -> str:
        return self.inner.items_id

    @property
    def hidden_ids(self) -> np.ndarray:
        return np.union1d(self.inner.hidden_ids, self.hidden)  # a view of a view hides both sets

    @property
    def roles(self) -> dict[str, Any]:
        return self.inner.roles

    @property
    def encoders(self) -> list[str]:
        return self.inner.encoders

    def probe(self, spec: str) -> list[float] | None:
        return self.inner.probe(spec)

    def default_model(self) -> str:
        return self.inner.default_model()

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "id": self.id, "hidden": int(len(self.hidden)), "wraps": self.inner.kind}

    def has_embeddings(self, spec: str, modality: str) -> bool:
        return self.inner.has_embeddings(spec, modality)

    def has_norms(self, spec: str, modality: str) -> bool:
        return self.inner.has_norms(spec, modality)

    def has_index(self, spec: str, modality: str) -> bool:
        return self.inner.has_index(spec, modality)

    def check_encoder(self, encoder: Any, role: str) -> None:
        self.inner.check_encoder(encoder, role)

    # --- reading it -------------------------------------------------------------------------
    def search(self, modality: str, queries: np.ndarray, k: int, encoder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(queries)
        q = q[None] if q.ndim == 1 else q
        h = len(self.hidden)
        if not h:
            return self.inner.search(modality, q, k, encoder)
        # a little more than k first (at most 2k); the short rows again with k + h, which is exact
        first = min(self.count, k + min(h, max(k, 16)))
        sims, ids = self._drop(*self.inner.search(modality, q, first, encoder), k)
        short = np.nonzero((ids >= 0).sum(1) < k)[0]
        wide = min(self.count, k + h)
        if len(short) and wide > first:
            s2, i2 = self._drop(*self.inner.search(modality, q[short], wide, encoder), k)
            sims[short], ids[short] = s2, i2
        return sims, ids

    def _drop(self, sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows with the hidden ids removed (order kept), cut or padded (-1, -inf) to k."""
        out_s = np.full((len(ids), k), -np.inf, np.float32)
        out_i = np.full((len(ids), k), -1, np.int64)
        valid = ids >= 0
        keep = valid & ~self._mask[np.where(valid, ids, 0)]
        for r in range(len(ids)):
            row_i, row_s = ids[r][keep[r]][:k], sims[r][keep[r]][:k]
            out_i[r, : len(row_i)], out_s[r, : len(row_s)] = row_i, row_s
        return out_s, out_i

    def embeddings(self, spec: str, modality: str) -> Embeddings:
        return self.inner.embeddings(spec, modality)

    def norms(self, spec: str, modality: str) -> ById:
        return self.inner.norms(spec, modality)

    @property
    def caption_hashes(self) -> ById:
        return self.inner.caption_hashes

    def rows(self, ids: Sequence[int], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        return self.inner.rows(ids, columns)

    def captions(self, ids: Sequence[int]) -> list[str]:
        return self.inner.captions(ids)

    def preload(self) -> None:
        self.inner.preload()

    def close(self) -> None:
        self.inner.close()
