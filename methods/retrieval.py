"""Cross-modal retrieval from the memory: coarse image kNN, then fine caption re-ranking.

Nothing here scans the memory or the caption store per query: kNN is FAISS, caption
de-duplication uses the stored caption hashes, and caption embeddings (and their norms)
under the fine and inference encoders are gathered by id from memory-mapped parts.

The switches of the authors' protocol and xm's own (see `methods/protocols.py`):
  pool    truncate-dedupe  keep the first K neighbours, then drop exact-duplicate
                           captions (the pool may end below K)           (authors' code)
          dedupe-truncate  the first K distinct captions                  (xm)
  rerank  dot     raw dot product of the fine features (caption norms stored at build)
          cosine  cosine similarity
  refetch ask for `overfetch` neighbours, and for `refetch` when fewer than K came back
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xm.encoders import CPU, DEFAULT_PRECISION, Device, Encoder, Precision, load_encoder, load_image
from xm.errors import XMError
from xm.memories import Memory, open_memory
from xm.memories.base import ById

POOLS = ("truncate-dedupe", "dedupe-truncate")
RERANKS = ("dot", "cosine")


@dataclass
class Retrieved:
    """The k captions kept for one query image."""

    ids: np.ndarray  # the k kept, best first
    fine_sims: np.ndarray  # fine similarity of each kept caption (raw dot or cosine, per `rerank`)
    neighbours: int = 0  # valid ids the kNN returned
    pool: int = 0  # captions in the pool after de-duplication


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, secs: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + secs


class CaptionEmbeddings:
    """Caption embeddings under one encoder: precomputed in the index, or computed once and
    cached (an encoder the index has none for, or captions encoded with a prefix).

    The computed ones are shared by every method of the process that asks for the same
    encoder object, memory items and prefix (a benchmark's xmore variants encode each
    caption once, and the "computing them on the fly" line is said once)."""

    # encoder object -> (memory items, prefix) -> id -> embedding; an encoder that is dropped
    # takes its captions with it
    _shared: weakref.WeakKeyDictionary[Encoder, dict[tuple[str, str], dict[int, np.ndarray]]] = weakref.WeakKeyDictionary()
    _shared_lock = threading.Lock()

    def __init__(self, memory: Memory, encoder: Encoder, prefix: str = "") -> None:
        self.memory = memory
        self.encoder = encoder
        self.prefix = prefix
        self.precomputed = not prefix and memory.has_embeddings(str(encoder.spec), "text")
        self._cache: dict[int, np.ndarray] = {}
        if memory.has_embeddings(str(encoder.spec), "text"):
            memory.check_encoder(encoder, "inference")
        if not self.precomputed:
            with self._shared_lock:
                per_encoder = self._shared.setdefault(encoder, {})
                key = (memory.items_id, prefix)
                first = key not in per_encoder
                self._cache = per_encoder.setdefault(key, {})
            if first:
                why = f"captions prefixed with {prefix!r}" if prefix else f"no caption embeddings for {encoder.spec}"
                print(f"xm: {memory.root}: {why}; computing them on the fly (cached)", file=sys.stderr)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        if self.precomputed:
            return self.memory.embeddings(str(self.encoder.spec), "text").gather(ids)
        missing = [int(i) for i in dict.fromkeys(int(i) for i in ids) if i not in self._cache]
        if missing:
            texts = [self.prefix + c for c in self.memory.captions(missing)]
            self._cache.update(zip(missing, self.encoder.encode_texts(texts)))
        return np.stack([self._cache[int(i)] for i in ids]) if len(ids) else np.zeros((0, self.encoder.dim), np.float32)


def caption_pool(ids: np.ndarray, hashes: ById, k: int, pool: str) -> np.ndarray:
    """The candidate captions of one query, in kNN order (see the module docstring)."""
    ids = ids[ids >= 0]
    if pool == "truncate-dedupe":
        ids = ids[:k]
    seen: set[int] = set()
    out = []
    for i in ids:
        h = int(hashes[i])
        if h in seen:
            continue
        seen.add(h)
        out.append(int(i))
        if len(out) == k:
            break
    return np.asarray(out, dtype=np.int64)


class Retriever:
    """X-MoRe steps 3-4: coarse kNN of the query image, fine re-ranking of the captions."""

    def __init__(self, memory: Memory, coarse: Encoder, fine: Encoder, k_coarse: int = 128, k_fine: int = 16,
                 direct: bool = True, overfetch: int = 200, refetch: int = 1000, pool: str = "truncate-dedupe",
                 rerank: str = "dot") -> None:
        memory.check_encoder(coarse, "coarse")
        memory.check_encoder(fine, "fine")
        self.memory, self.coarse, self.fine = memory, coarse, fine
        self.k_coarse, self.k_fine, self.direct = k_coarse, k_fine, direct
        self.overfetch = max(overfetch, k_coarse)
        self.refetch = max(refetch, self.overfetch)
        self.pool, self.rerank = pool, rerank
        self.fine_captions = CaptionEmbeddings(memory, fine)
        self.fine_norms = memory.norms(str(fine.spec), "text") if rerank == "dot" else None
        self.hashes = memory.caption_hashes

    def _knn(self, queries: np.ndarray) -> np.ndarray:
        n = self.memory.count
        _, ids = self.memory.search("image", queries, min(self.overfetch, n), encoder=str(self.coarse.spec))
        short = np.nonzero((ids >= 0).sum(1) < self.k_coarse)[0]
        if len(short) and self.refetch > self.overfetch and n > self.overfetch:
            # as the authors' client: ask again, for more, when fewer than K came back
            _, again = self.memory.search("image", queries[short], min(self.refetch, n), encoder=str(self.coarse.spec))
            wide = np.full((len(ids), again.shape[1]), -1, np.int64)
            wide[:, : ids.shape[1]] = ids
            wide[short] = again
            ids = wide
        return ids

    def _similarity(self, cand: np.ndarray, fine_query: np.ndarray) -> np.ndarray:
        sims = self.fine_captions.gather(cand) @ fine_query
        if self.fine_norms is not None:
            sims = sims * np.asarray(self.fine_norms[cand], np.float32)
        return sims

    def retrieve(self, coarse_queries: np.ndarray, fine_queries: np.ndarray, timings: Timings | None = None) -> list[Retrieved]:
        """Given the query images' coarse and fine embeddings."""
        t = time.perf_counter()
        ids = self._knn(coarse_queries)
        t2 = time.perf_counter()
        out = []
        for row, qid in enumerate(ids):
            cand = caption_pool(qid, self.hashes, self.k_coarse, self.pool)
            if self.direct:
                sims = self._similarity(cand, fine_queries[row])
                order = np.argsort(-sims, kind="stable")[: self.k_fine]
                kept, kept_sims = cand[order], sims[order]
            else:  # "indirect" ablation: coarse order, no re-ranking
                kept = cand[: self.k_fine]
                kept_sims = self._similarity(kept, fine_queries[row])
            out.append(Retrieved(kept, kept_sims, int((qid >= 0).sum()), len(cand)))
        if timings is not None:
            timings.add("knn", t2 - t)
            timings.add("rerank", time.perf_counter() - t2)
        return out


def search_memory(index: str | Path | Memory, image: Path | None = None, text: str | None = None, k: int = 10,
                  modality: str = "image", encoder: str | None = None,
                  precision: Precision = DEFAULT_PRECISION, device: Device = CPU) -> list[dict[str, Any]]:
    """Nearest memory items to an image or text under an indexed encoder (default: coarse),
    the query embedded at `precision` (fp32 | bf16 | fp16 | int8) on `device`."""
    memory = index if isinstance(index, Memory) else open_memory(index)
    spec = encoder or memory.roles["coarse"]
    enc = load_encoder(spec, precision=precision, device=device)
    memory.check_encoder(enc, "coarse" if spec == memory.roles.get("coarse") else "inference")
    if image is not None:
        query = enc.encode_images([load_image(image)])
    elif text is not None:
        query = enc.encode_texts([text])
    else:
        raise XMError("search: give an image or a text")
    sims, ids = memory.search(modality, query, min(k, memory.count), encoder=spec)
    keep = ids[0] >= 0
    rows = memory.rows(ids[0][keep])
    return [{"id": int(i), "similarity": float(s), "caption": r["caption"], "url": r["url"], "source_id": r["source_id"]}
            for i, s, r in zip(ids[0][keep], sims[0][keep], rows)]
