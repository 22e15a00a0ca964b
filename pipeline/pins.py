"""A build folder remembers the parameters each of its resumable steps was started with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xm.errors import XMError
from xm.indexes.layout import write_json


def pin_params(path: Path, params: dict[str, Any], what: str) -> None:
    """Record the parameters a build folder was started with; refuse to resume it with others."""
    if path.is_file():
        before = json.loads(path.read_text())
        if before != params:
            raise XMError(f"{path}: this build folder was started with other {what} ({before}); "
                          "use a new --out, or delete the folder to start over")
    else:
        write_json(path, params)
