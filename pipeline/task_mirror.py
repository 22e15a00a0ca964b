"""Spark tasks that write their part to object storage themselves (`--out s3://...` on a
cluster with no disk shared by the driver and the executors).

A task of the build (embed, store, index training, checksums) is the same function as on one
machine, run against a folder of its own: `InBucket` makes a private folder on the executor
(under its temporary directory, `TMPDIR`: the container's local disk on YARN or k8s), pulls
into it only what the task reads (`reads`: its part's marker and checkpoint, the source's
pinned inputs, one metadata part...), runs the task there, then pushes what the task wrote
(`object_store.push`): every file whole (object storage's uploads are never visible
part-written; elsewhere a temporary name and a rename), the part's marker after its files, and
removes the folder. So exactly-once is what it was on a shared disk: a task killed before its
marker is pushed leaves whole files of a part no marker lists (the next attempt overwrites them
with the same bytes), a speculative copy writes the same bytes, and the driver reads only
markers (`STATE`, pulled after each job), never the part files.

Executors build the filesystem from their own environment, as img2dataset's and autofaiss's
executors do (fsspec's `FSSPEC_S3_*` settings, `AWS_*` credentials, an instance role): set them
with `--spark-conf spark.executorEnv.NAME=VALUE` where the nodes lack them; the preflight
checks that every executor reaches the bucket.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xm.indexes import object_store
from xm.indexes.layout import Layout
from xm.pipeline.faults import kill_point

# what the driver pulls after each job of tasks: the markers and the kept trained indexes (small)
STATE = ("_work/done/", "_work/autofaiss-trained/")
# what the driver never pulls (the tasks' part files); it reads their listing instead
PART_FILES = ("embeddings/", "store/part-", "store/rows-", "_work/rows/", "_work/checkpoint/", "_work/store-hashes/", "_work/autofaiss/",
              "_work/download/", "_work/laion/")
# inputs a task fetched for itself (LAION's embedding parts): never pushed
_NOT_PUSHED = ("_work/laion/",)


def _moved(value: Any, old: str, new: str) -> Any:
    """`value` (a job: plain data) with every path under `old` made the same path under `new`."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + "/") else value
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_moved(v, old, new) for v in value)
    return value


def reads(job: Any) -> list[str]:
    """What a task reads under --out (relative paths; a trailing "/": a folder), as its job says
    (`"reads"`, set where the job is made: the embed, store and training jobs); a job that says
    nothing reads nothing there (the checksum tasks stream their files, `Runner.readable`)."""
    return list(job.get("reads", [])) if isinstance(job, dict) else []


def embed_reads(layout: Layout, part: str, inputs: list[str] | None) -> list[str]:
    """An embed task's: its part's marker (done already?) and checkpoint, and the source's `inputs`."""
    return [layout.rel(layout.done_marker("embed", part)), layout.rel(layout.checkpoint_dir("embed", part)) + "/", *(inputs or [])]


@dataclass(frozen=True)
class InBucket:
    """`fn` as a task that works in a private folder and writes to `url` (the build's --out);
    `root`: the driver's staging folder, which the jobs name."""

    fn: Callable[[Any], Any]
    url: str
    root: str

    def __call__(self, job: Any) -> Any:
        folder = Path(tempfile.mkdtemp(prefix="xm-task-"))
        try:
            object_store.pull(self.url, folder, "--out", only=reads(job))
            result = self.fn(_moved(job, self.root, str(folder)))
            part = job.get("part", "") if isinstance(job, dict) else ""
            object_store.push(folder, self.url, "--out", skip=_NOT_PUSHED, deletions=True,
                              on_file=kill_point("push", part))
            return _moved(result, str(folder), self.root)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            folder.with_name(f"{folder.name}.xm-sync.json").unlink(missing_ok=True)
