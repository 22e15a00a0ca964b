"""`xm export embeddings`: any index, coded or not, in clip-retrieval's float16 layout, read back
by embedding-reader (what autofaiss and clip-retrieval's tools read with) with the same vectors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from embedding_reader import EmbeddingReader

from conftest import TINY, TINY_ROLES, TINY_WIDE, write_caption_folder
from xm.encoders import EncoderSpec
from xm.memories import open_index
from xm.pipeline import BuildConfig, build_index

pytestmark = pytest.mark.slow  # builds a coded index and runs the CLI (about 2 min on 2 loaded cores)


@pytest.fixture(scope="module")
def coded_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    src = write_caption_folder(root / "pairs", 20, caption=lambda i: f"a photo number {i}")
    # parts of 8 (3 parts), the fine encoder's captions as SQ8 codes, the coarse images as SQfp16 codes
    build_index(BuildConfig(source=str(src), out=root / "idx", shard_size=8, text_codecs=[f"{TINY_WIDE}=SQ8"],
                            image_codecs=[f"{TINY}=SQfp16"], **TINY_ROLES))
    return root / "idx"


def _read(folder, modality: str) -> tuple[np.ndarray, list[str]]:
    kind = {"image": "img_emb", "text": "text_emb"}[modality]
    reader = EmbeddingReader(str(folder / kind), file_format="parquet_npy", meta_columns=["caption"],
                             metadata_folder=str(folder / "metadata"))
    rows, captions = [], []
    for emb, meta in reader(batch_size=7, show_progress=False):
        rows.append(emb)
        captions += list(meta["caption"])
    return np.concatenate(rows), captions


def test_every_encoder_is_exported_decoded_and_embedding_reader_reads_it(coded_index, tmp_path) -> None:
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "xm.cli", "export", "embeddings", str(coded_index), str(out), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    memory = open_index(coded_index)
    ids = np.arange(memory.count)
    store_captions = memory.captions(ids)
    assert set(info["encoders"]) == {TINY, TINY_WIDE}
    assert info["encoders"][TINY_WIDE]["decoded"] == ["text"] and info["encoders"][TINY]["decoded"] == ["image"]
    seen = 0
    for spec, entry in info["encoders"].items():
        folder = out / EncoderSpec.parse(spec).slug
        assert sorted(p.name for p in (folder / "metadata").iterdir()) == [f"metadata_0000{i}.parquet" for i in range(3)]
        for modality in entry["modalities"]:
            vectors, captions = _read(folder, modality)
            kind = {"image": "img_emb", "text": "text_emb"}[modality]
            assert {np.load(f, mmap_mode="r").dtype for f in (folder / kind).iterdir()} == {np.dtype(np.float16)}
            assert len(vectors) == memory.count == 20
            assert captions == store_captions  # row-aligned with the metadata, in global-id order
            expected = memory.embeddings(spec, modality).gather(ids)  # decoded rows for a coded entry
            assert np.array_equal(vectors, expected.astype(np.float16).astype(np.float32)), (spec, modality)
            assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)
            seen += 1
    assert seen == 3  # the coarse (also the inference) encoder: image + text; the fine: text
    refused = subprocess.run([sys.executable, "-m", "xm.cli", "export", "embeddings", str(coded_index), str(out)],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "not empty" in refused.stderr


def test_one_encoder_only(coded_index, tmp_path) -> None:
    from xm.indexes.export_embeddings import export_embeddings

    info = export_embeddings(coded_index, tmp_path / "one", encoders=[TINY_WIDE])
    assert list(info["encoders"]) == [TINY_WIDE]
    assert [p.name for p in (tmp_path / "one").iterdir()] == [EncoderSpec.parse(TINY_WIDE).slug]
