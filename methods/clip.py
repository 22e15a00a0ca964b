"""Zero-shot CLIP (`clip`): the image modality alone, the baseline every method is read against."""

from __future__ import annotations

from typing import Any

import numpy as np

from xm.methods.base import Decision, Method, Queries
from xm.methods.registry import register
from xm.methods.zeroshot import class_probs, class_weights


class ZeroShotCLIP(Method):
    name = "clip"
    summary = "zero-shot CLIP: softmax(s · f · Wᵀ) with template-averaged class weights; needs no memory"
    needs_memory = False
    thread_safe_evidence = True  # fixed class weights and an encoder: nothing changes per call

    def __init__(self, ctx, **options: Any) -> None:
        super().__init__(ctx, **options)
        self.encoder = ctx.encoder(ctx.model)
        self.weights = class_weights(self.encoder, ctx.classnames, ctx.templates)

    def evidence(self, queries: Queries) -> dict[str, np.ndarray]:
        return {"p_img": class_probs(queries.features(self.encoder), self.weights, self.encoder.logit_scale)}

    def decide(self, evidence: dict[str, np.ndarray], state: Any = None) -> Decision:
        p = evidence["p_img"]
        return Decision(probs=p, components={"p_img": p}, info=[{} for _ in range(len(p))])


register(ZeroShotCLIP)
