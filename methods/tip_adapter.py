"""Tip-Adapter (`tip-adapter`), training-free few-shot CLIP with an image-feature cache, and
the cache-adapter machinery CODER-Adapter shares (`methods/coder.py`; docs/coder.md).

    logits(x) = s · f(x) · Wᵀ + α · exp(-β (1 - a(x, K))) · L

K: one key per support image (its features averaged over `augment_passes` random crops
and flips, as the authors), L: the support labels one-hot, a(x, K): the query's affinity
to every key (Tip-Adapter: the cosine of image features; CODER-Adapter: of CODER
vectors, min-max normalised over the keys). α and β are chosen by a grid search over
the validation split of `Support` only, never the test split.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from xm.errors import XMError
from xm.methods.base import Context, Decision, Example, Method, Option, Queries, Support
from xm.methods.registry import register
from xm.methods.zeroshot import class_weights, softmax

# (encoder, example keys, passes, seed) -> features: coder-adapter and tip-adapter share one
# augmented pass over the support images in a benchmark.
_FEATURES: dict[tuple, np.ndarray] = {}
_FEATURE_SECONDS: dict[tuple, float] = {}


def augment_transform(encoder: Any) -> Any:
    """The authors' support augmentation: random resized crop (scale 0.5-1) and horizontal
    flip at the encoder's input size, then the encoder's own normalisation."""
    from torchvision import transforms as T

    norm = next((t for t in getattr(encoder.preprocess, "transforms", []) if isinstance(t, T.Normalize)), None)
    if norm is None:
        raise XMError(f"encoder {encoder.spec}: its preprocessing has no Normalize step to augment around")
    size = encoder.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(p=0.5), T.ToTensor(), norm])


def support_features(encoder: Any, examples: Sequence[Example], passes: int, seed: int,
                     batch_size: int = 64) -> np.ndarray:
    """Normalised mean over `passes` augmented views of each image (n x d); passes 0 is the
    plain preprocessing. Seeded: the same support gives the same features."""
    key = (str(encoder.spec), tuple(e.key for e in examples), int(passes), int(seed))
    if key in _FEATURES:
        return _FEATURES[key]
    t0 = time.perf_counter()
    images = [e.load() for e in examples]
    if passes <= 0:
        feats = encoder.encode_images(images, batch_size=batch_size).astype(np.float64)
    else:
        import torch

        aug = augment_transform(encoder)
        feats = np.zeros((len(images), encoder.dim), np.float64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(passes):
                for i in range(0, len(images), batch_size):
                    pixels = torch.stack([aug(im) for im in images[i:i + batch_size]])
                    feats[i:i + batch_size] += encoder.encode_pixels(pixels)
        feats /= passes
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    _FEATURES[key] = feats.astype(np.float32)
    _FEATURE_SECONDS[key] = time.perf_counter() - t0
    return _FEATURES[key]


def one_hot(labels: Sequence[int], n_classes: int) -> np.ndarray:
    y = np.asarray(labels, np.int64)
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise XMError(f"support label out of range 0..{n_classes - 1}")
    out = np.zeros((len(y), n_classes), np.float64)
    out[np.arange(len(y)), y] = 1.0
    return out


def cache_term(affinity: np.ndarray, onehot: np.ndarray, beta: float) -> np.ndarray:
    """exp(-β (1 - a)) · L  (n x C)."""
    return np.exp(-beta * (1.0 - affinity)) @ onehot


def _grid(lo: float, hi: float, n: int) -> np.ndarray:
    """n points spaced evenly in log scale over [lo, hi] (α and β span orders of magnitude:
    Tip-Adapter's β is near 5 with real CLIP, CODER's EuroSAT start 91, random weights' larger)."""
    lo, hi = max(lo, 1e-6), max(hi, 1e-6)
    return np.unique(np.geomspace(lo, hi, n)) if n > 1 and hi > lo else np.array([np.sqrt(lo * hi)])


def search_alpha_beta(zs: np.ndarray, affinity: np.ndarray, onehot: np.ndarray, labels: Sequence[int],
                      alpha_range: tuple[float, float], beta_range: tuple[float, float], grid: int, rounds: int,
                      start: tuple[float, float]) -> dict[str, Any]:
    """The (α, β) of best validation accuracy: the start point, a `grid` x `grid` log-spaced
    grid over the ranges, then `rounds - 1` finer grids around the best so far (each spanning
    one step of the previous grid either side, cut at the range's ends). Every point tried,
    the start clipped into the ranges included, lies inside them. Ties keep the earlier
    point (start first)."""
    t0 = time.perf_counter()
    y = np.asarray(labels, np.int64)
    # the start point too lies in the ranges, so the chosen (α, β) always does
    start = (float(np.clip(start[0], *alpha_range)), float(np.clip(start[1], *beta_range)))
    best = (-1.0, start[0], start[1])
    evaluations = 0

    def evaluate(alphas: np.ndarray, betas: np.ndarray) -> None:
        nonlocal best, evaluations
        for b in betas:
            c = cache_term(affinity, onehot, float(b))
            for a in alphas:
                acc = float(np.mean(np.argmax(zs + a * c, axis=1) == y))
                evaluations += 1
                if acc > best[0]:
                    best = (acc, float(a), float(b))

    evaluate(np.array([start[0]]), np.array([start[1]]))
    alphas, betas = _grid(*alpha_range, grid), _grid(*beta_range, grid)
    for _ in range(rounds):
        evaluate(alphas, betas)
        ra = alphas[1] / alphas[0] if len(alphas) > 1 else 2.0
        rb = betas[1] / betas[0] if len(betas) > 1 else 2.0
        # finer grids stay inside the stated ranges (docs/coder.md): a best point on an edge is refined inward only
        alphas = _grid(max(alpha_range[0], best[1] / ra), min(alpha_range[1], best[1] * ra), grid)
        betas = _grid(max(beta_range[0], best[2] / rb), min(beta_range[1], best[2] * rb), grid)
    return {"alpha": round(best[1], 6), "beta": round(best[2], 6), "val_accuracy": best[0], "evaluations": evaluations,
            "search_seconds": time.perf_counter() - t0}


ADAPTER_OPTIONS = (
    Option("augment_passes", 20, "augmented views averaged per support image (authors: 20; 0 = no augmentation)", minimum=0),
    Option("scale", 100.0, "s of the zero-shot term s·f·Wᵀ (the authors' fixed 100)", minimum=0),
    Option("alpha_min", 0.01, "α search range, low end (log-spaced grid)", minimum=1e-6),
    Option("alpha_max", 100.0, "α search range, high end", minimum=1e-6),
    Option("grid", 12, "points per axis of each search grid", minimum=1),
    Option("search_rounds", 3, "grid-search rounds (each finer, around the best so far)", minimum=1),
)


class CacheAdapter(Method):
    """Shared by Tip-Adapter and CODER-Adapter: subclasses define the key space (`keys`) and
    the affinity of query keys to support keys."""

    few_shot = True
    needs_memory = False

    def __init__(self, ctx: Context, **options: Any) -> None:
        super().__init__(ctx, **options)
        o = self.opts
        if o["alpha_min"] > o["alpha_max"] or o["beta_min"] > o["beta_max"]:
            raise XMError(f"{self.name}: a search range's low end exceeds its high end "
                          f"(alpha {o['alpha_min']:g}..{o['alpha_max']:g}, beta {o['beta_min']:g}..{o['beta_max']:g})")
        self.encoder = ctx.encoder(ctx.model)
        self.weights = class_weights(self.encoder, ctx.classnames, ctx.templates)
        self.state: dict[str, Any] | None = None

    # --- the key space ---------------------------------------------------------------
    def keys(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def affinity(self, query_keys: np.ndarray, support_keys: np.ndarray) -> np.ndarray:
        return query_keys.astype(np.float64) @ support_keys.T.astype(np.float64)

    def zero_shot(self, features: np.ndarray) -> np.ndarray:
        return self.opts["scale"] * (features.astype(np.float64) @ self.weights.T.astype(np.float64))

    # --- few-shot ----------------------------------------------------------------------
    def fit(self, support: Support) -> dict[str, Any]:
        o = self.opts
        if not support.train:
            raise XMError(f"{self.name}: the support set is empty")
        t0 = time.perf_counter()
        feats = support_features(self.encoder, support.train, o["augment_passes"], support.seed)
        keys = self.keys(feats)
        onehot = one_hot([e.label for e in support.train], len(self.ctx.classnames))
        fkey = (str(self.encoder.spec), tuple(e.key for e in support.train), int(o["augment_passes"]), int(support.seed))
        chosen: dict[str, Any] = {"shots": support.shots, "seed": support.seed, "support_images": len(support.train),
                                  "augment_passes": o["augment_passes"],
                                  "support_feature_seconds": round(_FEATURE_SECONDS.get(fkey, time.perf_counter() - t0), 3)}
        start = (o["alpha"], o["beta"])
        if support.val:
            t1 = time.perf_counter()
            vf = support_features(self.encoder, support.val, 0, 0)
            vkey = (str(self.encoder.spec), tuple(e.key for e in support.val), 0, 0)
            aff = self.affinity(self.keys(vf), keys)
            found = search_alpha_beta(self.zero_shot(vf), aff, onehot, [e.label for e in support.val],
                                      (o["alpha_min"], o["alpha_max"]), (o["beta_min"], o["beta_max"]),
                                      o["grid"], o["search_rounds"], start)
            chosen.update(found)
            chosen.update({"val_images": len(support.val), "selected_on": "validation",
                           "val_feature_seconds": round(_FEATURE_SECONDS.get(vkey, time.perf_counter() - t1), 3)})
        else:
            chosen.update({"alpha": start[0], "beta": start[1], "val_images": 0, "search_seconds": 0.0,
                           "selected_on": "none (no validation set): the start values"})
        chosen["search_seconds"] = round(chosen["search_seconds"], 4)
        digest = hashlib.sha256(keys.astype(np.float32).tobytes() + onehot.astype(np.uint8).tobytes()
                                + np.array([chosen["alpha"], chosen["beta"]], np.float64).tobytes()).hexdigest()[:20]
        self.state = {"keys": keys, "onehot": onehot, "alpha": chosen["alpha"], "beta": chosen["beta"], "digest": digest}
        chosen["state_digest"] = digest
        return chosen

    def extra_key(self) -> dict[str, Any]:
        return {"fit": self.state["digest"] if self.state else None}

    def _fitted(self) -> dict[str, Any]:
        if self.state is None:
            raise XMError(f"method {self.name}: few-shot; it needs support images first "
                          f"(`xm benchmark --shots N`, or fit(support) in Python)")
        return self.state

    def evidence(self, queries: Queries) -> dict[str, np.ndarray]:
        st = self._fitted()
        f = queries.features(self.encoder)
        zs = self.zero_shot(f)
        cache = st["alpha"] * cache_term(self.affinity(self.keys(f), st["keys"]), st["onehot"], st["beta"])
        return {"zs_logits": zs, "cache_logits": cache, "logits": zs + cache}

    def decide(self, evidence: dict[str, np.ndarray], state: Any = None) -> Decision:
        st = self._fitted()
        probs = softmax(evidence["logits"])
        n = len(probs)
        info = [{"alpha": st["alpha"], "beta": st["beta"]} for _ in range(n)]
        return Decision(probs=probs, components={"p_zs": softmax(evidence["zs_logits"])}, info=info)


class TipAdapter(CacheAdapter):
    name = "tip-adapter"
    summary = "Tip-Adapter (few-shot, training-free): zero-shot CLIP + an image-feature cache of the support set"
    options = ADAPTER_OPTIONS + (
        Option("alpha", 1.0, "α before the search (and without a validation set); Tip-Adapter's 1", minimum=0),
        Option("beta", 5.5, "β before the search (and without a validation set); Tip-Adapter's 5.5", minimum=0),
        Option("beta_min", 0.1, "β search range, low end (log-spaced grid)", minimum=1e-6),
        Option("beta_max", 1000.0, "β search range, high end", minimum=1e-6),
    )

    def keys(self, features: np.ndarray) -> np.ndarray:
        return features.astype(np.float32)


register(TipAdapter)
