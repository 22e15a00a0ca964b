"""The build's units of work, the same on this machine and as Spark tasks.

A job is plain data (a dict: the build's config, the part, an id offset), never a
closure: an executor re-derives the part from the shared --out folder, loads the
encoders once per worker process, and writes through the same functions the local
build uses. Exactly once comes from the files themselves: every file is renamed into
place and a part's marker is written last, so a retried task (or a speculative copy)
either finds the marker and returns it, or redoes the part into identical files.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

import xm.encoders
from xm.encoders.device import Device
from xm.errors import XMError
from xm.indexes.layout import Layout, atomic_path, sha256_file
from xm.indexes.store import write_store_shard
from xm.pipeline import faults
from xm.pipeline.config import BuildConfig
from xm.pipeline.embed import embed_part, read_marker
from xm.pipeline.runners.base import Runner


def load_plan_encoders(cfg: BuildConfig, plan: dict[str, tuple[str, ...]], quiet: bool = False,
                       device: Device | None = None) -> dict[str, Any]:
    """The encoders a build's plan embeds with (cached per process by the one loader), on `device`
    (default: the build's first device); one whose every embedding the source provides
    precomputed is not loaded (its weights need not exist)."""
    where = device or cfg.target.first()
    # xm.encoders.load_encoder looked up per call, so that a test may count the loads
    return {spec: xm.encoders.load_encoder(spec, cache_dir=cfg.cache_dir, precision=cfg.precision, quiet=quiet, device=where)
            for spec in cfg.kind.encoders_to_load(cfg, plan)}


# ---------------------------------------------------------------- fault injection

kill_point = faults.kill_point  # where a test kills a task part-way (pipeline/faults.py)


# ---------------------------------------------------------------- embed

def embed_task(job: dict[str, Any]) -> dict[str, Any]:
    """Embed one part (job: {"config", "part"}) as a task of a runner that is not `in_process`
    (the local build calls embed_part itself); return its marker."""
    cfg = BuildConfig.from_dict(job["config"])
    layout = Layout(cfg.out)
    done = read_marker(layout, job["part"])
    if done is not None:
        return done
    import torch  # heavy: imported by the task that computes, not by the driver that plans

    runner = cfg.runner_kind
    torch.set_num_threads(runner.task_threads())  # the cores the runner gave the task, not every core of the node
    part = cfg.kind.part_named(cfg, layout, job["part"])
    if part is None:
        raise XMError(f"{cfg.source}: part {job['part']} is not there from this executor")
    plan = cfg.plan()
    gpu = runner.task_gpu()
    if gpu is not None:  # spark.task.resource.gpu.amount: this task's GPU, whichever the last task had
        device = Device.parse(f"cuda:{gpu}", check=False)
    elif cfg.target.kind == "cuda":  # asked for and not given: one line, never the CPU instead
        raise XMError(f"--device {cfg.device}: this {runner.tasks or 'task'} was given no GPU; set "
                      "spark.task.resource.gpu.amount (and the executors' GPU resources)")
    else:
        device = cfg.target
    encoders = load_plan_encoders(cfg, plan, quiet=True, device=device)
    return embed_part(part, encoders, plan, layout, cfg.batch_size, on_captions=kill_point("embed", part.name),
                      num_workers=cfg.workers())


# ---------------------------------------------------------------- store

def store_task(job: dict[str, Any]) -> int:
    """Write one caption-store shard and its rows of the caption-hash file being built (job:
    {"out", "slug", "shard", "first", "stop", "parts": [[name, first id, rows], ...] of the parts
    overlapping ids first..stop-1, "hashes": that file}); return its row count. Nothing but the
    count goes back to the driver: the hashes of 400M items are 3.2 GB, past Spark's default
    1 GB result limit (spark.driver.maxResultSize)."""
    layout = Layout(job["out"])
    first, stop = int(job["first"]), int(job["stop"])
    pieces = []
    for name, part_first, rows in job["parts"]:
        if not rows:
            continue
        source = layout.part_rows(name)
        if not source.is_file():  # a build folder begun before the store shards: the first encoder's metadata/
            source = layout.metadata_file(job["slug"], name)
        table = pq.read_table(source)
        if table.num_rows != rows:
            raise XMError(f"{source}: {table.num_rows} rows, its embed marker says {rows}")
        lo = max(first, part_first) - part_first
        pieces.append(table.slice(lo, min(stop, part_first + rows) - part_first - lo))
    hashes = write_store_shard(pieces, first, layout.store_shard(int(job["shard"])))
    if job["hashes"] is None:  # no file shared with the driver (tasks writing to object storage): beside the shard
        with atomic_path(part_hashes_file(layout, shard_name(int(job["shard"])))) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(hashes, dtype="<i8"))
    else:
        write_hash_rows(Path(job["hashes"]), first, hashes)
    return len(hashes)


def part_hashes_dir(layout: Layout) -> Path:
    """Where store tasks that share no file with the driver leave their parts' caption hashes."""
    return layout.work / "store-hashes"


def shard_name(shard: int) -> str:
    """The name a store shard's hashes are left under in the bucket (`part_hashes_file`)."""
    return f"shard-{shard}"


def part_hashes_file(layout: Layout, part: str) -> Path:
    return part_hashes_dir(layout) / f"{part}.npy"


def read_part_hashes(bucket: str, layout: Layout, part: str) -> np.ndarray:
    """On the driver: a part's caption hashes as its store task left them in the bucket."""
    from xm.indexes import object_store

    return np.load(io.BytesIO(object_store.read_bytes(bucket, layout.rel(part_hashes_file(layout, part)), "--out")))


def create_hash_file(path: Path, count: int) -> None:
    """An int64 .npy of `count` rows (zeros, sparse on disk) that store tasks fill in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    np.lib.format.open_memmap(path, mode="w+", dtype="<i8", shape=(count,)).flush()


def write_hash_rows(path: Path, first: int, hashes: np.ndarray) -> None:
    """Write `hashes` at rows first.. of the .npy at `path`: disjoint byte ranges, so tasks on
    several executors write one shared file without a driver collect; a retried task writes the
    same bytes again."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read_header(f)  # leaves f at the first row
        f.seek(f.tell() + 8 * first)
        f.write(np.ascontiguousarray(hashes, dtype="<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())  # on shared storage, visible to the driver once the task is done


# ---------------------------------------------------------------- manifest checksums

def hash_task(paths: list[str]) -> list[str]:
    """sha256 of each file (a path, or a URL where the tasks wrote the files to object storage)."""
    from xm.indexes import object_store

    return [object_store.sha256_of(p) if object_store.is_remote(p) else sha256_file(Path(p)) for p in paths]


def hasher_for(runner: Runner, chunks: int = 64) -> Callable[[list[Path]], list[str]]:
    """Checksums of many files, spread over `runner` in up to `chunks` tasks."""

    def hashes(paths: list[Path]) -> list[str]:
        if not paths:
            return []
        n = max(1, min(chunks, len(paths) // 8))  # a task per few files at least: tasks cost ~0.1 s each
        groups = [[runner.readable(p) for p in paths[i::n]] for i in range(n)]
        results = runner.map(hash_task, groups, "xm manifest checksums")
        out: dict[str, str] = {}
        for group, digests in zip(groups, results):
            out.update(zip(group, digests))
        return [out[runner.readable(p)] for p in paths]

    return hashes
