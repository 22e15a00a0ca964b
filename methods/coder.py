"""CODER: cross-modal neighbour representation (METHODS.md section 3; docs/coder.md).

An image's CODER vector is its cosine to each of the N texts of a text set
(`xm.texts`): every class's name texts (and WordNet synonyms), attribute, analogous and
memory-caption texts. Variants:

    coder          zero-shot: s_c = 100 · mean({c_j : j ∈ att_c ∪ ana_c ∪ cap_c} ∪ {max_{j ∈ name_c ∪ syno_c} c_j})
    coder-rerank   two-stage: where p1 - p2 of softmax(s) is below the dataset's threshold,
                   the top 5 are reranked by one-vs-one difference texts (never any label)
    coder-adapter  few-shot (Tip-Adapter style over CODER vectors; methods/tip_adapter.py):
                   s·f·Wᵀ + α · exp(-β (1 - minmax(ĉ(x)·Kᵀ)/T)) · L, α and β searched on validation

Without an index CODER runs from names and a descriptions file alone (`needs_memory` is
False); the `memory` text source needs one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xm.errors import XMError
from xm.methods.base import Context, Decision, ExplanationSection, Method, Need, Option, Queries
from xm.methods.registry import register
from xm.methods.tip_adapter import ADAPTER_OPTIONS, CacheAdapter
from xm.methods.zeroshot import softmax
from xm.texts import MAX_KINDS, MEAN_KINDS, TextOptions, TextSet, build_textset, read_textset
from xm.texts.descriptions import norm_name

# The authors' per-dataset rerank thresholds on p1 - p2 (xm dataset names and aliases).
THRESHOLDS = {"eurosat": 0.3, "imagenet": 0.1, "imagenetv2": 0.05, "imagenet-v2": 0.05, "dtd": 0.6,
              "caltech101": 0.3, "caltech": 0.3, "food101": 0.1, "food": 0.1, "oxford_pets": 0.1, "pets": 0.1,
              "places365": 0.1, "places": 0.1, "cub": 0.2, "cub200": 0.2, "cub_200_2011": 0.2}

TEXT_OPTIONS = (
    Option("texts_file", "", "a text set written by `xm texts` (JSON); replaces building the texts here"),
    Option("descriptions", "", "descriptions file: DCLIP's JSON (class -> sentences) or xm's sectioned form"),
    Option("sources", "", "text sources, comma-separated from names,descriptions,wordnet,memory "
                          "(default: names, plus descriptions when a file is given)"),
    Option("name_template", "", "name text template with {c} (default: the dataset's, else 'a photo of {c}')"),
    Option("wordnet_dir", "", "folder of the WordNet database files (default: XM_WORDNET_DIR, /usr/share/wordnet)"),
    Option("synonym_min_sim", 0.8, "WordNet lemmas kept at this similarity to their class name or more"),
    Option("max_similarity", 0.9, "analogous classes and memory captions this close to another class name are dropped"),
    Option("memory_k", 8, "memory captions kept per class at most", minimum=0),
    Option("memory_search", 64, "memory captions searched per class (text-to-text kNN)", minimum=1),
    Option("ovo_as_written", False, "one-vs-one entries of the descriptions file are whole sentences (default: "
                                    "attributes rendered through the dataset's one-vs-one templates, as the authors)"),
)

_ENCODED: dict[tuple[str, str], CoderTexts] = {}


def text_options(opts: dict[str, Any], dataset: str | None, task: str = "zero-shot") -> TextOptions:
    return TextOptions(sources=opts["sources"], descriptions=opts["descriptions"], dataset=dataset,
                       name_template=opts["name_template"], wordnet_dir=opts["wordnet_dir"],
                       synonym_min_sim=opts["synonym_min_sim"], max_similarity=opts["max_similarity"],
                       memory_k=opts["memory_k"], memory_search=opts["memory_search"], task=task,
                       ovo_as_written=bool(opts["ovo_as_written"]))


def load_textset(method: Method, encoder: Any) -> TextSet:
    """The method's text set: read from `texts_file`, or built from its sources."""
    o, ctx = method.opts, method.ctx
    if o["texts_file"]:
        if o["descriptions"] or o["sources"]:
            raise XMError(f"{method.name}: give either texts_file ({o['texts_file']}) or descriptions/sources, not both "
                          f"(`xm texts` already built the set from its sources)")
        ts = read_textset(o["texts_file"]).for_classes(ctx.classnames, o["texts_file"], ctx.dataset)
        return without_hidden_captions(ts, ctx.memory, str(o["texts_file"]))
    # the authors' templates differ between their zero-shot and few-shot runs (pets, DTD)
    task = "few-shot" if method.few_shot else "zero-shot"
    ts = build_textset(ctx.classnames, encoder, text_options(o, ctx.dataset, task), ctx.memory, where=method.name)
    if ts.of_source("memory") and ctx.memory is not None and len(ctx.memory.hidden_ids):
        # mined here through the run's memory, whose searches never return a hidden item
        ts.meta["decontamination"] = {"line": f"memory captions mined through this run's memory, its "
                                              f"{len(ctx.memory.hidden_ids)} hidden near-duplicates never searched"}
    return ts


