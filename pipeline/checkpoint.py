"""Mid-part checkpoints of the embed stage: a Ctrl-C or a kill loses at most about a minute of
embedding, however large a part is.

A part is the unit the embed stage marks done, and parts are large (10,000 images of a folder
by default, more at scale), so the image embeddings a part has computed so far are saved every
`EVERY_SECONDS` (`XM_CHECKPOINT_SECONDS` overrides it) under `_work/checkpoint/embed/<part>/`,
and once more when Ctrl-C (or any error) stops the part. A save appends only the rows computed
since the last one (one chunk file per image encoder, one of the rows' positions in the part)
and then rewrites `state.json` atomically; the state lists the chunks that count, so a kill
mid-save leaves the previous checkpoint intact. Caption embeddings are checkpointed per
encoder: each encoder's caption files of the part are final once written, and the state says so.

A re-run finds the checkpoint, says where it resumes, skips the samples it covers without
decoding them and goes on with the same batches: a checkpoint always ends at a whole batch, so
every later batch holds the same images as in an uninterrupted build, and the part's files are
byte-identical to an uninterrupted build's. A checkpoint made under other settings (plan, batch
size, part size) is discarded. The part's marker, written last, makes the checkpoint obsolete;
it is removed then. This module is the one owner of the checkpoint's files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from xm.errors import quoted
from xm.indexes.layout import Layout, atomic_path, write_json
from xm.pipeline.sources.base import Sample

EVERY_SECONDS = 60.0
STATE = "state.json"


def every_seconds() -> float:
    """Seconds between two saves (XM_CHECKPOINT_SECONDS: tests save after every batch with 0)."""
    return float(os.environ.get("XM_CHECKPOINT_SECONDS", EVERY_SECONDS))


class PartCheckpoint:
    """The embeddings of one part computed so far: `resume` gives the kept samples it covers and
    the position the part goes on from, `add` takes each batch's image embeddings with the kept
    samples' positions in the part (the input pipeline's `Batch.positions`: positions, not an
    order kept here, since decoding may run in worker processes), `images_done` the number of
    samples the part had, `texts_written` follows each encoder's caption files, `discard` the
    part's marker."""

    def __init__(self, layout: Layout, part: str, size: int | None, settings: dict[str, Any],
                 image_specs: list[str], every: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dir = layout.checkpoint_dir("embed", part)
        self.part, self.size, self.image_specs = part, size, list(image_specs)
        self.every = every_seconds() if every is None else every
        self.clock = clock
        # as the state file holds them (tuples read back as lists), to compare with it
        self.settings = json.loads(json.dumps({"settings": settings, "image_specs": self.image_specs, "size": size}))
        self.state = self._load()
        self._pending: list[tuple[list[int], dict[str, np.ndarray]]] = []
        self._last = clock()

    def _fresh(self) -> dict[str, Any]:
        return {**self.settings, "consumed": 0, "kept": 0, "chunks": [], "images_done": False, "texts": []}

    def _load(self) -> dict[str, Any]:
        path = self.dir / STATE
        try:
            state = json.loads(path.read_text())
            if all(state.get(k) == v for k, v in self.settings.items()):
                return dict(state)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)  # none, or made under other settings: start over
        return self._fresh()

    # ------------------------------------------------------------------ resuming

    @property
    def skipped(self) -> int:
        """Samples the checkpoint covers that were not kept (they failed to decode)."""
        return int(self.state["consumed"]) - int(self.state["kept"])

    def resume(self, samples: Callable[[], Iterator[Sample]]) -> tuple[list[Sample], int]:
        """(the kept samples the checkpoint covers, the position in the part to go on from). Says
        where it resumes when there is a checkpoint."""
        consumed = int(self.state["consumed"])
        restored: list[Sample] = []
        if consumed:
            keep = set(self._positions().tolist())
            it = iter(samples())
            for i in range(consumed):
                s = next(it, None)
                if s is None:  # the part has changed under its checkpoint: embed it afresh
                    shutil.rmtree(self.dir, ignore_errors=True)
                    self.state = self._fresh()
                    return [], 0
                if i in keep:
                    restored.append(s)
            done = f"; captions of {len(self.state['texts'])} encoder(s) done" if self.state["texts"] else ""
            print(f"xm: resuming part {quoted(self.part)} at item {consumed}/{self.size if self.size is not None else '?'}"
                  f" ({len(restored)} embedded{done})", file=sys.stderr, flush=True)
        return restored, consumed

    def _positions(self) -> np.ndarray:
        parts = [np.load(self.dir / f"pos-{i}.npy") for i in range(len(self.state["chunks"]))]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def images(self, spec: str) -> np.ndarray | None:
        """The saved image embeddings of `spec` (float16), None if nothing is saved."""
        i = self.image_specs.index(spec)
        chunks = [np.load(self.dir / f"img-{i}-{c}.npy") for c in range(len(self.state["chunks"]))]
        return np.concatenate(chunks) if chunks else None

    # ------------------------------------------------------------------ saving

    def add(self, positions: list[int], embeddings: dict[str, np.ndarray]) -> None:
        """One batch's image embeddings and its kept samples' positions in the part, in the order
        the batches come; saved every `every` s."""
        self._pending.append((list(positions), embeddings))  # one append: a Ctrl-C keeps the batch whole or drops it
        if self.clock() - self._last >= self.every:
            self.save()

    def save(self) -> None:
        """Append what was added since the last save; the state is rewritten last."""
        if not self._pending:
            return
        seq = len(self.state["chunks"])
        positions = np.asarray([p for ps, _ in self._pending for p in ps], np.int64)
        _save(self.dir / f"pos-{seq}.npy", positions)
        for i, spec in enumerate(self.image_specs):
            rows = np.concatenate([e[spec] for _, e in self._pending]).astype(np.float16)  # as the part file stores them
            _save(self.dir / f"img-{i}-{seq}.npy", rows)
        self.state["chunks"].append(len(positions))
        self.state["consumed"] = int(positions[-1]) + 1
        self.state["kept"] = int(self.state["kept"]) + len(positions)
        write_json(self.dir / STATE, self.state)
        self._pending = []
        self._last = self.clock()

    def images_done(self, seen: int) -> None:
        """Every image of the part is embedded (`seen`: the part's samples, failures included): the
        state covers every sample."""
        self.save()
        self.state["consumed"] = seen
        self.state["images_done"] = True
        write_json(self.dir / STATE, self.state)

    def has_texts(self, spec: str, files: list[Path]) -> bool:
        return bool(self.state["images_done"]) and spec in self.state["texts"] and all(f.is_file() for f in files)

    def texts_written(self, spec: str) -> None:
        self.state["texts"].append(spec)
        write_json(self.dir / STATE, self.state)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
