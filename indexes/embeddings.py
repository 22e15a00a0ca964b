"""Row-aligned embedding parts (clip-retrieval layout) read by global id, memory-mapped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


class CodedEmbeddingMatrix(EmbeddingMatrix):
    """Compressed embedding parts (`*_code_<part>.npy`, uint8 codes of one FAISS codec), read
    like `EmbeddingMatrix`: `gather` decodes only the rows asked for (`sa_decode`).

    Decoded rows are renormalised to unit length: the stored embeddings are unit vectors by
    construction (their norms are kept apart, float32), and quantization shrinks rows by
    different amounts, which would otherwise bias dot products toward the rows it shrank least."""

    def __init__(self, files: Sequence[Path], codec_file: Path) -> None:
        from xm.indexes.codecs import read_codec

        super().__init__(files)
        self.codec = read_codec(codec_file)
        self.codec_file = codec_file
        size = int(self.codec.sa_code_size())
        for f, p in zip(self.files, self.parts):
            if p.dtype != np.uint8 or p.ndim != 2 or p.shape[1] != size:
                raise XMError(f"{f}: {p.dtype} {p.shape} codes, the codec {codec_file.name} writes uint8 rows of {size} bytes")
        self.dim = int(self.codec.d)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        from xm.indexes.codecs import decode

        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        codes = np.empty((len(ids), self.parts[0].shape[1]), dtype=np.uint8)
        part_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for p in np.unique(part_of):
            sel = np.nonzero(part_of == p)[0]
            codes[sel] = self.parts[p][ids[sel] - self.offsets[p]]
        out = decode(self.codec, codes)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)
