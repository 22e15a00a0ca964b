"""Format 2: what each encoder holds, v1 indexes still open, --add-encoder, --encoder, failures summed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, TINY_ROLES, TINY_WIDE, make_image, write_caption_folder
from xm.classify import Classifier
from xm.errors import XMError
from xm.indexes.layout import sha256_file
from xm.indexes.manifest import read_manifest
from xm.memories import open_index
from xm.pipeline import BuildConfig, build_index
from xm.pipeline.extend import add_encoder

LABELS = ["caption number 1", "caption number 2", "something else"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("v2")
    src = write_caption_folder(root / "pairs", 24)
    build_index(BuildConfig(source=str(src), out=root / "idx", **TINY_ROLES))
    return root / "idx"


def _xm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xm.cli", *args], capture_output=True, text=True)


def test_manifest_declares_what_each_encoder_holds(built) -> None:
    m = open_index(built)
    assert m.manifest.format == "xm-index/2" and m.format_read == "xm-index/2"
    assert m.manifest.encoders[TINY].embedded == ["image", "text"] and m.manifest.encoders[TINY].norms == ["text"]
    assert m.manifest.encoders[TINY_WIDE].embedded == ["text"]
    assert {(e.encoder, e.modality) for e in m.manifest.indexes} == {(TINY, "image"), (TINY, "text")}
    assert m.has_index(TINY, "text") and not m.has_index(TINY_WIDE, "image")
    assert m.default_model() == TINY
    # the stored norms are the caption embeddings' norms before normalisation
    enc = __import__("xm").load_encoder(TINY_WIDE)
    _, norms = enc.encode_texts_with_norms(m.store.captions([0, 3]))
    np.testing.assert_allclose(m.norms(TINY_WIDE, "text")[[0, 3]], norms, rtol=1e-5)


def _old_store(index: Path, target: Path, m: dict) -> None:
    """The rows the way memories before the store shards kept them: a Parquet store part and the
    first encoder's metadata/ part per part (captions twice), no store/rows-*.arrow."""
    import pyarrow.parquet as pq

    from xm.indexes.layout import Layout
    from xm.indexes.store import open_store, write_store_part

    store, layout = open_store(Layout(index), read_manifest(index)), Layout(target)
    slug = next(iter(m["encoders"].values()))["slug"]
    first = 0
    for part in m["parts"]:
        rows = store.table(first, first + part["rows"]).drop_columns(["id"])
        write_store_part(rows, first, layout.store_part(part["name"]))
        layout.metadata_file(slug, part["name"]).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, layout.metadata_file(slug, part["name"]))
        m["files"] |= {layout.rel(f): {} for f in (layout.store_part(part["name"]), layout.metadata_file(slug, part["name"]))}
        first += part["rows"]
    for shard in (target / "store").glob("rows-*.arrow"):
        shard.unlink()
        del m["files"][f"store/{shard.name}"]


def _as_v1(index: Path, target: Path) -> Path:
    """Rewrite a built index the way format 1 laid it out: index/<modality>/, roles only, no norms,
    the rows in Parquet store parts and metadata/ parts."""
    shutil.copytree(index, target)
    m = json.loads((target / "manifest.json").read_text())
    coarse = m["roles"]["coarse"]
    _old_store(index, target, m)
    files = {}
    for e in m["indexes"]:
        (target / "index" / e["modality"]).parent.mkdir(exist_ok=True)
        shutil.move(target / e["dir"], target / "index" / e["modality"])
    shutil.rmtree(target / "index" / m["encoders"][coarse]["slug"])
    for rel in m["files"]:
        new = rel
        for e in m["indexes"]:
            new = new.replace(e["dir"] + "/", f"index/{e['modality']}/")
        if "/text_norm/" in new:
            continue
        files[new] = {"bytes": (target / new).stat().st_size, "sha256": sha256_file(target / new)}
    for e in m["encoders"].values():
        shutil.rmtree(target / "embeddings" / e["slug"] / "text_norm", ignore_errors=True)
    v1 = {"format": "xm-index/1", "id": "v1index00000000", "created": m["created"], "count": m["count"], "source": m["source"],
          "roles": m["roles"],
          "encoders": {s: {k: v for k, v in e.items() if k not in ("embedded", "norms")} | {"modalities": e["embedded"]}
                       for s, e in m["encoders"].items()},
          "parts": m["parts"],
          "indexes": {e["modality"]: {k: v for k, v in e.items() if k not in ("modality", "dir")} for e in m["indexes"]},
          "stats": m["stats"], "versions": m["versions"], "files": files}
    (target / "manifest.json").write_text(json.dumps(v1))
    return target


