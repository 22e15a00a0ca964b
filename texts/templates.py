"""The CODER authors' per-dataset text templates, read from `coder_templates.json` (data
transcribed from their released `template.py`; the file names its source).

A dataset's templates are its own entry over the `default` one, kind by kind: `name`
(also renders WordNet synonyms), `attribute` and `analogous` (each per task, `zero-shot`
or `few-shot`: the authors switch two datasets' templates between their zero-shot and
few-shot runs) and `ovo` (every one-vs-one attribute is rendered through each of these).
Placeholders: `{c}`, `{att}`, `{ana}`, `{ovo}`, `{other}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from xm.errors import XMError

DATA = Path(__file__).with_name("coder_templates.json")
TASKS = ("zero-shot", "few-shot")


@dataclass(frozen=True)
class CoderTemplates:
    """The templates CODER renders one dataset's texts with."""

    dataset: str  # the authors' key ("default" when the dataset has no entry)
    name: tuple[str, ...]
    attribute: tuple[str, ...]
    analogous: tuple[str, ...]
    ovo: tuple[str, ...]
    filter_template: str  # the analogous filter renders candidates and class names with this
    filter_max_similarity: float

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "name": list(self.name), "attribute": list(self.attribute),
                "analogous": list(self.analogous), "ovo": list(self.ovo)}


@lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    return json.loads(DATA.read_text(encoding="utf-8"))


def authors_key(dataset: str | None) -> str | None:
    """The authors' spelling of an xm dataset name (`food101` -> `food-101`), or None."""
    if not dataset:
        return None
    data = _data()
    key = dataset.strip()
    if key in data["datasets"]:
        return key
    return data["aliases"].get(key.lower().replace(" ", "_"))


def datasets() -> list[str]:
    """Every dataset the authors' template file lists (their spelling)."""
    return list(_data()["datasets"])


def coder_templates(dataset: str | None, task: str = "zero-shot") -> CoderTemplates:
    """The authors' templates for `dataset` (xm's or their name) in a zero-shot or few-shot run."""
    if task not in TASKS:
        raise XMError(f"CODER templates: task {task!r}; choose from {', '.join(TASKS)}")
    data = _data()
    key = authors_key(dataset)
    own = data["datasets"].get(key, {}) if key else {}
    base = data["default"]

    def pick(kind: str) -> tuple[str, ...]:
        value = own.get(kind, base[kind])
        return tuple(value[task] if isinstance(value, dict) else value)

    flt = data["analogous_filter"]
    return CoderTemplates(key or "default", pick("name"), pick("attribute"), pick("analogous"), pick("ovo"),
                          flt["template"], float(flt["max_similarity"]))


def fill(template: str, **values: str) -> str:
    """`template` with each `{key}` replaced (plain replacement: class names may hold braces)."""
    out = template
    for k, v in values.items():
        out = out.replace("{" + k + "}", v)
    return out
