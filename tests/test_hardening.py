"""Hostile input: decompression bombs, markup and escape codes in data, labels CLIP cannot
tell apart, bad options and folders, damaged ids, Ctrl-C. One line, a non-zero exit, nothing lost."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, TINY_ROLES, jpeg_bytes, make_image, write_caption_folder
from xm.encoders import load_image
from xm.errors import XMError
from xm.memories import open_index
from xm.methods.zeroshot import read_labels
from xm.pipeline import BuildConfig, build_index


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG that declares a huge image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _xm(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xm.cli", *args], capture_output=True, text=True, **kw)


def _one_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode not in (0, None), r
    errs = [line for line in r.stderr.splitlines() if line.startswith("xm: error")]
    assert len(errs) == 1 and "Traceback" not in r.stderr, r.stderr
    return errs[0]


def test_decompression_bomb_is_one_counted_failure(tmp_path) -> None:
    bomb = bomb_png()
    assert len(bomb) < 200
    with pytest.raises(XMError, match="over the limit of 100 megapixels"):
        load_image(bomb, name="bomb.png")
    src = write_caption_folder(tmp_path / "pairs", 6)
    (src / "bomb.png").write_bytes(bomb)
    (src / "bomb.txt").write_text("a bomb")
    summary = build_index(BuildConfig(source=str(src), out=tmp_path / "idx", **TINY_ROLES))
    assert summary.count == 6 and summary.failures == {"failed_to_decode": 1}


@pytest.fixture(scope="module")
def hostile_index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    captions = ["[/bold] closing markup", "[/] bare close", "\x1b[2J\x1b]0;owned\x07 clears the screen", "plain words"] * 3
    src = write_caption_folder(root / "pairs", 12, caption=lambda i: captions[i])
    build_index(BuildConfig(source=str(src), out=root / "idx", **TINY_ROLES))
    return root / "idx"


def test_markup_and_escape_codes_in_data_are_printed_as_text(hostile_index, tmp_path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("[/bold] cat\n\x1b[31mred dog\n")
    image = next((hostile_index.parent / "pairs").glob("*.jpg"))
    for args in (["search", str(hostile_index), "--text", "markup", "-k", "12"],
                 ["classify", str(image), "--labels", str(labels), "--index", str(hostile_index), "--explain",
                  "--k-coarse", "4", "--k-fine", "4"]):
        r = _xm(*args)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout
        assert "[/bold]" in r.stdout and "\\x1b" in r.stdout


def test_labels_that_clip_cannot_tell_apart_are_refused(tmp_path) -> None:
    f = tmp_path / "labels.txt"
    f.write_text("Red Fox\nblue tram\nred  fox\n")
    with pytest.raises(XMError, match=r"labels.txt: labels 'Red Fox' and 'red  fox' are the same to CLIP's tokenizer; lines 1 and 3"):
        read_labels(f)


def test_bad_options_and_folders_are_one_line(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 4)
    roles = ["--coarse", TINY, "--fine", TINY, "--inference", TINY]
    assert "--batch-size 0: must be at least 1" in _one_error(_xm("build-index", "--source", str(src), "--out", str(tmp_path / "a"), "--batch-size", "0", *roles))
    assert "--shards 0" in _one_error(_xm("build-index", "--source", str(src), "--out", str(tmp_path / "a"), "--shards", "0", *roles))
    assert "--limit 0" in _one_error(_xm("build-index", "--source", str(src), "--out", str(tmp_path / "a"), "--limit", "0", *roles))
    assert "must exceed --max-index-memory" in _one_error(_xm("build-index", "--source", str(src), "--out", str(tmp_path / "a"),
                                                                "--max-index-memory", "4G", "--current-memory", "4G", *roles))
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    assert "is a file, not a folder" in _one_error(_xm("build-index", "--source", str(src), "--out", str(afile), *roles))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert "not an xm index" in _one_error(_xm("build-index", "--source", str(src), "--out", str(foreign), *roles))
    assert (foreign / "thesis.tex").read_text() == "precious" and len(list(foreign.iterdir())) == 1


def test_out_of_range_ids_from_a_damaged_index_are_refused(hostile_index) -> None:
    memory = open_index(hostile_index)
    shards = memory.index("image")
    real = shards.search
    shards.search = lambda q, k: (lambda d, i: (d, i + 10_000))(*real(q, k))
    with pytest.raises(XMError, match="returned id .* for an index of 12 items"):
        memory.search("image", np.ones((1, memory.index("image").dim), np.float32), 3)


@pytest.mark.slow
def test_ctrl_c_during_a_folder_build_exits_130_and_resumes(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 400)
    out = tmp_path / "idx"
    args = [sys.executable, "-m", "xm.cli", "build-index", "--source", str(src), "--out", str(out), "--coarse", TINY,
            "--fine", TINY, "--inference", TINY, "--shard-size", "50", "--batch-size", "8"]
    # paused at the index stage once the parts are embedded: on a quiet machine the rest of the build
    # takes about a second, and a Ctrl-C sent after its last step found nothing left to stop
    paused = {**os.environ, "XM_PAUSE_AT": "index", "XM_PAUSE_SECONDS": "60"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=paused)
    deadline = time.time() + 120
    while not list((out / "_work" / "done" / "embed").glob("*.json")) and time.time() < deadline:
        time.sleep(0.05)  # interrupt once a part is embedded
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "xm: interrupted; re-run the same command to resume" in err and "Traceback" not in err
    done = subprocess.run(args + ["--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["count"] == 400
    assert open_index(out).count == 400


def _crafted(index: Path, tmp: Path, edit) -> Path:
    """A copy of `index` whose image shard was edited by `edit(bytearray)` and re-hashed in the
    manifest, as anyone re-publishing an index could: only structural checks can catch it."""
    import hashlib
    import shutil

    copy = tmp / f"crafted-{len(list(tmp.iterdir()))}"
    shutil.copytree(index, copy)
    m = json.loads((copy / "manifest.json").read_text())
    entry = next(e for e in m["indexes"] if e["modality"] == "image")
    shard = copy / entry["dir"] / entry["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    edit(data)
    shard.write_bytes(bytes(data))
    rel = shard.relative_to(copy).as_posix()
    m["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy


def _ivf_layout(data: bytearray) -> tuple[int, int, int, list[int]]:
    """(offset of the first list size, nlist, code size, sizes) of faiss's 'ilar' inverted lists."""
    at = data.index(b"ilar")
    nlist, code_size = struct.unpack_from("<QQ", data, at + 4)
    kind = bytes(data[at + 20 : at + 24])
    assert kind == b"full", kind
    first = at + 24 + 8  # after the vector's length
    return first, nlist, code_size, list(struct.unpack_from(f"<{nlist}Q", data, first))


