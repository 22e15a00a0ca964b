"""The one ensemble of image and text predictions (X-MoRe eqs. 2-4 and their ablations).

Modes:
  modal   paper eqs. 2-3: each modality's confidence min-max normalised over the stream
          of queries seen so far (current included), then eq. 4
  l1      the authors' code: c_t / sum of c over the stream so far
  raw     unadjusted confidences (Table 7)
  equal   equal weights (Table 5)
  image   image only (plain zero-shot CLIP)
  text    text only (the caption ensemble)

Undefined min-max (max == min, e.g. the first query of a stream, or a stream whose
confidences are all tied): that modality's weight is its raw confidence c_t. A single
photo is thus weighted by how certain each modality actually is, and as the stream
grows the paper's normalisation takes over. If both weights are 0 (both modalities at
their stream minimum) the two are weighted equally, so a prediction always exists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

MODES = ("modal", "l1", "raw", "equal", "image", "text")
MODALITIES = ("img", "txt")


def confidence(p: np.ndarray) -> np.ndarray:
    """1 - H(p)/log C along the last axis: 0 for uniform, 1 for one-hot."""
    p = np.asarray(p, dtype=np.float64)
    c = p.shape[-1]
    h = -np.sum(np.where(p > 0, p * np.log(np.clip(p, 1e-300, None)), 0.0), axis=-1)
    return 1.0 - h / np.log(c)


def entropy(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.clip(p, 1e-300, None)), 0.0), axis=-1)


@dataclass
class StreamState:
    """What the adjustment remembers of the queries seen so far, per modality."""

    count: int = 0
    min: dict[str, float] = field(default_factory=lambda: {m: float("inf") for m in MODALITIES})
    max: dict[str, float] = field(default_factory=lambda: {m: float("-inf") for m in MODALITIES})
    sum: dict[str, float] = field(default_factory=lambda: {m: 0.0 for m in MODALITIES})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StreamState:
        return cls(count=int(data["count"]), min=dict(data["min"]), max=dict(data["max"]), sum=dict(data["sum"]))


@dataclass
class Weights:
    img: float
    txt: float


def adjust(state: StreamState, c_img: float, c_txt: float, mode: str) -> Weights:
    """Add one query's confidences to the stream and return its adjusted weights."""
    if mode not in MODES:
        raise ValueError(f"unknown ensemble mode {mode!r}; choose from {', '.join(MODES)}")
    cs = {"img": float(c_img), "txt": float(c_txt)}
    state.count += 1
    for m, c in cs.items():
        state.min[m] = min(state.min[m], c)
        state.max[m] = max(state.max[m], c)
        state.sum[m] += c
    if mode == "modal":
        w = {}
        for m, c in cs.items():
            span = state.max[m] - state.min[m]
            w[m] = (c - state.min[m]) / span if span > 0 else c
        return Weights(w["img"], w["txt"])
    if mode == "l1":
        return Weights(*(cs[m] / state.sum[m] if state.sum[m] > 0 else 0.0 for m in MODALITIES))
    if mode == "raw":
        return Weights(cs["img"], cs["txt"])
    if mode == "equal":
        return Weights(0.5, 0.5)
    if mode == "image":
        return Weights(1.0, 0.0)
    return Weights(0.0, 1.0)


def combine(p_img: np.ndarray, p_txt: np.ndarray, w: Weights) -> np.ndarray:
    """Eq. 4, p = w_img p_img + w_txt p_txt, renormalised to a distribution (the authors' code
    takes the argmax of the mix as it is: dividing by its positive sum changes no ranking).
    Both weights 0: the equal mix."""
    wi, wt = (w.img, w.txt) if (w.img + w.txt) > 0 else (0.5, 0.5)
    p = wi * np.asarray(p_img, np.float64) + wt * np.asarray(p_txt, np.float64)
    return p / p.sum()


def run_stream(p_img: np.ndarray, p_txt: np.ndarray, mode: str, state: StreamState | None = None,
               order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble a whole stream (queries in `order`); returns (final probs, weights n x 2) by query index."""
    state = state or StreamState()
    c_img, c_txt = confidence(p_img), confidence(p_txt)
    n = len(p_img)
    final = np.empty((n, p_img.shape[1]), np.float64)
    weights = np.empty((n, 2), np.float64)
    for i in (order if order is not None else range(n)):
        w = adjust(state, c_img[i], c_txt[i], mode)
        weights[i] = (w.img, w.txt)
        final[i] = combine(p_img[i], p_txt[i], w)
    return final, weights
