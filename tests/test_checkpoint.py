"""Mid-part checkpoints of the embed stage (`pipeline/checkpoint.py`): an interrupted part resumes
where its last whole batch ended, says so, and ends in the same bytes as an uninterrupted part."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TINY, TINY_WIDE, write_caption_folder
from xm.encoders import load_encoder
from xm.indexes.layout import Layout
from xm.pipeline.embed import embed_part
from xm.pipeline.sources.base import Part, Sample

PLAN = {TINY: ("image", "text"), TINY_WIDE: ("text",)}
N = 31  # 30 images and one that does not decode (a counted failure), batches of 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    src = write_caption_folder(tmp_path_factory.mktemp("ck") / "pairs", N - 1)
    (src / "im017b.jpg").write_bytes(b"not an image")
    (src / "im017b.txt").write_text("a broken file")
    return src


@pytest.fixture(scope="module")
def encoders() -> dict:
    return {spec: load_encoder(spec) for spec in PLAN}


def _part(folder: Path) -> Part:
    files = sorted(folder.glob("*.jpg"))

    def samples() -> Iterator[Sample]:
        for f in files:
            yield Sample(key=f.stem, caption=f.with_suffix(".txt").read_text(), image_path=str(f))

    return Part(name="00000", samples=samples, size=len(files))


def _files(root: Path) -> dict[str, bytes]:
    """Every artefact of the part (embeddings, norms, metadata, the marker), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "checkpoint" not in p.parts}


def _interrupt_after(rows: int, layout: Layout, seen: list[dict]):
    count = [0]

    def on_rows(n: int) -> None:
        count[0] += n
        if count[0] >= rows:
            state = layout.checkpoint_dir("embed", "00000") / "state.json"
            seen.append({"kept": count[0], "saved": state.read_text() if state.is_file() else None})
            raise KeyboardInterrupt
    return on_rows


@pytest.fixture(scope="module")
def reference(folder, encoders, tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("ref")
    marker = embed_part(_part(folder), encoders, PLAN, Layout(root), 4)
    assert marker["rows"] == N - 1 and marker["failures"] == {"failed_to_decode": 1}
    return _files(root)


def test_ctrl_c_mid_images_resumes_at_the_last_batch_and_ends_byte_identical(folder, encoders, reference, tmp_path,
                                                                             monkeypatch, capsys) -> None:
    monkeypatch.setenv("XM_CHECKPOINT_SECONDS", "0")  # a save after every batch (the default: every minute)
    layout = Layout(tmp_path)
    seen: list[dict] = []
    with pytest.raises(KeyboardInterrupt):
        embed_part(_part(folder), encoders, PLAN, layout, 4, on_rows=_interrupt_after(20, layout, seen))
    # the periodic save had already covered the batch the interrupt came after
    # batches are 4 consecutive files less those that fail (the broken one is the 18th): 4+4+4+4+3+4
    assert seen and seen[0]["kept"] == 23 and seen[0]["saved"] is not None and '"kept": 23' in seen[0]["saved"]
    assert not layout.done_marker("embed", "00000").exists()
    capsys.readouterr()
    calls = []
    real = encoders[TINY].encode_pixels
    monkeypatch.setattr(encoders[TINY], "encode_pixels", lambda px: calls.append(len(px)) or real(px))
    marker = embed_part(_part(folder), encoders, PLAN, layout, 4)
    # 23 images kept of the first 24 files: 7 left, in batches of 4
    assert "xm: resuming part 00000 at item 24/31 (23 embedded)" in capsys.readouterr().err
    assert calls == [4, 3]
    assert marker["rows"] == N - 1 and marker["failures"] == {"failed_to_decode": 1}
    assert _files(tmp_path) == reference
    assert not layout.checkpoint_dir("embed", "00000").exists()


def test_ctrl_c_in_the_captions_keeps_the_images_and_finished_encoders(folder, encoders, reference, tmp_path,
                                                                       monkeypatch, capsys) -> None:
    layout = Layout(tmp_path)  # the default minute between saves: the images are saved when their phase ends
    ticks = []

    def on_captions(n: int) -> None:
        ticks.append(n)
        if len([t for t in ticks if t]) == 2:  # the second encoder's first batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_part(_part(folder), encoders, PLAN, layout, 4, on_captions=on_captions)
    assert ticks[0] == 0  # the phase says when it starts (progress rates count from there)
    capsys.readouterr()
    calls: list[str] = []
    for spec, enc in encoders.items():
        monkeypatch.setattr(enc, "encode_pixels", lambda px, s=spec, r=enc.encode_pixels: calls.append(s) or r(px))
        monkeypatch.setattr(enc, "encode_texts_with_norms",
                            lambda t, *a, s=spec, r=enc.encode_texts_with_norms, **k: calls.append(f"{s} text") or r(t, *a, **k))
    embed_part(_part(folder), encoders, PLAN, layout, 4)
    err = capsys.readouterr().err
    assert "resuming part 00000 at item 31/31 (30 embedded; captions of 1 encoder(s) done)" in err, err
    assert calls == [f"{TINY_WIDE} text"]  # no image and no finished encoder computed twice
    assert _files(tmp_path) == reference


def test_a_checkpoint_made_with_another_batch_size_is_not_used(folder, encoders, reference, tmp_path, monkeypatch,
                                                               capsys) -> None:
    monkeypatch.setenv("XM_CHECKPOINT_SECONDS", "0")
    layout = Layout(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        embed_part(_part(folder), encoders, PLAN, layout, 2, on_rows=_interrupt_after(10, layout, []))
    capsys.readouterr()
    embed_part(_part(folder), encoders, PLAN, layout, 4)
    assert "resuming" not in capsys.readouterr().err
    assert _files(tmp_path) == reference