@pytest.fixture(scope="module")
def ivf_index(tmp_path_factory) -> Path:
    """A memory big enough for autofaiss to choose an IVF index (the kind crafted shards attack)."""
    root = tmp_path_factory.mktemp("ivf")
    src = write_caption_folder(root / "pairs", 1200)
    build_index(BuildConfig(source=str(src), out=root / "idx", index_text=False, **TINY_ROLES))
    m = json.loads((root / "idx" / "manifest.json").read_text())
    assert "IVF" in m["indexes"][0]["key"], m["indexes"][0]["key"]
    return root / "idx"


@pytest.mark.slow
def test_crafted_shards_are_refused_in_one_line(ivf_index, tmp_path) -> None:
    def huge_list(data: bytearray) -> None:
        first, _, _, _ = _ivf_layout(data)
        struct.pack_into("<Q", data, first, 1 << 40)

    def other_lists(data: bytearray) -> None:
        at = data.index(b"ilar")
        data[at : at + 4] = b"ilod"

    def foreign_id(data: bytearray) -> None:
        first, nlist, code_size, sizes = _ivf_layout(data)
        lists = first + 8 * nlist
        j = next(i for i, n in enumerate(sizes) if n)
        start = lists + sum(n * (code_size + 8) for n in sizes[:j])
        struct.pack_into("<q", data, start + sizes[j] * code_size, 10**9)

    for edit, expect in ((huge_list, "lies outside the file|claims"), (other_lists, "damaged"), (foreign_id, "stores ids outside")):
        crafted = _crafted(ivf_index, tmp_path, edit)
        # the checksums agree (the manifest was re-hashed): only the structural checks can tell
        for args in (["info", str(crafted), "--verify"], ["search", str(crafted), "--text", "caption", "-k", "5"]):
            err = _one_error(_xm(*args))
            assert re.search(expect, err) and "shard-000.index" in err, err


