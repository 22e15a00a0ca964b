"""Compressed embeddings: one mechanism, a FAISS standalone codec named by its factory string.

`SQ8` (1 byte a dimension), `SQ4`, `SQfp16`, `PQ64` (64 bytes), `OPQ32,PQ32`, ... are
trained once per (encoder, modality) on a deterministic sample of the float16 embeddings,
stored with `faiss.write_index` beside the codes (see `indexes/layout.py`), and decoded
with `sa_decode` by `indexes.embeddings.CodedEmbeddingMatrix`, so every method reads
compressed embeddings through the same `memory.embeddings(spec, modality).gather(ids)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xm.errors import XMError

# training rows per codec: evenly spaced over the whole memory (deterministic); enough for
# PQ's 256 centroids per sub-quantizer (faiss asks for 39 points each) at every size we offer
TRAIN_ROWS = 65_536
# the stand-in width for checking a factory string before the encoder is known (3840 = 2^8 * 15:
# PQ and OPQ sizes that divide it pass); the real width is checked by make_codec at the build's
# validation, so a PQ whose M does not divide 3840 (PQ512, PQ1024) is refused here, a known limit
_CHECK_DIM = 3840
# standalone codecs only: an IVF's list ids or a graph are not a per-row code
_REFUSED = ("IVF", "HNSW", "NSG", "IMI", "Flat", "IDMap", "Refine", "RFlat")


def check_codec(codec: str, flag: str = "--text-codec") -> str:
    """A factory string that names a per-row FAISS codec (before the encoder's dim is known)."""
    import faiss

    text = codec.strip()
    if not text or any(word in text for word in _REFUSED):
        raise XMError(f"{flag} {codec!r}: not a standalone codec; use e.g. SQ8, SQ4, SQfp16, PQ64, OPQ32,PQ32")
    try:
        index = faiss.index_factory(_CHECK_DIM, text, faiss.METRIC_INNER_PRODUCT)
        index.sa_code_size()
    except RuntimeError as exc:
        raise XMError(f"{flag} {codec!r}: not a FAISS codec factory string ({_faiss_reason(exc)}); "
                      "use e.g. SQ8, SQ4, SQfp16, PQ64, OPQ32,PQ32") from exc
    return text


def make_codec(codec: str, dim: int, where: str = "") -> Any:
    """An untrained codec for `dim`-dimensional rows; XMError if it does not fit the dim."""
    import faiss

    try:
        index = faiss.index_factory(int(dim), codec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise XMError(f"{where or 'codec'} {codec}: does not fit {dim}-dimensional embeddings ({_faiss_reason(exc)})") from exc
    no_polysemous_training(index)
    return index


def no_polysemous_training(index: Any) -> None:
    """Switch off polysemous training, which faiss's factory turns on for every PQ (as if the key
    ended in `np`): it re-orders each sub-quantizer's centroids so that Hamming distances between
    codes approximate real ones, for `polysemous_ht` searches. xm decodes codes (`sa_decode`) and
    never searches by Hamming distance, so it was time spent for nothing: most of a PQ codec's
    training (bench/bench_compress.py --polysemous measures it)."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    for candidate in (inner, getattr(inner, "index", None)):
        if candidate is not None and hasattr(candidate, "do_polysemous_training"):
            candidate.do_polysemous_training = False


def code_size(codec: str, dim: int) -> int:
    """Bytes per row of `codec` for `dim`-dimensional rows (known before training)."""
    return int(make_codec(codec, dim).sa_code_size())


def train_sample_ids(count: int, rows: int | None = None) -> np.ndarray:
    """Evenly spaced global ids: the same sample on every run, spread over every part."""
    rows = rows or TRAIN_ROWS
    return np.unique(np.linspace(0, count - 1, min(count, rows)).astype(np.int64)) if count else np.zeros(0, np.int64)


def train_codec(codec: str, sample: np.ndarray, where: str = "") -> Any:
    """The codec trained on `sample` (float32 rows); XMError if the sample is too small for it."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    index = make_codec(codec, x.shape[1], where)
    need = _min_training_rows(index)
    if len(x) < need:
        raise XMError(f"{where or 'codec'} {codec}: needs at least {need} training rows, the index holds {len(x)}; "
                      "use SQ8 (or SQ4, SQfp16) for a memory this small")
    if not index.is_trained:
        index.train(x)
    return index


def encode(index: Any, x: np.ndarray) -> np.ndarray:
    """uint8 codes (n, code_size) of float rows."""
    codes = index.sa_encode(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(codes, dtype=np.uint8).reshape(len(x), index.sa_code_size())


def decode(index: Any, codes: np.ndarray) -> np.ndarray:
    """float32 rows of uint8 codes."""
    return np.asarray(index.sa_decode(np.ascontiguousarray(codes, dtype=np.uint8)), dtype=np.float32)


def write_codec(index: Any, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


def read_codec(path: Path) -> Any:
    import faiss

    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise XMError(f"{path}: unreadable codec ({_faiss_reason(exc)})") from exc


def _min_training_rows(index: Any) -> int:
    """PQ's k-means needs at least as many rows as centroids (2^nbits per sub-quantizer);
    OPQ's rotation at least as many as dimensions (faiss aborts the process below that)."""
    import faiss

    need = 1
    if isinstance(index, faiss.IndexPreTransform):
        need = int(index.d)
        index = faiss.downcast_index(index.index)
    pq = getattr(index, "pq", None)
    return max(need, int(pq.ksub)) if pq is not None else need


def _faiss_reason(exc: BaseException) -> str:
    """FAISS errors carry a C++ trace; the last 'Error ...' line says what is wrong."""
    import re

    text = " ".join(str(exc).split())
    found = re.findall(r"\.(?:cpp|h):\d+: (.*?)(?= Error in |$)", text)
    return (found[-1] if found else text).strip().strip("'")
