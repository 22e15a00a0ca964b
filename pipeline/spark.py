"""The build past one machine: one SparkSession for every distributed stage.

img2dataset (download) and autofaiss (index) both distribute on Spark and both pick up
the session that is active when they are called, so xm creates exactly one, before the
first of them, from `--spark-master` and `--spark-conf` (or uses spark-submit's). xm's
own stages run on it as tasks whose unit of work is plain data (a dict naming the build
and the part, see `tasks.py`): an executor re-derives everything else from the shared
`--out` folder, so a task can be retried or run twice and writes the same files (every
file is renamed into place, the part's marker last).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from xm.errors import XMError
from xm.indexes.manifest import package_versions

# Versions that must agree between the driver and every executor: a part embedded or an
# index trained under another faiss or xm would not be the index the manifest describes.
CHECKED_PACKAGES = ("xm-retrieval", "faiss-cpu", "autofaiss", "img2dataset")

_MASTER = re.compile(r"^(local(\[(\*|\d+)(,\d+)?\])?|spark://[^\s/]+(:\d+)?(,[^\s/]+(:\d+)?)*|yarn|k8s://\S+|local-cluster\[\d+,\d+,\d+\])$")


def check_spark_options(master: str | None, conf: Sequence[str]) -> None:
    """--spark-master and --spark-conf, checked once (one line naming the option); pyspark and
    Java must be there, since nothing later can work without them."""
    if master is not None and not _MASTER.match(master):
        raise XMError(f"--spark-master {master!r}: expected local, local[N], local[N,F], local[*], spark://HOST:PORT, yarn or k8s://URL")
    for item in conf:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip() or not key.strip().startswith("spark."):
            raise XMError(f"--spark-conf {item!r}: expected spark.KEY=VALUE")
    try:
        import pyspark  # noqa: F401
    except ImportError as exc:
        raise XMError("--distributor pyspark: pyspark is not installed; pip install -e '.[spark]' (needs Java 17+)") from exc
    if not (os.environ.get("JAVA_HOME") or shutil.which("java")):
        raise XMError("--distributor pyspark: no Java found (JAVA_HOME unset and no java on PATH); pyspark 4 needs Java 17+")


def parse_conf(conf: Sequence[str]) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (item.partition("=") for item in conf)}


@contextlib.contextmanager
def spark_session(master: str | None, conf: Sequence[str], app_name: str, ui: bool = False) -> Iterator[Any]:
    """The build's one session: spark-submit's if one is active (then --spark-master must agree
    or be absent), else a new one, stopped when the build ends. `ui` (--spark-ui): open Spark's
    web UI where a cluster can reach it; without it the UI listens on loopback only, or not at all."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        running = active.sparkContext.master
        if master and master != running:
            raise XMError(f"--spark-master {master}: a Spark session on {running} is already active (spark-submit); "
                          "drop --spark-master or submit to that master")
        if conf:
            raise XMError(f"--spark-conf {conf[0]}: a Spark session is already active (spark-submit), its settings are "
                          "fixed; pass them to spark-submit --conf instead")
        yield active
        return
    builder = SparkSession.builder.appName(app_name)
    if master or not SparkConf().contains("spark.master"):  # spark-submit's --master stands unless overridden
        builder = builder.master(master or "local[*]")
    settings = parse_conf(conf)
    # the Python (and so the xm) that runs the driver runs the tasks, unless the user says
    # otherwise; a context made from Python reads PYSPARK_PYTHON, not spark.pyspark.python
    os.environ.setdefault("PYSPARK_PYTHON", settings.get("spark.pyspark.python", sys.executable))
    settings.setdefault("spark.ui.showConsoleProgress", "false")  # xm shows its own progress
    _loopback_defaults(master or SparkConf().get("spark.master", "local[*]"), settings, ui)
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # py4j and the JVM launcher raise many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise XMError(f"--spark-master {master or 'local[*]'}: could not start Spark ({first})") from exc
    session.sparkContext.setLogLevel("ERROR")
    if ui and session.sparkContext.uiWebUrl:
        print(f"xm: Spark UI at {session.sparkContext.uiWebUrl}", file=sys.stderr, flush=True)
    try:
        yield session
    finally:
        session.stop()


