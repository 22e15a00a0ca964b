"""Building a text set from its sources (CODER, METHODS.md section 3; docs/coder.md).

Sources, each text recording its own:

* ``names``: one name text per class from the name template (the CODER authors'
  per-dataset templates, `xm.texts.templates`: "a photo of {c}", EuroSAT's "a photo of
  {c}, satellite domain.", ...),
* ``descriptions``: a DCLIP-format file (attributes, the dataset's attribute template,
  default "{c} which has {att}"), and in its sectioned form analogous classes (default
  "a {c} similar to {ana}.") and one-vs-one attributes, each rendered through every one of
  the dataset's one-vs-one templates (as the authors; `ovo_as_written` keeps them as
  written). The analogous filter is the authors': "a photo of {ana}" against "a photo of
  {c'}" for every OTHER class c', dropped above `max_similarity` (0.9); a candidate that
  is another class's name is dropped too (that text would coincide with the class's),
* ``wordnet`` (opt-in): lemma names of the class's synsets, rendered with the name
  template, kept when their similarity to the class's own name text is at least
  `synonym_min_sim` and higher than to every other class's,
* ``memory`` (beyond the paper): captions found by text-to-text search of the index
  around each class's name text, kept only when closer to their own class's name than to
  every other, and not above `max_similarity` to another class's name.

Every rejected text is listed in the set's ``dropped`` with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from xm.errors import XMError
from xm.texts.descriptions import Descriptions, norm_name, read_descriptions
from xm.texts.templates import CoderTemplates, coder_templates, fill
from xm.texts.textset import Text, TextSet

SOURCE_NAMES = ("names", "descriptions", "wordnet", "memory")
_DEFAULT = coder_templates(None)
DEFAULT_NAME_TEMPLATE = _DEFAULT.name[0]
NAME_TEMPLATES = {d: t for d in ("eurosat",) for t in coder_templates(d).name}  # kept for callers; the data file has all
ATTRIBUTE_TEMPLATE = _DEFAULT.attribute[0]
ANALOGOUS_TEMPLATE = _DEFAULT.analogous[0]


@dataclass
class TextOptions:
    """How to build a text set (the CODER options of the same names)."""

    sources: str = ""  # comma-separated; "" = names, plus descriptions when a file is given
    descriptions: str = ""
    dataset: str | None = None
    name_template: str = ""  # "" = the dataset's (the authors' templates) or CODER's default
    task: str = "zero-shot"  # the authors' templates differ between zero-shot and few-shot runs (pets, DTD)
    ovo_as_written: bool = False  # one-vs-one entries are whole sentences, not attributes to render
    wordnet_dir: str = ""
    synonym_min_sim: float = 0.8
    max_similarity: float = 0.9
    memory_k: int = 8  # captions kept per class at most
    memory_search: int = 64  # captions searched per class

    def source_list(self, where: str = "sources") -> list[str]:
        if not self.sources.strip():
            return ["names"] + (["descriptions"] if self.descriptions else [])
        out = []
        for s in (p.strip() for p in self.sources.split(",")):
            if not s:
                continue
            if s not in SOURCE_NAMES:
                raise XMError(f"{where}: unknown text source {s!r}; choose from {', '.join(SOURCE_NAMES)}")
            if s not in out:
                out.append(s)
        if "names" not in out:
            raise XMError(f"{where}: {self.sources!r} lacks 'names' (every class needs its name text)")
        if "descriptions" in out and not self.descriptions:
            raise XMError(f"{where}: source 'descriptions' needs a descriptions file (--descriptions desc.json)")
        return out

    def templates(self) -> CoderTemplates:
        return coder_templates(self.dataset, self.task)

    def template(self) -> str:
        t = self.name_template or self.templates().name[0]
        if "{c}" not in t:
            raise XMError(f"name_template {t!r}: needs a {{c}} where the class name goes")
        return t


_fill = fill


def build_textset(classnames: Sequence[str], encoder: Any, opts: TextOptions, memory: Any = None,
                  where: str = "texts") -> TextSet:
    """The text set of `classnames` from `opts`' sources; `encoder` filters (WordNet, analogous, memory)."""
    sources = opts.source_list(f"{where}: sources")
    if "memory" in sources and memory is None:
        raise XMError(f"{where}: source 'memory' needs an index (--index IDX)")
    classnames = list(classnames)
    name_t = opts.template()
    tpl = opts.templates()
    meta: dict[str, Any] = {
        "dataset": opts.dataset, "encoder": str(getattr(encoder, "spec", encoder)), "sources": sources,
        "templates": {**tpl.to_json(), "name": name_t, "task": opts.task},
        "options": {k: v for k, v in asdict(opts).items() if k not in ("sources", "dataset")},
    }
    ts = TextSet(classnames, {}, meta)
    names = [_fill(name_t, c=c) for c in classnames]
    for c, t in zip(classnames, names):
        ts.add(c, Text(t, "name", "names"))
    name_emb = encoder.encode_texts(names).astype(np.float64)  # C x d

    if "descriptions" in sources:
        desc = read_descriptions(opts.descriptions, classnames, opts.dataset)
        meta["descriptions"] = {"file": opts.descriptions, "classes_described": desc.classes_described(),
                                "unmatched_classes": desc.unmatched}
        _add_descriptions(ts, desc, encoder, opts, tpl)
    if "wordnet" in sources:
        from xm.texts.wordnet import open_wordnet

        wn = open_wordnet(opts.wordnet_dir or None)
        meta["wordnet"] = str(wn.folder)
        _add_synonyms(ts, wn, encoder, name_emb, name_t, opts)
    if "memory" in sources:
        meta["memory"] = {"index": str(getattr(memory, "root", "")), "index_id": getattr(memory, "id", None)}
        _add_memory(ts, memory, encoder, name_emb, names, opts, where)
    ts.check(where)
    return ts