def without_hidden_captions(ts: TextSet, memory: Any, path: str) -> TextSet:
    """A text set read from a file, with the memory captions of items the run's memory hides
    (near-duplicates of the test images, `xm benchmark --decontaminate`) taken out: `xm texts`
    mined them before the run, through the whole memory. The set's `meta["decontamination"]`
    says what was done; captions mined from another index cannot be checked, and say so."""
    mined = ts.of_source("memory")
    hidden = memory.hidden_ids if memory is not None else np.zeros(0, np.int64)
    if not mined or not len(hidden):
        return ts
    built_on = str((ts.meta.get("memory") or {}).get("index_id") or "")
    if not built_on or not built_on.startswith(memory.items_id):  # a view's id begins with its index's
        ts.meta["decontamination"] = {
            "line": f"{path}: {len(mined)} memory caption(s) mined from index {built_on or '(unrecorded)'}, not this run's "
                    f"({memory.items_id}): they cannot be checked against the {len(hidden)} hidden near-duplicates",
            "warning": f"CODER's figure may be optimistic: rebuild {path} with `xm texts --index {memory.root}`, or let "
                       f"the benchmark mine the captions (--opt sources=...,memory instead of texts_file)"}
        return ts
    out = TextSet(list(ts.classes), {c: [] for c in ts.classes}, dict(ts.meta), list(ts.dropped))
    dropped = 0
    hidden_set = set(int(i) for i in hidden)
    for c in ts.classes:
        for t in ts.texts[c]:
            if t.source == "memory" and int(t.extra.get("id", -1)) in hidden_set:
                dropped += 1
                out.dropped.append({"class": c, "source": "memory", "kind": t.kind, "id": int(t.extra["id"]),
                                    "caption": t.text, "reason": "a near-duplicate of a test image (decontamination)"})
                continue
            out.add(c, t)
    out.meta["decontamination"] = {"dropped": dropped, "line": f"{path}: {dropped} of its {len(mined)} memory caption(s) "
                                                                f"came from hidden near-duplicates of the test images, dropped"}
    out.check(path)
    return out


def textset_decontamination(ts: TextSet) -> dict[str, Any]:
    """`Method.decontamination` for CODER: what `load_textset` did about the run's hidden items."""
    return dict(ts.meta.get("decontamination") or {})


