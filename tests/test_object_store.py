"""`--out`, `--source` and a memory on object storage, against an S3-compatible server this
test starts on 127.0.0.1 (moto's ThreadedMotoServer, from PyPI: the `test` extra pins
`moto[server]`; s3fs is the `s3` extra). The build to `s3://` equals the build to a folder."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from conftest import TINY, TINY_ROLES, TINY_WIDE, make_image, write_caption_folder  # noqa: E402
from xm.encoders import load_encoder  # noqa: E402
from xm.errors import XMError  # noqa: E402
from xm.memories import open_index  # noqa: E402
from xm.memories.registry import open_memory  # noqa: E402
from xm.pipeline import BuildConfig, build_index  # noqa: E402
from xm.pipeline.extend import add_encoder  # noqa: E402

BUCKET = "xm-test"
# no instance-metadata lookups (169.254.169.254) and no user config: only the loopback server answers
_ISOLATED = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
             "AWS_DEFAULT_REGION": "us-east-1"}
_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """The server, a bucket on it, and the environment that points s3fs at it."""
    import fsspec

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**_ISOLATED, **_KEYS, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}  # fsspec read its environment at import
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    try:
        fs.mkdir(BUCKET)
    except FileExistsError:  # moto keeps its buckets per process: another module's server made it
        pass
    try:
        yield env
    finally:
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _content(memory) -> dict:
    coarse = load_encoder(TINY)
    queries = coarse.encode_images([make_image(i) for i in (0, 3, 5)])
    out = {"count": memory.count, "captions": memory.captions(range(memory.count)),
           "hashes": np.asarray(memory.caption_hashes[np.arange(memory.count)]).tolist()}
    for modality in ("image", "text"):
        sims, ids = memory.search(modality, queries, 4)
        out[f"knn/{modality}"] = (ids.tolist(), np.round(sims, 5).tolist())
    return out


def test_build_to_s3_equals_local_build_and_opens_from_s3(s3, tmp_path, monkeypatch) -> None:
    import fsspec

    monkeypatch.chdir(tmp_path)  # a URL taken for a path would make ./s3: here
    monkeypatch.setenv("XM_HOME", str(tmp_path / "home"))
    src = write_caption_folder(tmp_path / "pairs", 6)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(src), f"{BUCKET}/pairs", recursive=True)  # the source on object storage too
    local = build_index(BuildConfig(source=str(src), out=tmp_path / "local", **TINY_ROLES))
    # the CLI hands --out over as a Path ("s3:/xm-test/mem"): it stays a URL
    remote = build_index(BuildConfig(source=f"s3://{BUCKET}/pairs", out=Path(f"s3://{BUCKET}/mem"), **TINY_ROLES))
    assert remote.out == f"s3://{BUCKET}/mem" and remote.count == local.count == 6
    assert not (tmp_path / "s3:").exists()
    stored = {p.split(f"{BUCKET}/mem/", 1)[1] for p in fs.find(f"{BUCKET}/mem")}
    assert "manifest.json" in stored and "store/caption_hash.npy" in stored
    assert any(p.startswith("index/") and p.endswith(".index") for p in stored)
    here, there = _content(open_index(tmp_path / "local")), _content(open_memory(f"s3://{BUCKET}/mem"))
    assert here == there
    # a rerun resumes from what the bucket holds and writes nothing new there
    before = {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/mem") if not p.endswith("last_build.json")}
    again = build_index(BuildConfig(source=f"s3://{BUCKET}/pairs", out=Path(f"s3://{BUCKET}/mem"), **TINY_ROLES))
    assert "store: current" in again.skipped and again.manifest_id == remote.manifest_id
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/mem") if not p.endswith("last_build.json")} == before
    # the manifest names the source as given, not this machine's copy of it
    assert open_memory(f"s3://{BUCKET}/mem").manifest.source.source == f"s3://{BUCKET}/pairs"
    # --add-encoder on the memory in the bucket: extended there, and a new open sees it; the images are
    # re-read from the recorded source, fetched again (this machine's copies are gone)
    import shutil

    shutil.rmtree(tmp_path / "home" / "cache")
    added = add_encoder(f"s3://{BUCKET}/mem", f"{TINY_WIDE}=image")
    assert added.out == f"s3://{BUCKET}/mem" and not (tmp_path / "s3:").exists()
    assert "image" in open_memory(f"s3://{BUCKET}/mem").manifest.encoders[TINY_WIDE].embedded


def _xm(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xm.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env, "XM_HOME": str(cwd / "home")})


def test_bad_s3_locations_are_one_line_exit_2(s3, tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 2)
    roles = ["--coarse", TINY, "--fine", TINY, "--inference", TINY]
    no_bucket = _xm(s3, tmp_path, "build-index", "--source", str(src), "--out", "s3://no-such-bucket/x", *roles)
    env_without_keys = {k: v for k, v in os.environ.items() if k not in _KEYS}
    no_keys = subprocess.run([sys.executable, "-m", "xm.cli", "build-index", "--source", str(src), "--out", f"s3://{BUCKET}/y", *roles],
                             capture_output=True, text=True, cwd=tmp_path,
                             env={**env_without_keys, **{k: v for k, v in s3.items() if k not in _KEYS}, "XM_HOME": str(tmp_path / "home")})
    for r, says in ((no_bucket, "s3://no-such-bucket/x: not found"), (no_keys, f"s3://{BUCKET}/y: no credentials")):
        errors = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
        assert errors[0].startswith("xm: error: --out ") and says in errors[0], errors[0]
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "home").exists()
    with pytest.raises(XMError, match="--index s3://no-such-bucket/m: not found"):
        open_memory("s3://no-such-bucket/m")


# ---------------------------------------------------------------- tasks writing to the bucket

_KILLED_PUSH = """
import sys
from pathlib import Path
from xm.indexes import object_store
from xm.pipeline.faults import kill_point
object_store.push(Path(sys.argv[1]), sys.argv[2], "--out", on_file=kill_point("push", "00001"))
"""


def test_a_task_killed_mid_push_leaves_no_visible_part(s3, tmp_path) -> None:
    """A task's push: every object whole, data before the marker; killed after two files, the
    bucket holds whole objects of a part no marker lists, and no temporary key."""
    import fsspec

    folder = tmp_path / "task"
    rng = np.random.default_rng(0)
    files = {"embeddings/e/img_emb/img_emb_00001.npy": rng.bytes(300_000), "embeddings/e/metadata/metadata_00001.parquet": rng.bytes(5_000),
             "embeddings/e/text_emb/text_emb_00001.npy": rng.bytes(200_000), "_work/done/embed/00001.json": b'{"part": "00001"}'}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    token = tmp_path / "kill"
    token.write_text("push 00001")
    url = f"s3://{BUCKET}/killed-push"
    run = subprocess.run([sys.executable, "-c", _KILLED_PUSH, str(folder), url], capture_output=True, text=True,
                         env={**os.environ, **s3, "XM_KILL_TASK_ONCE": str(token)})
    assert run.returncode == 137 and not token.exists(), run.stderr[-2000:]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    there = {p.split("killed-push/", 1)[1]: fs.cat_file(p) for p in fs.find(f"{BUCKET}/killed-push")}
    assert len(there) == 2 and "_work/done/embed/00001.json" not in there  # the marker comes after every file
    assert all(files[rel] == data for rel, data in there.items())  # whole objects, never a part-written one
    # the retried task completes the part, marker last
    assert object_store_push(folder, url) == 4
    assert {p.split("killed-push/", 1)[1] for p in fs.find(f"{BUCKET}/killed-push")} == set(files)


def object_store_push(folder: Path, url: str) -> int:
    from xm.indexes import object_store

    return object_store.push(folder, url, "--out")


def test_whole_file_writes_where_a_file_is_visible_while_written(tmp_path) -> None:
    """Off object storage (HDFS, a mounted folder) a file is written under a temporary name and renamed."""
    import fsspec

    from xm.indexes import object_store

    fs = fsspec.filesystem("file")
    src = tmp_path / "a.npy"
    src.write_bytes(b"x" * 1000)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest/a.npy").write_bytes(b"old")
    seen: list[str] = []
    real_put = fs.put_file

    def spying_put(lpath, rpath, **kw):
        seen.append(rpath)
        return real_put(lpath, rpath, **kw)

    fs.put_file = spying_put
    object_store.put_whole(fs, str(src), str(tmp_path / "dest/a.npy"), "hdfs")
    assert len(seen) == 1 and seen[0].endswith(".tmp") and "/dest/." in seen[0]
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["a.npy"]
    assert (tmp_path / "dest/a.npy").read_bytes() == b"x" * 1000


@pytest.mark.slow
def test_spark_tasks_write_to_the_bucket_with_no_shared_folder(s3, tmp_path, monkeypatch) -> None:
    """No disk shared by the driver and the executors: each Spark task works in a private folder
    (its own TMPDIR here) and writes its part to the bucket itself; the driver's staging folder
    never receives a part file; one task killed after pushing two files of its part is retried;
    the memory in the bucket equals the local build."""
    pytest.importorskip("pyspark")
    import fsspec

    from xm.pipeline.task_mirror import PART_FILES

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XM_HOME", str(tmp_path / "home"))
    src = write_caption_folder(tmp_path / "pairs", 6)
    local = build_index(BuildConfig(source=str(src), out=tmp_path / "local", shard_size=2, **TINY_ROLES))
    executors, stage = tmp_path / "executors", tmp_path / "driver-stage"
    executors.mkdir()
    token = tmp_path / "kill"
    token.write_text("push 00001")
    # executors get the filesystem's settings from their environment, as img2dataset's and autofaiss's do
    env = [f"spark.executorEnv.{k}={v}" for k, v in {**s3, "TMPDIR": str(executors), "XM_KILL_TASK_ONCE": str(token)}.items()]
    url = f"s3://{BUCKET}/spark-mem"
    cfg = BuildConfig(source=str(src), out=Path(url), shard_size=2, stage_dir=str(stage), distributor="pyspark",
                      spark_master="local[2,3]", spark_conf=env, **TINY_ROLES)
    remote = build_index(cfg)
    assert cfg.bucket == url and remote.out == url and remote.count == local.count == 6
    assert not token.exists(), "no task was killed"
    here = [p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()]
    folder = next(p for p in (stage / "object-store/stage").iterdir() if p.is_dir())
    held = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert held and not [p for p in held if p.startswith(PART_FILES)], held
    assert "_work/done/embed/00001.json" in held and any(p.startswith("index/") and p.endswith(".index") for p in held), held
    # every task's private folder is removed but the killed attempt's (os._exit runs no cleanup; a
    # container's scratch goes with it), which holds that part, done there, its push cut short
    left = [p for p in executors.glob("xm-task-*") if p.is_dir()]
    assert len(left) == 1 and (left[0] / "_work/done/embed/00001.json").is_file(), left
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    stored = {p.split(f"{BUCKET}/spark-mem/", 1)[1] for p in fs.find(f"{BUCKET}/spark-mem")}
    for part in ("00000", "00001", "00002"):
        assert {f"_work/rows/rows_{part}.parquet", f"_work/done/embed/{part}.json"} <= stored
    assert any(p.startswith("store/rows-") and p.endswith(".arrow") for p in stored), stored  # the store shard, written by its task
    assert not [p for p in stored if p.endswith(".tmp") or p.startswith(("_work/store-hashes/", "_work/autofaiss/"))
                or "/.build-" in p], stored
    assert _content(open_index(tmp_path / "local")) == _content(open_memory(url))
    assert here  # the driver's folder was used (state only)
    # a new driver (its own empty staging folder, as after a lost one) resumes from what the bucket
    # holds: nothing redone, not one object rewritten
    before = {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/spark-mem") if not p.endswith("last_build.json")}
    again = build_index(BuildConfig(source=str(src), out=Path(url), shard_size=2, stage_dir=str(tmp_path / "new-driver"),
                                    distributor="pyspark", spark_master="local[2]", spark_conf=env[:-1], **TINY_ROLES))
    assert "embed: 3 part(s) already done" in again.skipped and "store: current" in again.skipped, again.skipped
    assert again.manifest_id == remote.manifest_id
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/spark-mem") if not p.endswith("last_build.json")} == before


def test_downloaded_parts_in_the_bucket_are_sized_from_their_sidecars_alone(s3, tmp_path) -> None:
    """The driver's view of img2dataset's shards in the bucket: the same parts, sizes and failures
    as of the same files in a folder, from the sidecars alone (the tars here are not tars: reading
    one would fail); a shard with no sidecar leaves its part's size unknown. An embed task asks
    for just its part's shards and sidecars, and the pinned grouping."""
    import json

    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xm.indexes.layout import Layout, write_json
    from xm.pipeline.part_size import ShardGroups, groups_file
    from xm.pipeline.sources.img2dataset_output import bucket_parts, download_failures, img2dataset_parts
    from xm.pipeline.sources.table import UrlTable

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    local = tmp_path / "download"
    local.mkdir()
    statuses = [["success", "success"], ["success", "failed_to_download"], ["success"], ["success", "success"], ["success"]]
    files = {"00005.tar": b"not a tar"}  # its sidecars never written (a shard cut short)
    for i, status in enumerate(statuses):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"status": status}), sink)
        files.update({f"{i:05d}.tar": b"not a tar", f"{i:05d}.parquet": sink.getvalue().to_pybytes(),
                      f"{i:05d}_stats.json": json.dumps({"status_dict": {s: status.count(s) for s in set(status)}}).encode()})
    for name, data in files.items():
        fs.pipe(f"{BUCKET}/sidecars/{name}", data)
        (local / name).write_bytes(data)
    url = f"s3://{BUCKET}/sidecars"

    def pairs(per_part: int) -> Callable[[int, int], ShardGroups]:
        return lambda shards, digits: ShardGroups(per_part=per_part, digits=digits)

    for per_part, want in ((2, [("00000", 3), ("00001", 3), ("00002", None)]),
                           (1, [("00000", 2), ("00001", 1), ("00002", 1), ("00003", 2), ("00004", 1), ("00005", None)])):
        parts = bucket_parts(url, pairs(per_part))
        assert [(p.name, p.size) for p in parts] == want
        assert [(p.name, p.size) for p in img2dataset_parts(local, pairs(per_part))] == want
    assert download_failures(url) == download_failures(local) == {"failed_to_download": 1}
    assert bucket_parts(f"s3://{BUCKET}/nothing-here") == [] and download_failures(f"s3://{BUCKET}/nothing-here") == {}
    layout = Layout(tmp_path / "build")
    write_json(groups_file(layout), {"shards_per_part": 3, "digits": 5})
    assert UrlTable().task_inputs(None, layout, "00001") == [  # type: ignore[arg-type]
        "_work/parts.json", *(f"_work/download/{s}{ext}" for s in ("00003", "00004", "00005") for ext in (".tar", ".parquet"))]


