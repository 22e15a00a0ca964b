"""`--distributor multiprocessing`: everything on this machine; img2dataset downloads with
its process pool, xm's jobs run one after another in this process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xm.errors import XMError
from xm.pipeline.runners.base import Runner, RunnerOptions


class LocalRunner(Runner):
    """Jobs one after another in this process."""

    name = "multiprocessing"
    img2dataset_distributor = "multiprocessing"

    @classmethod
    def check_options(cls, options: RunnerOptions) -> None:
        if options.spark_master or options.spark_conf or options.spark_ui:
            flag = "--spark-master" if options.spark_master else "--spark-conf" if options.spark_conf else "--spark-ui"
            raise XMError(f"{flag}: only with --distributor pyspark")

    def map(self, fn: Callable[[Any], Any], jobs: list[Any], description: str,
            on_done: Callable[[int], None] | None = None) -> list[Any]:
        out = []
        for job in jobs:
            out.append(fn(job))
            if on_done is not None:
                on_done(1)
        return out
