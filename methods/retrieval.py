"""Cross-modal retrieval from the memory: coarse image kNN, then fine caption re-ranking.

Nothing here scans the memory or the caption store per query: kNN is FAISS, caption
de-duplication uses the stored caption hashes, and caption embeddings under the fine
and inference encoders are gathered by id from memory-mapped parts.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xm.encoders import Encoder, load_encoder, load_image
from xm.errors import XMError
from xm.indexes import MemoryIndex, open_index


@dataclass
class Retrieved:
    """The k captions kept for one query image."""

    ids: np.ndarray  # the k kept, best first
    fine_sims: np.ndarray  # fine similarity of each kept caption


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, secs: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + secs


class CaptionEmbeddings:
    """Caption embeddings under one encoder: precomputed in the index, or computed once and cached."""

    def __init__(self, memory: MemoryIndex, encoder: Encoder) -> None:
        self.memory = memory
        self.encoder = encoder
        self.precomputed = memory.has_embeddings(str(encoder.spec), "text")
        self._cache: dict[int, np.ndarray] = {}
        if self.precomputed:
            memory.check_encoder(encoder, "inference")
        else:
            print(f"xm: {memory.root} has no caption embeddings for {encoder.spec}; computing them on the fly (cached)", file=sys.stderr)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        if self.precomputed:
            return self.memory.embeddings(str(self.encoder.spec), "text").gather(ids)
        missing = [int(i) for i in ids if int(i) not in self._cache]
        if missing:
            embs = self.encoder.encode_texts(self.memory.store.captions(missing))
            self._cache.update(zip(missing, embs))
        return np.stack([self._cache[int(i)] for i in ids]) if len(ids) else np.zeros((0, self.encoder.dim), np.float32)


def dedupe_keep_order(ids: np.ndarray, hashes: np.ndarray, k: int) -> np.ndarray:
    """The first `k` ids whose captions are distinct strings (by hash), in the given order."""
    seen: set[int] = set()
    out = []
    for i, h in zip(ids, hashes):
        if i < 0 or int(h) in seen:
            continue
        seen.add(int(h))
        out.append(i)
        if len(out) == k:
            break
    return np.asarray(out, dtype=np.int64)


class Retriever:
    """X-MoRe steps 3-4: coarse kNN of the query image, fine re-ranking of the captions."""

    def __init__(self, memory: MemoryIndex, coarse: Encoder, fine: Encoder, k_coarse: int = 128, k_fine: int = 16,
                 direct: bool = True, overfetch: int = 200) -> None:
        memory.check_encoder(coarse, "coarse")
        memory.check_encoder(fine, "fine")
        self.memory, self.coarse, self.fine = memory, coarse, fine
        self.k_coarse, self.k_fine, self.direct = k_coarse, k_fine, direct
        # as the authors' code: ask for more than K, keep the first K distinct captions
        self.overfetch = max(overfetch, k_coarse)
        self.fine_captions = CaptionEmbeddings(memory, fine)
        self.hashes = np.asarray(memory.caption_hashes)

    def retrieve(self, coarse_queries: np.ndarray, fine_queries: np.ndarray | None, timings: Timings | None = None) -> list[Retrieved]:
        """Given the query images' coarse (and, for direct retrieval, fine) embeddings."""
        t = time.perf_counter()
        _, ids = self.memory.search("image", coarse_queries, min(self.overfetch, self.memory.count))
        t2 = time.perf_counter()
        out = []
        for row, qid in enumerate(ids):
            cand = dedupe_keep_order(qid, self.hashes[np.clip(qid, 0, None)], self.k_coarse)
            if self.direct and fine_queries is not None:
                sims = self.fine_captions.gather(cand) @ fine_queries[row]
                order = np.argsort(-sims, kind="stable")[: self.k_fine]
                out.append(Retrieved(cand[order], sims[order]))
            else:  # "indirect" ablation: coarse order, no re-ranking
                kept = cand[: self.k_fine]
                sims = self.fine_captions.gather(kept) @ fine_queries[row] if fine_queries is not None else np.full(len(kept), np.nan)
                out.append(Retrieved(kept, sims))
        if timings is not None:
            timings.add("knn", t2 - t)
            timings.add("rerank", time.perf_counter() - t2)
        return out


def search_memory(index: str | Path | MemoryIndex, image: Path | None = None, text: str | None = None, k: int = 10,
                  modality: str = "image") -> list[dict[str, Any]]:
    """Nearest memory items to an image or text under the index's coarse encoder."""
    memory = index if isinstance(index, MemoryIndex) else open_index(index)
    coarse = load_encoder(memory.roles["coarse"])
    memory.check_encoder(coarse, "coarse")
    if image is not None:
        query = coarse.encode_images([load_image(image)])
    elif text is not None:
        query = coarse.encode_texts([text])
    else:
        raise XMError("search: give an image or a text")
    sims, ids = memory.search(modality, query, min(k, memory.count))
    keep = ids[0] >= 0
    rows = memory.store.fetch(ids[0][keep])
    return [{"id": int(i), "similarity": float(s), "caption": r["caption"], "url": r["url"], "source_id": r["source_id"]}
            for i, s, r in zip(ids[0][keep], sims[0][keep], rows)]
