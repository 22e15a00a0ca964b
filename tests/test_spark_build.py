"""The build on Spark (`--distributor pyspark`) against the build on this machine.

`local[2,3]`: two task slots and three attempts per task (plain `local` never retries),
so a killed task is retried as on a cluster. Real img2dataset downloads from a loopback
server, real open_clip, autofaiss on Spark, Parquet.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pyspark")

from conftest import TINY, TINY_ROLES, jpeg_bytes, make_image  # noqa: E402
from xm.encoders import load_encoder  # noqa: E402
from xm.errors import XMError  # noqa: E402
from xm.memories import open_index  # noqa: E402
from xm.pipeline import BuildConfig, build_index  # noqa: E402

pytestmark = pytest.mark.slow
N = 30
QUERIES = (0, 7, 13, 22, 29)


def _pairs(routes: dict[str, bytes], base: str, folder: Path) -> Path:
    rows = []
    for i in range(N):
        routes[f"/img/{i}.jpg"] = jpeg_bytes(make_image(i))
        rows.append((f"{base}/img/{i}.jpg", f"a memory photo number {i}"))
    rows.append((f"{base}/missing.jpg", "a dead link"))
    table = folder / "pairs.parquet"
    pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(table)
    return table


def _config(table: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(source=str(table), out=out, processes=1, threads=4, shard_size=10, timeout=5, shards=2,
                       **TINY_ROLES, **kw)


def _spark(table: Path, out: Path, *conf: str, master: str = "local[2,3]") -> BuildConfig:
    return _config(table, out, distributor="pyspark", spark_master=master, spark_conf=list(conf))


def _content(root: Path) -> dict:
    """What a build holds: embeddings by encoder and modality, captions by id, kNN results."""
    memory = open_index(root)
    coarse = load_encoder(TINY)
    queries = coarse.encode_images([make_image(i) for i in QUERIES])
    out = {"count": memory.count, "captions": memory.store.captions(range(memory.count)), "rows": memory.rows(range(memory.count)),
           "hashes": np.asarray(memory.caption_hashes).tolist()}
    for spec, entry in memory.manifest.encoders.items():
        for modality in entry.embedded:
            out[f"{spec}/{modality}"] = memory.embeddings(spec, modality).gather(np.arange(memory.count)).tobytes()
    for modality in ("image", "text"):
        sims, ids = memory.search(modality, queries, 8)
        out[f"knn/{modality}"] = (ids.tolist(), np.round(sims, 5).tolist())
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The same pairs built here and on Spark."""
    from conftest import _serve

    server = _serve(0.0)
    base, routes = next(server)
    root = tmp_path_factory.mktemp("spark")
    table = _pairs(routes, base, root)
    local = build_index(_config(table, root / "local"))
    spark = build_index(_spark(table, root / "spark"))
    yield {"table": table, "root": root, "local": local, "spark": spark, "routes": routes}
    server.close()


def test_spark_build_equals_local_build(built) -> None:
    assert built["spark"].count == built["local"].count == N
    assert built["spark"].failures == built["local"].failures and sum(built["spark"].failures.values()) == 1
    here, there = _content(built["root"] / "local"), _content(built["root"] / "spark")
    assert here.keys() == there.keys()
    for key in here:
        assert here[key] == there[key], key
    # the caption of a memory image is found from the image, on the Spark-built index
    memory = open_index(built["root"] / "spark")
    ids = there["knn/image"][0]
    assert [memory.store.captions(row[:1])[0] for row in ids] == [f"a memory photo number {i}" for i in QUERIES]
    # the selection is a folder of parquet files (img2dataset's driver reads each whole)
    assert sorted(p.name for p in (built["root"] / "spark/_work/select/urls").iterdir()) == ["part-00000.parquet"]


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and "_work" not in p.parts}


def test_spark_rerun_does_nothing(built) -> None:
    root = built["root"] / "spark"
    before = _mtimes(root)
    again = build_index(_spark(built["table"], root))
    assert _mtimes(root) == before  # not one artefact rewritten, the manifest included
    assert "embed: 4 part(s) already done" in again.skipped and "store: current" in again.skipped
    assert again.count == N and again.manifest_id == built["spark"].manifest_id


