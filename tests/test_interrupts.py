"""Ctrl-C at every stage of a table build and of a folder build: exit 130 with the resume
line, nothing lost, and a re-run completes to the same index as an uninterrupted build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, TINY_WIDE, jpeg_bytes, make_image, write_caption_folder
from xm.memories import open_index

pytestmark = pytest.mark.slow
ROLES = ["--coarse", TINY, "--fine", TINY_WIDE, "--inference", TINY]
MESSAGE = "xm: interrupted; re-run the same command to resume"


def _args(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "xm.cli", "build-index", "--source", str(source), "--out", str(out), *ROLES,
            "--shard-size", "10", "--batch-size", "8", *extra]


def _interrupt_at(args: list[str], stage: str) -> str:
    """Run the build paused at `stage`'s start, Ctrl-C it there; return its stderr."""
    env = {**os.environ, "XM_PAUSE_AT": stage, "XM_PAUSE_SECONDS": "60"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if f"paused at stage {stage}" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[1]
    err = "".join(lines) + rest
    assert proc.returncode == 130, err
    assert MESSAGE in err and "Traceback" not in err, err
    return err


def _contents(index: Path) -> tuple[int, list[tuple[str, str]], list[str]]:
    m = open_index(index, verify=True)
    rows = m.store.fetch(list(range(m.count)))
    return m.count, [(r["source_id"], r["caption"]) for r in rows], sorted(m.manifest.files)


def _table(tmp_path: Path, server) -> Path:
    base, routes = server
    lines = []
    for i in range(24):
        routes[f"/i/{i}.jpg"] = jpeg_bytes(make_image(i))
        lines.append({"url": f"{base}/i/{i}.jpg", "caption": f"picture {i}"})
    table = tmp_path / "pairs.jsonl"
    table.write_text("\n".join(json.dumps(line) for line in lines))
    return table


@pytest.mark.parametrize("kind", ["table", "folder"])
def test_ctrl_c_at_every_stage_then_resume(tmp_path, image_server, kind) -> None:
    if kind == "table":
        source = _table(tmp_path, image_server)
        stages = ["select", "download", "embed", "index", "store", "manifest"]
        extra = ["--processes", "1", "--threads", "4"]
    else:
        source = write_caption_folder(tmp_path / "pairs", 24)
        stages = ["embed", "index", "store", "manifest"]
        extra = []
    reference = tmp_path / "reference"
    assert subprocess.run(_args(source, reference, *extra), capture_output=True).returncode == 0
    out = tmp_path / "interrupted"
    for stage in stages:
        _interrupt_at(_args(source, out, *extra), stage)
    done = subprocess.run(_args(source, out, *extra, "--json"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    count, rows, files = _contents(out)
    ref_count, ref_rows, ref_files = _contents(reference)
    assert (count, rows, files) == (ref_count, ref_rows, ref_files) and count == 24


def test_ctrl_c_in_the_middle_of_a_download(tmp_path, slow_image_server) -> None:
    """img2dataset's own SIGINT handler exits 0: xm turns it back into an interrupt."""
    source = _table(tmp_path, slow_image_server)
    out = tmp_path / "idx"
    args = _args(source, out, "--processes", "1", "--threads", "1")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "_work" / "download").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # inside img2dataset now: 24 images at 0.2 s each, one thread
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and MESSAGE in err, err
    assert not (out / "manifest.json").exists()
    done = subprocess.run(args + ["--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["count"] == 24  # stdout holds the JSON alone: img2dataset's output went to stderr
