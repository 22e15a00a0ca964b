"""Fault injection for tests and debugging, where a task can be killed part-way (no xm imports:
the tasks and the code that runs them both use it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def kill_point(stage: str, part: str) -> Callable[[int], None]:
    """Tests: XM_KILL_TASK_ONCE=FILE, where FILE holds '<stage> <part>', kills the process that
    runs that part mid-way (after some of its files are in place, before its marker), once:
    the file is removed first, so the retried task completes."""
    token = os.environ.get("XM_KILL_TASK_ONCE")
    if not token or not os.path.isfile(token):
        return lambda n: None
    try:
        wanted = Path(token).read_text().split()
    except OSError:
        return lambda n: None
    if wanted != [stage, part]:
        return lambda n: None
    seen = [0]

    def tick(n: int) -> None:
        seen[0] += 1
        if seen[0] == 2:  # the second caption batch: the first encoder's caption file is written
            try:
                os.unlink(token)
            except FileNotFoundError:
                return  # another attempt took the kill already
            os._exit(137)

    return tick
