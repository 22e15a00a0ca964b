"""Keeping libraries' output where it belongs: xm's stdout is for results (`--json`), and
each warning is one line of ours.

img2dataset prints progress on stdout (in its worker processes too, so this works on the
file descriptors, not `sys.stdout`); faiss prints clustering warnings from C++ on fd 2.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 (and `sys.stdout`) to stderr for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def captured_stderr(lines: list[str]) -> Iterator[None]:
    """Capture fd 2 into `lines` (for C++ warnings the caller summarises itself)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as buf:
        try:
            os.dup2(buf.fileno(), 2)
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            lines.extend(buf.read().decode("utf-8", "replace").splitlines())
