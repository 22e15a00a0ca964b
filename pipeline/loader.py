"""The embed stage's input pipeline: a part's samples read, decoded, preprocessed for every image
encoder and their captions tokenised for every text encoder, in batches, off the critical path.

`--num-workers N` (N > 0) does this in N worker processes (torch's `DataLoader`): worker w makes
the batches w, w+N, w+2N, ... of the part, and the loader hands them back round-robin, so the
batches, their rows and their order are the same for every N, and so are the artefacts (tested
byte for byte against N = 0). N = 0 does it in one background thread of this process (`prefetch`).
On CUDA the batches come back in pinned memory, so that the copy to the GPU can be non-blocking.

A batch is `batch_size` consecutive samples of the part minus those that failed to decode (a
batch may be empty: every worker answers for each of its batches, which keeps the order).
Closing the iterator (`contextlib.closing`, also on Ctrl-C) stops the thread or shuts the worker
processes down before it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from xm.encoders import load_image
from xm.errors import XMError
from xm.pipeline.sources.base import Part, Sample

T = TypeVar("T")
MAX_DEFAULT_WORKERS = 8  # past this, decoding outruns one GPU for CLIP-sized models
FORK = sys.platform.startswith("linux")  # worker processes inherit the part (see `part_batches`)


def default_workers(accelerator: bool) -> int:
    """`--num-workers`' default. Feeding an accelerator: the cores beyond the one that drives it,
    at most 8. On the CPU: 0 (one decoding thread), since the model's forward passes already use
    every core and worker processes only compete with them (bench/bench_device.py measured
    --num-workers 1 and 2 at 0.82x and 0.78x of 0 on 2 cores with ViT-B-32). 0 where worker
    processes cannot be forked."""
    if not accelerator or not FORK:
        return 0
    return max(0, min(MAX_DEFAULT_WORKERS, (os.cpu_count() or 1) - 1))


@dataclass
class Batch:
    """One batch of a part: the samples kept (image bytes dropped), their pixels per image encoder
    and their caption tokens per text encoder, and how many of the batch's samples failed to decode."""

    samples: list[Sample]
    pixels: dict[str, Any] = field(default_factory=dict)  # spec -> (n,3,H,W) float tensor
    tokens: dict[str, Any] = field(default_factory=dict)  # spec -> (n,L) token tensor
    failed: int = 0
    positions: list[int] = field(default_factory=list)  # each kept sample's position in the part (checkpoints)

    def pin_memory(self) -> Batch:
        """Called by torch's pin-memory thread (the DataLoader pins a custom batch this way)."""
        return Batch(self.samples, {k: v.pin_memory() for k, v in self.pixels.items()},
                     {k: v.pin_memory() for k, v in self.tokens.items()}, self.failed, self.positions)


