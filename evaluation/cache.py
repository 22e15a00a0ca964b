"""Resumable benchmark evidence: a method's evidence kept chunk by chunk while its pass runs.

`xm benchmark` caches a method's evidence over the whole image list once the pass is done
(`runner.EvidencePass`, one `.npz` per method named by the image list's and the method's
evidence keys, which hold everything the evidence depends on). While the pass runs, each
finished chunk of images (`CHUNK_BATCHES` batches) is written at once beside it, in
`<that name>.parts/`, so a Ctrl-C loses at most the chunk under way and a re-run of the same
command computes only the chunks that are missing. A chunk file is named by its first
position and a digest of the rows it holds, so a chunk cut another way (another
`--batch-size`) is never taken for it; files are written under a temporary name and renamed,
so a kill never leaves a partial file under a final name. The folder goes once the whole
evidence is saved.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from xm.indexes.layout import atomic_path

# 4 batches (128 images at the default --batch-size 32): the most a Ctrl-C loses; small next
# to a benchmark's test split, and one small file per method per chunk
CHUNK_BATCHES = 4
ROWS = "_rows"  # dataset positions of the chunk's images that decoded
FAILED = "_failed"  # those that did not


def chunk_spans(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[lo, hi) positions of each chunk: whole batches, so every batch is the one an
    uninterrupted pass makes (the same evidence, to the bit)."""
    size = batch_size * CHUNK_BATCHES
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


class EvidenceChunks:
    """The finished chunks of one method's evidence pass."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _file(self, lo: int, rows: list[int]) -> Path:
        digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]
        return self.folder / f"{lo:09d}-{digest}.npz"

    def load(self, lo: int, rows: list[int]) -> dict[str, np.ndarray] | None:
        path = self._file(lo, rows)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError):
            return None  # a damaged chunk is recomputed

    def save(self, lo: int, rows: list[int], evidence: dict[str, np.ndarray], readable: list[int], failed: list[int]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._file(lo, rows)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **evidence, **{ROWS: np.asarray(readable, np.int64), FAILED: np.asarray(failed, np.int64)})

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
