"""`xm train reco` with its defaults at both ends: a 1,000-item memory gets enough optimiser
steps to learn, and a 400M-pair memory keeps the paper's batch (the default computed, not trained).

The memory is a labelled nearest-neighbour setting, not zero-shot: 10 classes, each a
prototype image and 90 near-duplicates of it captioned with a prompt of its class, plus 100
unrelated distractors; the held-out queries are other near-duplicates of the prototypes,
none of them in the memory. The tiny random-init encoders put every image pair above cosine
0.96, so the near-duplicate rule's default threshold is refused there (test_reco.py tests
that one line); the training below passes --dup-threshold 1.01 (the item itself only) and
leaves every other option at its default.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, TINY_WIDE, make_image, near_duplicate
from xm.memories import open_index
from xm.methods.base import Context, Queries
from xm.methods.registry import create
from xm.pipeline import BuildConfig, build_index
from xm.training.reco import MAX_BATCH, MIN_STEPS_PER_EPOCH, TrainConfig, default_batch_size

CLASSES = ["red fox", "blue tram", "green parrot", "stone bridge", "paper kite",
           "copper kettle", "brass horn", "wool scarf", "glass vase", "oak table"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "{}, seen up close."]
PER_CLASS = 90
DISTRACTORS = 100


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: several torch threads on a busy 2-core machine are much slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prototype(c: int):
    return make_image(7000 + c, size=64)


@pytest.fixture(scope="module")
def memory(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reco-1k")
    src = root / "src"
    src.mkdir()
    for c, name in enumerate(CLASSES):
        for j in range(PER_CLASS):
            near_duplicate(_prototype(c), 1000 * c + j).save(src / f"m{c:02d}_{j:03d}.jpg", quality=90)
            (src / f"m{c:02d}_{j:03d}.txt").write_text(TEMPLATES[j % len(TEMPLATES)].format(name))
    for i in range(DISTRACTORS):
        make_image(9000 + i, size=64).save(src / f"z{i:03d}.jpg")
        (src / f"z{i:03d}.txt").write_text(f"holiday snapshot {i}")
    build_index(BuildConfig(source=str(src), out=root / "idx", coarse=TINY, fine=TINY_WIDE, inference=[TINY]))
    return root / "idx"


def test_default_batch_gives_a_small_memory_enough_steps_and_keeps_4096_at_scale() -> None:
    assert default_batch_size(1_000) == 64 and default_batch_size(1_500) == 128
    assert default_batch_size(10_000) == 1024
    for n in (256, 1_000, 1_500, 10_000, 32_768):
        assert math.ceil(n / default_batch_size(n)) >= MIN_STEPS_PER_EPOCH, n
    assert default_batch_size(100) == 32 and default_batch_size(20) == 20 and default_batch_size(2) == 2
    # the 400M end: the paper's batch, and an epoch is 97,657 steps (10 epochs under a million)
    n = 400_000_000
    assert default_batch_size(n) == MAX_BATCH == 4096
    assert math.ceil(n / default_batch_size(n)) == 97_657


@pytest.mark.slow  # builds a 1,000-item index and trains 160 steps: ~20 s on a quiet 2-core machine
def test_defaults_on_a_1k_memory_beat_clip_on_held_out_images(memory, tmp_path) -> None:
    from typer.testing import CliRunner

    from xm.cli.app import _register, app

    _register()
    out = tmp_path / "ck"
    r = CliRunner().invoke(app, ["train", "reco", "--index", str(memory), "--out", str(out), "--dup-threshold", "1.01", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["pairs"] == len(CLASSES) * PER_CLASS + DISTRACTORS == 1000
    assert summary["batch_size"] == 64 and summary["batch_derived"] and summary["steps"] == 160
    assert summary["losses"][-1] < summary["losses"][0]

    queries, labels = [], []
    for c in range(len(CLASSES)):
        for j in range(6):  # seeds no memory item was made with
            queries.append(near_duplicate(_prototype(c), 500_000 + 1000 * c + j))
            labels.append(c)
    ctx = Context(open_index(memory), TINY, CLASSES, TEMPLATES)
    acc = {}
    for name, kw in (("clip", {}), ("reco", {"checkpoint": str(out)})):
        method = create(name, ctx, **kw)
        pred = method.decide(method.evidence(Queries(queries))).probs.argmax(axis=1)
        acc[name] = float(np.mean(pred == np.array(labels)))
    # measured: clip 0.10 (chance), reco 1.00; the former default batch (4096, 10 steps) gave reco 0.30
    assert acc["reco"] >= 0.8 and acc["reco"] >= acc["clip"] + 0.5, acc


def test_an_explicit_batch_size_is_kept(memory, tmp_path) -> None:
    from xm.training.reco import train_reco

    s = train_reco(TrainConfig(index=memory, out=tmp_path / "ck", epochs=1, batch_size=500, dup_threshold=1.01))
    assert s.batch_size == 500 and not s.batch_derived and s.steps == 2
