"""Zero-shot CLIP heads: label files, template-averaged class weights, softmax probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xm.errors import XMError
from xm.userfiles import read_text

DEFAULT_TEMPLATE = "a photo of a {}."


def read_labels(path: str | Path) -> list[str]:
    """One class name per line; UTF-8 (BOM tolerated), CRLF, blank lines and `#` comments skipped."""
    path = Path(path)
    text = read_text(path, "label file")
    labels: list[str] = []
    seen: dict[str, tuple[int, str]] = {}  # tokenizer key -> (line, label as written)
    for lineno, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        # CLIP's tokenizer lower-cases and collapses whitespace: such labels are one class to it
        key = " ".join(name.lower().split())
        if key in seen:
            first, other = seen[key]
            what = "duplicate label" if other == name else f"labels {other!r} and {name!r} are the same to CLIP's tokenizer;"
            raise XMError(f"{path}: {what} {name!r} on lines {first} and {lineno}" if other == name
                          else f"{path}: {what} lines {first} and {lineno}")
        seen[key] = (lineno, name)
        labels.append(name)
    if not labels:
        raise XMError(f"{path}: no labels (one class name per line)")
    if len(labels) < 2:
        raise XMError(f"{path}: only one label ({labels[0]!r}); classification needs at least two")
    return labels


def check_templates(templates: Sequence[str]) -> list[str]:
    out = list(templates) or [DEFAULT_TEMPLATE]
    for t in out:
        if "{}" not in t and "{c}" not in t:
            raise XMError(f"template {t!r}: needs a {{}} where the class name goes")
    return out


def class_weights(encoder: Any, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """C x d class vectors the CLIP way: mean of normalised template embeddings, renormalised."""
    templates = check_templates(templates)
    texts = [t.replace("{c}", "{}").format(c) for c in classnames for t in templates]
    emb = encoder.encode_texts(texts).reshape(len(classnames), len(templates), -1)
    w = emb.mean(axis=1)
    return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def class_probs(features: np.ndarray, weights: np.ndarray, scale: float) -> np.ndarray:
    """softmax(s * f . W^T) for normalised features (n x d) -> n x C."""
    return softmax(scale * (features.astype(np.float64) @ weights.T.astype(np.float64)))
