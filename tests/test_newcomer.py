"""What a newcomer meets first (issue 22): the version, progress ETAs per phase, messages that
quote hostile data, the offline LAION line."""

from __future__ import annotations

import re
import time

from xm.cli import output


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
