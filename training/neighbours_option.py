"""`--neighbours`: how RECO's neighbour tables are searched, parsed once at the edge (no torch
here: the CLI's help text imports it at every start)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xm.errors import XMError

NEIGHBOURS = ("auto", "exact", "index")
NEIGHBOURS_HELP = ("how RECO's neighbour tables are searched: exact (every stored embedding, streamed to --device; "
                   "training/exact_knn.py) | index (the memory's kNN index, on the CPU, approximate where the index is) | "
                   "auto (exact on cuda or mps, index on the CPU)")


@dataclass(frozen=True)
class Neighbours:
    """`--neighbours` as given (`asked`); `resolve(device)` says what runs there."""

    asked: str = "auto"

    @classmethod
    def parse(cls, text: str | Neighbours | None, flag: str = "--neighbours") -> Neighbours:
        if isinstance(text, Neighbours):
            return text
        value = "auto" if text is None else str(text).strip().lower()
        if value not in NEIGHBOURS:
            raise XMError(f"{flag} {text!r}: choose from {', '.join(NEIGHBOURS)}")
        return cls(value)

    def resolve(self, device: Any) -> str:
        """`exact` or `index` on `device` (an `xm.encoders.device.Device`): auto is exact where
        the device is an accelerator, where it costs least; on the CPU the index answers sooner."""
        if self.asked != "auto":
            return self.asked
        return "exact" if device.is_accelerator else "index"