def _add_descriptions(ts: TextSet, desc: Descriptions, encoder: Any, opts: TextOptions, tpl: CoderTemplates) -> None:
    classnames = ts.classes
    for c in classnames:
        for att in desc.descriptors.get(c, []):
            for t in tpl.attribute:
                ts.add(c, Text(_fill(t, c=c, att=att), "attribute", "descriptions", extra={"descriptor": att}))
    # analogous classes: the authors' filter, "a photo of {ana}" against every OTHER class's "a photo of {c}"
    pairs = [(c, a) for c in classnames for a in desc.analogous.get(c, [])]
    if pairs:
        bare = encoder.encode_texts([_fill(tpl.filter_template, c=c) for c in classnames]).astype(np.float64)
        ana = encoder.encode_texts([_fill(tpl.filter_template, c=a) for _, a in pairs]).astype(np.float64)
        sims = ana @ bare.T
        index = {c: i for i, c in enumerate(classnames)}
        norms = {norm_name(c): c for c in classnames}
        for (c, a), row in zip(pairs, sims):
            other = np.delete(row, index[c])
            others = [x for x in classnames if x != c]
            if norm_name(a) in norms and norms[norm_name(a)] != c:
                ts.dropped.append({"class": c, "source": "descriptions", "kind": "analogous", "analogous": a,
                                   "reason": f"is the class {norms[norm_name(a)]!r}"})
            elif len(other) and other.max() > opts.max_similarity:
                j = int(np.argmax(other))
                ts.dropped.append({"class": c, "source": "descriptions", "kind": "analogous", "analogous": a,
                                   "reason": f"similarity {other[j]:.3f} to class {others[j]!r} > {opts.max_similarity:g}"})
            else:
                for t in tpl.analogous:
                    ts.add(c, Text(_fill(t, c=c, ana=a), "analogous", "descriptions", extra={"analogous": a}))
    for c in classnames:
        for versus, entries in desc.differences.get(c, {}).items():
            for s in entries:
                if opts.ovo_as_written:
                    ts.add(c, Text(s, "ovo", "descriptions", versus=versus))
                    continue
                # the authors render each one-vs-one attribute through every one-vs-one template of the dataset
                for t in tpl.ovo:
                    ts.add(c, Text(_fill(t, c=c, other=versus, ovo=s), "ovo", "descriptions", versus=versus,
                                   extra={"attribute": s}))


