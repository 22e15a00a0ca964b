"""`--distributor pyspark`: the build's one SparkSession (`pipeline/spark.py`), started before
img2dataset and autofaiss look for it, every executor checked first; xm's jobs run as one
Spark task each."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from xm.indexes.layout import Layout
from xm.pipeline import spark
from xm.pipeline.runners.base import Runner, RunnerOptions


class SparkRunner(Runner):
    """One Spark task per job on the build's session."""

    name = "pyspark"
    img2dataset_distributor = "pyspark"
    autofaiss_distributed = "pyspark"
    in_process = False
    tasks = "Spark tasks"
    absolute_paths = True

    def __init__(self, session: Any, description: str, stack: contextlib.ExitStack | None = None) -> None:
        self.session = session
        self.description = description
        self._stack = stack

    @classmethod
    def check_options(cls, options: RunnerOptions) -> None:
        spark.check_spark_options(options.spark_master, options.spark_conf)

    @classmethod
    def open(cls, options: RunnerOptions, layout: Layout) -> SparkRunner:
        with contextlib.ExitStack() as stack:
            session = stack.enter_context(spark.spark_session(options.spark_master, options.spark_conf,
                                                              f"xm build-index {layout.root.name}",
                                                              ui=options.spark_ui))
            slots = spark.preflight(session, layout.root)
            runner = cls(session, f"Spark {session.sparkContext.master} ({slots} task slots)", stack.pop_all())
        return runner

    def map(self, fn: Callable[[Any], Any], jobs: list[Any], description: str,
            on_done: Callable[[int], None] | None = None) -> list[Any]:
        return spark.run_tasks(self.session, fn, jobs, description, on_done)

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @classmethod
    def task_threads(cls) -> int:
        return spark.task_threads()  # the cores Spark gave the task, not every core of the node

    @classmethod
    def task_gpu(cls) -> str | None:
        return spark.task_gpu()
