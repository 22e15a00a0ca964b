"""End to end: real img2dataset downloads from a loopback server, real open_clip, faiss, Parquet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import TINY, TINY_ROLES, jpeg_bytes, make_image, write_caption_folder
from xm.encoders import load_encoder
from xm.errors import XMError
from xm.memories import open_index
from xm.pipeline import BuildConfig, build_index

N_GOOD = 40


def _serve_pairs(routes: dict[str, bytes], base: str) -> pd.DataFrame:
    rows = []
    for i in range(N_GOOD):
        routes[f"/img/{i}.jpg"] = jpeg_bytes(make_image(i))
        rows.append((f"{base}/img/{i}.jpg", f"a memory photo number {i}", f"lic{i}"))
    rgba = make_image(900, mode="RGBA")
    rgba.putalpha(128)
    routes["/alpha.png"] = jpeg_bytes(rgba, "PNG")
    rows.append((f"{base}/alpha.png", "a translucent png", "licA"))
    routes["/huge.jpg"] = jpeg_bytes(make_image(901, size=4000))
    rows.append((f"{base}/huge.jpg", "a very large image", "licH"))
    routes["/corrupt.jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg at all"
    rows.append((f"{base}/corrupt.jpg", "a corrupt file", "licC"))
    for j in range(3):
        rows.append((f"{base}/missing/{j}.jpg", f"a dead link {j}", "licM"))
    return pd.DataFrame(rows, columns=["URL", "TEXT", "LICENSE"])


def _config(source: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(source=str(source), out=out, url_col="URL", caption_col="TEXT", processes=1, threads=4,
                       shard_size=8, timeout=5, **TINY_ROLES, **kw)


@pytest.mark.slow
def test_download_embed_index_store(tmp_path, image_server) -> None:
    base, routes = image_server
    table = tmp_path / "pairs.parquet"
    _serve_pairs(routes, base).to_parquet(table)
    summary = build_index(_config(table, tmp_path / "idx", shards=2))

    expected = N_GOOD + 2  # the PNG with alpha and the huge image succeed
    assert summary.count == expected
    assert summary.selected == N_GOOD + 6
    assert sum(summary.failures.values()) == 4, summary.failures  # 3 dead links + 1 corrupt
    assert any("404" in reason for reason in summary.failures)

    memory = open_index(tmp_path / "idx")
    assert memory.count == expected
    for spec in {TINY, TINY_ROLES["fine"]}:
        assert len(memory.embeddings(spec, "text")) == expected
    assert len(memory.embeddings(TINY, "image")) == expected
    assert memory.index("image").ntotal == expected and len(memory.index("image").shards) == 2
    assert len(memory.store) == expected and len(memory.caption_hashes) == expected
    meta = memory.store.table(0, memory.count).to_pandas()
    assert len(meta) == expected and meta["url"].is_unique and meta["id"].tolist() == list(range(expected))
    # captions and URLs are stored once: in the store's shards, no metadata/ part in the memory
    assert not list((tmp_path / "idx/embeddings").glob("*/metadata")) and not list((tmp_path / "idx/store").glob("*.parquet"))

    # a memory image finds itself first, with its own caption and the source's extra column
    coarse = load_encoder(TINY)
    for i in (0, 17, 39):
        q = coarse.encode_images([make_image(i)])
        sims, ids = memory.search("image", q, 5)
        row = memory.store.fetch(ids[0][:1])[0]
        assert row["caption"] == f"a memory photo number {i}" and row["url"].endswith(f"/img/{i}.jpg")
        assert row["LICENSE"] == f"lic{i}"
        assert sims[0, 0] > 0.99
    # the text index finds an identical caption first
    _, ids = memory.search("text", coarse.encode_texts(["a very large image"]), 1)
    assert memory.store.captions(ids[0]) == ["a very large image"]

    # re-running the same command is a no-op that keeps the same artefacts
    again = build_index(_config(table, tmp_path / "idx", shards=2))
    assert again.count == expected and again.manifest_id == summary.manifest_id
    assert any("already done" in s for s in again.skipped)
    # ... and one with another selection into the same folder is refused, leaving it intact
    with pytest.raises(XMError, match="other selection"):
        build_index(_config(table, tmp_path / "idx", shards=2, limit=5))
    with pytest.raises(XMError, match="other encoders"):
        build_index(BuildConfig(source=str(table), out=tmp_path / "idx", url_col="URL", caption_col="TEXT",
                                coarse=TINY, fine=TINY, inference=[TINY], processes=1, threads=4, shard_size=8, shards=2))
    assert open_index(tmp_path / "idx").count == expected


def _markers(out: Path) -> list[Path]:
    return sorted((out / "_work/done/embed").glob("*.json"))


@pytest.mark.slow
def test_killed_mid_embed_resumes_without_loss_or_duplicates(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 0)
    n = 600
    for i in range(n):
        make_image(i, size=64).save(src / f"im{i:04d}.jpg")
        (src / f"im{i:04d}.txt").write_text(f"caption {i}")
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "xm.cli", "build-index", "--source", str(src), "--out", str(out),
           "--coarse", TINY, "--fine", TINY_ROLES["fine"], "--inference", TINY, "--batch-size", "8", "--shard-size", "50"]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _markers(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(_markers(out))
    assert 1 <= done_before < n // 50, "the kill must land inside the embed stage"
    assert not (out / "manifest.json").exists()

    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    memory = open_index(out)
    assert memory.count == n
    rows = memory.store.fetch(np.arange(n))
    assert sorted(r["source_id"] for r in rows) == sorted(f"im{i:04d}.jpg" for i in range(n))
    assert [r["id"] for r in rows] == list(range(n))
    for r in rows[::97]:
        assert r["caption"] == f"caption {int(r['source_id'][2:6])}"
    # no stray temporary files left behind
    assert not [p for p in out.rglob("*.tmp")]


def test_folder_source_counts_and_corrupt_file(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 12)
    (src / "zz_broken.jpg").write_bytes(b"not an image")
    Image.new("L", (50, 50), 128).save(src / "gray.png")
    summary = build_index(BuildConfig(source=str(src), out=tmp_path / "idx", **TINY_ROLES))
    assert summary.count == 13 and summary.failures == {"failed_to_decode": 1}
    memory = open_index(tmp_path / "idx")
    row = memory.store.fetch([memory.count - 1])[0]
    assert {row["source_id"], row["caption"]} == {"im011.jpg", "caption number 11"}


def test_index_refuses_damaged_or_missing_files(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 10)
    build_index(BuildConfig(source=str(src), out=tmp_path / "idx", **TINY_ROLES))
    shard = next((tmp_path / "idx/index").glob("*/image/shard-*.index"))
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(XMError, match="checksum"):
        open_index(tmp_path / "idx")
    shard.unlink()
    with pytest.raises(XMError, match="missing"):
        open_index(tmp_path / "idx")
    with pytest.raises(XMError, match="not a finished xm index"):
        open_index(tmp_path / "pairs")


def test_bad_sources_fail_clearly(tmp_path) -> None:
    with pytest.raises(XMError, match="no such file"):
        build_index(BuildConfig(source=str(tmp_path / "nope.parquet"), out=tmp_path / "o", **TINY_ROLES))
    bad = tmp_path / "t.csv"
    bad.write_text("link,words\nhttp://x/1.jpg,hello\n")
    with pytest.raises(XMError, match="no column 'URL'"):
        build_index(BuildConfig(source=str(bad), out=tmp_path / "o", url_col="URL", caption_col="TEXT", **TINY_ROLES))
    with pytest.raises(XMError, match="metadata part 0"):
        build_index(BuildConfig(source="laion400m", out=tmp_path / "o", parts=[0], metadata_root=str(tmp_path), **TINY_ROLES))


def test_laion_precomputed_embedding_parts(tmp_path) -> None:
    """Parts in LAION's layout (images/ texts/ metadata/), written with the coarse encoder."""
    coarse = load_encoder(TINY)
    root = tmp_path / "laion"
    captions = {}
    for part, n in ((0, 9), (1, 6)):
        imgs = [make_image(100 * part + j) for j in range(n)]
        caps = [f"laion caption {part}-{j}" for j in range(n)]
        captions[part] = caps
        for sub in ("images", "texts", "metadata"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        np.save(root / f"images/img_emb_{part}.npy", coarse.encode_images(imgs).astype(np.float16))
        np.save(root / f"texts/text_emb_{part}.npy", coarse.encode_texts(caps).astype(np.float16))
        pd.DataFrame({"url": [f"http://laion/{part}/{j}" for j in range(n)], "caption": caps,
                      "NSFW": ["UNLIKELY"] * n, "similarity": np.linspace(0.3, 0.4, n)}).to_parquet(root / f"metadata/metadata_{part}.parquet")
    summary = build_index(BuildConfig(source="laion400m-embeddings", out=tmp_path / "idx", parts=[0, 1],
                                      embeddings_root=str(root), **TINY_ROLES))
    assert summary.count == 15
    memory = open_index(tmp_path / "idx")
    _, ids = memory.search("image", coarse.encode_images([make_image(103)]), 1)
    row = memory.store.fetch(ids[0])[0]
    assert row["caption"] == "laion caption 1-3" and row["url"] == "http://laion/1/3"
    # fine-encoder caption embeddings were computed from the metadata captions
    fine = load_encoder(TINY_ROLES["fine"])
    np.testing.assert_allclose(memory.embeddings(TINY_ROLES["fine"], "text").gather([12]),
                               fine.encode_texts(["laion caption 1-3"]), atol=2e-3)
    # a part whose embeddings disagree with its metadata is refused with its file named
    np.save(root / "images/img_emb_2.npy", np.zeros((3, 64), np.float16))
    np.save(root / "texts/text_emb_2.npy", np.zeros((3, 64), np.float16))
    pd.DataFrame({"url": ["u"] * 4, "caption": ["c"] * 4}).to_parquet(root / "metadata/metadata_2.parquet")
    with pytest.raises(XMError, match="img_emb_2.npy"):
        build_index(BuildConfig(source="laion400m-embeddings", out=tmp_path / "idx2", parts=[2],
                                embeddings_root=str(root), **TINY_ROLES))


@pytest.mark.slow
def test_laion400m_source_over_loopback(tmp_path, image_server) -> None:
    """LAION-400M metadata parts fetched over HTTP by their real names, NSFW-filtered, then downloaded."""
    from xm.pipeline import laion

    base, routes = image_server
    rows = []
    for i in range(6):
        routes[f"/laion/{i}.jpg"] = jpeg_bytes(make_image(300 + i))
        rows.append({"SAMPLE_ID": 1000 + i, "URL": f"{base}/laion/{i}.jpg", "TEXT": f"laion pair {i}", "HEIGHT": 96,
                     "WIDTH": 96, "LICENSE": "?", "NSFW": "NSFW" if i == 2 else "UNLIKELY", "similarity": 0.31 + i / 100})
    buf = tmp_path / "part.parquet"
    pd.DataFrame(rows).to_parquet(buf)
    routes[f"/meta/{laion.metadata_part_name(0)}"] = buf.read_bytes()
    summary = build_index(BuildConfig(source="laion400m", out=tmp_path / "idx", parts=[0], limit=4,
                                      metadata_root=f"{base}/meta", processes=1, threads=4, **TINY_ROLES))
    assert summary.selected == 4 and summary.count == 4
    memory = open_index(tmp_path / "idx")
    rows = memory.store.fetch(range(4))
    assert [r["caption"] for r in rows] == ["laion pair 0", "laion pair 1", "laion pair 3", "laion pair 4"]
    assert rows[2]["SAMPLE_ID"] == 1003 and rows[2]["NSFW"] == "UNLIKELY"

    # the img2dataset output folder is itself a source
    again = build_index(BuildConfig(source=str(tmp_path / "idx/_work/download"), out=tmp_path / "idx2", **TINY_ROLES))
    assert again.source_kind == "img2dataset" and again.count == 4
    assert open_index(tmp_path / "idx2").store.captions([3]) == ["laion pair 4"]


def test_cli_info_and_search(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 10)
    build_index(BuildConfig(source=str(src), out=tmp_path / "idx", **TINY_ROLES))
    xm = [sys.executable, "-m", "xm.cli"]
    info = subprocess.run([*xm, "info", str(tmp_path / "idx"), "--verify"], capture_output=True, text=True)
    assert info.returncode == 0 and "xm-tiny-vit:random" in info.stdout and "IVF" in info.stdout
    manifest = json.loads(subprocess.run([*xm, "info", str(tmp_path / "idx"), "--json"], capture_output=True, text=True).stdout)
    assert manifest["count"] == 10 and manifest["roles"]["fine"] == TINY_ROLES["fine"]
    hits = subprocess.run([*xm, "search", str(tmp_path / "idx"), "--image", str(src / "im004.jpg"), "-k", "3", "--json"],
                          capture_output=True, text=True)
    first = json.loads(hits.stdout.splitlines()[0])
    assert first["caption"] == "caption number 4" and first["id"] == 4
    text = subprocess.run([*xm, "search", str(tmp_path / "idx"), "--text", "caption number 7", "--modality", "text", "--json"],
                          capture_output=True, text=True)
    assert json.loads(text.stdout.splitlines()[0])["caption"] == "caption number 7"
    bad = subprocess.run([*xm, "search", str(tmp_path / "idx"), "--image", str(tmp_path / "nope.jpg")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("nope.jpg: no such image file")


def test_failed_first_run_can_be_retried_with_other_encoders(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 5)
    with pytest.raises(XMError, match="ViT-B-32:openai"):
        build_index(BuildConfig(source=str(src), out=tmp_path / "idx"))  # default encoders: not available offline
    assert build_index(BuildConfig(source=str(src), out=tmp_path / "idx", **TINY_ROLES)).count == 5
