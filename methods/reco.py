"""RECO: retrieval-enhanced embeddings fused by a trained transformer (METHODS.md section 2).

Uni-modal search, cross-modal fusion, under one frozen CLIP E (default: the index's
coarse encoder): the query image's k nearest memory IMAGES contribute their TEXT
embeddings, each class prompt's k nearest memory TEXTS contribute their IMAGE
embeddings, and the fusion branches (methods/reco_model.py), trained by `xm train reco`, turn
[original; retrieved] into refined embeddings. Scores are s · v̄ · t̄ᵀ with the trained
logit scale s.

    reco        refine both the image and the class prompts (the default mode)
    reco-image  refine the image only (v̄ · t)       reco-text   the prompts only (v · t̄)
    reco-mean   the training-free ablation: fusion = mean of original and retrieved (Table 3)
    reco-auto   mode=auto: the mode of best accuracy on the validation split (`fit`; Table 4)

RECO classifies with E itself (the image features and the class prompts are E's), not
with the context's inference model. Class prompts: each template's prompt is refined
on its own (its own text->text search), then the refined prompts of a class are
averaged and renormalised, as CLIP averages its template embeddings. Evidence holds the
three modes' distributions, so the variants share one cached evidence pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xm.errors import XMError
from xm.methods.base import Context, Decision, ExplanationSection, Method, Need, Option, Queries, Support
from xm.methods.registry import register
from xm.methods.zeroshot import check_templates, softmax

if TYPE_CHECKING:  # the model module imports torch: only a RECO that runs loads it
    from xm.methods.reco_model import RecoModel

MODES = ("both", "image", "text")
AUTO = "auto"  # the mode of best accuracy on the validation split (paper §4.3, Table 4), chosen by `fit`


class Reco(Method):
    name = "reco"
    summary = "RECO: image->image and text->text search, cross-modal fusion by a trained transformer (xm train reco)"
    trains = True
    options = (
        Option("mode", "both", "what is refined: both, the image only, the class prompts only, or auto (the one of "
                               "best validation accuracy; xm benchmark)", MODES + (AUTO,), evidence=False),
        Option("fusion", "transformer", "transformer (trained, `xm train reco`) | mean (training-free ablation)",
               ("transformer", "mean")),
        Option("k", 10, "neighbours retrieved per image and per class prompt", minimum=1),
        Option("checkpoint", "", "RECO checkpoint (.safetensors, its .json, or its folder); default under the index"),
        Option("encoder", "", "the frozen CLIP E (default: the index's coarse role)"),
    )

    @classmethod
    def trains_for(cls, options: dict) -> bool:
        return options.get("fusion", "transformer") == "transformer"

    def __init__(self, ctx: Context, **options: Any) -> None:
        super().__init__(ctx, **options)
        o = self.opts
        memory = ctx.memory
        self.spec = o["encoder"] or (memory.roles.get("coarse", "") if memory is not None else "")
        self.weights_path: Path | None = None
        if memory is not None and self.spec and o["fusion"] == "transformer":
            # the model module imports torch: only a RECO that runs loads it (`xm methods` does not)
            from xm.methods.reco_model import default_dir, resolve_checkpoint

            self.weights_path = resolve_checkpoint(o["checkpoint"]) if o["checkpoint"] else default_dir(memory, self.spec) / "reco.safetensors"
        self.check()
        self.encoder = ctx.encoder(self.spec)
        if not self.encoder.fingerprint_matches(memory.probe(self.spec)):
            raise XMError(f"{memory.root}: encoder {self.spec} has other weights than the ones that built this index")
        self.image_emb = memory.embeddings(self.spec, "image")
        self.text_emb = memory.embeddings(self.spec, "text")
        self.model: RecoModel | None = None  # None: the mean fusion
        self.chosen_mode: str | None = None  # mode=auto: set by fit on the validation split
        self.meta: dict[str, Any] = {}
        self.scale = float(self.encoder.logit_scale)
        if o["fusion"] == "transformer":
            self._load_checkpoint()
        self._prompts()

    # --- what it needs ---------------------------------------------------------------
    def needs(self) -> list[Need]:
        if not self.spec:
            return [Need("(a coarse encoder)", "image", "index")]
        needs = [Need(self.spec, m, kind) for kind in ("embeddings", "index") for m in ("image", "text")]
        if self.opts["fusion"] == "transformer":
            needs.append(Need(self.spec, "image", "trained", str(self.weights_path)))
        return needs

    def check(self) -> None:
        memory = self.ctx.memory
        if memory is not None and self.weights_path is not None and not self.weights_path.is_file():
            if all(memory.provides(n) for n in self.needs() if n.kind != "trained"):
                raise XMError(f"{self.weights_path}: no RECO checkpoint; train one with `xm train reco --index "
                              f"{memory.root} --encoder {self.spec}` or name one with --reco-checkpoint")
        super().check()

    def _load_checkpoint(self) -> None:
        from xm.methods.reco_model import load_model, meta_path, read_meta

        memory, path = self.ctx.memory, self.weights_path
        assert path is not None  # set for a transformer fusion; check() refused a RECO without a memory or an encoder
        meta = read_meta(path)
        where = meta_path(path)
        if meta.get("index_id") != memory.items_id:  # a decontaminated view of the index is the same index
            raise XMError(f"{where}: RECO checkpoint trained on index {meta.get('index_id')} "
                          f"({meta.get('index_root')}), not on this one ({memory.id}, {memory.root}); "
                          f"train one with `xm train reco --index {memory.root}`")
        if meta.get("encoder") != self.spec:
            raise XMError(f"{where}: RECO checkpoint trained for encoder {meta.get('encoder')}, not {self.spec}")
        if not self.encoder.fingerprint_matches(meta.get("probe", [])):
            raise XMError(f"{where}: RECO checkpoint trained on other weights of {self.spec} than the ones loaded")
        if not meta.get("complete"):
            raise XMError(f"{where}: RECO training stopped after {meta.get('epochs_done')} of {meta.get('epochs')} "
                          f"epochs; re-run `xm train reco --index {memory.root}` to finish it")
        if int(meta.get("dim", -1)) != self.encoder.dim:
            raise XMError(f"{where}: fusion width {meta.get('dim')}, encoder {self.spec} width {self.encoder.dim}")
        self.model, self.meta = load_model(path, meta)
        self.model.to(self.ctx.device.torch)  # the fusion runs where the encoders do (a CPU-written checkpoint)
        self.scale = float(self.model.logit_scale.detach().exp())

    # --- fusion ------------------------------------------------------------------------
    def _fuse(self, branch: str, query: np.ndarray, retrieved: np.ndarray, valid: np.ndarray) -> np.ndarray:
        from xm.methods.reco_model import mean_fusion, refine

        if self.model is None:
            return mean_fusion(query, retrieved, valid)
        return refine(getattr(self.model, branch), query, retrieved, valid)

    def _retrieve(self, modality: str, query: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, similarities, the OTHER modality's embeddings of the neighbours (n, k, d), valid)."""
        k = self.opts["k"]
        sims, ids = self.ctx.memory.search(modality, query, k, encoder=self.spec)
        other = self.text_emb if modality == "image" else self.image_emb
        valid = ids >= 0
        emb = other.gather(np.where(valid, ids, 0).ravel()).reshape(len(ids), k, -1)
        return ids, sims, emb, valid

    def _prompts(self) -> None:
        """The class weights, original (t) and refined (t̄), each the renormalised mean over
        templates; the refined prompts' neighbours are kept for `explain`."""
        classnames, templates = self.ctx.classnames, check_templates(self.ctx.templates)
        texts = [t.replace("{c}", "{}").format(c) for c in classnames for t in templates]
        emb = self.encoder.encode_texts(texts)
        ids, sims, retrieved, valid = self._retrieve("text", emb)
        refined = self._fuse("text", emb, retrieved, valid)
        c, m = len(classnames), len(templates)

        def average(x: np.ndarray) -> np.ndarray:
            w = x.reshape(c, m, -1).mean(axis=1)
            return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)

        self.class_original, self.class_refined = average(emb), average(refined)
        self.prompt_ids, self.prompt_sims, self.prompt_texts = ids.reshape(c, m, -1), sims.reshape(c, m, -1), texts

    # --- the three steps ---------------------------------------------------------------
    def evidence(self, queries: Queries) -> dict[str, np.ndarray]:
        v = queries.features(self.encoder)
        ids, sims, retrieved, valid = self._retrieve("image", v)
        v_ref = self._fuse("image", v, retrieved, valid)

        def probs(x: np.ndarray, w: np.ndarray) -> np.ndarray:
            return softmax(self.scale * (x.astype(np.float64) @ w.T.astype(np.float64)))

        return {"p_both": probs(v_ref, self.class_refined), "p_image": probs(v_ref, self.class_original),
                "p_text": probs(v, self.class_refined), "neighbours": ids, "neighbour_sims": sims}

    def wants_validation(self) -> bool:
        return self.opts["mode"] == AUTO

    def fit(self, support: Support) -> dict[str, Any]:
        """mode=auto: the inference mode of best top-1 accuracy on the validation images
        (ties: both, image, text in that order). Other modes choose nothing."""
        if self.opts["mode"] != AUTO:
            return {}
        if not support.val:
            raise XMError(f"{self.name}: mode=auto chooses the mode on a validation split, and this run has none; "
                          f"pass --opt mode=both|image|text")
        labels = np.array([e.label for e in support.val])
        correct = {m: 0 for m in MODES}
        for lo in range(0, len(support.val), 64):
            batch = support.val[lo:lo + 64]
            ev = self.evidence(Queries([e.load() for e in batch]))
            for m in MODES:
                correct[m] += int((ev[f"p_{m}"].argmax(axis=1) == labels[lo:lo + len(batch)]).sum())
        accuracy = {m: correct[m] / len(labels) for m in MODES}
        self.chosen_mode = max(MODES, key=lambda m: (accuracy[m], -MODES.index(m)))
        return {"mode": self.chosen_mode, "val_images": len(labels),
                **{f"val_acc_{m}": round(a, 4) for m, a in accuracy.items()}}

    def mode(self) -> str:
        """The inference mode: the option's, or the one `fit` chose for mode=auto."""
        if self.opts["mode"] != AUTO:
            return str(self.opts["mode"])
        if self.chosen_mode is None:
            raise XMError(f"{self.name}: mode=auto is chosen on a validation split, which only `xm benchmark` has; "
                          f"pass --opt mode=both|image|text here")
        return self.chosen_mode

    def decide(self, evidence: dict[str, np.ndarray], state: Any = None) -> Decision:
        mode = self.mode()
        p = evidence[f"p_{mode}"]
        found = (evidence["neighbours"] >= 0).sum(axis=1)
        info = [{"mode": mode, "fusion": self.opts["fusion"], "neighbours": int(f)} for f in found]
        return Decision(probs=p, components={f"p_{m}": evidence[f"p_{m}"] for m in MODES}, info=info)

    def explain(self, evidence: dict[str, np.ndarray], row: int) -> dict[str, Any]:
        """The captions fused into the image, and the items fused into the predicted class's prompts."""
        memory = self.ctx.memory
        ids, sims = evidence["neighbours"][row], evidence["neighbour_sims"][row]
        keep = ids >= 0
        image = [{"id": r["id"], "caption": r["caption"], "url": r["url"], "image_similarity": float(s)}
                 for r, s in zip(memory.rows(ids[keep], columns=("id", "caption", "url")), sims[keep])]
        pred = int(np.argmax(evidence[f"p_{self.mode()}"][row]))
        m = self.prompt_ids.shape[1]
        prompts = []
        for j in range(m):
            pid, psim = self.prompt_ids[pred, j], self.prompt_sims[pred, j]
            ok = pid >= 0
            rows = memory.rows(pid[ok], columns=("id", "caption", "url"))
            prompts.append({"prompt": self.prompt_texts[pred * m + j],
                            "retrieved": [{"id": r["id"], "caption": r["caption"], "url": r["url"], "text_similarity": float(s)}
                                          for r, s in zip(rows, psim[ok])]})
        return {"image_neighbours": image, "predicted": self.ctx.classnames[pred], "class_prompts": prompts}

    def explanation_view(self, explanation: dict[str, Any]) -> list[ExplanationSection]:
        if "image_neighbours" not in explanation:
            return []
        sections = [ExplanationSection("image + its neighbours' captions (fused)",
                                       ("id", "image sim", "caption"),
                                       tuple((n["id"], n["image_similarity"], n["caption"]) for n in explanation["image_neighbours"]))]
        for p in explanation["class_prompts"]:
            prompt = p["prompt"]
            sections.append(ExplanationSection(
                f'prompt "{prompt}" + its neighbours',
                ("id", "text sim", "caption"), tuple((r["id"], r["text_similarity"], r["caption"]) for r in p["retrieved"])))
        return sections

    def extra_key(self) -> dict[str, Any]:
        return {"encoder": self.spec, "checkpoint": self.meta.get("weights_sha256")}

    def decontamination(self) -> dict[str, Any]:
        """Whether the checkpoint's training kept this run's hidden near-duplicates of the test
        images out of its neighbour tables and pairs (`xm train reco --decontaminate-against`):
        the run's hidden ids against the ids the checkpoint records. Not refused when it did
        not (checkpoints trained before decontamination existed keep working): warned, recorded."""
        if self.model is None:
            return {}  # the mean fusion trained nothing
        record = self.meta.get("decontamination") or {}
        trained_out = set(int(i) for i in record.get("memory_ids") or [])
        against = sorted({str(d.get("dataset")) for d in record.get("datasets") or [] if d.get("of") != "training pairs"})
        run = [int(i) for i in self.ctx.memory.hidden_ids]
        missed = [i for i in run if i not in trained_out]
        dataset = self.ctx.dataset
        out: dict[str, Any] = {"checkpoint_against": against, "checkpoint_hidden": len(trained_out), "run_hidden": len(run),
                               "run_hidden_in_training": len(missed),
                               "dataset_named": dataset is not None and dataset in against}
        said = f"decontaminated against {', '.join(against)}" if against else "not decontaminated"
        if not run:
            out["line"] = (f"RECO checkpoint {said}; this run hides no near-duplicates of its test images, so there "
                           f"was nothing to keep out of training")
        elif not missed:
            out["line"] = (f"RECO checkpoint {said}: all {len(run)} near-duplicates this run hides were out of its "
                           f"neighbour tables and training pairs")
        else:
            out["line"] = (f"RECO checkpoint {said}: {len(missed)} of the {len(run)} near-duplicates this run hides were "
                           f"in its neighbour tables or training pairs")
            out["warning"] = (f"RECO's figure may be optimistic: retrain with `xm train reco --index {self.ctx.memory.root} "
                              f"--decontaminate-against {dataset or 'DATASET'}`")
        return out


register(Reco, {
    "reco-image": ({"mode": "image"}, "RECO refining the image only (v̄ · t)"),
    "reco-text": ({"mode": "text"}, "RECO refining the class prompts only (v · t̄)"),
    "reco-mean": ({"fusion": "mean"}, "RECO's training-free ablation: mean of original and retrieved embeddings"),
    "reco-auto": ({"mode": AUTO}, "RECO with the inference mode of best validation accuracy (paper Table 4; xm benchmark)"),
})