class CoderTexts:
    """A text set encoded under one encoder, laid out for the scores: class-major, each
    class's max-group (name, synonym) first, then its mean-group texts; ovo texts as the
    mean embedding of each ordered pair (mean cos(f, t_j) = f · mean t_j)."""

    def __init__(self, ts: TextSet, encoder: Any) -> None:
        self.classes = list(ts.classes)
        C = len(self.classes)
        texts: list[str] = []
        b_cols: list[int] = []
        cls, kinds, a_cols, b_starts, a_bounds = [], [], [], [], [0]
        for ci, c in enumerate(self.classes):
            group_b, group_a = ts.of(c, MAX_KINDS), ts.of(c, MEAN_KINDS)
            b_starts.append(len(b_cols))
            for t in group_b:
                b_cols.append(len(texts))
                texts.append(t.text)
                cls.append(ci)
                kinds.append(t.kind)
            for t in group_a:
                a_cols.append(len(texts))
                texts.append(t.text)
                cls.append(ci)
                kinds.append(t.kind)
            a_bounds.append(len(a_cols))
        self.texts, self.class_of, self.kinds = texts, np.array(cls, np.int64), kinds
        self.sources = [t.source for c in self.classes for t in ts.of(c, MAX_KINDS) + ts.of(c, MEAN_KINDS)]
        self.b_cols, self.b_starts = np.array(b_cols, np.int64), np.array(b_starts, np.int64)
        self.a_cols, self.a_bounds = np.array(a_cols, np.int64), np.array(a_bounds, np.int64)
        self.a_counts = np.diff(self.a_bounds).astype(np.float64)
        self.emb = encoder.encode_texts(texts).astype(np.float32)  # N x d
        # ovo: pair_index[c, c'] -> row of ovo_mean (mean embedding of ovo(c, c')), -1 if none
        index = {c: i for i, c in enumerate(self.classes)}
        pairs: dict[tuple[int, int], list[str]] = {}
        for c in self.classes:
            for t in ts.of(c, ("ovo",)):
                assert t.versus is not None  # TextSet.check refuses an ovo text without one
                pairs.setdefault((index[c], index[t.versus]), []).append(t.text)
        self.pair_index = np.full((C, C), -1, np.int64)
        self.ovo_mean = np.zeros((len(pairs) + 1, self.emb.shape[1]), np.float32)  # last row: zeros (missing)
        self.ovo_count = sum(len(v) for v in pairs.values())
        if pairs:
            flat = [s for v in pairs.values() for s in v]
            emb = encoder.encode_texts(flat)
            pos = 0
            for r, ((i, j), v) in enumerate(pairs.items()):
                self.ovo_mean[r] = emb[pos:pos + len(v)].mean(axis=0)
                self.pair_index[i, j] = r
                pos += len(v)

    @property
    def n_pairs(self) -> int:
        return len(self.ovo_mean) - 1

    def vectors(self, features: np.ndarray) -> np.ndarray:
        """CODER vectors c(x) = [cos(f(x), t_j)]_j (n x N)."""
        return features.astype(np.float64) @ self.emb.T.astype(np.float64)

    def scores(self, cos: np.ndarray) -> np.ndarray:
        """s_c = 100 · (Σ_{mean group} c_j + max_{max group} c_j) / (|mean group| + 1)   (n x C)."""
        max_b = np.maximum.reduceat(cos[:, self.b_cols], self.b_starts, axis=1)
        cs = np.concatenate([np.zeros((len(cos), 1)), np.cumsum(cos[:, self.a_cols], axis=1)], axis=1)
        sum_a = cs[:, self.a_bounds[1:]] - cs[:, self.a_bounds[:-1]]
        return 100.0 * (sum_a + max_b) / (self.a_counts + 1.0)

    def rerank_scores(self, features: np.ndarray, top: np.ndarray) -> np.ndarray:
        """For each candidate c of a row's top-K: mean over the other candidates c' of
        f·mean ovo(c, c') - f·mean ovo(c', c); a pair lacking either direction adds 0."""
        n, k = top.shape
        f = features.astype(np.float64)
        out = np.zeros((n, k))
        missing = len(self.ovo_mean) - 1
        for a in range(k):
            for b in range(k):
                if a == b:
                    continue
                ab, ba = self.pair_index[top[:, a], top[:, b]], self.pair_index[top[:, b], top[:, a]]
                ok = (ab >= 0) & (ba >= 0)
                diff = self.ovo_mean[np.where(ok, ab, missing)] - self.ovo_mean[np.where(ok, ba, missing)]
                out[:, a] += np.einsum("nd,nd->n", f, diff)
        return out / max(k - 1, 1)


def encoded_texts(ts: TextSet, encoder: Any) -> CoderTexts:
    key = (ts.digest(), str(encoder.spec))
    if key not in _ENCODED:
        _ENCODED[key] = CoderTexts(ts, encoder)
    return _ENCODED[key]


def check_sources(method: Method) -> None:
    """The text sources are known, and `memory` has an index to mine."""
    if method.opts["texts_file"]:
        return
    sources = text_options(method.opts, method.ctx.dataset).source_list(f"{method.name}: sources")
    if "memory" in sources and method.ctx.memory is None:
        raise XMError(f"method {method.name}: text source 'memory' needs an index (--index)")


