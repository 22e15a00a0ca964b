"""Method options from the command line: named flags plus generic `--opt NAME=VALUE`, one dict.

Values stay strings here; each method's `Option.coerce` types and validates them (one place).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xm.errors import XMError


def method_options(generic: Sequence[str], **named: Any) -> dict[str, Any]:
    out: dict[str, Any] = {k: str(v) if isinstance(v, Path) else v for k, v in named.items() if v is not None}
    for item in generic:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise XMError(f"--opt {item!r}: expected NAME=VALUE (see `xm methods` for each method's options)")
        if name in out:
            raise XMError(f"--opt {item!r}: option {name} is given twice")
        out[name] = value
    return out