def test_verify_checks_counts_against_the_files(hostile_index, tmp_path) -> None:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(hostile_index, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["count"] = 11
    (copy / "manifest.json").write_text(json.dumps(m))
    assert "parts hold 12 rows, the manifest says count 11" in _one_error(_xm("info", str(copy), "--verify"))


def test_img2dataset_folders_other_formats_named_and_failures_counted(tmp_path) -> None:
    import io
    import tarfile

    parquet_format = tmp_path / "pq"
    parquet_format.mkdir()
    (parquet_format / "00000_stats.json").write_text(json.dumps({"status_dict": {"success": 3}}))
    (parquet_format / "00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(XMError, match="'parquet' output format, which xm does not read"):
        build_index(BuildConfig(source=str(parquet_format), out=tmp_path / "o1", **TINY_ROLES))

    webdataset = tmp_path / "wds"
    webdataset.mkdir()
    with tarfile.open(webdataset / "00000.tar", "w") as tar:
        for i in range(4):
            for ext, data in (("jpg", jpeg_bytes(make_image(i))), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (webdataset / "00000_stats.json").write_text(json.dumps({"status_dict": {"success": 4, "404 Not Found": 2}}))
    summary = build_index(BuildConfig(source=str(webdataset), out=tmp_path / "o2", limit=3, **TINY_ROLES))
    assert summary.count == 3 and summary.failures == {"404 Not Found": 2}
    assert open_index(tmp_path / "o2").manifest.source.limit == 3


def test_a_folder_without_captions_is_warned_about(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 5)
    for txt in list(src.glob("*.txt"))[:2]:
        txt.unlink()
    summary = build_index(BuildConfig(source=str(src), out=tmp_path / "idx", **TINY_ROLES))
    assert summary.warnings == ["2 of 5 items have an empty caption (no .txt beside the image)"]


def test_a_killed_index_builds_leftovers_are_swept(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 6)
    build_index(BuildConfig(source=str(src), out=tmp_path / "idx", **TINY_ROLES))
    folder = next((tmp_path / "idx" / "index").glob("*/image"))
    stale = folder / ".build-killed"
    stale.mkdir()
    (stale / "full.index").write_bytes(b"half an index")
    (folder / "build.json").unlink()  # so that the index stage runs again
    build_index(BuildConfig(source=str(src), out=tmp_path / "idx", stages=("index", "manifest"), **TINY_ROLES))
    assert not stale.exists() and open_index(tmp_path / "idx", verify=True).count == 6


def test_closing_the_decoding_prefetch_stops_its_thread() -> None:
    """Ctrl-C mid-embed closes the prefetch: its producer must be gone before the process exits,
    or the C++ runtime aborts the exit (SIGABRT instead of 130) while it is inside a decoder."""
    import contextlib
    import threading

    from xm.pipeline.embed import prefetch

    made: list[int] = []

    def slow() -> Iterator[int]:
        for i in range(1000):
            time.sleep(0.01)
            made.append(i)
            yield i

    def producers() -> list[threading.Thread]:  # only ours: other tests' pools may end meanwhile
        return [t for t in threading.enumerate() if t.name == "xm-prefetch" and t.is_alive()]

    assert producers() == []
    batches = prefetch(slow(), depth=2)
    with contextlib.closing(batches):
        assert next(batches) == 0
        assert len(producers()) == 1
    assert producers() == []  # the producer has ended, not merely been left behind
    assert len(made) < 10  # it stopped, it did not drain the source
    with pytest.raises(ValueError, match="bad item"):  # a producer's error still reaches the consumer

        def bad() -> Iterator[int]:
            yield 1
            raise ValueError("bad item")

        list(prefetch(bad()))