def memory_needs(method: Method) -> list[Need]:
    """The `memory` source searches the index's coarse caption kNN index."""
    if method.opts["texts_file"] or method.ctx.memory is None:
        return []
    if "memory" not in text_options(method.opts, method.ctx.dataset).source_list(f"{method.name}: sources"):
        return []
    return [Need(method.ctx.memory.roles.get("coarse") or "(a coarse encoder)", "text", "index")]


def threshold_for(name: str, value: float, dataset: str | None) -> float:
    if value >= 0:
        if value > 1:
            raise XMError(f"{name} option threshold: {value:g}; a p1 - p2 margin lies in 0..1")
        return float(value)
    key = norm_name(dataset or "").replace(" ", "_")
    if key in THRESHOLDS:
        return THRESHOLDS[key]
    known = ", ".join(f"{k} {v:g}" for k, v in THRESHOLDS.items() if k in
                      ("eurosat", "imagenet", "imagenetv2", "dtd", "caltech101", "food101", "oxford_pets", "places365", "cub"))
    raise XMError(f"{name}: no rerank threshold for {'dataset ' + repr(dataset) if dataset else 'this run (no --dataset)'}; "
                  f"give --opt threshold=T (the p1 - p2 margin under which the top 5 are reranked; authors: {known})")


class CODER(Method):
    name = "coder"
    summary = "CODER zero-shot: image-to-text-set cosines, mean(attribute, analogous) + max(name, synonym); no memory needed"
    needs_memory = False
    options = TEXT_OPTIONS + (
        # not `rerank`: X-MoRe's `rerank` (dot | cosine) is a benchmark-protocol option set for every method
        Option("two_stage", False, "rerank the top candidates of uncertain images by one-vs-one difference texts",
               evidence=False),
        Option("threshold", -1.0, "rerank when p1 - p2 is below this (-1: the dataset's, EuroSAT 0.3 ...; required otherwise)",
               evidence=False),
        Option("rerank_top", 5, "candidates the rerank reorders", minimum=2),
    )

    def __init__(self, ctx: Context, **options: Any) -> None:
        super().__init__(ctx, **options)
        self.check()
        self.threshold = threshold_for(self.name, self.opts["threshold"], ctx.dataset) if self.opts["two_stage"] else None
        self.encoder = ctx.encoder(ctx.model)
        self.textset = load_textset(self, self.encoder)
        self.coded = encoded_texts(self.textset, self.encoder)
        if self.opts["two_stage"] and self.coded.n_pairs == 0:
            raise XMError(f"{self.name}: the text set has no one-vs-one difference texts to rerank with; give a "
                          f"descriptions file with a 'differences' section (docs/coder.md)")

    def check(self) -> None:
        check_sources(self)
        super().check()

    def needs(self) -> list[Need]:
        return memory_needs(self)

    def extra_key(self) -> dict[str, Any]:
        return {"texts": self.textset.digest()}

    def decontamination(self) -> dict[str, Any]:
        return textset_decontamination(self.textset)

    def evidence(self, queries: Queries) -> dict[str, np.ndarray]:
        f = queries.features(self.encoder)
        scores = self.coded.scores(self.coded.vectors(f))
        k = min(self.opts["rerank_top"], len(self.ctx.classnames))
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out = {"scores": scores, "top": top, "features": f.astype(np.float32)}
        out["rerank"] = self.coded.rerank_scores(f, top) if self.coded.n_pairs else np.zeros(top.shape)
        return out

    def decide(self, evidence: dict[str, np.ndarray], state: Any = None) -> Decision:
        p1 = softmax(evidence["scores"])
        probs = p1.copy()
        top, rr = evidence["top"], evidence["rerank"]
        rows = np.arange(len(p1))
        ps = np.sort(p1, axis=1)
        margin = ps[:, -1] - ps[:, -2] if p1.shape[1] > 1 else np.ones(len(p1))
        info: list[dict[str, Any]] = []
        for i in rows:
            row: dict[str, Any] = {"margin": float(margin[i])}
            if self.threshold is not None and margin[i] < self.threshold:
                # the top-K's stage-1 probabilities, handed out in rerank order (ties keep stage-1 order)
                order = np.argsort(-rr[i], kind="stable")
                probs[i, top[i][order]] = p1[i, top[i]]
                row.update({"reranked": True, "stage1": self.ctx.classnames[int(top[i, 0])],
                            "rerank_scores": {self.ctx.classnames[int(c)]: float(s) for c, s in zip(top[i], rr[i])}})
            elif self.threshold is not None:
                row["reranked"] = False
            info.append(row)
        return Decision(probs=probs, components={"p_stage1": p1}, info=info)

    def explain(self, evidence: dict[str, np.ndarray], row: int) -> dict[str, Any]:
        """The stage-1 candidates and, for each, its texts closest to the image."""
        cos = self.coded.vectors(evidence["features"][row:row + 1])[0]
        out = []
        for c in evidence["top"][row]:
            cols = np.nonzero(self.coded.class_of == c)[0]
            best = cols[np.argsort(-cos[cols], kind="stable")[:5]]
            out.append({"class": self.ctx.classnames[int(c)], "score": float(evidence["scores"][row, c]),
                        "texts": [{"text": self.coded.texts[j], "kind": self.coded.kinds[j],
                                   "source": self.coded.sources[j], "cosine": float(cos[j])} for j in best]})
        return {"candidates": out, "texts": len(self.coded.texts), "ovo_texts": self.coded.ovo_count}

    def explanation_view(self, explanation: dict[str, Any]) -> list[ExplanationSection]:
        candidates = explanation.get("candidates")
        if not candidates:
            return []
        # one table: each candidate's score on its first text's row
        rows = tuple((c["class"] if j == 0 else "", c["score"] if j == 0 else None, t["cosine"], t["kind"], t["source"], t["text"])
                     for c in candidates for j, t in enumerate(c["texts"] or [{"cosine": None, "kind": "", "source": "", "text": ""}]))
        return [ExplanationSection(f"candidates, closest texts ({explanation['texts']} texts, {explanation['ovo_texts']} one-vs-one)",
                                   ("candidate", "score", "cosine", "kind", "source", "text"), rows)]


