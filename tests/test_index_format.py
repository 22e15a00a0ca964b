from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest

from xm.indexes.embeddings import EmbeddingMatrix
from xm.indexes.layout import STORE_ROW_GROUP
from xm.indexes.shards import ShardedIndex, shard_bounds, write_shards
from xm.indexes.store import CaptionStore, write_store_part


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
    store = CaptionStore(files, sizes)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(files[0]).metadata.row_group(0).num_rows == STORE_ROW_GROUP
    ids = np.random.default_rng(0).choice(first, 128, replace=False)
    rows = store.fetch(ids)
    assert [r["id"] for r in rows] == ids.tolist()
    assert [r["caption"] for r in rows] == [f"cap {i}" for i in ids]
    assert rows[0]["NSFW"] == "UNLIKELY"
    h = np.concatenate(hashes)
    assert len(set(h.tolist())) == first


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
