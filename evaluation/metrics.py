"""CLIP_benchmark's zero-shot metrics (a method's own diagnostics are its `Method.diagnostics`)."""

from __future__ import annotations

import numpy as np


def accuracy_at(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    topk = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=1)))


def mean_per_class_recall(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    recalls = [np.mean(pred[labels == c] == c) for c in range(n_classes) if np.any(labels == c)]
    return float(np.mean(recalls))


def zeroshot_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    n_classes = probs.shape[1]
    out = {"acc1": accuracy_at(probs, labels, 1)}
    if n_classes >= 5:
        out["acc5"] = accuracy_at(probs, labels, 5)
    out["mean_per_class_recall"] = mean_per_class_recall(probs.argmax(1), labels, n_classes)
    return out