def _add_synonyms(ts: TextSet, wn: Any, encoder: Any, name_emb: np.ndarray, name_t: str, opts: TextOptions) -> None:
    cands = [(i, c, lemma) for i, c in enumerate(ts.classes) for lemma in wn.lemmas(c)]
    if not cands:
        return
    texts = [_fill(name_t, c=lemma) for _, _, lemma in cands]
    sims = encoder.encode_texts(texts).astype(np.float64) @ name_emb.T
    for (i, c, lemma), text, row in zip(cands, texts, sims):
        own, best = row[i], int(np.argmax(row))
        if best != i:
            ts.dropped.append({"class": c, "source": "wordnet", "kind": "synonym", "lemma": lemma,
                               "reason": f"closer to class {ts.classes[best]!r} ({row[best]:.3f} > {own:.3f})"})
        elif own < opts.synonym_min_sim:
            ts.dropped.append({"class": c, "source": "wordnet", "kind": "synonym", "lemma": lemma,
                               "reason": f"similarity {own:.3f} to its class < {opts.synonym_min_sim:g}"})
        else:
            ts.add(c, Text(text, "synonym", "wordnet", extra={"lemma": lemma, "similarity": round(float(own), 4)}))


def _add_memory(ts: TextSet, memory: Any, encoder: Any, name_emb: np.ndarray, names: list[str],
                opts: TextOptions, where: str) -> None:
    from xm.encoders import Device, load_encoder

    coarse = memory.roles.get("coarse")
    if not coarse or not memory.has_index(coarse, "text"):
        raise XMError(f"{memory.root}: source 'memory' needs a caption kNN index; add it with "
                      f"`xm build-index --out {memory.root} --add-encoder {coarse}=index-text`")
    # on the device the command's encoder runs on (parsed at its edge)
    same_device = Device.parse(str(getattr(encoder, "device", "cpu")), check=False)
    search_enc = encoder if str(getattr(encoder, "spec", "")) == coarse else load_encoder(coarse, device=same_device)
    q = search_enc.encode_texts(names)
    _, ids = memory.search("text", q, opts.memory_search, encoder=coarse)
    flat = sorted({int(i) for i in ids.ravel() if i >= 0})
    if not flat:
        return
    captions = dict(zip(flat, memory.captions(flat)))
    uniq = sorted({(captions[i] or "").strip() for i in flat} - {""})
    emb = dict(zip(uniq, encoder.encode_texts(uniq).astype(np.float64))) if uniq else {}
    taken: set[str] = set()
    for i, c in enumerate(ts.classes):
        kept: list[tuple[float, int, str]] = []
        seen: set[str] = set()
        for mid in (int(x) for x in ids[i] if x >= 0):
            cap = (captions[mid] or "").strip()
            if not cap or cap in seen:
                continue
            seen.add(cap)
            row = emb[cap] @ name_emb.T
            own, best = row[i], int(np.argmax(row))
            other = np.delete(row, i)
            if best != i:
                ts.dropped.append({"class": c, "source": "memory", "kind": "caption", "id": mid, "caption": cap,
                                   "reason": f"closer to class {ts.classes[best]!r} ({row[best]:.3f} > {own:.3f})"})
            elif len(other) and other.max() > opts.max_similarity:
                ts.dropped.append({"class": c, "source": "memory", "kind": "caption", "id": mid, "caption": cap,
                                   "reason": f"similarity {other.max():.3f} to another class > {opts.max_similarity:g}"})
            elif cap not in taken:
                kept.append((float(own), mid, cap))
        kept.sort(key=lambda r: (-r[0], r[1]))
        for own, mid, cap in kept[: opts.memory_k]:
            taken.add(cap)
            ts.add(c, Text(cap, "caption", "memory", extra={"id": mid, "similarity": round(own, 4)}))
