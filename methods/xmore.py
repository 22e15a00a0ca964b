"""X-MoRe: cross-modal retrieval + modal-confidence ensemble (METHODS.md section 1).

`evidence` does everything that does not depend on the stream (encoders, kNN, re-ranking,
both modalities' class distributions) and batches; `decide` feeds it through the one
ensemble (`methods/ensemble.py`) in stream order. Every variant is an option preset:

    xmore           the authors' weighting: L1 over the stream (c_t / sum of c so far)
    xmore-minmax    the paper's eqs. 2-3 (min-max over the stream, documented first query)
    xmore-equal     equal confidence (Table 5)       xmore-raw   unadjusted (Table 7)
    xmore-indirect  no fine re-ranking (Table 3)     captions    the text modality alone
    captions-logits the caption baseline by the argmax of the mean caption logits

Retrieval switches (pool order, raw dot or cosine, skipping short retrievals) default to
the authors' protocol; `--protocol xm` sets xm's own (`methods/protocols.py`). The caption
prefix defaults to none (captions as stored, their precomputed embeddings used); the
authors' protocol sets their `a_photo_of_a `, which `xm classify`, the server and the
benchmark apply through the protocol (captions then encoded on the fly, cached).

The final mix w_img p_img + w_txt p_txt is renormalised to sum to 1 (`ensemble.combine`),
so `Decision.probs` is a distribution. The authors' code takes the argmax of the mix
without renormalising: dividing by a positive sum changes no ranking, so every decision,
top-k included, is theirs (tested in tests/test_authors_protocol.py).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from xm.methods.base import Context, Decision, ExplanationSection, Method, Need, Option, Queries
from xm.methods.ensemble import MODES, StreamState, adjust, combine, confidence
from xm.methods.registry import register
from xm.methods.retrieval import POOLS, RERANKS, CaptionEmbeddings, Retriever
from xm.methods.xmore_diagnostics import l1_weight_ratios, modality_entropy
from xm.methods.zeroshot import class_probs, class_weights, softmax


class XMoRe(Method):
    name = "xmore"
    summary = "X-MoRe, the authors' protocol: image + retrieved-caption predictions, L1 confidence weighting"
    stream = True
    thread_safe_evidence = True  # retrieval and encoders only read what the constructor set up
    options = (
        Option("ensemble", "l1", "how the two modalities are weighted", MODES, evidence=False),
        Option("text_vote", "probs", "text modality: mean of caption distributions (probs) or softmax of mean logits",
               ("probs", "logits"), evidence=False),
        Option("retrieval", "direct", "direct (fine re-ranking) | indirect (coarse order)", ("direct", "indirect")),
        Option("k_coarse", 128, "captions kept from the coarse image kNN (K)", minimum=1),
        Option("k_fine", 16, "captions kept after fine re-ranking (k)", minimum=1),
        Option("pool", "truncate-dedupe", "pool order", POOLS),
        Option("rerank", "dot", "fine re-ranking score", RERANKS),
        Option("skip_short", True, "skip (and count) images with fewer than K neighbours", evidence=False),
        Option("overfetch", 200, "neighbours asked of the kNN", minimum=1),
        Option("refetch", 1000, "neighbours asked again when fewer than K came back", minimum=1),
        Option("caption_prefix", "", "literal prefix of each caption before the inference encoder (authors: 'a_photo_of_a ')"),
        Option("coarse", "", "coarse encoder (default: the index's coarse role)"),
        Option("fine", "", "fine encoder (default: the index's fine role)"),
    )

    def __init__(self, ctx: Context, **options: Any) -> None:
        super().__init__(ctx, **options)
        o = self.opts
        if o["k_fine"] > o["k_coarse"]:
            from xm.errors import XMError

            raise XMError(f"{self.name}: k_fine {o['k_fine']} exceeds k_coarse {o['k_coarse']}")
        memory = ctx.memory
        self.coarse_spec = o["coarse"] or (memory.roles.get("coarse") if memory is not None else "")
        self.fine_spec = o["fine"] or (memory.roles.get("fine") if memory is not None else "") or self.coarse_spec
        self.check()
        self.inference = ctx.encoder(ctx.model)
        self.coarse = ctx.encoder(self.coarse_spec)
        self.fine = ctx.encoder(self.fine_spec)
        self.weights = class_weights(self.inference, ctx.classnames, ctx.templates)
        self.scale = self.inference.logit_scale
        self.retriever = Retriever(memory, self.coarse, self.fine, o["k_coarse"], o["k_fine"], o["retrieval"] == "direct",
                                   o["overfetch"], o["refetch"], o["pool"], o["rerank"])
        self.captions = CaptionEmbeddings(memory, self.inference, o["caption_prefix"])

    def needs(self) -> list[Need]:
        if not self.coarse_spec:
            return [Need("(a coarse encoder)", "image", "index")]
        needs = [Need(self.coarse_spec, "image", "index"), Need(self.fine_spec, "text", "embeddings")]
        if self.opts["rerank"] == "dot":
            needs.append(Need(self.fine_spec, "text", "norms"))
        return needs

    def extra_key(self) -> dict[str, Any]:
        return {"coarse": self.coarse_spec, "fine": self.fine_spec}

    def caption_logits(self, caption_ids: np.ndarray) -> np.ndarray:
        """s · t_j · Wᵀ for each kept caption (k x C)."""
        ids = caption_ids[caption_ids >= 0]
        return self.scale * (self.captions.gather(ids).astype(np.float64) @ self.weights.T.astype(np.float64))

    def evidence(self, queries: Queries) -> dict[str, np.ndarray]:
        k = self.opts["k_fine"]
        p_img = class_probs(queries.features(self.inference), self.weights, self.scale)
        retrieved = self.retriever.retrieve(queries.features(self.coarse), queries.features(self.fine), queries.timings)
        t = time.perf_counter()
        n, c = len(queries), len(self.ctx.classnames)
        ids = np.full((n, k), -1, np.int64)
        sims = np.full((n, k), np.nan, np.float32)
        p_txt, p_txt_logits = np.full((n, c), 1.0 / c), np.full((n, c), 1.0 / c)
        for i, r in enumerate(retrieved):
            ids[i, : len(r.ids)], sims[i, : len(r.ids)] = r.ids, r.fine_sims
            if len(r.ids):
                logits = self.caption_logits(r.ids)
                p_txt[i] = softmax(logits).mean(axis=0)
                p_txt_logits[i] = softmax(logits.mean(axis=0))
        queries.add_time("caption embeddings + text modality", time.perf_counter() - t)
        return {"p_img": p_img, "p_txt": p_txt, "p_txt_logits": p_txt_logits, "ids": ids, "fine_sims": sims,
                "neighbours": np.array([r.neighbours for r in retrieved], np.int64),
                "pool": np.array([r.pool for r in retrieved], np.int64)}

    def new_state(self) -> StreamState:
        return StreamState()

    def decide(self, evidence: dict[str, np.ndarray], state: StreamState | None = None) -> Decision:
        state = state if state is not None else self.new_state()
        o = self.opts
        p_img = evidence["p_img"]
        p_txt = evidence["p_txt_logits"] if o["text_vote"] == "logits" else evidence["p_txt"]
        c_img, c_txt = confidence(p_img), confidence(p_txt)
        n = len(p_img)
        probs = np.empty_like(p_img, dtype=np.float64)
        skipped = np.zeros(n, bool)
        info: list[dict[str, Any]] = []
        for i in range(n):
            if o["skip_short"] and evidence["neighbours"][i] < o["k_coarse"]:
                # the authors drop such images from the stream: not scored, not in the L1 history
                skipped[i] = True
                probs[i] = p_img[i]
                info.append({"skipped": f"{int(evidence['neighbours'][i])} neighbours in the memory, fewer than "
                                        f"k_coarse={o['k_coarse']}"})
                continue
            w = adjust(state, c_img[i], c_txt[i], o["ensemble"])
            probs[i] = combine(p_img[i], p_txt[i], w)
            total = w.img + w.txt
            info.append({"stream_position": state.count,
                         "weights": {"img": w.img, "txt": w.txt},
                         "weights_normalised": {"img": w.img / total, "txt": w.txt / total} if total > 0 else {"img": 0.5, "txt": 0.5},
                         "confidence": {"img": float(c_img[i]), "txt": float(c_txt[i])},
                         "captions_used": int((evidence["ids"][i] >= 0).sum()), "pool": int(evidence["pool"][i])})
        return Decision(probs=probs, components={"p_img": p_img, "p_txt": p_txt}, info=info, skipped=skipped)

    def explain(self, evidence: dict[str, np.ndarray], row: int) -> dict[str, Any]:
        """The kept captions, their fine similarity, and each one's own class vote."""
        ids = evidence["ids"][row]
        ids = ids[ids >= 0]
        rows = self.ctx.memory.rows(ids, columns=("id", "caption", "url"))
        votes = softmax(self.caption_logits(ids)) if len(ids) else np.zeros((0, len(self.ctx.classnames)))
        out = []
        for r, sim, p in zip(rows, evidence["fine_sims"][row], votes):
            v = int(np.argmax(p))
            out.append({"id": r["id"], "caption": r["caption"], "url": r["url"], "fine_similarity": float(sim),
                        "vote": self.ctx.classnames[v], "vote_prob": float(p[v])})
        return {"captions": out}

    def explanation_view(self, explanation: dict[str, Any]) -> list[ExplanationSection]:
        captions = explanation.get("captions")
        if not captions:
            return []
        return [ExplanationSection("captions used (fine re-ranked)", ("id", "fine sim", "vote", "vote p", "caption"), tuple(
            (c["id"], c["fine_similarity"], c["vote"], c["vote_prob"], c["caption"]) for c in captions))]

    def diagnostics(self, decision: Decision, labels: np.ndarray) -> dict[str, Any]:
        """The paper's Table 6 (mean entropy per modality) and Table 8 (its analysis: over images the
        ensemble got right, split by which single modality was right, mean per-image L1 weight ratio).
        Of the plain `xmore` variant only: the paper's tables are of the authors' protocol, and the
        presets are its ablations."""
        if getattr(self, "variant", self.name) != self.name:
            return {}
        scored = ~decision.skipped if decision.skipped is not None else np.ones(len(decision.probs), bool)
        p_img, p_txt = decision.components["p_img"][scored], decision.components["p_txt"][scored]
        info = [i for i, s in zip(decision.info, scored) if s]
        weights = np.array([[i["weights"]["img"], i["weights"]["txt"]] for i in info]).reshape(-1, 2)
        final = decision.probs[scored].argmax(1)
        return {"mean_entropy": modality_entropy(p_img, p_txt),
                "l1_weight_ratio_by_case": l1_weight_ratios(p_img, p_txt, final, weights, labels[scored])}


register(XMoRe, {
    "xmore-minmax": ({"ensemble": "modal"}, "X-MoRe, the paper's eqs. 2-3: min-max confidence over the stream"),
    "xmore-equal": ({"ensemble": "equal"}, "X-MoRe, equal confidence (Table 5)"),
    "xmore-raw": ({"ensemble": "raw"}, "X-MoRe, unadjusted confidence (Table 7)"),
    "xmore-indirect": ({"retrieval": "indirect"}, "X-MoRe without fine re-ranking (Table 3)"),
    "captions": ({"ensemble": "text"}, "caption ensemble: the retrieved captions' mean distribution alone"),
    "captions-logits": ({"ensemble": "text", "text_vote": "logits"}, "caption baseline: argmax of the mean caption logits"),
})
