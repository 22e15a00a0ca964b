"""Descriptions files: DCLIP's JSON format, and xm's sectioned extension (docs/coder.md).

DCLIP and CuPL publish their descriptors as one JSON object, class -> list of sentences:

    {"forest": ["tall trees", "a dense green canopy"], "river": ["a winding blue line", ...]}

That file is read as it is (its sentences are CODER's attribute texts). For analogous
classes and one-vs-one difference texts, the sectioned form holds up to three sections,
each keyed by class (every value an object, which no DCLIP file has, so the two forms
never mix up):

    {"descriptors": {"forest": ["tall trees", ...]},
     "analogous":   {"forest": ["woodland", "jungle"]},
     "differences": {"forest": {"river": ["dense trees instead of water", ...]}}}

`differences[c][c']` lists the attributes in which c differs from c' (the rerank's
ovo(c, c'); rendered through the dataset's one-vs-one templates, `xm.texts.templates`).
Class keys match the labels under either naming (`xm.texts.classmatch`); a label that no
key of the file matches is refused in one line that names it and mentions `--classnames`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xm.errors import XMError
from xm.texts.classmatch import ClassMatcher
from xm.userfiles import read_json

SECTIONS = ("descriptors", "analogous", "differences")


def norm_name(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


@dataclass
class Descriptions:
    """A descriptions file matched to a label set (keys are the label names)."""

    path: str
    descriptors: dict[str, list[str]] = field(default_factory=dict)
    analogous: dict[str, list[str]] = field(default_factory=dict)
    differences: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # classes of the file not in the label set

    def classes_described(self) -> int:
        return sum(1 for v in self.descriptors.values() if v)


def _strings(path: Path, where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise XMError(f"{path}: {where} must be a list of strings")
    return [s.strip() for s in value if s.strip()]


def read_descriptions(path: str | Path, classnames: Sequence[str], dataset: str | None = None) -> Descriptions:
    """Read a DCLIP-format or sectioned descriptions file for the label set `classnames`
    (keys matched under either naming of `dataset`'s classes); every label needs a key."""
    path = Path(path)
    data = read_json(path, "descriptions file")
    if not isinstance(data, dict) or not data:
        raise XMError(f"{path}: descriptions must be a JSON object, class -> list of sentences (DCLIP format)")
    if all(isinstance(v, list) for v in data.values()):
        sections: dict[str, Any] = {"descriptors": data}
    elif all(isinstance(v, dict) for v in data.values()):
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise XMError(f"{path}: unknown section(s) {', '.join(map(repr, unknown))}; a sectioned descriptions file "
                          f"holds {', '.join(SECTIONS)}")
        sections = data
    else:
        raise XMError(f"{path}: mixes lists and objects at the top level; use either DCLIP's class -> list form "
                      f"or the sections {', '.join(SECTIONS)}")

    matcher = ClassMatcher(classnames, dataset)
    out = Descriptions(str(path))
    unmatched: set[str] = set()
    matched: set[str] = set()
    keys: list[str] = []

    def label(key: str) -> str | None:
        keys.append(key)
        name = matcher.label(key)
        if name is None:
            unmatched.add(key)
        else:
            matched.add(name)
        return name

    for key, sentences in (sections.get("descriptors") or {}).items():
        s = _strings(path, f"descriptors of {key!r}", sentences)
        if (c := label(key)) is not None:
            out.descriptors.setdefault(c, []).extend(s)
    for key, names in (sections.get("analogous") or {}).items():
        s = _strings(path, f"analogous classes of {key!r}", names)
        if (c := label(key)) is not None:
            out.analogous.setdefault(c, []).extend(s)
    for key, others in (sections.get("differences") or {}).items():
        if not isinstance(others, dict):
            raise XMError(f"{path}: differences of {key!r} must be an object, other class -> list of sentences")
        c = label(key)
        for other, sentences in others.items():
            s = _strings(path, f"differences of {key!r} from {other!r}", sentences)
            o = label(other)
            if c is not None and o is not None and o != c:
                out.differences.setdefault(c, {}).setdefault(o, []).extend(s)
    out.unmatched = sorted(unmatched)
    matcher.require_all(matched, str(path), keys)
    return out
