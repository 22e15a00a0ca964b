"""`--source datacomp`: DataComp's metadata parquet + npz pairs ingested without images or the
weights of the encoders that made the arrays (ViT-B/32 and ViT-L/14, not available here)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import xm.encoders
from conftest import TINY
from xm.indexes.layout import Layout
from xm.memories import open_index

B32, L14 = "ViT-B-32:openai", "ViT-L-14:openai"
B32_SLUG, L14_SLUG = "ViT-B-32_openai", "ViT-L-14_openai"
# DataComp names its files by 32-hex-digit hashes; their order is the order of global ids
STEMS = ["0a5d3f52e4c1b7d8a9e0f1c2d3b4a596", "3f00c8e1b2a4d6f8e0a1b3c5d7e9f1a2", "c2b4e6a8d0f1e3c5a7b9d1f3e5c7a9b1"]
ROWS = [30, 25, 20]


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _write_pair(folder: Path, stem: str, n: int, seed: int, **override) -> dict:
    """One metadata pair in DataComp's layout: real column names, float16 arrays of the real dims."""
    rng = np.random.default_rng(seed)
    uids = [f"{seed:08x}{j:024x}" for j in range(n)]
    texts = [f"datacomp caption {seed}-{j}" for j in range(n)]
    pq.write_table(pa.table({
        "uid": uids, "url": [f"http://pool.example/{seed}/{j}.jpg" for j in range(n)], "text": texts,
        "original_width": rng.integers(50, 900, n), "original_height": rng.integers(50, 900, n),
        "clip_b32_similarity_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
        "clip_l14_similarity_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
        "face_bboxes": [[] if j % 3 else [[0.1, 0.2, 0.3, 0.4]] for j in range(n)],
        "sha256": [f"{j:064x}" for j in range(n)],
    }), folder / f"{stem}.parquet")
    arrays = {"b32_img": _unit(rng, n, 512), "b32_txt": _unit(rng, n, 512),
              "l14_img": _unit(rng, n, 768), "l14_txt": _unit(rng, n, 768), "dedup": _unit(rng, n, 64)}
    arrays.update(override)
    np.savez(folder / f"{stem}.npz", **{k: v for k, v in arrays.items() if v is not None})
    return {"uid": uids, "text": texts, **arrays}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("datacomp") / "metadata"
    folder.mkdir()
    return folder, [_write_pair(folder, stem, n, seed=i + 1) for i, (stem, n) in enumerate(zip(STEMS, ROWS))]