class CODERAdapter(CacheAdapter):
    name = "coder-adapter"
    summary = "CODER-Adapter (few-shot, training-free): zero-shot CLIP + a cache of the support images' CODER vectors"
    options = TEXT_OPTIONS + ADAPTER_OPTIONS + (
        Option("alpha", 1.73, "α before the search (and without a validation set); the authors' EuroSAT start", minimum=0),
        Option("beta", 91.34, "β before the search (and without a validation set); the authors' EuroSAT start", minimum=0),
        Option("beta_min", 1.0, "β search range, low end (log-spaced grid)", minimum=1e-6),
        Option("beta_max", 1000.0, "β search range, high end", minimum=1e-6),
        Option("affinity", "minmax", "query-to-key affinity: cosine min-max normalised over the keys, or the cosine",
               ("minmax", "cosine")),
        Option("temperature", 1.0, "T of exp(-β (1 - minmax(a)/T))", minimum=1e-6),
    )

    def __init__(self, ctx: Context, **options: Any) -> None:
        super().__init__(ctx, **options)
        check_sources(self)
        super().check()
        self.textset = load_textset(self, self.encoder)
        self.coded = encoded_texts(self.textset, self.encoder)

    def needs(self) -> list[Need]:
        return memory_needs(self)

    def extra_key(self) -> dict[str, Any]:
        return {"texts": self.textset.digest(), **super().extra_key()}

    def decontamination(self) -> dict[str, Any]:
        return textset_decontamination(self.textset)

    def keys(self, features: np.ndarray) -> np.ndarray:
        v = self.coded.vectors(features)
        return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def affinity(self, query_keys: np.ndarray, support_keys: np.ndarray) -> np.ndarray:
        a = super().affinity(query_keys, support_keys)
        if self.opts["affinity"] == "minmax":
            lo, hi = a.min(axis=1, keepdims=True), a.max(axis=1, keepdims=True)
            a = (a - lo) / np.maximum(hi - lo, 1e-12)
        return a / self.opts["temperature"]


register(CODER, {"coder-rerank": ({"two_stage": True}, "CODER two-stage: rerank uncertain images' top 5 by one-vs-one texts")})
register(CODERAdapter)
