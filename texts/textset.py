"""A text set: the texts of every class that CODER compares an image with, and the JSON
file `xm texts` writes and `--texts-file` reads back (format `xm-texts/1`, docs/coder.md).

Each text records its class, its kind (how CODER uses it) and its source (where it came
from). Kinds:

* ``name``, ``synonym``: the class's names; the zero-shot score takes their max,
* ``attribute``, ``analogous``, ``caption``: averaged into the score with that max,
* ``ovo``: "how this class differs from `versus`", read by the two-stage rerank only
  (not part of the CODER vector).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xm.errors import XMError
from xm.userfiles import read_json

FORMAT = "xm-texts/1"
MAX_KINDS = ("name", "synonym")  # max over these ...
MEAN_KINDS = ("attribute", "analogous", "caption")  # ... averaged with these
VECTOR_KINDS = MAX_KINDS + MEAN_KINDS  # the CODER vector's texts
KINDS = VECTOR_KINDS + ("ovo",)
SOURCES = ("names", "descriptions", "wordnet", "memory", "file")


@dataclass
class Text:
    """One text of a class."""

    text: str
    kind: str
    source: str
    versus: str | None = None  # ovo: the other class
    extra: dict[str, Any] = field(default_factory=dict)  # what the source recorded (raw descriptor, memory id, similarity)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text, "kind": self.kind, "source": self.source}
        if self.versus is not None:
            out["versus"] = self.versus
        out.update(self.extra)
        return out


@dataclass
class TextSet:
    """The texts of each class, in the label order of `classes`."""

    classes: list[str]
    texts: dict[str, list[Text]]
    meta: dict[str, Any] = field(default_factory=dict)  # dataset, encoder, templates, sources, options
    dropped: list[dict[str, Any]] = field(default_factory=list)  # texts a filter rejected, with the reason

    def __post_init__(self) -> None:
        for c in self.classes:
            self.texts.setdefault(c, [])

    def add(self, classname: str, text: Text) -> None:
        self.texts[classname].append(text)

    def extend(self, classname: str, texts: Iterable[Text]) -> None:
        for t in texts:
            self.add(classname, t)

    def of(self, classname: str, kinds: Sequence[str] = KINDS) -> list[Text]:
        return [t for t in self.texts[classname] if t.kind in kinds]

    def of_source(self, source: str) -> list[Text]:
        """Every text of every class that `source` gave ("memory": mined memory captions)."""
        return [t for c in self.classes for t in self.texts[c] if t.source == source]

    def count(self, kinds: Sequence[str] = VECTOR_KINDS) -> int:
        return sum(len(self.of(c, kinds)) for c in self.classes)

    def by_source(self) -> dict[str, dict[str, int]]:
        """Texts per (source, kind) over all classes."""
        out: dict[str, dict[str, int]] = {}
        for c in self.classes:
            for t in self.texts[c]:
                out.setdefault(t.source, {}).setdefault(t.kind, 0)
                out[t.source][t.kind] += 1
        return out

    def digest(self) -> str:
        """Everything a CODER vector depends on: the texts, their kinds and classes."""
        rows = [[c, t.kind, t.versus, t.text] for c in self.classes for t in self.texts[c]]
        return hashlib.sha256(json.dumps([self.classes, rows]).encode()).hexdigest()[:20]

    def check(self, where: str = "text set") -> None:
        """Every class has a name text; every ovo text names another class of the set."""
        known = set(self.classes)
        for c in self.classes:
            if not self.of(c, MAX_KINDS):
                raise XMError(f"{where}: class {c!r} has no name text (kind 'name' or 'synonym')")
            for t in self.texts[c]:
                if t.kind not in KINDS:
                    raise XMError(f"{where}: class {c!r}: unknown text kind {t.kind!r}; choose from {', '.join(KINDS)}")
                if t.kind == "ovo" and (t.versus not in known or t.versus == c):
                    raise XMError(f"{where}: class {c!r}: ovo text {t.text!r} needs 'versus' naming another class")

    def for_classes(self, classnames: Sequence[str], where: str, dataset: str | None = None) -> TextSet:
        """This set for the label set `classnames` (any order; the set's class names matched to
        the labels under either naming, `xm.texts.classmatch`); refuses a label with no texts."""
        from xm.texts.classmatch import ClassMatcher

        matcher = ClassMatcher(classnames, dataset)
        to_label = {c: matcher.label(c) for c in self.classes}
        matcher.require_all({v for v in to_label.values() if v is not None}, where, self.classes,
                            hint="rebuild it with `xm texts --labels ...`")
        texts: dict[str, list[Text]] = {c: [] for c in classnames}
        for c in self.classes:
            label = to_label[c]
            if label is None or texts[label]:
                continue  # a class of no label, or a second key of the same label: the first wins
            for t in self.texts[c]:
                versus = to_label.get(t.versus) if t.versus is not None else None
                if t.kind == "ovo" and versus is None:
                    continue  # its other class is not in this label set
                texts[label].append(Text(t.text, t.kind, t.source, versus, dict(t.extra)))
        return TextSet(list(classnames), texts, dict(self.meta), list(self.dropped))

    # --- JSON ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            **self.meta,
            "classes": self.classes,
            "counts": {"texts": self.count(KINDS), "vector": self.count(), "by_source": self.by_source()},
            "texts": {c: [t.to_json() for t in self.texts[c]] for c in self.classes},
            "dropped": self.dropped,
        }

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


_TEXT_KEYS = {"text", "kind", "source", "versus"}


def read_textset(path: str | Path) -> TextSet:
    """Read a text set written by `xm texts` (and perhaps edited by hand); one line per problem."""
    path = Path(path)
    data = read_json(path, "text-set file", " (write one with `xm texts`)")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise XMError(f"{path}: not an xm text set (expected \"format\": \"{FORMAT}\"; `xm texts` writes one)")
    texts_raw = data.get("texts")
    if not isinstance(texts_raw, dict):
        raise XMError(f"{path}: 'texts' must be an object of class -> list of texts")
    classes = data.get("classes") or list(texts_raw)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise XMError(f"{path}: 'classes' must be a list of class names")
    texts: dict[str, list[Text]] = {}
    for c in classes:
        rows = texts_raw.get(c, [])
        if not isinstance(rows, list):
            raise XMError(f"{path}: texts of class {c!r} must be a list")
        out = []
        for i, r in enumerate(rows):
            if isinstance(r, str):  # a bare string is an attribute-like text written by hand
                r = {"text": r, "kind": "attribute", "source": "file"}
            if not isinstance(r, dict) or not isinstance(r.get("text"), str) or not r["text"].strip():
                raise XMError(f"{path}: class {c!r}, text {i}: needs a non-empty 'text'")
            out.append(Text(r["text"], str(r.get("kind", "attribute")), str(r.get("source", "file")),
                            r.get("versus"), {k: v for k, v in r.items() if k not in _TEXT_KEYS}))
        texts[c] = out
    extra = sorted(set(texts_raw) - set(classes))
    if extra:
        raise XMError(f"{path}: texts for {', '.join(map(repr, extra[:5]))}, which 'classes' does not list")
    meta = {k: v for k, v in data.items() if k not in ("format", "classes", "texts", "dropped", "counts")}
    ts = TextSet(list(classes), texts, meta, list(data.get("dropped") or []))
    ts.check(str(path))
    return ts