def test_v1_index_opens_and_is_upgraded_by_add_encoder(built, tmp_path) -> None:
    old = _as_v1(built, tmp_path / "v1")
    m = open_index(old, verify=True)
    assert m.format_read == "xm-index/1" and m.has_index(TINY, "image") and not m.has_norms(TINY_WIDE, "text")
    assert m.manifest.store is None and m.rows(range(m.count)) == open_index(built).rows(range(m.count))
    image = make_image(3)
    # xm's protocol (cosine re-ranking) needs nothing v1 lacks
    r = Classifier(old, LABELS, model=TINY, protocol_name="xm", options={"k_coarse": 4, "k_fine": 2}).classify_images([image])[0]
    assert r["prediction"] in LABELS
    # the authors' raw-dot re-ranking needs the fine caption norms: one line naming the flag that adds them
    with pytest.raises(XMError, match=rf"needs {TINY_WIDE} text embedding norms.*--add-encoder {TINY_WIDE}=text"):
        Classifier(old, LABELS, model=TINY, options={"k_coarse": 4, "k_fine": 2})
    before = {p: sha256_file(old / p) for p in m.manifest.files}
    summary = add_encoder(str(old), f"{TINY_WIDE}=text")
    assert summary.added == ["text embeddings"]
    upgraded = open_index(old, verify=True)
    assert upgraded.manifest.format == "xm-index/2" and "format_read" not in json.loads((old / "manifest.json").read_text())
    assert upgraded.has_norms(TINY_WIDE, "text") and upgraded.index_entry(TINY, "image").dir == "index/image"
    assert all(sha256_file(old / p) == h for p, h in before.items() if "text_emb" not in p)
    r2 = Classifier(old, LABELS, model=TINY, options={"k_coarse": 4, "k_fine": 2}).classify_images([image])[0]
    assert r2["prediction"] in LABELS
    # idempotent: a re-run adds nothing and leaves the manifest as it is
    again = add_encoder(str(old), f"{TINY_WIDE}=text")
    assert again.added == [] and again.manifest_id == upgraded.id


def test_add_encoder_image_index_from_the_source(built, tmp_path) -> None:
    idx = tmp_path / "idx"
    shutil.copytree(built, idx)
    out = _xm("build-index", "--out", str(idx), "--add-encoder", f"{TINY_WIDE}=index-image", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["added"] == ["image embeddings", "image kNN index"]
    m = open_index(idx, verify=True)
    assert m.has_index(TINY_WIDE, "image") and m.manifest.encoders[TINY_WIDE].embedded == ["image", "text"]
    # the added image embeddings are the wide encoder's, row-aligned with the store: an image finds itself
    enc = __import__("xm").load_encoder(TINY_WIDE)
    row = m.store.fetch([7])[0]
    src = built.parent / "pairs" / row["source_id"]
    _, ids = m.search("image", enc.encode_images([__import__("xm").load_image(src)]), 1, encoder=TINY_WIDE)
    assert ids[0, 0] == 7
    bad = _xm("build-index", "--out", str(idx), "--add-encoder", f"{TINY}=pictures")
    assert bad.returncode == 2 and "unknown part(s) pictures" in bad.stderr


def test_encoder_flag_and_failures_summed_over_parts(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 9)
    for name in ("im001.jpg", "im005.jpg", "im007.jpg"):  # three parts of 3 images, a broken one in each
        (src / name).write_bytes(b"not an image")
    summary = build_index(BuildConfig(source=str(src), out=tmp_path / "idx", shard_size=3,
                                      encoders=[f"{TINY_WIDE}=image,index-text"], **TINY_ROLES))
    assert summary.failures == {"failed_to_decode": 3} and summary.count == 6
    m = open_index(tmp_path / "idx")
    assert m.manifest.stats.failures == {"failed_to_decode": 3}
    assert m.manifest.encoders[TINY_WIDE].embedded == ["image", "text"] and m.has_index(TINY_WIDE, "text")
