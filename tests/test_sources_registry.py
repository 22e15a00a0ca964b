"""A source is a plug-in: a toy one registered from here builds an index through the normal
build, with no change to xm's files; an unknown --source is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from conftest import TINY, TINY_ROLES, jpeg_bytes, make_image, write_caption_folder
from xm.encoders import load_encoder
from xm.errors import XMError
from xm.indexes.layout import Layout
from xm.memories import open_index
from xm.pipeline import BuildConfig, Part, Sample, Source, build_index, register_source
from xm.pipeline.sources import registry

ROWS = (5, 3)  # samples per part


class ToySource(Source):
    """`--source toy:N`: generated images, N in each of two parts, captions that name them."""

    name = "toy"

    def recognises(self, value: str) -> bool:
        return value.startswith("toy:")

    def parts(self, cfg, layout: Layout) -> list[Part]:
        def samples(part: int, n: int) -> Iterator[Sample]:
            for i in range(n):
                seed = 100 * part + i
                yield Sample(key=f"toy-{seed}", caption=f"toy picture {seed}", image=jpeg_bytes(make_image(seed)),
                             extra={"seed": seed})

        return [Part(name=f"{p:05d}", samples=lambda p=p, n=n: samples(p, n), size=n) for p, n in enumerate(ROWS)]


@pytest.fixture
def toy() -> Iterator[type[Source]]:
    register_source(ToySource)
    yield ToySource
    registry.unregister(ToySource.name)


def test_a_registered_source_builds_an_index(toy, tmp_path) -> None:
    summary = build_index(BuildConfig(source="toy:any", out=tmp_path / "idx", **TINY_ROLES))
    assert summary.source_kind == "toy" and summary.count == sum(ROWS)
    memory = open_index(tmp_path / "idx")
    assert memory.count == sum(ROWS)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "toy"
    # a toy image finds itself, with its caption and the source's extra column
    _, ids = memory.search("image", load_encoder(TINY).encode_images([make_image(102)]), 1)
    row = memory.store.fetch(ids[0])[0]
    assert row["caption"] == "toy picture 102" and row["seed"] == 102
    # a resumed build finds every part done
    again = build_index(BuildConfig(source="toy:any", out=tmp_path / "idx", **TINY_ROLES))
    assert any("already done" in s for s in again.skipped)


def test_a_plugin_is_tried_before_the_builtins_and_leaves_with_its_test(toy, tmp_path) -> None:
    assert registry.lookup("toy:x").name == "toy"
    assert registry.lookup(str(tmp_path)).name == "images"  # a plain folder is still the folder source
    registry.unregister("toy")
    with pytest.raises(XMError, match="no such file or folder"):
        registry.lookup("toy:x")
    register_source(ToySource)  # the fixture removes it again


def test_an_unknown_source_is_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(XMError) as err:
        build_index(BuildConfig(source="laion5b", out=tmp_path / "o", **TINY_ROLES))
    assert str(err.value) == "laion5b: no such file or folder, and not one of laion400m, laion400m-embeddings, datacomp"
    assert not (tmp_path / "o").exists()
    run = subprocess.run([sys.executable, "-m", "xm.cli", "build-index", "--source", "laion5b", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and errors == [f"xm: error: {err.value}"], run.stderr
    assert not (tmp_path / "o").exists()


def test_an_unknown_distributor_is_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(XMError, match=r"^--distributor 'ray': choose multiprocessing or pyspark$"):
        build_index(BuildConfig(source=str(tmp_path), out=tmp_path / "o", distributor="ray", **TINY_ROLES))


def test_a_registered_runner_runs_the_build(tmp_path) -> None:
    """A distributor is a plug-in too: the build asks its runner for everything that differs."""
    from xm.pipeline.runners import registry as runners
    from xm.pipeline.runners.local import LocalRunner

    jobs: list[str] = []

    class CountingRunner(LocalRunner):
        name = "counting"
        description = "a counting test runner"

        def map(self, fn, items, description, on_done=None):
            jobs.append(description)
            return super().map(fn, items, description, on_done)

    runners.register(CountingRunner)
    try:
        summary = build_index(BuildConfig(source=str(write_caption_folder(tmp_path / "pairs", 6)), out=tmp_path / "idx",
                                          distributor="counting", **TINY_ROLES))
    finally:
        runners.unregister("counting")
    assert summary.ran_on == "a counting test runner" and summary.count == 6
    assert "xm store" in jobs and "xm manifest checksums" in jobs
