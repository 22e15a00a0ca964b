"""The index stage: autofaiss chooses and trains an index under a memory budget and fills
it, on this machine or on Spark executors; we tune its search parameters once and keep it
as memory-mappable shards with global ids.

* one machine (`--distributor multiprocessing`): autofaiss builds one index; it is tuned,
  then split by id range (`write_shards`).
* Spark (`--distributor pyspark`): the index is trained by an executor task and kept
  (`index_training.py`: every stale index at once, reused by a rerun), executors add id ranges
  to it, and autofaiss keeps `shards_to_keep` merged indices (`nb_indices_to_keep`, at least
  `--shards`), each written by an executor with global ids. They become the shards as they are; they are tuned together, on a stacked
  view of all of them (`xm.indexes.tuning.stacked_view`).

Either way autofaiss is given a placeholder `index_param`, which skips its own per-index
tuning: on Spark that tuning runs per shard on `reconstruct_n(0, ...)`, i.e. on uninitialised
memory for every shard but the first, and hangs for `..._HNSW32` keys (see tuning.py). The
one tuner (`tune_ivf`) then picks one parameter string, stored in build.json for every shard.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from xm.errors import XMError
from xm.indexes import object_store
from xm.indexes.layout import Layout, write_json
from xm.indexes.shards import ShardInfo, ivf_id_span, write_shards
from xm.indexes.tuning import sample_queries, stacked_view, tune_ivf
from xm.pipeline import index_training
from xm.pipeline.config import BuildConfig
from xm.pipeline.quiet import captured_stderr
from xm.pipeline.spark import active_session, cores_per_task, run_tasks

# Any IVF accepts it and it makes autofaiss skip its tuner (optimize_and_measure_index tunes only
# when index_param is None); the real parameters come from tune_ivf.
PLACEHOLDER_PARAM = "nprobe=1"
# real query vectors for tuning: autofaiss measures coverage on 100 and speed on up to 4000
TUNE_QUERIES = 1000
# the whole tuning of one index stops here and keeps its best setting so far (reported)
TUNE_DEADLINE_S = 300.0
# on Spark, the most vectors autofaiss may merge into one index on the driver (its own add task size)
MERGE_ON_DRIVER_MAX = 10_000_000


def index_is_current(layout: Layout, slug: str, modality: str, count: int, shards: int) -> bool:
    info = layout.index_build_info(slug, modality)
    if not info.is_file():
        return False
    data = json.loads(info.read_text())
    return data.get("count") == count and data.get("requested_shards") == shards and all(
        (layout.index_dir(slug, modality) / s["file"]).is_file() for s in data["shards"]
    )


def autofaiss_on_gpu(cfg: BuildConfig) -> bool:
    """Whether autofaiss trains this build's indexes on a GPU: the build runs on CUDA (--device) and
    faiss is a GPU build that sees one (`index_training.faiss_gpu`, the `gpu` extra). The index it
    writes is a CPU index either way, so the artefacts stay CPU-readable."""
    return cfg.target.kind == "cuda" and index_training.faiss_gpu()


def _autofaiss(build_index: Callable[..., Any], cfg: BuildConfig, emb_dir: Path, index_path: Path, infos_path: Path,
               **extra: Any) -> Any:
    if autofaiss_on_gpu(cfg):
        extra["use_gpu"] = True
    return build_index(
        embeddings=str(emb_dir),
        index_path=str(index_path),
        index_infos_path=str(infos_path),
        max_index_memory_usage=cfg.max_index_memory,
        current_memory_available=cfg.current_memory,
        min_nearest_neighbors_to_retrieve=cfg.k,
        max_index_query_time_ms=cfg.max_query_time_ms,
        metric_type="ip",
        should_be_memory_mappable=True,
        index_param=PLACEHOLDER_PARAM,
        verbose=logging.WARNING,
        **extra,
    )


def _report_faiss_lines(layout: Layout, emb_dir: Path, faiss_lines: list[str]) -> None:
    few = sorted({line.split("please provide")[0].strip() for line in faiss_lines if "please provide at least" in line})
    if few:  # faiss warns once per k-means run; one line of ours says it
        print(f"xm: {layout.rel(emb_dir)}: few training points for the index's clustering ({few[0]}); "
              "fine for a small memory, recall may suffer", file=sys.stderr)
    other = [line for line in faiss_lines if line.strip() and "please provide at least" not in line and "Sampling a subset" not in line]
    if other:
        print("\n".join(other), file=sys.stderr)


def _single_machine(build_index: Callable[..., Any], cfg: BuildConfig, emb_dir: Path, tmp: Path, path_for: Callable[[int], Path],
                    queries: np.ndarray,
                    index_key: str | None) -> tuple[list[ShardInfo], dict[str, Any], Any]:
    """One index built here, tuned, then split by id range into the shard files."""
    import faiss

    index_path, infos_path = tmp / "full.index", tmp / "infos.json"
    _, infos = _autofaiss(build_index, cfg, emb_dir, index_path, infos_path, index_key=index_key)
    if not index_path.is_file():
        raise XMError(f"autofaiss built no index for {emb_dir} under --max-index-memory {cfg.max_index_memory}")
    index = faiss.read_index(str(index_path))
    tuned = tune_ivf(index, queries, cfg.k, cfg.max_query_time_ms, deadline_s=TUNE_DEADLINE_S)
    autofaiss_infos = json.loads(infos_path.read_text()) if infos_path.is_file() else dict(infos or {})
    shards = write_shards(index, cfg.shards, path_for)
    return shards, autofaiss_infos, (tuned, index)


def shards_to_keep(shards: int, count: int) -> int:
    """How many indices autofaiss keeps on Spark: at least --shards, and never more than
    MERGE_ON_DRIVER_MAX vectors in one. autofaiss merges into one index on the driver
    (`nb_indices_to_keep=1`) but into several on the executors, so past that size the index is
    kept in pieces of at most that many vectors and never gathered on the driver."""
    return max(shards, math.ceil(count / MERGE_ON_DRIVER_MAX))


def _on_spark(cfg: BuildConfig, layout: Layout, slug: str, modality: str, emb_dir: Path, tmp: Path,
              path_for: Callable[[int], Path], queries: np.ndarray,
              index_key: str | None, work: Path) -> tuple[list[ShardInfo], dict[str, Any], Any]:
    """The trained index kept for (slug, modality) (trained now, on an executor, if it is not:
    `index_training`), filled by autofaiss's distributed add on the executors, which keeps
    `shards_to_keep` indices; each becomes a shard as it is (global ids, one id range each),
    then all are tuned together once."""
    import faiss
    from autofaiss.external.metadata import IndexMetadata
    from autofaiss.indices.build import get_optimize_index_fn
    from autofaiss.indices.distributed import add_embeddings_to_index_distributed
    from autofaiss.utils.cast import cast_bytes_to_memory_string, cast_memory_to_bytes
    from embedding_reader import EmbeddingReader

    session = active_session()  # autofaiss would otherwise start its own local[1] one with a 16G driver
    trained, record = index_training.trained_for(cfg, layout, slug, modality, index_key,
                                                 functools.partial(run_tasks, session))
    shutil.rmtree(work, ignore_errors=True)  # a killed build's small indices
    work.mkdir(parents=True, exist_ok=True)
    index_path, infos_path = tmp / "full.index", tmp / "infos.json"
    # tasks writing to the bucket (cfg.bucket): autofaiss's executors read the embeddings, the
    # trained index and each other's small indices there and write the kept indices there (fsspec);
    # the driver then fetches only the kept indices, the shards
    there = (lambda path: f"{cfg.bucket}/{layout.rel(path)}") if cfg.bucket else str  # noqa: E731
    if cfg.bucket:
        object_store.remove(cfg.bucket, layout.rel(work), "--out")
    reader = EmbeddingReader(index_training.embeddings_at(cfg, layout, slug, modality), file_format="npy")
    # autofaiss's own optimizer writes each kept index (and its infos); the placeholder
    # index_param skips its tuner, as on one machine
    optimizer = get_optimize_index_fn(embedding_reader=reader, index_key=record["key"], index_path=there(index_path),
                                      index_infos_path=there(infos_path), use_gpu=False, save_on_disk=True,
                                      max_index_query_time_ms=cfg.max_query_time_ms,
                                      min_nearest_neighbors_to_retrieve=cfg.k, make_direct_map=False,
                                      index_param=PLACEHOLDER_PARAM)
    metadata = IndexMetadata(record["key"], record["count"], record["dim"], False)
    keep = shards_to_keep(cfg.shards, record["count"])
    # autofaiss's add_embeddings_to_index, called one level down so that its executor tasks get
    # `nb_cores` (the cores Spark gives a task, not every core of the node); the memory left for
    # adding is computed as that function does: the budget less one kept index
    adding = cast_bytes_to_memory_string(cast_memory_to_bytes(cfg.current_memory)
                                         - metadata.estimated_index_size_in_bytes() / keep)
    _, metrics = add_embeddings_to_index_distributed(
        trained_index_or_path=there(trained), embedding_reader=reader, memory_available_for_adding=adding,
        nb_cores=cores_per_task(),
        # its default is an HDFS path; executors must see this folder
        temporary_indices_folder=there(work) if cfg.bucket else str(work.resolve()),
        nb_indices_to_keep=keep, index_optimizer=optimizer)
    shutil.rmtree(work, ignore_errors=True)
    if cfg.bucket:  # the kept indices, here; nothing of the build's temporary work stays in the bucket
        object_store.get_folder(cfg.bucket, layout.rel(tmp), tmp, "--out")
        object_store.remove(cfg.bucket, layout.rel(tmp), "--out")
        object_store.remove(cfg.bucket, layout.rel(work), "--out")
    # nb_indices_to_keep == 1: "full.index"; more: "full.index0", "full.index1", ... (zero-padded)
    written = sorted(p for p in tmp.glob("full.index*") if p.is_file())
    if not written:
        raise XMError(f"autofaiss on Spark built no index for {emb_dir} under --max-index-memory {cfg.max_index_memory}")
    spans = []
    for p in written:
        idx = faiss.read_index(str(p), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        spans.append((ivf_id_span(idx, p), int(idx.ntotal), p))
        del idx
    spans.sort()
    shards: list[ShardInfo] = []
    expect = 0
    for i, ((lo, hi), n, p) in enumerate(spans):
        if lo != expect:
            raise XMError(f"{emb_dir}: autofaiss's indices do not tile the ids (one starts at {lo}, expected {expect})")
        target = Path(path_for(i))
        os.replace(p, target)  # same folder tree under --out: an atomic rename
        shards.append(ShardInfo(file=target.name, ntotal=n, id_offset=0, id_range=(lo, hi)))
        expect = hi
    infos = {}
    for f in sorted(tmp.glob("infos.json*")):
        infos[f.name] = json.loads(f.read_text())
    if not infos and metrics:
        infos = {"metrics": metrics}
    infos["training"] = {"index_key": record["key"], "reused": bool(record.get("reused"))}
    view = stacked_view([Path(path_for(i)) for i in range(len(shards))])  # the shards, renamed above
    tuned = tune_ivf(view, queries, cfg.k, cfg.max_query_time_ms, deadline_s=TUNE_DEADLINE_S)
    return shards, infos, (tuned, view)


def _key_of(infos: dict[str, Any]) -> str:
    if "index_key" in infos:
        return infos["index_key"]
    for v in infos.values():
        if isinstance(v, dict):
            found = _key_of(v)
            if found:
                return found
    return ""


def build_modality_index(cfg: BuildConfig, layout: Layout, slug: str, modality: str, count: int,
                         index_key: str | None = None) -> dict[str, Any]:
    """Build, tune and shard the kNN index over one encoder's `modality` embeddings; write its
    build.json and return it. A runner with an autofaiss `distributed` mode (Spark) builds on the
    running SparkSession.
    `index_key` overrides autofaiss's choice (tests; autofaiss picks when None)."""
    from autofaiss import build_index  # heavy: only the index stage needs it

    emb_dir = layout.emb_dir(slug, modality)
    out_dir = layout.index_dir(slug, modality)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".build-*"):  # left by a build killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    files: list[str | Path] = (
        [f"{cfg.bucket}/{rel}" for rel in sorted(object_store.stats(cfg.bucket, "--out", layout.rel(emb_dir))) if rel.endswith(".npy")]
        if cfg.bucket else sorted(emb_dir.glob("*.npy")))
    if not files:
        raise XMError(f"{layout.rel(emb_dir)}: no embedding parts to index")
    queries = sample_queries(files, TUNE_QUERIES)
    path_for = lambda i: layout.shard_file(slug, modality, i)  # noqa: E731
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        # clip-retrieval builds exactly this way; the coverage target is what makes a
        # K=128 query return 128 ids instead of -1 padding
        faiss_lines: list[str] = []
        with captured_stderr(faiss_lines):
            if cfg.runner_kind.autofaiss_distributed is not None:
                work = layout.work / "autofaiss" / f"{slug}-{modality}"
                shards, autofaiss_infos, (tuned, index) = _on_spark(cfg, layout, slug, modality, emb_dir, Path(tmp),
                                                                    path_for, queries, index_key, work)
            else:
                shards, autofaiss_infos, (tuned, index) = _single_machine(build_index, cfg, emb_dir, Path(tmp), path_for,
                                                                          queries, index_key)
        # old shards go only now, once the new ones are in place: a failed or killed rebuild
        # (hours of autofaiss) leaves the previous index as its manifest describes it
        for old in set(out_dir.glob("shard-*.index")) - {out_dir / s.file for s in shards}:
            old.unlink()
        _report_faiss_lines(layout, emb_dir, faiss_lines)
        if index.ntotal != count:
            raise XMError(f"{emb_dir}: autofaiss indexed {index.ntotal} vectors, expected {count}")
        key = index_key or _key_of(autofaiss_infos)
        dim = int(index.d)
        del index
    if tuned.stopped_by_deadline:
        print(f"xm: {layout.rel(out_dir)}: search-parameter tuning stopped after {TUNE_DEADLINE_S:.0f}s; "
              f"kept {tuned.params}", file=sys.stderr)
    info = {
        "modality": modality,
        "embeddings": layout.rel(emb_dir),
        "count": count,
        "dim": dim,
        "metric": "ip",
        "key": key,
        "params": tuned.params,
        "requested_shards": cfg.shards,
        "k_target": cfg.k,
        # exact re-scoring over the embeddings on disk; pointless for an exact (Flat) index
        "refine_k_factor": 0 if key.startswith("Flat") or key.endswith(",Flat") else int(cfg.refine_k_factor),
        "shards": [s.__dict__ for s in shards],
        "distributor": cfg.runner_kind.name,
        "tuning": tuned.as_dict(),
        "autofaiss": autofaiss_infos,
    }
    write_json(layout.index_build_info(slug, modality), info)
    return info
