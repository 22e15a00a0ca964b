"""Matching the class keys of a descriptions or texts file to a benchmark's labels.

A key matches a label when the two agree ignoring case, underscores, CamelCase joins and
extra spaces (`forest`, `Forest`, `annual_crop_land`, `AnnualCropLand`), or when both are
names of the same class under two namings xm ships (CLIP_benchmark's and CoOp's:
`brushland or shrubland` is `Herbaceous Vegetation Land`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from xm.errors import XMError
from xm.evaluation.classnames import namings

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def match_key(name: str) -> str:
    """The form two names are compared in."""
    return " ".join(_CAMEL.sub(" ", name).replace("_", " ").replace("-", " ").lower().split())


class ClassMatcher:
    """Keys -> labels of one label set (`label(key)` is None for a key of no label)."""

    def __init__(self, classnames: Sequence[str], dataset: str | None = None) -> None:
        self.classnames = list(classnames)
        self.index: dict[str, str] = {}
        for c in self.classnames:
            self.index.setdefault(match_key(c), c)
        # the other namings of the same classes: a label in one naming takes the names of its row in every other
        for naming in namings(dataset):
            if len(naming) != len(self.classnames):
                continue
            rows = [self.index.get(match_key(n)) for n in naming]
            for other in namings(dataset):
                if len(other) == len(naming):
                    for label, alias in zip(rows, other):
                        if label is not None:
                            self.index.setdefault(match_key(alias), label)

    def label(self, key: str) -> str | None:
        return self.index.get(match_key(key))

    def require_all(self, matched: Iterable[str], where: str, keys: Iterable[str], hint: str = "rename its keys") -> None:
        """One line naming the labels no key matched (and the keys that matched no label)."""
        missing = [c for c in self.classnames if c not in set(matched)]
        if not missing:
            return
        spare = sorted({k for k in keys if self.label(k) is None})
        raise XMError(f"{where}: no key matches class(es) {', '.join(map(repr, missing[:5]))}"
                      f"{' ...' if len(missing) > 5 else ''}"
                      f"{'; keys matching no class: ' + ', '.join(map(repr, spare[:5])) if spare else ''}"
                      f"; if the file names the classes otherwise: {hint}, or give the benchmark the file's "
                      f"names with --classnames FILE")
