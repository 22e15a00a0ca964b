"""Row-aligned embedding parts (clip-retrieval layout) read by global id, memory-mapped."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from xm.errors import XMError


class EmbeddingMatrix:
    """The concatenation of `*_emb_<part>.npy` files, gathered by global id without loading them."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)
        self.parts: list[np.ndarray] = []
        for f in self.files:
            try:
                self.parts.append(np.load(f, mmap_mode="r"))
            except (OSError, ValueError) as exc:
                raise XMError(f"{f}: unreadable embedding file ({exc})") from exc
        sizes = [p.shape[0] for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.dim = self.parts[0].shape[1] if self.parts else 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows for global ids (any order, repeats allowed)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if len(ids) == 0:
            return out
        part_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for p in np.unique(part_of):
            sel = np.nonzero(part_of == p)[0]
            out[sel] = self.parts[p][ids[sel] - self.offsets[p]]
        return out