def test_killed_embed_task_is_retried_with_identical_output(built, tmp_path) -> None:
    token = tmp_path / "kill-once"
    token.write_text("embed 00001")
    out = built["root"] / "killed"
    summary = build_index(_spark(built["table"], out, f"spark.executorEnv.XM_KILL_TASK_ONCE={token}"))
    assert not token.exists(), "the task was never killed"
    assert summary.count == N
    killed, clean = _content(out), _content(built["root"] / "spark")
    for key in clean:
        assert killed[key] == clean[key], key


def test_spark_options_are_checked(tmp_path) -> None:
    table = tmp_path / "t.parquet"
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}).to_parquet(table)
    with pytest.raises(XMError, match="--spark-master 'mesos://x'"):
        build_index(_spark(table, tmp_path / "a", master="mesos://x"))
    with pytest.raises(XMError, match="--spark-conf 'executor.memory'"):
        build_index(_spark(table, tmp_path / "b", "executor.memory"))
    with pytest.raises(XMError, match="--spark-master: only with --distributor pyspark"):
        build_index(_config(table, tmp_path / "c", spark_master="local[2]"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_preflight_refuses_an_executor_that_cannot_see_out(tmp_path, monkeypatch) -> None:
    from xm.pipeline import spark as spark_mod

    def blind(spark, fn, jobs, description, on_done=None):
        probe = fn(0)  # the real probe, run here: it sees the token...
        return [probe, {**probe, "host": "node-7", "sees_out": False}]  # ...and one executor does not

    monkeypatch.setattr(spark_mod, "run_tasks", blind)

    class Context:
        defaultParallelism = 2

    class Session:
        sparkContext = Context()

    with pytest.raises(XMError, match=r"--out .*: not visible from the executor on node-7"):
        spark_mod.preflight(Session(), tmp_path)

    def stale(spark, fn, jobs, description, on_done=None):
        probe = fn(0)
        return [{**probe, "versions": {**probe["versions"], "faiss-cpu": "1.7.4"}}]

    monkeypatch.setattr(spark_mod, "run_tasks", stale)
    with pytest.raises(XMError, match="faiss-cpu 1.7.4, the driver has"):
        spark_mod.preflight(Session(), tmp_path)
    assert not list((tmp_path / "_work/spark-preflight").iterdir())  # its token file is gone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not listen on {port}")


def test_standalone_master_and_worker_on_loopback(built, tmp_path) -> None:
    """A real standalone cluster (master + one worker, both bound to 127.0.0.1) runs the CLI."""
    import pyspark

    spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
    env = {**os.environ, "SPARK_HOME": str(Path(pyspark.__file__).parent), "SPARK_LOCAL_IP": "127.0.0.1",
           "PYSPARK_PYTHON": sys.executable, "SPARK_WORKER_DIR": str(tmp_path / "work"), "SPARK_LOG_DIR": str(tmp_path / "logs")}
    port, ui, wui = _free_port(), _free_port(), _free_port()
    logs = open(tmp_path / "cluster.log", "wb")
    master = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(ui)], env=env, stdout=logs, stderr=logs)
    worker = None
    try:
        _wait_port(port, master, "the Spark master")
        worker = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                   "--cores", "2", "--memory", "2g", "--webui-port", str(wui), f"spark://127.0.0.1:{port}"],
                                  env=env, stdout=logs, stderr=logs)
        time.sleep(3)
        out = tmp_path / "idx"
        cmd = [sys.executable, "-m", "xm.cli", "build-index", "--source", str(built["table"]), "--out", str(out),
               "--coarse", TINY, "--fine", TINY_ROLES["fine"], "--inference", TINY, "--shard-size", "10",
               "--processes", "1", "--threads", "4", "--shards", "2", "--distributor", "pyspark",
               "--spark-master", f"spark://127.0.0.1:{port}", "--spark-conf", "spark.executor.memory=1g", "--json"]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (run.stderr[-3000:], (tmp_path / "cluster.log").read_text()[-3000:])
        here = _content(out)
        clean = _content(built["root"] / "local")
        for key in clean:
            assert here[key] == clean[key], key
    finally:
        for proc in (worker, master):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        logs.close()
        shutil.rmtree(tmp_path / "work", ignore_errors=True)
