"""A memory of many parts opens and serves under `ulimit -n 1024` (issue 19, point 2): readers
open parts lazily through one bounded cache of maps and files, and a large manifest keeps its
per-part records in checksummed Parquet tables (point 5).

The memories are written with xm's own writers by bench/bench_parts.py (no encoder runs: this
tests the readers); the probe opens, searches and fetches in a fresh process whose descriptor
limit is set with `resource.setrlimit(RLIMIT_NOFILE, 1024)`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from xm.errors import XMError
from xm.indexes import manifest as manifest_module, read_manifest
from xm.memories import open_index

PARTS = 700  # 2,100 embedding part files: past INLINE_FILES, so the manifest keeps tables
SHARD_ROWS = 100  # 14 caption-store shards: a fetch of 128 random ids touches all of them
FILES = 3 * PARTS + PARTS * 2 // SHARD_ROWS + 2  # + the caption hashes and the kNN shard
_spec = importlib.util.spec_from_file_location("bench_parts", Path(__file__).parents[1] / "bench" / "bench_parts.py")
bench_parts = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(bench_parts)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def past_the_limit(tmp_path_factory) -> Path:
    """More parts than the probe's descriptor limit (700 parts, 2,100 part files, under 256
    descriptors; the 40k one under 1,024 is the slow test): a reader holding every part open
    fails here, as it failed at 1,017 parts under 1,024."""
    root = tmp_path_factory.mktemp("many") / "memory"
    bench_parts.build(root, PARTS, 2, shard_rows=SHARD_ROWS)
    return root


def test_more_parts_than_descriptors_open_search_and_fetch(past_the_limit) -> None:
    got = bench_parts.probe(past_the_limit, nofile=256)
    assert got["top1_is_query"]  # the probe also checked every fetched caption against what was written
    assert got["cached_open"] <= 128 and got["open_files"] < 256
    assert got["memory_maps_of_the_memory"] <= 128 + 4  # the cache's parts, the caption hashes, the shard


def test_a_large_manifest_keeps_parts_and_files_in_tables(past_the_limit) -> None:
    data = json.loads((past_the_limit / "manifest.json").read_text())
    assert set(data["parts"]) == {"table", "rows", "sha256"} and data["parts"]["rows"] == PARTS
    assert data["files"]["rows"] == FILES and (past_the_limit / "manifest.json").stat().st_size < 4096
    m = read_manifest(past_the_limit)
    assert len(m.parts) == PARTS and m.parts[7].rows == 2 and len(m.files) == FILES
    assert m == read_manifest(past_the_limit) and m.id


def test_opening_checks_a_sample_and_verify_checks_everything(past_the_limit, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(past_the_limit, copy)
    m = read_manifest(copy)
    sampled = set(manifest_module.sample_files(m, 1_000))
    spared = next(rel for rel in m.files if rel not in sampled and rel.startswith("embeddings/"))
    (copy / spared).write_bytes(b"x")  # resized, in a file opening does not check
    open_index(copy)  # opens: a summary check
    with pytest.raises(XMError, match="bytes, the manifest says"):
        open_index(copy, verify=True)  # xm info --verify: every file


def test_a_damaged_manifest_table_is_refused_in_one_line(past_the_limit, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(past_the_limit, copy)
    table = copy / json.loads((copy / "manifest.json").read_text())["parts"]["table"]
    t = pq.read_table(table)
    pq.write_table(t.slice(0, 10), table)
    with pytest.raises(XMError, match="checksum differs from the manifest's; the manifest's parts table is damaged"):
        read_manifest(copy)
    table.unlink()
    with pytest.raises(XMError, match="missing .the manifest keeps its parts there"):
        read_manifest(copy)


def test_a_rewrite_with_the_same_content_keeps_its_tables(past_the_limit, tmp_path) -> None:
    import shutil

    from xm.indexes.layout import Layout

    copy = tmp_path / "copy"
    shutil.copytree(past_the_limit, copy)
    before = sorted(p.name for p in (copy / "manifest").iterdir())
    m = read_manifest(copy)
    files = [copy / rel for rel in m.files]
    again = manifest_module.write_manifest(Layout(copy), m, files, keep_if_same=True)
    assert again == m and sorted(p.name for p in (copy / "manifest").iterdir()) == before


@pytest.mark.slow
def test_a_40k_part_memory_opens_under_ulimit_1024(tmp_path) -> None:
    """Issue 19's done-when: 40,000 parts (the simulated 400M) open, search and fetch under 1,024
    descriptors; its caption store cut into 400 shards (400M's count at the default million ids a
    shard), so the fetches of random ids map and drop shards through the bounded cache."""
    root = tmp_path / "memory"
    bench_parts.build(root, 40_000, 1, shard_rows=100)
    got = bench_parts.probe(root, nofile=1024, repeats=5)  # checks every caption it fetched
    assert got["top1_is_query"] and got["open_files"] < 1024 and got["memory_maps_of_the_memory"] <= 132


def test_an_old_layout_memory_fetches_the_same_rows(past_the_limit, tmp_path) -> None:
    """A memory built before the store shards (a Parquet store part and a metadata/ part per part,
    no `store` in its manifest) still opens, fetches the same rows within the descriptor bound,
    and exports the same clip-retrieval metadata/ parts as the memory that keeps its rows once."""
    from xm.indexes.export_embeddings import export_embeddings

    old = tmp_path / "old"
    bench_parts.legacy_copy(past_the_limit, old)
    assert read_manifest(old).store is None and read_manifest(past_the_limit).store is not None
    a, b = open_index(past_the_limit), open_index(old)
    ids = np.random.default_rng(5).choice(a.count, 300, replace=False)
    assert a.rows(ids) == b.rows(ids) and a.captions(ids) == [f"caption of item {i}" for i in ids]
    assert a.describe()["columns"] == b.describe()["columns"] == ["caption", "url", "source_id"]
    got = bench_parts.probe(old, nofile=256, repeats=2)  # checks every caption it fetched
    assert got["open_files"] < 256 and got["cached_open"] <= 128
    export_embeddings(past_the_limit, tmp_path / "export")  # metadata/ written from the store shards
    meta = sorted((tmp_path / "export").glob("*/metadata/*.parquet"))
    assert len(meta) == PARTS
    for f in meta[::50]:  # the metadata/ parts the old build wrote beside its store
        assert pq.read_table(f).equals(pq.read_table(old / "embeddings" / f.relative_to(tmp_path / "export")))
