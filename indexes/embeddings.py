"""Row-aligned embedding parts (clip-retrieval layout) read by global id, memory-mapped."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xm.errors import XMError
from xm.indexes.open_files import OpenFiles


def npy_shape(path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """An .npy file's shape and dtype from its header alone (no map kept, the file closed)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = np.lib.format._read_array_header(f, version)  # type: ignore[attr-defined]
    except (OSError, ValueError) as exc:
        raise XMError(f"{path}: unreadable embedding file ({exc})") from exc
    return tuple(shape), np.dtype(dtype)


def _mapped(f: str | Path, what: str) -> np.ndarray:
    """One part file memory-mapped, or one line naming it (`what`: the kind of file, for the line)."""
    try:
        return np.load(f, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise XMError(f"{f}: unreadable {what} ({exc})") from exc


class EmbeddingMatrix:
    """The concatenation of `*_emb_<part>.npy` files, gathered by global id without loading them.

    Parts are memory-mapped when a gather first touches them and kept in `opened`, a bounded
    LRU (`OpenFiles`, shared by a memory's readers): a memory of 40,000 parts holds at most its
    capacity of maps and descriptors, not one per part. With `rows` (the manifest's, per part)
    nothing is opened up front; without, each part's header is read once for its row count."""

    def __init__(self, files: Sequence[str | Path], rows: Sequence[int] | None = None, opened: OpenFiles | None = None) -> None:
        self.files = list(files)
        self.opened = opened if opened is not None else OpenFiles()
        self._rows_known = rows is not None
        sizes = list(rows) if rows is not None else [npy_shape(f)[0][0] for f in self.files]
        if len(sizes) != len(self.files):
            raise XMError(f"{len(self.files)} embedding files for {len(sizes)} parts")
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.dim = self._width(npy_shape(self.files[0])) if self.files else 0

    def _width(self, header: tuple[tuple[int, ...], np.dtype]) -> int:
        shape = header[0]
        if len(shape) != 2:
            raise XMError(f"{self.files[0]}: shape {shape}, expected (rows, dim) embeddings")
        return int(shape[1])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def part(self, p: int) -> np.ndarray:
        """Part `p`, memory-mapped (opened now or kept from before), checked against its rows."""
        return self.opened.get(("npy", self.files[p]), lambda: self._open(p))

    def _open(self, p: int) -> np.ndarray:
        f = self.files[p]
        arr = _mapped(f, "embedding file")
        expected = int(self.offsets[p + 1] - self.offsets[p])
        if arr.ndim != 2 or arr.shape[0] != expected or arr.shape[1] != self.part_width():
            raise XMError(f"{f}: shape {arr.shape}, the manifest says {expected} rows of {self.part_width()}")
        return arr

    def part_width(self) -> int:
        """Columns every part has (the rows' dimension; a coded matrix's code size)."""
        return self.dim

    def _gather_rows(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        part_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for p in np.unique(part_of):
            sel = np.nonzero(part_of == p)[0]
            out[sel] = self.part(int(p))[ids[sel] - self.offsets[p]]
        return out

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows for global ids (any order, repeats allowed)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if len(ids) == 0:
            return out
        return self._gather_rows(ids, out)


class ByIdParts:
    """A per-item float vector stored as one .npy part per part (the caption norms), read by
    id (`norms[ids]`) through the same bounded cache of maps: nothing is loaded whole."""

    def __init__(self, files: Sequence[str | Path], rows: Sequence[int], opened: OpenFiles | None = None) -> None:
        self.files = list(files)
        self.opened = opened if opened is not None else OpenFiles()
        self.offsets = np.concatenate([[0], np.cumsum(list(rows), dtype=np.int64)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _open(self, p: int) -> np.ndarray:
        f = self.files[p]
        arr = _mapped(f, "file")
        expected = int(self.offsets[p + 1] - self.offsets[p])
        if arr.shape != (expected,):
            raise XMError(f"{f}: shape {arr.shape}, the manifest says {expected} rows")
        return arr

    def __getitem__(self, ids: Any) -> np.ndarray:
        wanted = np.asarray(ids, dtype=np.int64)
        flat = np.atleast_1d(wanted)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"id out of range 0..{len(self) - 1}")
        out = np.empty(len(flat), dtype=np.float32)
        part_of = np.searchsorted(self.offsets, flat, side="right") - 1
        for p in np.unique(part_of):
            sel = np.nonzero(part_of == p)[0]
            arr = self.opened.get(("npy", self.files[int(p)]), functools.partial(self._open, int(p)))
            out[sel] = arr[flat[sel] - self.offsets[p]]
        return out.reshape(wanted.shape)


class CodedEmbeddingMatrix(EmbeddingMatrix):
    """Compressed embedding parts (`*_code_<part>.npy`, uint8 codes of one FAISS codec), read
    like `EmbeddingMatrix`: `gather` decodes only the rows asked for (`sa_decode`).

    Decoded rows are renormalised to unit length: the stored embeddings are unit vectors by
    construction (their norms are kept apart, float32), and quantization shrinks rows by
    different amounts, which would otherwise bias dot products toward the rows it shrank least."""

    def __init__(self, files: Sequence[str | Path], codec_file: Path, rows: Sequence[int] | None = None,
                 opened: OpenFiles | None = None) -> None:
        from xm.indexes.codecs import read_codec

        super().__init__(files, rows, opened)
        self.codec = read_codec(codec_file)
        self.codec_file = codec_file
        self.code_size = int(self.codec.sa_code_size())
        if self.files:
            shape, dtype = npy_shape(self.files[0])
            if dtype != np.uint8 or len(shape) != 2 or shape[1] != self.code_size:
                raise XMError(f"{self.files[0]}: {dtype} {shape} codes, the codec {codec_file.name} writes uint8 rows of {self.code_size} bytes")
        self.dim = int(self.codec.d)

    def part_width(self) -> int:
        return self.code_size

    def _open(self, p: int) -> np.ndarray:
        arr = super()._open(p)
        if arr.dtype != np.uint8:
            raise XMError(f"{self.files[p]}: {arr.dtype} codes, the codec {self.codec_file.name} writes uint8 rows of {self.code_size} bytes")
        return arr

    def gather(self, ids: np.ndarray) -> np.ndarray:
        from xm.indexes.codecs import decode

        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        codes = self._gather_rows(ids, np.empty((len(ids), self.code_size), dtype=np.uint8))
        out = decode(self.codec, codes)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)
