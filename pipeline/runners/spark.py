"""`--distributor pyspark`: the build's one SparkSession (`pipeline/spark.py`), started before
img2dataset and autofaiss look for it, every executor checked first; xm's jobs run as one
Spark task each. With `--out` on object storage and a source whose tasks say what they read
(`options.bucket`), each task works in a folder of its own and writes to the bucket itself
(`pipeline/task_mirror.py`); the driver then pulls only the markers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xm.indexes import object_store
from xm.indexes.layout import Layout
from xm.pipeline import spark
from xm.pipeline.runners.base import Runner, RunnerOptions
from xm.pipeline.task_mirror import STATE, InBucket


class SparkRunner(Runner):
    """One Spark task per job on the build's session."""

    name = "pyspark"
    img2dataset_distributor = "pyspark"
    autofaiss_distributed = "pyspark"
    in_process = False
    tasks = "Spark tasks"
    absolute_paths = True

    def __init__(self, session: Any, description: str, stack: contextlib.ExitStack | None = None,
                 bucket: str | None = None, root: str | None = None) -> None:
        self.session = session
        self.description = description
        self._stack = stack
        self.bucket, self.root = bucket, root  # tasks write to `bucket`; the driver's folder is `root`

    @classmethod
    def check_options(cls, options: RunnerOptions) -> None:
        spark.check_spark_options(options.spark_master, options.spark_conf)

    @classmethod
    def open(cls, options: RunnerOptions, layout: Layout) -> SparkRunner:
        with contextlib.ExitStack() as stack:
            session = stack.enter_context(spark.spark_session(options.spark_master, options.spark_conf,
                                                              f"xm build-index {layout.root.name}",
                                                              ui=options.spark_ui))
            slots = spark.preflight(session, layout.root, options.bucket)
            runner = cls(session, f"Spark {session.sparkContext.master} ({slots} task slots)", stack.pop_all(),
                         options.bucket, str(layout.root))
        return runner

    def map(self, fn: Callable[[Any], Any], jobs: list[Any], description: str,
            on_done: Callable[[int], None] | None = None) -> list[Any]:
        if self.bucket is None or self.root is None:
            return spark.run_tasks(self.session, fn, jobs, description, on_done)
        object_store.push(Path(self.root), self.bucket, "--out")  # what the driver wrote that the tasks read (pins, listings)
        results = spark.run_tasks(self.session, InBucket(fn, self.bucket, self.root), jobs, description, on_done)
        object_store.pull(self.bucket, Path(self.root), "--out", only=STATE)  # the markers the tasks wrote there
        return results

    def readable(self, path: Path) -> str:
        # tasks writing to the bucket: every file of the build is there (pushed after each stage)
        if self.bucket is None or self.root is None:
            return str(path)
        return f"{self.bucket}/{Path(path).relative_to(self.root).as_posix()}"

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