def _loopback_defaults(master: str, settings: dict[str, str], ui: bool) -> None:
    """Spark's web UI listens on every interface (SPARK_LOCAL_IP, else 0.0.0.0) and shows the
    build's paths and settings to anyone on the network. A local master needs no network at all:
    the driver and its UI are bound to loopback. A cluster's driver must be reachable by its
    executors, so its address is left to Spark, and the UI is off unless --spark-ui asks for it.
    What --spark-conf or the environment says wins."""
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # read by the JVM xm starts: where the UI binds
        settings.setdefault("spark.driver.bindAddress", "127.0.0.1")
        settings.setdefault("spark.driver.host", "127.0.0.1")
    elif not ui:
        settings.setdefault("spark.ui.enabled", "false")


def active_session() -> Any:
    """The session the build started, which img2dataset and autofaiss pick up; refuse to go on
    without one (either would start its own local one, with a 16G driver)."""
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession() or SparkSession._instantiatedSession
    if session is None:
        raise XMError("--distributor pyspark: no SparkSession is running; the build starts one from --spark-master")
    return session


# ---------------------------------------------------------------- preflight

def _probe_executor(token_file: str, token: str, bucket: str | None, _: Any) -> dict[str, Any]:
    """On an executor: who it is, whether it sees the driver's --out (or reaches `bucket`, where
    the tasks write themselves), its package versions."""
    problem = None
    if bucket is not None:
        from xm.indexes import object_store

        try:  # with the executor's own environment, as its tasks will
            object_store.check_writable(bucket, "--out")
        except XMError as exc:
            problem = str(exc)
    else:
        try:
            seen = Path(token_file).read_text() == token
        except OSError:
            seen = False
        problem = None if seen else "not seen"
    versions = package_versions()
    return {"host": socket.gethostname(), "sees_out": problem is None, "problem": problem,
            "versions": {k: versions.get(k) for k in CHECKED_PACKAGES}}


def preflight(spark: Any, out: Path, bucket: str | None = None) -> int:
    """A short job of one task per task slot (Spark spreads them over the executors it has, but
    does not promise to reach each): each must see `out` at the same path (or, where the tasks
    write to object storage themselves, reach `bucket` with its own environment) and run the
    driver's xm, faiss, autofaiss and img2dataset; otherwise one line. Returns the task slots."""
    folder = out / "_work" / "spark-preflight"
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    token_file = folder / f"{token}.txt"
    token_file.write_text(token)
    slots = max(1, int(spark.sparkContext.defaultParallelism))
    try:
        probes = run_tasks(spark, functools.partial(_probe_executor, str(token_file), token, bucket), list(range(max(2, slots))),
                           "xm preflight")
    finally:
        token_file.unlink(missing_ok=True)
    mine = package_versions()
    for p in probes:
        if not p["sees_out"] and bucket is not None:
            raise XMError(f"executor on {p['host']}: {p['problem']} (executors build the filesystem from their own "
                          "environment: pass it with --spark-conf spark.executorEnv.NAME=VALUE)")
        if not p["sees_out"]:
            raise XMError(f"--out {out}: not visible from the executor on {p['host']} at the same path; put --out on "
                          "storage every executor mounts there (NFS, a shared volume)")
        for name in CHECKED_PACKAGES:
            if p["versions"].get(name) != mine.get(name):
                raise XMError(f"executor on {p['host']}: {name} {p['versions'].get(name)}, the driver has {mine.get(name)}; "
                              "install the same versions on every node")
    return slots


# ---------------------------------------------------------------- tasks

