"""RECO's model, as inference uses it: the fusion transformer (`RecoModel`, two `Fusion`
branches and a learned logit scale), applying it (`refine`) or its training-free ablation
(`mean_fusion`), and reading a trained checkpoint (where it lives, its JSON, its weights).

`methods/reco.py` classifies with it; `xm train reco` (training/reco.py) trains it and
writes the checkpoints read here. Files of a checkpoint (default folder
`<index>/trained/reco/<encoder slug>/`): `reco.safetensors` (the weights: image.*, text.*,
logit_scale) and `reco.json` beside it (settings, ties to the index and encoder, the
weights' sha256), written last.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xm.errors import XMError
from xm.indexes.layout import sha256_file

FORMAT = "xm-reco/1"
WEIGHTS = "reco.safetensors"
META = "reco.json"
# CLIP's temperature: initialised at 0.07 and the logit scale clamped at 100
INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


def slug(spec: str) -> str:
    from xm.encoders.loader import EncoderSpec

    return EncoderSpec.parse(spec).slug


def default_dir(memory: Any, spec: str) -> Path:
    """Where `xm train reco` writes and the method looks by default: under the index."""
    return Path(memory.root) / "trained" / "reco" / slug(spec)


def resolve_checkpoint(path: str | Path) -> Path:
    """The weights file a user's --reco-checkpoint names: the file, its .json, or the folder."""
    p = Path(path)
    if p.is_dir() or not p.suffix:
        return p / WEIGHTS
    if p.suffix == ".json":
        return p.with_suffix(".safetensors")
    return p


def meta_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


# ------------------------------------------------------------------------ the model

def build_model(dim: int, heads: int = 0, mlp_ratio: float = 1.0) -> RecoModel:
    """The two fusion branches and the learned temperature (see `RecoModel`)."""
    return RecoModel(dim, heads or max(1, dim // 64), mlp_ratio)


class Fusion(nn.Module):
    """One pre-LN transformer encoder layer over [query; retrieved_1..k]; the refined
    embedding is the output at the QUERY's position, L2-normalised.

    Only that position's output is ever used, so only it is computed: keys and values
    come from all k+1 tokens (the query attends to itself and to the retrieved ones),
    the query projection, the attention output and the MLP from the query token alone.
    This equals `nn.TransformerEncoderLayer(norm_first=True, activation="gelu",
    dropout=0)` at position 0 (tests/test_reco.py checks it) at about 40% of its cost.
    Pre-LN keeps the original embedding on the residual path, so the refinement starts
    near the frozen CLIP embedding. No position or type embeddings: the retrieved set is
    unordered, and the query is of the other modality than what it retrieves. Missing
    neighbours (id -1) are masked out of the attention.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % heads:
            raise XMError(f"reco: {heads} heads do not divide the embedding width {dim}")
        self.dim, self.heads = dim, heads
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        hidden = int(round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, query: torch.Tensor, retrieved: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # query (B, d), retrieved (B, k, d), valid (B, k) bool
        x = torch.cat([query[:, None, :], retrieved], dim=1)
        h = self.ln1(x)
        ignore = torch.cat([torch.zeros_like(valid[:, :1]), ~valid], dim=1)
        a, _ = self.attn(h[:, :1], h, h, key_padding_mask=ignore, need_weights=False)
        y = query + a[:, 0]
        y = y + self.mlp(self.ln2(y))
        return F.normalize(y, dim=-1)


class RecoModel(nn.Module):
    """Two fusion branches with separate parameters (image: query image + retrieved texts;
    text: query text + retrieved images) and one learned logit scale, CLIP's: initialised
    at 1/0.07 and clamped at 100 after every step."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.dim, self.n_heads, self.mlp_ratio = dim, heads, mlp_ratio
        self.image = Fusion(dim, heads, mlp_ratio)
        self.text = Fusion(dim, heads, mlp_ratio)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / INIT_TEMPERATURE)))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def clamp_(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))


def mean_fusion(query: np.ndarray, retrieved: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The training-free ablation: the normalised mean of the original and the retrieved
    embeddings (missing neighbours left out)."""
    total = query.astype(np.float64) + (retrieved.astype(np.float64) * valid[..., None]).sum(axis=1)
    total /= (1 + valid.sum(axis=1))[:, None]
    return (total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def refine(branch: Fusion, query: np.ndarray, retrieved: np.ndarray, valid: np.ndarray, batch: int = 4096) -> np.ndarray:
    """A fusion branch applied to numpy arrays (inference), on the device the branch is on."""
    out = []
    where = next(branch.parameters()).device

    def tensor(a: np.ndarray, dtype: Any = None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype)).to(where)

    with torch.inference_mode():
        for i in range(0, len(query), batch):
            out.append(branch(tensor(query[i:i + batch], np.float32), tensor(retrieved[i:i + batch], np.float32),
                              tensor(valid[i:i + batch])).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, query.shape[1]), np.float32)


# --------------------------------------------------------------------- checkpoints

def read_meta(weights: Path) -> dict[str, Any]:
    path = meta_path(weights)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise XMError(f"{path}: missing (a RECO checkpoint is {weights.name} with this JSON beside it)") from exc
    except (OSError, ValueError) as exc:
        raise XMError(f"{path}: unreadable RECO checkpoint description ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise XMError(f"{path}: not a RECO checkpoint of format {FORMAT} (format {meta.get('format')!r})")
    return meta


def load_model(weights: Path, meta: dict[str, Any] | None = None) -> tuple[RecoModel, dict[str, Any]]:
    """(model, meta) from a checkpoint whose weights match the digest its JSON records."""
    from safetensors.torch import load_file

    meta = meta or read_meta(weights)
    if not weights.is_file():
        raise XMError(f"{weights}: missing RECO weights")
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise XMError(f"{weights}: does not match the digest in {meta_path(weights).name} (a half-written or "
                      f"replaced checkpoint); re-run `xm train reco` to finish it")
    model = build_model(meta["dim"], meta["heads"], meta["mlp_ratio"])
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as exc:
        raise XMError(f"{weights}: not the weights its JSON describes ({str(exc).splitlines()[0][:120]})") from exc
    return model.eval(), meta
