"""Compressed caption embeddings (`--text-codec`): a tiny real build, read back through the
one `memory.embeddings(...).gather` path, classified with X-MoRe, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY, TINY_ROLES, TINY_WIDE, make_image, write_caption_folder
from xm.classify import Classifier
from xm.encoders import EncoderSpec, load_encoder
from xm.errors import XMError
from xm.indexes.layout import Layout
from xm.memories import open_index
from xm.pipeline import BuildConfig, build_index, compress as compress_mod

N = 20  # three parts of 8, 8, 4 rows
FINE_SLUG = EncoderSpec.parse(TINY_WIDE).slug
CODEC = [f"{TINY_WIDE}=SQ8"]
COARSE_SLUG = EncoderSpec.parse(TINY).slug


def _cfg(src, out, **kw) -> BuildConfig:
    return BuildConfig(source=str(src), out=out, shard_size=8, **TINY_ROLES, **kw)


def _sq8_error_bound(codec) -> float:
    """Largest distance of a renormalised SQ8 reconstruction from a unit row, from the trained
    ranges: each dimension is off by at most half a step (vdiff/255/2), renormalising at most
    doubles the error, and the reference itself is float16 (2^-11 relative per dimension)."""
    import faiss

    sq = faiss.downcast_index(codec).sq
    trained = faiss.vector_to_array(sq.trained)
    vdiff = trained[codec.d:] if len(trained) == 2 * codec.d else np.full(codec.d, trained[1])
    return float(2 * np.linalg.norm(vdiff / 255 / 2) + 2.0 ** -10 + 1e-4)


@pytest.fixture(scope="module")
def captions_folder(tmp_path_factory):
    return write_caption_folder(tmp_path_factory.mktemp("pairs"), N, caption=lambda i: f"a photo number {i} of a small thing")


def test_build_with_text_codec(captions_folder, tmp_path) -> None:
    out = tmp_path / "idx"
    summary = build_index(_cfg(captions_folder, out, text_codecs=CODEC, image_codecs=[f"{TINY}=SQfp16"]))
    layout = Layout(out)
    manifest = json.loads(layout.manifest.read_text())
    entry = manifest["encoders"][TINY_WIDE]
    assert entry["codecs"] == {"text": "SQ8"} and "text" in entry["norms"]
    parts = [p["name"] for p in manifest["parts"]]
    assert len(parts) == 3
    for p in parts:
        assert layout.rel(layout.code_file(FINE_SLUG, "text", p)) in manifest["files"]
    assert layout.rel(layout.codec_file(FINE_SLUG, "text")) in manifest["files"]
    # no float16 caption parts of the fine encoder remain, listed or on disk; the others' do
    assert not any(rel.startswith(f"embeddings/{FINE_SLUG}/text_emb") for rel in manifest["files"])
    assert not layout.emb_dir(FINE_SLUG, "text").exists()
    assert layout.emb_file(COARSE_SLUG, "text", parts[0]).is_file()
    # the coarse image embeddings (the kNN refine step's) through the same mechanism
    assert manifest["encoders"][TINY]["codecs"] == {"image": "SQfp16"} and not layout.emb_dir(COARSE_SLUG, "image").exists()

    memory = open_index(out, verify=True)
    matrix = memory.embeddings(TINY_WIDE, "text")
    ids = np.arange(N)[::-1]
    got = matrix.gather(ids)
    fine = load_encoder(TINY_WIDE)
    ref = fine.encode_texts(memory.store.captions(ids.tolist())).astype(np.float16).astype(np.float32)
    err = np.linalg.norm(got - ref, axis=1)
    assert got.shape == ref.shape and err.max() <= _sq8_error_bound(matrix.codec), (err.max(), _sq8_error_bound(matrix.codec))
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)

    coarse = load_encoder(TINY)
    for i in (0, 13):  # a memory image still finds itself first (kNN, refine with decoded rows)
        from PIL import Image

        q = coarse.encode_images([Image.open(captions_folder / f"im{i:03d}.jpg").convert("RGB")])
        assert memory.search("image", q, 3)[1][0][0] == i
        assert np.abs(memory.embeddings(TINY, "image").gather([i]) - q).max() < 2e-3

    clf = Classifier(memory, ["thing", "photo"], method="xmore", model=TINY, options={"k_coarse": 8, "k_fine": 4})
    rows = clf.classify_images([make_image(3), make_image(11)])
    assert len(rows) == 2 and all(r["prediction"] in ("thing", "photo") and r["captions_used"] == 4 for r in rows)

    # a re-run of the same command changes nothing: no codes rewritten, the same manifest
    codes = sorted(layout.code_dir(FINE_SLUG, "text").iterdir())
    before = {f: f.stat().st_mtime_ns for f in codes}
    again = build_index(_cfg(captions_folder, out, text_codecs=CODEC, image_codecs=[f"{TINY}=SQfp16"]))
    assert again.manifest_id == summary.manifest_id
    assert any(s.startswith(f"compress {FINE_SLUG}/text") for s in again.skipped)
    assert {f: f.stat().st_mtime_ns for f in codes} == before
    # and without the flag, the compressed index is not silently rebuilt as float16
    with pytest.raises(XMError, match="compressed with SQfp16; give --image-codec"):
        build_index(_cfg(captions_folder, out, text_codecs=CODEC))
    assert open_index(out).id == summary.manifest_id  # refused, nothing changed


@pytest.mark.parametrize("flag, says", [
    ("SQ8", "expected SPEC=CODEC"),
    (f"{TINY_WIDE}=", "expected SPEC=CODEC"),
    ("ViT-B-32:nope=SQ8", "embeds no captions"),
    (f"{TINY_WIDE}=banana", "not a FAISS codec"),
    (f"{TINY_WIDE}=IVF16,PQ8", "not a standalone codec"),
    (f"{TINY_WIDE}=PQ64", "does not fit 96-dimensional"),  # known from the architecture's config, before any work
])
def test_bad_codec_flag_is_one_line(tmp_path, flag, says) -> None:
    with pytest.raises(XMError) as err:
        _cfg(tmp_path / "src", tmp_path / "out", text_codecs=[flag]).validate()
    msg = str(err.value)
    assert msg.startswith("--text-codec") and says in msg and "\n" not in msg


def test_image_codec_flag_names_its_option(tmp_path) -> None:
    with pytest.raises(XMError, match="^--image-codec .*embeds no images") as err:
        _cfg(tmp_path / "src", tmp_path / "out", image_codecs=[f"{TINY_WIDE}=SQ8"]).validate()
    assert "\n" not in str(err.value)


def test_killed_compress_keeps_previous_index_and_resumes(captions_folder, tmp_path, monkeypatch) -> None:
    out = tmp_path / "idx"
    first = build_index(_cfg(captions_folder, out))  # float16 everywhere
    layout = Layout(out)
    written = []
    real = compress_mod._write_codes

    def dies_after_one(path, codes):
        if written:
            raise RuntimeError("killed mid-compress")
        real(path, codes)
        written.append(path)

    monkeypatch.setattr(compress_mod, "_write_codes", dies_after_one)
    with pytest.raises(RuntimeError, match="killed"):
        build_index(_cfg(captions_folder, out, text_codecs=CODEC))
    # the previous index is intact and usable: its manifest, its float16 parts
    memory = open_index(out, verify=True)
    assert memory.id == first.manifest_id and not memory.encoder_entry(TINY_WIDE).codecs
    assert memory.embeddings(TINY_WIDE, "text").gather(np.arange(N)).shape[0] == N
    assert not list(layout.code_dir(FINE_SLUG, "text").glob(".*tmp"))

    monkeypatch.setattr(compress_mod, "_write_codes", real)
    done_first = written[0].stat().st_mtime_ns
    build_index(_cfg(captions_folder, out, text_codecs=CODEC))
    memory = open_index(out, verify=True)
    assert memory.encoder_entry(TINY_WIDE).codecs == {"text": "SQ8"}
    assert written[0].stat().st_mtime_ns == done_first  # the part coded before the kill is kept
    assert not layout.emb_dir(FINE_SLUG, "text").exists()
    assert memory.embeddings(TINY_WIDE, "text").gather(np.arange(N)).shape == (N, load_encoder(TINY_WIDE).dim)