def run_tasks(spark: Any, fn: Callable[[Any], Any], jobs: list[Any], description: str,
              on_done: Callable[[int], None] | None = None) -> list[Any]:
    """One Spark task per job (`fn` a module-level function, jobs plain data); results in job
    order. `on_done(n)` is told as tasks finish (polled from Spark's status tracker)."""
    if not jobs:
        return []
    sc = spark.sparkContext
    group = f"xm-{uuid.uuid4().hex[:8]}"
    result: dict[str, Any] = {}

    def collect() -> None:
        sc.setJobGroup(group, description, interruptOnCancel=True)
        try:
            result["value"] = sc.parallelize(jobs, len(jobs)).map(fn).collect()
        except BaseException as exc:  # re-raised on the calling thread
            result["error"] = exc

    worker = threading.Thread(target=collect, daemon=True)
    worker.start()
    reported = 0
    try:
        while worker.is_alive():
            worker.join(0.5)
            if on_done is not None:
                done = _finished_tasks(sc, group)
                if done > reported:
                    on_done(done - reported)
                    reported = done
    except KeyboardInterrupt:
        sc.cancelJobGroup(group)
        raise
    if "error" in result:
        raise _task_error(result["error"], description)
    if on_done is not None and len(jobs) > reported:
        on_done(len(jobs) - reported)
    return result["value"]


def _finished_tasks(sc: Any, group: str) -> int:
    tracker = sc.statusTracker()
    done = 0
    for job_id in tracker.getJobIdsForGroup(group):
        job = tracker.getJobInfo(job_id)
        for stage_id in (job.stageIds if job else []):
            stage = tracker.getStageInfo(stage_id)
            done += stage.numCompletedTasks if stage else 0
    return done


def _task_error(exc: BaseException, description: str) -> BaseException:
    """An XMError raised inside a task comes back wrapped in a Py4J/Spark error: keep its one line.
    Any other failure keeps its cause: Spark's reason for aborting the job (a result past
    spark.driver.maxResultSize, a lost executor), else the task's own exception line, never
    only Py4J's "An error occurred while calling ..."."""
    text = str(exc)
    match = re.search(r"xm\.errors\.XMError: (.+)", text)
    if match:
        return XMError(match.group(1).strip())
    return XMError(f"{description}: a Spark job failed ({spark_cause(exc)[:300]})")


def spark_cause(exc: BaseException) -> str:
    """The line of a Spark/Py4J error that says why."""
    text = str(exc)
    aborted = re.search(r"Job aborted due to stage failure: (.+)", text)
    if aborted:
        return aborted.group(1).strip()
    # a Python exception inside the task: its last "SomeError: message" line of the traceback
    raised = re.findall(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", text, flags=re.MULTILINE)
    meaningful = [f"{name}: {msg.strip()}" for name, msg in raised if "Py4J" not in name and "occurred while calling" not in msg]
    if meaningful:
        return meaningful[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and "occurred while calling" not in line]
    return lines[0] if lines else type(exc).__name__


def task_threads() -> int:
    """Inside a task: the cores Spark gave it (spark.task.cpus), so tasks sharing an executor
    do not oversubscribe it."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return max(1, int(ctx.cpus())) if ctx is not None else max(1, os.cpu_count() or 1)


def task_gpu() -> str | None:
    """Inside a task: the GPU address Spark assigned it (spark.task.resource.gpu.amount), if any."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    resources = ctx.resources() if ctx is not None else {}
    gpu = resources.get("gpu")
    return gpu.addresses[0] if gpu is not None and gpu.addresses else None


def cores_per_task() -> int:
    """On the driver: the cores each task gets (spark.task.cpus of the running session; 1 by
    default), what a library running its own tasks (autofaiss's `nb_cores`) must use per task."""
    session = active_session()
    return max(1, int(session.sparkContext.getConf().get("spark.task.cpus", "1")))
