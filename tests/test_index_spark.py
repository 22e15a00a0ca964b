"""The index stage on Spark (autofaiss `distributed="pyspark"`, one shard per kept index), the
one tuner shared with the single-machine path, and the parallel shard search."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyspark")

import faiss  # noqa: E402

from xm.errors import XMError  # noqa: E402
from xm.indexes.layout import Layout, part_name  # noqa: E402
from xm.indexes.shards import ShardedIndex, write_shards  # noqa: E402
from xm.indexes.tuning import apply_params, coverage, stacked_view, tune_ivf  # noqa: E402
from xm.pipeline.config import BuildConfig  # noqa: E402
from xm.pipeline.index_stage import PLACEHOLDER_PARAM, build_modality_index  # noqa: E402

SLUG = "enc"
DIM = 32


@pytest.fixture(scope="module")
def spark():
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    os.environ["PYSPARK_PYTHON"] = sys.executable  # executors run this venv's python
    from pyspark.sql import SparkSession

    ss = (SparkSession.builder.master("local[2,3]")  # local[N,F]: a failed task is retried (plain local never)
          .appName("xm-test-index")
          .config("spark.ui.enabled", "false")
          .config("spark.driver.host", "127.0.0.1")
          .config("spark.driver.bindAddress", "127.0.0.1")
          .config("spark.driver.memory", "1g")
          .getOrCreate())
    ss.sparkContext.setLogLevel("ERROR")
    yield ss
    ss.stop()


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _write_embeddings(root: Path, sizes: list[int], seed: int = 0) -> tuple[Layout, np.ndarray]:
    """clip-retrieval's layout: embeddings/<slug>/img_emb/img_emb_<part>.npy, float16, several parts."""
    layout = Layout(root)
    x = _clustered(sum(sizes), seed)
    lo = 0
    for i, n in enumerate(sizes):
        f = layout.emb_file(SLUG, "image", part_name(i))
        f.parent.mkdir(parents=True, exist_ok=True)
        np.save(f, x[lo : lo + n])
        lo += n
    return layout, x.astype(np.float32)


def _cfg(root: Path, shards: int) -> BuildConfig:
    return BuildConfig(source="unused", out=root, distributor="pyspark", shards=shards, k=50,
                       max_index_memory="200M", current_memory="2G", max_query_time_ms=10.0)


def _stored_ids(path: Path) -> np.ndarray:
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    lists = faiss.extract_index_ivf(index).invlists
    out = [np.array(faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)))
           for i in range(lists.nlist) if lists.list_size(i)]
    return np.concatenate(out)


def _unsplit(files: list[Path]):
    """The same trained index, unsplit: every shard's lists merged into one in-memory index."""
    merged = faiss.read_index(str(files[0]))
    for f in files[1:]:
        faiss.merge_into(merged, faiss.read_index(str(f)), False)  # keep the stored (global) ids
    return merged


def _build(cfg: BuildConfig, layout: Layout, count: int, key: str | None, timeout_s: float) -> dict:
    """build_modality_index in a thread: a build that hangs fails the test instead of the run."""
    box: dict = {}

    def run() -> None:
        try:
            box["info"] = build_modality_index(cfg, layout, SLUG, "image", count, index_key=key)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test's thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"the index build with key {key} did not finish in {timeout_s}s"
    if "error" in box:
        raise box["error"]
    return box["info"]


def _check_distributed(layout: Layout, info: dict, x: np.ndarray, shards: int, k: int) -> None:
    folder = layout.index_dir(SLUG, "image")
    files = [folder / s["file"] for s in info["shards"]]
    assert len(files) == shards
    # global ids: the shards' union is every id exactly once, each shard one contiguous range
    ids = [_stored_ids(f) for f in files]
    union = np.concatenate(ids)
    assert len(union) == len(x) and np.array_equal(np.sort(union), np.arange(len(x)))
    for got, s in zip(ids, info["shards"]):
        assert s["id_offset"] == 0 and got.min() == s["id_range"][0] and got.max() == s["id_range"][1] - 1
    # one parameter string for every shard, from our tuner, not autofaiss's per-shard one
    params = info["params"]
    assert params.startswith("nprobe=") and info["tuning"]["params"] == params
    assert info["tuning"]["coverage"] >= info["tuning"]["target_coverage"]
    recorded = [v for v in info["autofaiss"].values() if isinstance(v, dict) and "index_param" in v]
    assert recorded and all(v["index_param"] == PLACEHOLDER_PARAM for v in recorded)
    # a query over all shards equals the same trained index unsplit, with the same params
    q = x[np.random.default_rng(5).choice(len(x), 40, replace=False)]
    q = q + 0.05 * np.random.default_rng(6).standard_normal(q.shape).astype(np.float32)
    one = _unsplit(files)
    apply_params(one, params)
    d1, i1 = one.search(q, k)
    # a missing result (fewer than k in the probed lists, which the recall-chosen nprobe allows)
    # is faiss's -FLT_MAX; the sharded reader says -inf
    d1 = np.where(i1 < 0, -np.inf, d1).astype(np.float32)
    sharded = ShardedIndex(files, [0] * len(files), params, [tuple(s["id_range"]) for s in info["shards"]])
    d2, i2 = sharded.search(q, k)
    np.testing.assert_allclose(d2, d1, rtol=1e-5, atol=1e-5)
    tie = np.isclose(d1[:, :, None], d1[:, None, :], atol=1e-6).sum(axis=2) > 1  # equal scores may swap
    assert (i1 == i2)[~tie].all()
    # the stacked view the tuner searched is that same index
    view = stacked_view(files)
    apply_params(view, params)
    d3, i3 = view.search(q, k)
    np.testing.assert_array_equal(i3, i1)
    d_seq, i_seq = sharded.search(q, k, parallel=False)
    np.testing.assert_array_equal(i_seq, i2)
    np.testing.assert_array_equal(d_seq, d2)


