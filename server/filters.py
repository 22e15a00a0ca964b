"""clip back's result filters over an xm memory: `deduplicate`, `use_safety_model`,
`use_violence_detector`, each a set of result positions to drop, computed over all the
`num_result_ids` results before any is dropped (as clip back's `post_filter` does).

* `deduplicate`: results whose (normalised, stored) embeddings are at least 0.94 similar form
  connected groups; each keeps its best-ranked member.
* `use_safety_model`: clip back runs a classifier over the embeddings; a LAION memory already
  carries that classifier's verdict in its metadata, which xm keeps in the caption store:
  `NSFW` (LAION-400M: UNLIKELY, UNSURE, NSFW; the last two are dropped) or `punsafe`
  (LAION-5B: a probability; over 0.5 is dropped, clip back's threshold). A memory without
  either column cannot honour it.
* `use_violence_detector`: clip back's detector is two prompt embeddings (LAION's
  `violence_detection_vit_b_32.npy` / `_vit_l_14.npy`, shape (2, dim)); a result is violent
  when its normalised embedding is closer (dot product) to the second than to the first. xm
  uses the same file given with `--violence-prompts`; without it the filter cannot run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xm.errors import XMError

DEDUP_THRESHOLD = 0.94
SAFETY_COLUMNS = ("NSFW", "punsafe")  # LAION-400M's tag, LAION-5B's probability
UNSAFE_TAGS = {"NSFW", "UNSURE"}
PUNSAFE_THRESHOLD = 0.5


def connected_dedup(emb: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Positions kept by clip back's `deduplicate`: results whose embeddings are at least
    `threshold` similar form connected groups; each group keeps its best-ranked member."""
    n = len(emb)
    if n < 2:
        return np.arange(n)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for lo in range(0, n, 1024):
        block = emb[lo : lo + 1024] @ emb.T
        rows, cols = np.nonzero(block >= threshold)
        for r, c in zip(rows + lo, cols):
            if c > r:
                a, b = find(int(r)), find(int(c))
                if a != b:
                    parent[max(a, b)] = min(a, b)  # the root is always the best-ranked member
    return np.array([i for i in range(n) if find(i) == i], dtype=np.int64)


def safety_column(columns: list[str]) -> str | None:
    """The caption store's column that carries LAION's NSFW verdict, if any (any letter case)."""
    by_lower = {c.lower(): c for c in columns}
    return next((by_lower[c.lower()] for c in SAFETY_COLUMNS if c.lower() in by_lower), None)


def unsafe(values: list[Any]) -> np.ndarray:
    """Positions whose NSFW value says unsafe: a tag NSFW/UNSURE, a probability over 0.5, true."""
    out = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            bad = v.strip().upper() in UNSAFE_TAGS
        elif isinstance(v, bool):
            bad = v
        elif isinstance(v, (int, float)):
            bad = float(v) > PUNSAFE_THRESHOLD
        else:
            bad = False  # unknown: kept, as clip back keeps what its model does not flag
        if bad:
            out.append(i)
    return np.array(out, dtype=np.int64)


def load_violence_prompts(path: Path) -> np.ndarray:
    """clip back's violence detector file: two prompt embeddings, (2, dim)."""
    try:
        prompts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise XMError(f"--violence-prompts {path}: not a readable .npy file ({exc})") from exc
    if prompts.ndim != 2 or prompts.shape[0] != 2 or not np.issubdtype(prompts.dtype, np.floating):
        raise XMError(f"--violence-prompts {path}: expected a float array of shape (2, dim) "
                      f"(clip back's violence_detection_*.npy), got {prompts.dtype} {prompts.shape}")
    if not np.isfinite(prompts).all():
        raise XMError(f"--violence-prompts {path}: holds NaN or infinity")
    return prompts.astype(np.float32)


def violent(emb: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Positions clip back's detector flags: the second prompt scores higher than the first."""
    return np.nonzero(np.argmax(emb @ prompts.T, axis=1) == 1)[0]
