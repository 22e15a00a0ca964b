"""Reading the files a user hands xm (labels, descriptions, text sets): one clear line per problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xm.errors import XMError


def read_text(path: str | Path, what: str, hint: str = "") -> str:
    """The file as UTF-8 text (a BOM tolerated); `what` names it in errors, `hint` says what to do."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise XMError(f"{path}: {what} not found{hint}") from exc
    except UnicodeDecodeError as exc:
        raise XMError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise XMError(f"{path}: unreadable {what} ({exc.strerror or exc})") from exc


def read_json(path: str | Path, what: str, hint: str = "") -> Any:
    text = read_text(path, what, hint)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise XMError(f"{path}: {what} is not JSON ({exc})") from exc