def _xm(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (its real error path: one line, exit code), as (code, stdout, stderr)."""
    from xm.cli.app import main

    monkeypatch.setattr(sys, "argv", ["xm", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return int(exit_.value.code or 0), out.out, out.err


def _build(monkeypatch, capsys, root: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return _xm(monkeypatch, capsys, "build-index", "--source", "datacomp", "--metadata-root", str(root),
               "--out", str(out), "--inference", TINY, *extra)


def _markers(out: Path) -> set[str]:
    return {p.stem for p in (out / "_work/done/embed").glob("*.json")}


def test_datacomp_pool_is_an_index_without_images_or_weights(pool, tmp_path, monkeypatch, capsys) -> None:
    root, data = pool
    loaded: list[str] = []
    real = xm.encoders.load_encoder
    monkeypatch.setattr(xm.encoders, "load_encoder", lambda spec, *a, **kw: loaded.append(str(spec)) or real(spec, *a, **kw))
    out = tmp_path / "idx"
    code, stdout, err = _build(monkeypatch, capsys, root.parent, out, "--json")  # the --data_dir: metadata/ is found
    assert code == 0, err
    assert loaded == [TINY]  # ViT-B/32 and ViT-L/14: every embedding from the pool, never loaded
    summary = json.loads(stdout.strip().splitlines()[-1])
    n = sum(ROWS)
    assert summary["count"] == n and summary["source_kind"] == "datacomp"

    layout, memory = Layout(out), open_index(out, verify=True)
    assert memory.parts == STEMS
    # the coarse image/text and fine text and image embeddings are the pool's arrays, bit for bit, in order
    for slug, modality, key in ((B32_SLUG, "image", "b32_img"), (B32_SLUG, "text", "b32_txt"),
                                (L14_SLUG, "text", "l14_txt"), (L14_SLUG, "image", "l14_img")):
        for stem, pair in zip(STEMS, data):
            stored = np.load(layout.emb_file(slug, modality, stem))
            assert stored.dtype == np.float16 and stored.tobytes() == pair[key].tobytes(), (slug, modality, stem)
    assert np.array_equal(memory.embeddings(B32, "image").gather(np.arange(n)),
                          np.concatenate([d["b32_img"] for d in data]).astype(np.float32))
    # captions by global id are the parquet's text; the uid is the item's source id
    texts = [t for d in data for t in d["text"]]
    assert memory.store.captions(np.arange(n)) == texts
    row = memory.store.fetch([31])[0]
    assert row["source_id"] == data[1]["uid"][1] and row["url"] == "http://pool.example/2/1.jpg"
    assert "sha256" in row and "face_bboxes" not in row
    # the coarse kNN finds an item from its own b32_img
    for i in (0, 29, 30, 74):
        part, j = (0, i) if i < 30 else (1, i - 30) if i < 55 else (2, i - 55)
        _, ids = memory.search("image", data[part]["b32_img"][j : j + 1].astype(np.float32), 1)
        assert ids[0, 0] == i
    # the inference encoder's caption embeddings were computed from the captions, with norms
    tiny = real(TINY)
    assert memory.has_norms(TINY, "text") and not memory.has_norms(L14, "text")
    np.testing.assert_allclose(memory.embeddings(TINY, "text").gather([5, 60]), tiny.encode_texts([texts[5], texts[60]]), atol=2e-3)

    # the manifest says which encoder and which array each embedding set is
    enc = memory.manifest.encoders
    assert enc[B32].to_json() == {"slug": B32_SLUG, "dim": 512, "logit_scale": 100.0, "probe": None, "embedded": ["image", "text"],
                        "norms": [], "precision": None,
                        "precomputed": {"image": "datacomp:b32_img", "text": "datacomp:b32_txt"}}
    assert enc[L14].dim == 768 and enc[L14].probe is None and enc[L14].embedded == ["image", "text"]
    assert enc[L14].precomputed == {"image": "datacomp:l14_img", "text": "datacomp:l14_txt"}
    assert enc[TINY].probe is not None and "precomputed" not in enc[TINY].to_json()
    assert {(e.encoder, e.modality) for e in memory.manifest.indexes} == {(B32, "image"), (B32, "text")}
    # a null probe is "not verifiable": the encoder is accepted by name, not refused or crashed on
    memory.check_encoder(SimpleNamespace(spec=B32, fingerprint_matches=lambda probe: False), "coarse")
    assert tiny.fingerprint_matches(None)

    # a rerun does nothing
    code, stdout, err = _build(monkeypatch, capsys, root.parent, out, "--json")
    assert code == 0, err
    again = json.loads(stdout.strip().splitlines()[-1])
    assert again["manifest_id"] == summary["manifest_id"] and "embed: 3 part(s) already done" in again["skipped"]
    assert f"index/{B32_SLUG}/image: current" in again["skipped"], again["skipped"]


def test_parts_and_limit(pool, tmp_path, monkeypatch, capsys) -> None:
    """--parts picks pairs by position in name order; --limit cuts the last pair with its arrays."""
    root, data = pool
    out = tmp_path / "lim"
    code, _, err = _build(monkeypatch, capsys, root, out, "--limit", "40", "--stages", "embed")
    assert code == 0, err
    assert _markers(out) == set(STEMS[:2])
    cut = np.load(Layout(out).emb_file(L14_SLUG, "text", STEMS[1]))
    assert cut.tobytes() == data[1]["l14_txt"][:10].tobytes()
    code, _, err = _build(monkeypatch, capsys, root, out, "--limit", "50", "--stages", "embed")
    assert code == 2 and "--limit" in err  # a folder keeps the selection it was started with

    from xm.pipeline import BuildConfig

    cfg = BuildConfig(source="datacomp", out=tmp_path / "p", metadata_root=str(root), parts=[2], inference=[TINY])
    # the embed stage's unit of work is plain data: a part is re-derived from (config, name)
    task_cfg = BuildConfig.from_dict(cfg.to_dict())
    parts = task_cfg.kind.parts(task_cfg, Layout(cfg.out))
    assert [p.name for p in parts] == [STEMS[2]] and parts[0].size == ROWS[2]
    assert parts[0].precomputed[(L14, "image")].key == "l14_img"
    assert cfg.plan()[L14] == ("image", "text")  # the pool's l14_img: RECO's memory, for free


def _bad_pool(tmp_path: Path, pool: tuple[Path, list[dict]], name: str) -> Path:
    """The first two pairs of the pool, the second broken as `name` says."""
    root = tmp_path / name
    root.mkdir()
    for stem in STEMS[:2]:
        for ext in (".parquet", ".npz"):
            shutil.copy(pool[0] / f"{stem}{ext}", root / f"{stem}{ext}")
    bad, n, rng = STEMS[1], ROWS[1], np.random.default_rng(7)
    if name == "missing-npz":
        (root / f"{bad}.npz").unlink()
    elif name == "key-absent":
        _write_pair(root, bad, n, 2, l14_txt=None)
    elif name == "rows":
        _write_pair(root, bad, n, 2, b32_txt=_unit(rng, n - 1, 512))
    elif name == "dim":
        _write_pair(root, bad, n, 2, l14_img=_unit(rng, n, 700))
    elif name == "nan":
        arr = _unit(rng, n, 768)
        arr[4, 10] = np.nan
        _write_pair(root, bad, n, 2, l14_txt=arr)
    elif name == "norm":
        _write_pair(root, bad, n, 2, b32_img=(_unit(rng, n, 512).astype(np.float32) * 3).astype(np.float16))
    return root


@pytest.mark.parametrize("name, expected", [
    ("missing-npz", f"{STEMS[1]}.npz: missing"),
    ("key-absent", f"{STEMS[1]}.npz: no array 'l14_txt'"),
    ("rows", f"{STEMS[1]}.npz [b32_txt]: 24 rows, but its metadata"),
    ("dim", f"{STEMS[1]}.npz [l14_img]: 700-dim rows, expected 768 for {L14}"),
    ("nan", f"{STEMS[1]}.npz [l14_txt]: row 4 is not finite"),
    ("norm", f"{STEMS[1]}.npz [b32_img]: row 0 has norm 3.0"),
])
def test_bad_pools_fail_in_one_line(pool, tmp_path, monkeypatch, capsys, name, expected) -> None:
    out = tmp_path / "out"
    code, _, err = _build(monkeypatch, capsys, _bad_pool(tmp_path, pool, name), out)
    errors = [line for line in err.splitlines() if line.startswith("xm: error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    assert STEMS[1] not in _markers(out)  # the bad part is not done ...
    assert not list(out.rglob(f"*_{STEMS[1]}.npy")) if out.exists() else True  # ... and left no array under a final name


@pytest.mark.parametrize("args, expected", [
    ((), "--source datacomp: no --metadata-root; download a pool's metadata"),
    (("--metadata-root", "http://127.0.0.1:1/datacomp"), "DataComp metadata is read from a local folder"),
    (("--coarse", TINY), f"image embeddings under {TINY} cannot be made"),
])
def test_unusable_setups_fail_before_any_work(pool, tmp_path, monkeypatch, capsys, args, expected) -> None:
    if args and args[0] == "--coarse":
        args = ("--metadata-root", str(pool[0]), *args)
    code, _, err = _xm(monkeypatch, capsys, "build-index", "--source", "datacomp", "--out", str(tmp_path / "o"),
                       "--inference", TINY, *args)
    errors = [line for line in err.splitlines() if line.startswith("xm: error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], err
    assert not (tmp_path / "o").exists()