def test_spark_index_autofaiss_key(spark, tmp_path) -> None:
    sizes = [1200, 900, 1100]
    layout, x = _write_embeddings(tmp_path, sizes)
    cfg = _cfg(tmp_path, shards=3)
    info = _build(cfg, layout, sum(sizes), None, timeout_s=240)
    assert info["key"].startswith("IVF") and info["distributor"] == "pyspark"
    _check_distributed(layout, info, x, shards=3, k=cfg.k)
    written = json.loads(layout.index_build_info(SLUG, "image").read_text())
    assert written["params"] == info["params"] and written["count"] == sum(sizes)


def test_spark_index_hnsw_quantizer_does_not_hang(spark, tmp_path) -> None:
    """autofaiss 2.18 tunes each kept index but the first on reconstruct_n(0, 100), memory
    that shard does not hold; with an HNSW quantizer that search never returned."""
    sizes = [2000, 1500, 1500]
    layout, x = _write_embeddings(tmp_path, sizes, seed=1)
    cfg = _cfg(tmp_path, shards=3)
    info = _build(cfg, layout, sum(sizes), "OPQ16_32,IVF64_HNSW32,PQ16x8", timeout_s=240)
    assert "quantizer_efSearch=" in info["params"]
    _check_distributed(layout, info, x, shards=3, k=cfg.k)


def test_tuner_meets_coverage_within_its_bound() -> None:
    x = _clustered(5000, 2).astype(np.float32)
    index = faiss.index_factory(DIM, "IVF128_HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    tuned = tune_ivf(index, x[:300], 200, max_ms=5.0, deadline_s=30)
    assert not tuned.stopped_by_deadline
    apply_params(index, tuned.params)
    assert coverage(index, x[:100], 200) >= 0.99  # 200 ids come back per query
    smaller = [e["coverage"] for e in tuned.evaluated if "coverage" in e and e["nprobe"] < tuned.nprobe]
    assert tuned.nprobe == 1 or smaller  # it searched downwards, not just took the maximum
    # a tuner past its deadline stops at once and still returns a usable setting
    late = tune_ivf(index, x[:300], 200, max_ms=5.0, deadline_s=0.0)
    assert late.stopped_by_deadline and late.params.startswith("nprobe=")
    # NaN rows (autofaiss's garbage queries) are dropped, never searched
    with pytest.raises(XMError, match="no finite"):
        tune_ivf(index, np.full((5, DIM), np.nan, np.float32), 10, max_ms=5.0)


def test_parallel_shard_search_equals_sequential(tmp_path) -> None:
    x = _clustered(6000, 3).astype(np.float32)
    index = faiss.index_factory(DIM, "IVF64,PQ8x8", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    apply_params(index, "nprobe=16")
    infos = write_shards(index, 4, lambda i: tmp_path / f"s{i}.index")
    sharded = ShardedIndex([tmp_path / s.file for s in infos], [s.id_offset for s in infos], "nprobe=16")
    assert sharded._pool is not None  # the parallel path is the one under test
    q = x[:64] + 0.05
    for k in (1, 30, 200):
        d_par, i_par = sharded.search(q, k)
        d_seq, i_seq = sharded.search(q, k, parallel=False)
        np.testing.assert_array_equal(i_par, i_seq)
        np.testing.assert_array_equal(d_par, d_seq)
    d1, i1 = index.search(q, 30)
    np.testing.assert_array_equal(sharded.search(q, 30)[1], i1)
    sharded.close()


def test_spark_training_is_kept_and_reused(spark, tmp_path) -> None:
    """Training runs once, on an executor, and is kept under _work: a rebuild (a new driver after
    a lost one) reuses it and fills the same index."""
    from xm.pipeline.index_training import trained_dir

    sizes = [1200, 1300]
    layout, x = _write_embeddings(tmp_path, sizes, seed=2)
    cfg = _cfg(tmp_path, shards=2)
    first = _build(cfg, layout, sum(sizes), None, timeout_s=240)
    assert first["autofaiss"]["training"] == {"index_key": first["key"], "reused": False}
    kept = trained_dir(layout, SLUG, "image") / "trained.index"
    stamp = kept.stat().st_mtime_ns
    before = [_stored_ids(layout.index_dir(SLUG, "image") / s["file"]) for s in first["shards"]]
    layout.index_build_info(SLUG, "image").unlink()  # the index must be rebuilt, its training need not
    again = _build(cfg, layout, sum(sizes), None, timeout_s=240)
    assert again["autofaiss"]["training"] == {"index_key": first["key"], "reused": True}
    assert kept.stat().st_mtime_ns == stamp
    assert again["params"] == first["params"] and again["shards"] == first["shards"]
    after = [_stored_ids(layout.index_dir(SLUG, "image") / s["file"]) for s in again["shards"]]
    assert all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(before, after))
    # another budget is another index: trained anew, not the kept one
    other = _build(BuildConfig(**{**cfg.__dict__, "max_index_memory": "100M"}), layout, sum(sizes), "IVF16,Flat", timeout_s=240)
    assert other["autofaiss"]["training"]["reused"] is False and other["key"] == "IVF16,Flat"
    _check_distributed(layout, _build(cfg, layout, sum(sizes), None, timeout_s=240), x, shards=2, k=cfg.k)
