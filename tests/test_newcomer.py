"""What a newcomer meets first (issue 22): the version, progress ETAs per phase, messages that
quote hostile data, the offline LAION line."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, TINY_ROLES, jpeg_bytes, make_image
from xm.cli import output
from xm.encoders import load_image
from xm.errors import XMError, quoted
from xm.memories import open_index
from xm.pipeline import BuildConfig, build_index
from xm.pipeline.build import BuildSummary
from xm.pipeline.sources.table import FILE_URL, NOT_HTTP


def test_a_phase_eta_counts_only_the_time_its_phase_runs(monkeypatch, capsys) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(output, "PLAIN_EVERY", 0.0)
    with output._plain_progress() as make:
        captions = make("embed captions", 100)  # made at the stage's start, as the build does
        clock[0] += 3600  # an hour of images before the captions phase starts
        captions(0)
        clock[0] += 10
        captions(10)  # 10 captions in 10 s: 90 left at 1/s
        clock[0] += 600  # the next part's images
        captions(0)
        clock[0] += 10
        captions(10)
    lines = capsys.readouterr().err.splitlines()
    assert re.search(r"10/100 \(10%\), 1\.0/s, 10 s, ETA 90 s$", lines[0]), lines
    assert re.search(r"20/100 \(20%\), 1\.0/s, 20 s, ETA 80 s$", lines[1]), lines


def test_a_bar_with_no_phase_start_counts_from_when_it_was_made(monkeypatch, capsys) -> None:
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    with output._plain_progress() as make:
        tick = make("images", 4)
        clock[0] += 2
        tick(4)
    assert "4/4 (100%), 2.0/s, 2 s" in capsys.readouterr().err


@pytest.mark.slow
def test_a_table_with_odd_urls_builds_and_counts_them_as_failures(tmp_path, image_server) -> None:
    base, routes = image_server
    for i in range(4):
        routes[f"/img/{i}.jpg"] = jpeg_bytes(make_image(i))
    local = tmp_path / "local.jpg"  # on this disk: only --allow-file-urls may read it
    local.write_bytes(jpeg_bytes(make_image(9)))
    odd = [local.as_uri(), "ftp://127.0.0.1/a.jpg", "javascript:alert(1)"]
    rows = [(f"{base}/img/{i}.jpg", f"photo {i}") for i in range(4)] + [(u, "odd") for u in odd]
    table = tmp_path / "pairs.parquet"
    pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(table)

    def build(out: str, **kw) -> BuildSummary:
        return build_index(BuildConfig(source=str(table), out=tmp_path / out, processes=1, threads=2, shard_size=8,
                                       timeout=5, index_text=False, **TINY_ROLES, **kw))

    summary = build("idx")
    assert summary.count == 4 and summary.selected == 7
    assert summary.failures == {FILE_URL: 1, NOT_HTTP: 2}, summary.failures
    urls = [r["url"] for r in open_index(tmp_path / "idx").store.fetch(np.arange(4))]
    assert sorted(urls) == sorted(u for u, _ in rows[:4])
    allowed = build("idx-file", allow_file_urls=True)
    assert allowed.count == 5 and allowed.failures == {NOT_HTTP: 2}, allowed.failures
    # a resumed build reads the same counts back
    assert build("idx").failures == {FILE_URL: 1, NOT_HTTP: 2}


def test_a_table_of_no_fetchable_url_is_one_line(tmp_path) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text("url,caption\nfile:///etc/passwd,a\nftp://x/\x1b[31m,b\n")
    with pytest.raises(XMError) as err:
        build_index(BuildConfig(source=str(table), out=tmp_path / "idx", **TINY_ROLES))
    assert "none of its 2 URL(s) is http(s)" in str(err.value) and "--allow-file-urls" in str(err.value)
    assert "\x1b" not in str(err.value)


HOSTILE_NAME = "\x1b[31mred\nsecond line\u202e.jpg"


def test_quoted_shows_control_characters_escaped_and_is_idempotent() -> None:
    q = quoted(HOSTILE_NAME)
    assert q == "\\x1b[31mred\\x0asecond line\\u202e.jpg"
    assert quoted(q) == q and quoted("tab\tand é") == "tab\tand é"


def test_an_unreadable_image_with_escape_codes_in_its_name_is_one_quoted_line(tmp_path) -> None:
    bad = tmp_path / HOSTILE_NAME
    bad.write_bytes(b"not an image")
    with pytest.raises(XMError) as err:
        load_image(bad)
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value) and "\\x1b[31mred\\x0asecond" in str(err.value)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    r = subprocess.run([sys.executable, "-m", "xm.cli", "classify", str(bad), "--labels", str(labels), "--method", "clip",
                        "--model", TINY], capture_output=True, text=True)
    assert r.returncode != 0
    assert "\x1b" not in r.stderr + r.stdout and "\u202e" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("xm: error")]
    assert len(errors) == 1 and "\\x1b[31mred\\x0asecond line\\u202e.jpg" in errors[0], r.stderr
    assert not any(line.startswith("second line") for line in r.stderr.splitlines())


def test_laion_offline_is_one_short_line_naming_the_metadata_at_once(tmp_path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the metadata's host is unreachable, as the-eye.eu is offline
    env = {**os.environ, "XM_OFFLINE": "0", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "xm.cli", "build-index", "--source", "laion400m", "--out", str(tmp_path / "idx"),
                        "--metadata-root", f"http://127.0.0.1:{port}/meta"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("xm: error")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    line = errors[0]
    assert "LAION-400M metadata: 127.0.0.1 unreachable" in line and "--metadata-root FOLDER" in line, line
    assert "ViT-B-32:openai" in line and "ViT-L-14:openai" in line and line.count("Hugging Face cache") == 1, line
    assert len(line.replace(str(tmp_path), "")) < 320, (len(line), line)
    assert not (tmp_path / "idx").exists()


def test_version_is_the_installed_packages() -> None:
    import importlib.metadata

    r = subprocess.run([sys.executable, "-m", "xm.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"xm {importlib.metadata.version('xm-retrieval')}\n", r
