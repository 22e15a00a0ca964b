"""The `Runner` interface: where the build's units of work run, and everything else that
differs between running here and running on a cluster (img2dataset's distributor, autofaiss's
`distributed`, the cores a task may use, whether paths must be absolute, the summary's line).

A runner kind is chosen once, from `--distributor` (`registry.get`); `BuildConfig.runner_kind`
holds it, and every stage asks it rather than comparing the flag's string.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from xm.indexes.layout import Layout


class RunnerOptions(Protocol):
    """The build options a runner reads (`BuildConfig` has them)."""

    @property
    def spark_master(self) -> str | None: ...

    @property
    def spark_conf(self) -> Sequence[str]: ...

    @property
    def spark_ui(self) -> bool: ...

    @property
    def bucket(self) -> str | None: ...


class Runner:
    """One build's runner, open from `open` until `close`."""

    name: ClassVar[str]  # the --distributor value
    img2dataset_distributor: ClassVar[str]  # img2dataset's `distributor` argument
    autofaiss_distributed: ClassVar[str | None] = None  # autofaiss's `distributed` argument; None: one machine
    # jobs run here, one after another: the build embeds in this process with the encoders loaded
    # once and counts progress in rows; otherwise one task per part, progress in parts
    in_process: ClassVar[bool] = True
    tasks: ClassVar[str] = ""  # what a job is called in progress labels ("Spark tasks")
    # tasks run in other working directories: every local path in the options is made absolute
    absolute_paths: ClassVar[bool] = False

    description: str = "this machine"  # the summary's "ran on"

    @classmethod
    def check_options(cls, options: RunnerOptions) -> None:
        """Refuse options this runner cannot take (one line naming the option)."""

    @classmethod
    def open(cls, options: RunnerOptions, layout: Layout) -> Runner:
        """The build's runner (a session started, its executors checked); `close` ends it."""
        return cls()

    def map(self, fn: Callable[[Any], Any], jobs: list[Any], description: str,
            on_done: Callable[[int], None] | None = None) -> list[Any]:
        """`fn` (a module-level function) over `jobs` (plain data); results in job order.
        `on_done(n)` is told as jobs finish."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what `open` started."""

    def readable(self, path: Path) -> str:
        """Where this runner's tasks read a file of the build (`path` as the driver names it)."""
        return str(path)

    @classmethod
    def task_threads(cls) -> int:
        """Inside a task: the cores it may use."""
        return max(1, os.cpu_count() or 1)

    @classmethod
    def task_gpu(cls) -> str | None:
        """Inside a task: the GPU it was given, if the runner assigns one."""
        return None
