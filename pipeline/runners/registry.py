"""The registry of runners: which one a `--distributor` value means. A new distributor is one
module (a `Runner` subclass) and one line here (or `register` from outside xm)."""

from __future__ import annotations

from xm.errors import XMError
from xm.pipeline.runners.base import Runner
from xm.pipeline.runners.local import LocalRunner
from xm.pipeline.runners.spark import SparkRunner

_RUNNERS: dict[str, type[Runner]] = {r.name: r for r in (LocalRunner, SparkRunner)}


def register(runner: type[Runner]) -> type[Runner]:
    """Add (or replace) the runner of `--distributor runner.name`; returns it (usable as a decorator)."""
    _RUNNERS[runner.name] = runner
    return runner


def unregister(name: str) -> None:
    _RUNNERS.pop(name, None)


def get(distributor: str) -> type[Runner]:
    """The runner kind of a `--distributor` value, or one line naming the choices."""
    if distributor not in _RUNNERS:
        names = list(_RUNNERS)
        choices = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise XMError(f"--distributor {distributor!r}: choose {choices}")
    return _RUNNERS[distributor]
