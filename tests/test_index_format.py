from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest

from xm.errors import XMError
from xm.indexes.embeddings import EmbeddingMatrix
from xm.indexes.layout import STORE_ROW_GROUP
from xm.indexes.open_files import OpenFiles
from xm.indexes.records import STORE_SHARDS, Manifest
from xm.indexes.shards import ShardedIndex, shard_bounds, write_shards
from xm.indexes.store import PartsStore, ShardStore, shard_ranges, write_store_part, write_store_shard


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("key,n_shards", [("IVF64,PQ8x8", 4), ("OPQ8_32,IVF32,PQ8x8", 3), ("Flat", 3), ("HNSW16", 2)])
def test_sharded_search_equals_one_index(tmp_path, key: str, n_shards: int) -> None:
    x = _unit(6000, 32, 0)
    q = _unit(20, 32, 1)
    index = faiss.index_factory(32, key, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    params = "nprobe=8" if "IVF" in key else ("efSearch=256" if "HNSW" in key else "")
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    d1, i1 = index.search(q, 50)
    infos = write_shards(index, n_shards, lambda i: tmp_path / f"shard-{i}.index")
    assert [s.id_range for s in infos] == shard_bounds(6000, n_shards)
    sharded = ShardedIndex([tmp_path / s.file for s in infos], [s.id_offset for s in infos], params)
    assert sharded.ntotal == 6000
    d2, i2 = sharded.search(q, 50)
    if "HNSW" in key:  # separate graphs per shard: approximately the same, exact top-1 on its own vectors
        _, self_ids = sharded.search(x[[5, 4000]], 1)
        assert self_ids[:, 0].tolist() == [5, 4000]
        assert np.mean([len(set(a) & set(b)) / 50 for a, b in zip(i1, i2)]) > 0.9
    else:
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)


def test_sharded_search_pads_missing_results(tmp_path) -> None:
    x = _unit(30, 8, 2)
    index = faiss.IndexFlatIP(8)
    index.add(x)
    infos = write_shards(index, 2, lambda i: tmp_path / f"s{i}.index")
    sims, ids = ShardedIndex([tmp_path / s.file for s in infos], [s.id_offset for s in infos]).search(x[:1], 40)
    assert (ids[0, :30] >= 0).all() and (ids[0, 30:] == -1).all() and np.isneginf(sims[0, 30:]).all()
    assert sorted(ids[0, :30].tolist()) == list(range(30))


def test_embedding_matrix_gathers_across_parts(tmp_path) -> None:
    parts = [_unit(n, 4, n) for n in (5, 7, 3)]
    files = []
    for i, p in enumerate(parts):
        files.append(tmp_path / f"img_emb_{i}.npy")
        np.save(files[-1], p.astype(np.float16))
    m = EmbeddingMatrix(files)
    full = np.concatenate(parts).astype(np.float16).astype(np.float32)
    ids = np.array([14, 0, 5, 5, 11, 4])
    np.testing.assert_array_equal(m.gather(ids), full[ids])
    assert len(m) == 15


def test_caption_store_fetches_ids_in_order(tmp_path) -> None:
    sizes = [2500, 10, 1800]
    files, first, hashes = [], 0, []
    for p, n in enumerate(sizes):
        table = pa.table({"caption": [f"cap {first + j}" for j in range(n)], "url": [f"u{first + j}" for j in range(n)],
                          "source_id": [str(first + j) for j in range(n)], "NSFW": ["UNLIKELY"] * n})
        files.append(tmp_path / f"part-{p}.parquet")
        hashes.append(write_store_part(table, first, files[-1]))
        first += n
    store = PartsStore(files, sizes)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(files[0]).metadata.row_group(0).num_rows == STORE_ROW_GROUP
    ids = np.random.default_rng(0).choice(first, 128, replace=False)
    rows = store.fetch(ids)
    assert [r["id"] for r in rows] == ids.tolist()
    assert [r["caption"] for r in rows] == [f"cap {i}" for i in ids]
    assert rows[0]["NSFW"] == "UNLIKELY"
    h = np.concatenate(hashes)
    assert len(set(h.tolist())) == first


def _hostile_parts(n_parts: int, seed: int = 0) -> list[pa.Table]:
    """Parts of 0-7 rows: unicode, empty and null captions, a column typed in some parts and null
    (or absent) in others."""
    rng = np.random.default_rng(seed)
    parts, first = [], 0
    for p in range(n_parts):
        n = int(rng.integers(0, 8))
        caps = [None if (first + j) % 11 == 0 else f"cap {first + j} \u00e9\u4e2d\n\"q\"" * int((first + j) % 3) for j in range(n)]
        cols = {"caption": pa.array(caps, pa.string()), "url": [f"http://127.0.0.1/{first + j}.jpg" for j in range(n)],
                "source_id": [str(first + j) for j in range(n)], "image_path": [f"img/{first + j}.jpg" for j in range(n)]}
        if p % 3 == 0:
            cols["similarity"] = pa.array([0.25 + j for j in range(n)], pa.float64())
        elif p % 3 == 1:
            cols["similarity"] = pa.array([None] * n, pa.null())
        parts.append(pa.table(cols))
        first += n
    return parts


