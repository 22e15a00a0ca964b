"""The corpus of bad inputs (bench/hostile_corpus.py): no traceback, no crash, no wrong exit
code, and a clear error line naming the problem, for every one of them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _corpus():
    spec = importlib.util.spec_from_file_location("hostile_corpus", Path(__file__).parents[1] / "bench" / "hostile_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_bad_input_is_one_clear_line(tmp_path) -> None:
    corpus = _corpus()
    outcomes = corpus.run_corpus(tmp_path)
    assert len(outcomes) >= 60
    bad = [(o.case.name, o.verdict, o.code, o.stderr[-400:]) for o in outcomes if o.verdict != "ok"]
    assert not bad, bad
    assert corpus.summary(outcomes).endswith("0 tracebacks, 0 crashes, 0 wrong exit codes, 0 unclear")
