"""Memory sizes as autofaiss takes them ("4G", "512M", "16GB")."""

from __future__ import annotations

import re

from xm.errors import XMError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(flag: str, text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise XMError(f"{flag} {text!r}: expected a size like 512M, 4G or 16GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