class _PartBatches:
    """The batches of one part that worker `w` of `n` makes (an iterable dataset of batches)."""

    def __init__(self, part: Part, preprocesses: dict[str, Callable], tokenizers: dict[str, Callable],
                 batch_size: int, start: int = 0) -> None:
        self.part, self.preprocesses, self.tokenizers, self.batch_size = part, preprocesses, tokenizers, batch_size
        self.start = start  # samples before it are covered by a checkpoint (`pipeline/checkpoint.py`)

    def __iter__(self) -> Iterator[Batch]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        chunk: list[Sample] = []
        first = self.start
        for i, s in enumerate(itertools.islice(self.part.samples(), self.start, None)):
            if (i // self.batch_size) % n != w:  # another worker's batch (its samples are read, not decoded)
                continue
            if not chunk:
                first = self.start + i
            chunk.append(s)
            if i % self.batch_size == self.batch_size - 1:
                yield make_batch(chunk, self.preprocesses, self.tokenizers, first)
                chunk = []
        if chunk:
            yield make_batch(chunk, self.preprocesses, self.tokenizers, first)


def preprocessed(s: Sample, preprocesses: dict[str, Callable]) -> dict[str, Any] | None:
    """The sample's image decoded once and preprocessed once per distinct preprocessing (by
    encoder), or None if it does not decode."""
    try:
        image = load_image(s.read_image(), name=s.key)
        done: dict[str, Any] = {}
        row = {}
        for k, fn in preprocesses.items():
            same = repr(fn)  # torchvision transforms print their parameters: equal repr, equal output
            if same not in done:
                done[same] = fn(image)
            row[k] = done[same]
        return row
    except (XMError, OSError):
        return None


def make_batch(chunk: list[Sample], preprocesses: dict[str, Callable], tokenizers: dict[str, Callable],
               first: int = 0) -> Batch:
    """Each image of `chunk` (the part's samples from position `first` on) decoded once and
    preprocessed once per distinct preprocessing; the captions of the images kept tokenised once
    per text encoder."""
    import torch

    kept: list[Sample] = []
    positions: list[int] = []
    pixels: dict[str, list[Any]] = {k: [] for k in preprocesses}
    failed = 0
    for pos, s in enumerate(chunk, first):
        row = preprocessed(s, preprocesses)
        if row is None:
            failed += 1
            continue
        for k, v in row.items():
            pixels[k].append(v)
        kept.append(dataclasses.replace(s, image=None) if s.image is not None else s)  # bytes stay in the worker
        positions.append(pos)
    captions = [s.caption for s in kept]
    return Batch(kept, {k: torch.stack(v) for k, v in pixels.items() if v},
                 {k: tok(captions) for k, tok in tokenizers.items()} if kept else {}, failed, positions)


def _as_is(batch: Any) -> Any:
    """The DataLoader's collate step: a worker's item is a whole `Batch` already."""
    return batch


def part_batches(part: Part, preprocesses: dict[str, Callable], tokenizers: dict[str, Callable], batch_size: int,
                 num_workers: int, pin_memory: bool = False, start: int = 0) -> Generator[Batch, None, None]:
    """The part's batches in order, from its sample `start` on (a checkpoint covers those before);
    close the generator when done with it (see the module doc)."""
    batches = _PartBatches(part, preprocesses, tokenizers, batch_size, start)
    if num_workers == 0:
        yield from prefetch(batches)
        return
    if not FORK:
        raise XMError(f"--num-workers {num_workers}: decoding workers are forked processes, which this platform "
                      "lacks; use --num-workers 0 (a decoding thread)")
    import torch.utils.data

    class Dataset(torch.utils.data.IterableDataset):
        def __iter__(self) -> Iterator[Batch]:
            return iter(batches)

    # fork: the part (a closure over its source) is inherited, not pickled; a worker only decodes on
    # the CPU, so a CUDA context in this process is never touched by it
    loader = torch.utils.data.DataLoader(
        Dataset(), batch_size=None, num_workers=num_workers, collate_fn=_as_is, pin_memory=pin_memory,
        multiprocessing_context=multiprocessing.get_context("fork"), prefetch_factor=2)
    with _sigint_held():  # iter() forks the workers
        it = iter(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:  # now, not when the iterator is collected: after Ctrl-C the process exits next
            shutdown()


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Ctrl-C held back while worker processes are forked. Python runs its SIGINT handler at the
    next bytecode, which during a fork can be inside logging's at-fork hook (`_releaseLock`): the
    KeyboardInterrupt is then swallowed ("Exception ignored") and logging's lock stays held, so the
    build hangs at its next log line instead of stopping. Held here, it is raised once the fork is
    over. Only the main thread can swap handlers; elsewhere (a thread per GPU) Ctrl-C is the main
    thread's anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt


def prefetch(items: Iterable[T], depth: int = 3, stop_wait: float = 60.0) -> Generator[T, None, None]:
    """Produce items in a background thread, so decoding overlaps the model's forward pass.

    Close the generator when done with it (`contextlib.closing`): closing stops the producer and
    waits for the item it is making. A producer left running inside native code (an image decoder,
    a torch op) while the interpreter exits after Ctrl-C makes the C++ runtime abort the process
    ("terminate called without an active exception", SIGABRT instead of exit 130)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()
    errors: list[BaseException] = []

    def put(item: object) -> bool:
        while not stop.is_set():  # never block for good on a consumer that has gone
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # re-raised in the consumer
            errors.append(exc)
        finally:
            put(done)

    producer = threading.Thread(target=run, daemon=True, name="xm-prefetch")
    producer.start()
    try:
        while (item := q.get()) is not done:
            yield item
    finally:
        stop.set()
        producer.join(stop_wait)
    if errors:
        raise errors[0]
