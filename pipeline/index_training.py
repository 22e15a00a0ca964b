"""Training a kNN index on the cluster, once, and keeping it (`--distributor pyspark`).

autofaiss's `build_index(distributed="pyspark")` trains on the driver, then adds on the
executors; a lost driver loses hours of training, and the two indexes of a build train one
after the other while the executors wait. Here, as autofaiss's own `create_big_index` does,
training is a Spark task on an executor, one per index, all submitted together (so the image
and caption indexes train at once), and the trained, empty index is kept under `_work/` with
a record of what it was trained for. A rerun (a new driver after a lost one) finds it and goes
straight to adding. The index key is chosen on the driver exactly as autofaiss's
`build_index` would (`get_optimal_index_keys_v2` under `--max-index-memory`), and training
calls the same autofaiss function as the one-machine build, on the same first vectors, so the
trained index is the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xm.errors import XMError
from xm.indexes.layout import Layout, atomic_path, write_json
from xm.pipeline.config import BuildConfig


def trained_dir(layout: Layout, slug: str, modality: str) -> Path:
    # beside, not inside, autofaiss's temporary folder (index_stage removes that one)
    return layout.work / "autofaiss-trained" / f"{slug}-{modality}"


def embeddings_at(cfg: BuildConfig, layout: Layout, slug: str, modality: str) -> str:
    """Where executors read an index's embeddings (autofaiss's embedding reader takes fsspec URLs):
    the bucket, when the tasks write there themselves (`cfg.bucket`), else the --out folder."""
    folder = layout.emb_dir(slug, modality)
    return f"{cfg.bucket}/{layout.rel(folder)}" if cfg.bucket else str(folder)


def faiss_gpu() -> bool:
    """The place a GPU faiss build plugs in: True where faiss was built with GPU support and sees
    a GPU (the `gpu` extra), so autofaiss trains the index's clustering there."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and int(getattr(faiss, "get_num_gpus", lambda: 0)()) > 0


def choose_key(cfg: BuildConfig, emb_dir: str, index_key: str | None) -> tuple[str, int, int]:
    """(index key, count, dim) as autofaiss's build_index chooses them; one line if the memory
    the key needs to build exceeds --current-memory."""
    from autofaiss.external.build import estimate_memory_required_for_index_creation
    from autofaiss.external.optimize import get_optimal_index_keys_v2
    from autofaiss.utils.cast import cast_bytes_to_memory_string, cast_memory_to_bytes
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(emb_dir, file_format="npy")
    count, dim = int(reader.count), int(reader.dimension)
    needed, key_used = estimate_memory_required_for_index_creation(count, dim, index_key, cfg.max_index_memory, False, cfg.shards)
    if needed > cast_memory_to_bytes(cfg.current_memory):
        raise XMError(f"--current-memory {cfg.current_memory}: building {key_used} over {count} vectors needs "
                      f"{cast_bytes_to_memory_string(needed)}; raise it or lower --max-index-memory")
    if index_key is None:
        keys = get_optimal_index_keys_v2(count, dim, cfg.max_index_memory, make_direct_map=False,
                                         should_be_memory_mappable=True, use_gpu=False)
        if not keys:
            raise XMError(f"--max-index-memory {cfg.max_index_memory}: no index of {count} vectors of dim {dim} fits it")
        index_key = keys[0]
    return index_key, count, dim


def _record(key: str, count: int, dim: int, current_memory: str) -> dict[str, Any]:
    return {"key": key, "count": count, "dim": dim, "metric": "ip", "current_memory": current_memory}


def kept(layout: Layout, slug: str, modality: str, record: dict[str, Any]) -> Path | None:
    """The kept trained index for exactly `record`, if there is one."""
    folder = trained_dir(layout, slug, modality)
    try:
        same = json.loads((folder / "trained.json").read_text()) == record
    except (OSError, ValueError):
        return None
    return folder / "trained.index" if same and (folder / "trained.index").is_file() else None


def train_task(job: dict[str, Any]) -> dict[str, Any]:
    """On an executor: train the empty index `job["record"]["key"]` on the embeddings of
    `job["emb_dir"]` and keep it (index file first, its record last); return the record. A
    retried or repeated task finds it kept and returns at once."""
    import faiss
    from autofaiss.external.metadata import IndexMetadata
    from autofaiss.indices.training import create_and_train_new_index
    from embedding_reader import EmbeddingReader

    from xm.pipeline.runners.registry import get

    layout, record = Layout(job["out"]), job["record"]
    if kept(layout, job["slug"], job["modality"], record) is not None:
        return {**record, "reused": True}
    faiss.omp_set_num_threads(get(job["distributor"]).task_threads())  # the task's cores, not the node's
    reader = EmbeddingReader(job["emb_dir"], file_format="npy")
    metadata = IndexMetadata(record["key"], reader.count, reader.dimension, False)
    index = create_and_train_new_index(reader, record["key"], metadata, "ip", record["current_memory"], use_gpu=faiss_gpu())
    folder = trained_dir(layout, job["slug"], job["modality"])
    with atomic_path(folder / "trained.index") as tmp:
        faiss.write_index(index, str(tmp))
    write_json(folder / "trained.json", record)
    return {**record, "reused": False}


def train_all(cfg: BuildConfig, layout: Layout, todo: Sequence[tuple[str, str, str | None]],
              run: Callable[[Callable[[Any], Any], list[Any], str, Callable[[int], None] | None], list[Any]],
              on_done: Callable[[int], None] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Train every (slug, modality, index_key) of `todo` not kept already, as one Spark job of one
    task per index (they train at once); {(slug, modality): record (+ "reused")}."""
    jobs: list[dict[str, Any]] = []
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for slug, modality, index_key in todo:
        emb_dir = embeddings_at(cfg, layout, slug, modality)
        key, count, dim = choose_key(cfg, emb_dir, index_key)
        record = _record(key, count, dim, cfg.current_memory)
        if kept(layout, slug, modality, record) is not None:  # trained by an earlier (lost) driver's build
            out[(slug, modality)] = {**record, "reused": True}
            if on_done is not None:
                on_done(1)
            continue
        jobs.append({"out": str(layout.root), "slug": slug, "modality": modality, "emb_dir": emb_dir,
                     "distributor": cfg.distributor, "record": record,
                     "reads": [layout.rel(trained_dir(layout, slug, modality)) + "/"]})  # a task writing to the bucket pulls it
    results = run(train_task, jobs, f"xm index training ({len(jobs)} at once)", on_done) if jobs else []
    out.update({(j["slug"], j["modality"]): r for j, r in zip(jobs, results)})
    return out


def trained_for(cfg: BuildConfig, layout: Layout, slug: str, modality: str, index_key: str | None,
                run: Callable[[Callable[[Any], Any], list[Any], str, Callable[[int], None] | None], list[Any]]
                ) -> tuple[Path, dict[str, Any]]:
    """The kept trained index of (slug, modality), trained now if it is not kept yet."""
    record = train_all(cfg, layout, [(slug, modality, index_key)], run)[(slug, modality)]
    path = trained_dir(layout, slug, modality) / "trained.index"
    if not path.is_file():
        raise XMError(f"{layout.rel(path)}: training left no index")
    return path, record