@pytest.mark.slow
def test_spark_download_goes_to_the_bucket_with_no_shared_folder(s3, image_server, tmp_path, monkeypatch) -> None:
    """A URL table (itself in the bucket) on Spark to `s3://`: img2dataset's executors write the shards to the bucket,
    the driver lists them and reads their sidecars there (sizes, failures), each embed task pulls
    its own shards into its private folder; the driver's staging folder never holds a shard or
    a part file, and the memory equals the local build (its download failure counted alike)."""
    pytest.importorskip("pyspark")
    import fsspec
    import pandas as pd

    from conftest import jpeg_bytes
    from xm.pipeline.task_mirror import PART_FILES

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XM_HOME", str(tmp_path / "home"))
    base, routes = image_server
    rows = []
    for i in range(6):
        routes[f"/img/{i}.jpg"] = jpeg_bytes(make_image(i))
        rows.append((f"{base}/img/{i}.jpg", f"caption number {i}"))
    rows.insert(3, (f"{base}/missing.jpg", "a dead link"))
    table = tmp_path / "pairs.parquet"
    pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(table)
    options = dict(processes=1, threads=4, shard_size=2, timeout=5, **TINY_ROLES)
    local = build_index(BuildConfig(source=str(table), out=tmp_path / "local", **options))
    executors, stage = tmp_path / "executors", tmp_path / "driver-stage"
    executors.mkdir()
    env = [f"spark.executorEnv.{k}={v}" for k, v in {**s3, "TMPDIR": str(executors)}.items()]
    url = f"s3://{BUCKET}/spark-download"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put_file(str(table), f"{BUCKET}/inputs/pairs.parquet")  # copied to the driver: only the select stage reads it
    cfg = BuildConfig(source=f"s3://{BUCKET}/inputs/pairs.parquet", out=Path(url), stage_dir=str(stage), distributor="pyspark",
                      spark_master="local[2]", spark_conf=env, **options)
    remote = build_index(cfg)
    assert cfg.bucket == url and remote.count == local.count == 6
    assert remote.failures == local.failures and sum(remote.failures.values()) == 1, (remote.failures, local.failures)
    here = [p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()]
    assert not [p for p in here if p.endswith((".tar", "_stats.json")) or "/_work/download/" in p], here
    folder = next(p for p in (stage / "object-store/stage").iterdir() if p.is_dir())
    held = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert "_work/done/embed/00001.json" in held and not [p for p in held if p.startswith(PART_FILES)], held
    stored = {p.split(f"{BUCKET}/spark-download/", 1)[1] for p in fs.find(f"{BUCKET}/spark-download")}
    for shard in ("00000", "00001", "00002", "00003"):  # 7 rows, 2 a shard: img2dataset's, written to the bucket
        assert {f"_work/download/{shard}.tar", f"_work/download/{shard}.parquet", f"_work/download/{shard}_stats.json",
                f"_work/done/embed/{shard}.json"} <= stored, stored
    assert not [p for p in stored if p.startswith("_work/download/_tmp")], stored
    assert not [p for p in executors.glob("xm-task-*")], "a task's private folder was left"
    assert _content(open_index(tmp_path / "local")) == _content(open_memory(url))
    # img2dataset's output folder as the source (the local build's download, a folder the executors
    # see, as an image folder): its tasks write to the bucket too, the same memory
    again = f"s3://{BUCKET}/spark-img2dataset"
    cfg = BuildConfig(source=str(tmp_path / "local/_work/download"), out=Path(again), stage_dir=str(stage),
                      distributor="pyspark", spark_master="local[2]", spark_conf=env, **options)
    folder_build = build_index(cfg)
    assert cfg.bucket == again and folder_build.failures == local.failures and folder_build.count == 6
    for folder in (stage / "object-store/stage").iterdir():  # both builds' driver folders: state only
        held = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
        assert not [p for p in held if p.startswith(PART_FILES)], held
    assert _content(open_index(tmp_path / "local")) == _content(open_memory(again))


def test_preflight_names_an_executor_that_cannot_reach_the_bucket(s3, tmp_path, monkeypatch) -> None:
    """Tasks that write to the bucket need no shared --out, but every executor must reach the
    bucket with its own environment: the real probe, run here, against a good and a bad bucket."""
    from xm.pipeline import spark as spark_mod

    class Context:
        defaultParallelism = 2

    class Session:
        sparkContext = Context()

    def here(spark, fn, jobs, description, on_done=None):
        return [fn(job) for job in jobs]

    monkeypatch.setattr(spark_mod, "run_tasks", here)
    assert spark_mod.preflight(Session(), tmp_path / "driver", f"s3://{BUCKET}/reachable") == 2
    with pytest.raises(XMError, match=r"^executor on .*: --out s3://no-such-bucket/m: not found .*spark\.executorEnv"):
        spark_mod.preflight(Session(), tmp_path / "driver", "s3://no-such-bucket/m")
