"""The X-MoRe paper's diagnostics of a scored stream (Tables 6 and 8), reported by
`XMoRe.diagnostics` in a benchmark's results."""

from __future__ import annotations

import numpy as np

from xm.methods.ensemble import entropy


def modality_entropy(p_img: np.ndarray, p_txt: np.ndarray) -> dict[str, float]:
    """Mean entropy of each modality's distribution (the paper's Table 6)."""
    return {"image": float(entropy(p_img).mean()), "text": float(entropy(p_txt).mean())}


def l1_weight_ratios(p_img: np.ndarray, p_txt: np.ndarray, final: np.ndarray, weights: np.ndarray,
                     labels: np.ndarray) -> dict[str, dict]:
    """Table 8 as the X-MoRe authors' analysis defines it: over the images the ensemble got
    right, split by which single modality was right, the mean of per-image w_img / w_txt."""
    right = final == labels
    img_ok = p_img.argmax(1) == labels
    txt_ok = p_txt.argmax(1) == labels
    cases = {"image right, text wrong": right & img_ok & ~txt_ok, "text right, image wrong": right & ~img_ok & txt_ok,
             "both right": right & img_ok & txt_ok, "neither right": right & ~img_ok & ~txt_ok}
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = weights[:, 0] / weights[:, 1]
    for name, mask in cases.items():
        finite = mask & np.isfinite(ratio)
        out[name] = {"n": int(mask.sum()), "mean_ratio_img_over_txt": float(ratio[finite].mean()) if finite.any() else None,
                     "w_img": float(weights[mask, 0].mean()) if mask.any() else None,
                     "w_txt": float(weights[mask, 1].mean()) if mask.any() else None}
    return out
