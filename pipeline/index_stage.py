"""The index stage: autofaiss chooses, trains and tunes an index under a memory budget;
we split it into memory-mappable shards with global ids."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from xm.indexes.layout import Layout, write_json
from xm.indexes.shards import write_shards
from xm.pipeline.config import BuildConfig
from xm.pipeline.quiet import captured_stderr


def index_is_current(layout: Layout, slug: str, modality: str, count: int, shards: int) -> bool:
    info = layout.index_build_info(slug, modality)
    if not info.is_file():
        return False
    data = json.loads(info.read_text())
    return data.get("count") == count and data.get("requested_shards") == shards and all(
        (layout.index_dir(slug, modality) / s["file"]).is_file() for s in data["shards"]
    )


def _autofaiss(build_index, cfg: BuildConfig, emb_dir: Path, index_path: Path, infos_path: Path):
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
        verbose=logging.WARNING,
    )


def build_modality_index(cfg: BuildConfig, layout: Layout, slug: str, modality: str, count: int) -> dict[str, Any]:
    import faiss
    from autofaiss import build_index

    emb_dir = layout.emb_dir(slug, modality)
    out_dir = layout.index_dir(slug, modality)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".build-*"):  # left by a build killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        index_path = Path(tmp) / "full.index"
        infos_path = Path(tmp) / "infos.json"
        # clip-retrieval builds exactly this way; the coverage target is what makes a
        # K=128 query return 128 ids instead of -1 padding
        faiss_lines: list[str] = []
        with captured_stderr(faiss_lines):
            _, infos = _autofaiss(build_index, cfg, emb_dir, index_path, infos_path)
        few = sorted({l.split("please provide")[0].strip() for l in faiss_lines if "please provide at least" in l})
        if few:  # faiss warns once per k-means run; one line of ours says it
            print(f"xm: {layout.rel(emb_dir)}: few training points for the index's clustering ({few[0]}); "
                  "fine for a small memory, recall may suffer", file=sys.stderr)
        other = [l for l in faiss_lines if l.strip() and "please provide at least" not in l and "Sampling a subset" not in l]
        if other:
            print("\n".join(other), file=sys.stderr)
        if not index_path.is_file():
            raise RuntimeError(f"autofaiss built no index for {emb_dir} under --max-index-memory {cfg.max_index_memory}")
        index = faiss.read_index(str(index_path))
        if index.ntotal != count:
            raise RuntimeError(f"{emb_dir}: autofaiss indexed {index.ntotal} vectors, expected {count}")
        key = (infos or {}).get("index_key") or json.loads(infos_path.read_text()).get("index_key", "")
        params = (infos or {}).get("index_param", "")
        for old in out_dir.glob("shard-*.index"):
            old.unlink()
        shards = write_shards(index, cfg.shards, lambda i: layout.shard_file(slug, modality, i))
        autofaiss_infos = json.loads(infos_path.read_text()) if infos_path.is_file() else dict(infos or {})
    info = {
        "modality": modality,
        "embeddings": layout.rel(emb_dir),
        "count": count,
        "dim": int(index.d),
        "metric": "ip",
        "key": key,
        "params": params,
        "requested_shards": cfg.shards,
        "k_target": cfg.k,
        # exact re-scoring over the embeddings on disk; pointless for an exact (Flat) index
        "refine_k_factor": 0 if key.startswith("Flat") or key.endswith(",Flat") else int(cfg.refine_k_factor),
        "shards": [s.__dict__ for s in shards],
        "autofaiss": autofaiss_infos,
    }
    write_json(layout.index_build_info(slug, modality), info)
    return info
