"""X-MoRe: cross-modal retrieval + modal-confidence ensemble (METHODS.md section 1).

`XMoRe.evidence` does everything that does not depend on the stream (encoders, kNN,
re-ranking, both modalities' class distributions) and can batch; `XMoRe.classify`
then feeds the evidence through the ensemble in stream order. The benchmark reuses
the same evidence for every ensemble variant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from xm.encoders import Encoder, load_encoder
from xm.indexes import MemoryIndex
from xm.methods.ensemble import StreamState, Weights, adjust, combine, confidence
from xm.methods.retrieval import CaptionEmbeddings, Retrieved, Retriever, Timings
from xm.methods.zeroshot import DEFAULT_TEMPLATE, class_probs, class_weights


@dataclass
class Evidence:
    """Per query: both modalities' class distributions and what was retrieved."""

    p_img: np.ndarray
    p_txt: np.ndarray
    retrieved: Retrieved
    caption_probs: np.ndarray  # k x C, each kept caption's own class distribution

    @property
    def c_img(self) -> float:
        return float(confidence(self.p_img))

    @property
    def c_txt(self) -> float:
        return float(confidence(self.p_txt))


@dataclass
class Prediction:
    probs: np.ndarray
    weights: Weights
    evidence: Evidence
    timings: dict[str, float] = field(default_factory=dict)

    def top(self, classnames: Sequence[str], n: int = 5) -> list[dict[str, Any]]:
        order = np.argsort(-self.probs, kind="stable")[:n]
        return [
            {"class": classnames[i], "prob": float(self.probs[i]), "p_img": float(self.evidence.p_img[i]),
             "p_txt": float(self.evidence.p_txt[i])}
            for i in order
        ]


class XMoRe:
    def __init__(self, memory: MemoryIndex, inference: Encoder | str, classnames: Sequence[str],
                 templates: Sequence[str] = (DEFAULT_TEMPLATE,), k_coarse: int = 128, k_fine: int = 16,
                 retrieval: str = "direct") -> None:
        if retrieval not in ("direct", "indirect"):
            raise ValueError(f"retrieval must be direct or indirect, not {retrieval!r}")
        self.memory = memory
        self.inference = load_encoder(inference) if isinstance(inference, str) else inference
        self.coarse = load_encoder(memory.roles["coarse"])
        self.fine = load_encoder(memory.roles["fine"])
        self.classnames = list(classnames)
        self.weights = class_weights(self.inference, self.classnames, templates)
        self.scale = self.inference.logit_scale
        self.retriever = Retriever(memory, self.coarse, self.fine, k_coarse, k_fine, direct=retrieval == "direct")
        self.captions = CaptionEmbeddings(memory, self.inference)

    def _encoders(self) -> dict[str, Encoder]:
        out: dict[str, Encoder] = {}
        for enc in (self.inference, self.coarse, self.fine):
            out.setdefault(str(enc.spec), enc)
        return out

    def encode(self, images: Sequence[Any], timings: Timings | None = None) -> dict[str, np.ndarray]:
        """Image embeddings under each distinct encoder (one forward per encoder)."""
        import torch

        feats = {}
        for spec, enc in self._encoders().items():
            t = time.perf_counter()
            pixels = torch.stack([enc.preprocess(im) for im in images])
            feats[spec] = enc.encode_pixels(pixels)
            if timings is not None:
                timings.add(f"encode {spec}", time.perf_counter() - t)
        return feats

    def evidence(self, images: Sequence[Any], timings: Timings | None = None) -> list[Evidence]:
        feats = self.encode(images, timings)
        p_img = self.image_modality(feats[str(self.inference.spec)])
        retrieved = self.retriever.retrieve(feats[str(self.coarse.spec)], feats[str(self.fine.spec)], timings)
        t = time.perf_counter()
        out = []
        for i, r in enumerate(retrieved):
            p_txt, cap = self.text_modality(r.ids)
            out.append(Evidence(p_img[i], p_txt, r, cap))
        if timings is not None:
            timings.add("caption fetch + text modality", time.perf_counter() - t)
        return out

    def image_modality(self, inference_features: np.ndarray) -> np.ndarray:
        """p_img = softmax(s . f . W^T), n x C."""
        return class_probs(inference_features, self.weights, self.scale)

    def text_modality(self, caption_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p_txt, per-caption distributions): the mean of each kept caption's class distribution."""
        caption_ids = np.asarray(caption_ids, dtype=np.int64)
        caption_ids = caption_ids[caption_ids >= 0]
        cap = class_probs(self.captions.gather(caption_ids), self.weights, self.scale)
        p_txt = cap.mean(axis=0) if len(cap) else np.full(len(self.classnames), 1.0 / len(self.classnames))
        return p_txt, cap

    def classify(self, images: Sequence[Any], state: StreamState, mode: str = "modal",
                 timings: Timings | None = None) -> list[Prediction]:
        """Classify images as one stream, in the given order, continuing `state`."""
        preds = []
        for ev in self.evidence(images, timings):
            t = time.perf_counter()
            w = adjust(state, ev.c_img, ev.c_txt, mode)
            probs = combine(ev.p_img, ev.p_txt, w)
            if timings is not None:
                timings.add("ensemble", time.perf_counter() - t)
            preds.append(Prediction(probs, w, ev))
        return preds

    def explain(self, ev: Evidence) -> list[dict[str, Any]]:
        """The kept captions, their fine similarity, and each one's own class vote."""
        rows = self.memory.store.fetch(ev.retrieved.ids, columns=("id", "caption", "url"))
        out = []
        for row, sim, p in zip(rows, ev.retrieved.fine_sims, ev.caption_probs):
            vote = int(np.argmax(p))
            out.append({"id": row["id"], "caption": row["caption"], "url": row["url"], "fine_similarity": float(sim),
                        "vote": self.classnames[vote], "vote_prob": float(p[vote])})
        return out