def _both_layouts(tmp_path, parts: list[pa.Table], shard_rows: int, opened: OpenFiles | None = None) -> tuple[PartsStore, ShardStore]:
    """The same rows as Parquet store parts (memories built before) and as store shards."""
    sizes = [t.num_rows for t in parts]
    firsts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    files, hashes = [], []
    for i, (t, first) in enumerate(zip(parts, firsts)):
        files.append(tmp_path / "parts" / f"part-{i:05d}.parquet")
        files[-1].parent.mkdir(exist_ok=True)
        hashes.append(write_store_part(t, int(first), files[-1]))
    whole = pa.concat_tables(parts, promote_options="default")
    shards, shard_hashes = [], []
    for i, (start, stop) in enumerate(shard_ranges(int(firsts[-1]), shard_rows)):
        shards.append(tmp_path / "shards" / f"rows-{i:05d}.arrow")
        shards[-1].parent.mkdir(exist_ok=True)
        shard_hashes.append(write_store_shard([whole.slice(start, stop - start)], start, shards[-1]))
    assert np.concatenate(hashes).tolist() == np.concatenate(shard_hashes).tolist()
    return PartsStore(files, sizes), ShardStore(shards, int(firsts[-1]), shard_rows, opened=opened)


def test_store_shards_fetch_the_rows_of_many_tiny_parquet_parts(tmp_path) -> None:
    """Issue 19: a fetch from the store shards equals the Parquet parts' rows, for random ids over
    hundreds of tiny parts, every column or some, ids in any order and repeated."""
    old, new = _both_layouts(tmp_path, _hostile_parts(400), shard_rows=97)
    assert len(old) == len(new) > 1000 and len(new.files) == len(shard_ranges(len(new), 97))
    rng = np.random.default_rng(1)
    for _ in range(5):
        ids = rng.choice(len(new), 128, replace=False)
        ids[-1] = ids[0]  # a repeated id comes back twice
        # a column a part lacks is null in its rows of the shard (Parquet parts left it out)
        assert new.fetch(ids) == [{"similarity": None, **row} for row in old.fetch(ids)]
        assert new.fetch(ids, ["url", "caption"]) == old.fetch(ids, ["url", "caption"])
        assert new.captions(ids) == old.captions(ids)
    row = new.fetch([0])[0]
    assert list(row) == ["id", "caption", "url", "source_id", "image_path", "similarity"] and row["caption"] is None
    assert new.table(90, 300).to_pylist() == [{"similarity": None, **row} for row in old.table(90, 300).to_pylist()]
    assert new.table(5, 5).num_rows == 0 and new.fetch([]) == []
    with pytest.raises(XMError, match="out of range"):
        new.fetch([len(new)])
    with pytest.raises(XMError, match="no column 'NSFW'"):
        new.fetch([1], ["NSFW"])


def test_store_shards_stay_within_the_open_file_bound(tmp_path) -> None:
    """Shards are mapped on demand and kept in the memory's bounded LRU: fetching from 40 shards
    with room for 4 leaves at most 4 mapped; a shard whose rows disagree with the count is refused."""
    import gc

    opened = OpenFiles(capacity=4)
    _, new = _both_layouts(tmp_path, _hostile_parts(120, seed=2), shard_rows=10, opened=opened)
    assert len(new.files) >= 30
    ids = np.random.default_rng(3).permutation(len(new))
    assert [r["id"] for r in new.fetch(ids)] == ids.tolist()
    gc.collect()
    mapped = {line.split()[-1] for line in open("/proc/self/maps") if "/shards/rows-" in line}
    assert len(opened) == 4 and len(mapped) <= 4
    short = ShardStore(new.files[:3], 25, 10)  # its third shard should hold 5 ids; the file holds 10
    with pytest.raises(XMError, match="rows-00002.arrow: 10 rows, the manifest's count says 5"):
        short.fetch([24])


def test_the_store_entry_is_recorded_and_an_unknown_layout_refused() -> None:
    base = {"format": "xm-index/2", "id": "x", "created": "", "count": 0, "source": {"kind": "folder", "source": "s", "limit": None, "parts": None},
            "roles": {"coarse": "a", "fine": "a", "inference": ["a"]}, "encoders": {}, "parts": [], "indexes": [],
            "stats": {"failures": {}, "selected": 0}, "versions": {}, "files": {}}
    assert Manifest.from_json(base).store is None and "store" not in Manifest.from_json(base).to_json()
    shards = {**base, "store": {"format": STORE_SHARDS, "shard_rows": 1000}}
    assert Manifest.from_json(shards).to_json()["store"] == {"format": STORE_SHARDS, "shard_rows": 1000}
    with pytest.raises(XMError, match=r"m.json: field store.format is 'xm-store/9'.*upgrade xm"):
        Manifest.from_json({**base, "store": {"format": "xm-store/9", "shard_rows": 1000}}, "m.json")
    with pytest.raises(XMError, match="store.shard_rows"):
        Manifest.from_json({**base, "store": {"format": STORE_SHARDS, "shard_rows": 0}}, "m.json")


def test_atomic_files_get_the_usual_mode(tmp_path) -> None:
    import os

    from xm.indexes.layout import FILE_MODE, atomic_path

    with atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == FILE_MODE == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert not (tmp_path / "b.bin").exists() and not list(tmp_path.glob(".b.bin*"))
