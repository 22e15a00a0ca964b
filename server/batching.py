"""Encoder work batched across concurrent requests.

One thread per (encoder, kind) runs the forward passes: a request submits its images
(or texts) and waits; the thread takes every job that is queued when it wakes (up to
`max_items`, waiting at most `wait_s` for more while the batch is small) and encodes
them as one batch. Under load this turns 50 single-image forwards into a few batched
ones; alone, a request pays at most `wait_s` extra. It also means one forward pass at a
time per encoder, which is what a CPU with few cores wants.

A batch that fails is retried one request at a time, so one bad image fails only the request
that sent it; and the thread drops its references to a batch (inputs and outputs) as soon as
the results are handed over, so a batch's memory is not held until the next one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np


class Batcher:
    def __init__(self, name: str, encode: Callable[[list[Any]], np.ndarray], max_items: int = 32,
                 wait_s: float = 0.004, on_batch: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.encode = encode
        self.max_items = max(1, max_items)
        self.wait_s = wait_s
        self.on_batch = on_batch
        self._queue: queue.Queue[tuple[list[Any], Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"xm-batch-{name}", daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[Any]) -> Future:
        fut: Future = Future()
        if not items:
            fut.set_result(None)
            return fut
        self._queue.put((list(items), fut))
        return fut

    def __call__(self, items: Sequence[Any], timeout: float | None = None) -> np.ndarray:
        return self.submit(items).result(timeout)

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            self._deliver(self._collect(first))
            first = None  # the batch's images and tensors belong to the requests now, not to this thread

    def _collect(self, first: tuple[list[Any], Future]) -> list[tuple[list[Any], Future]]:
        """`first` and whatever else is queued (up to max_items, waiting at most wait_s)."""
        jobs = [first]
        n = len(first[0])
        deadline = time.perf_counter() + self.wait_s
        while n < self.max_items:
            try:
                nxt = self._queue.get_nowait() if time.perf_counter() >= deadline else \
                    self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)
                break
            jobs.append(nxt)
            n += len(nxt[0])
        return [j for j in jobs if j[1].set_running_or_notify_cancel()]

    def _deliver(self, jobs: list[tuple[list[Any], Future]]) -> None:
        if not jobs:
            return
        items = [it for j in jobs for it in j[0]]
        try:
            out = self.encode(items)
        except BaseException as exc:
            if len(jobs) == 1:
                jobs[0][1].set_exception(exc)
                return
            del items
            for one in jobs:  # isolate the request that broke the batch: each alone
                self._deliver([one])
            return
        if self.on_batch is not None:
            self.on_batch(len(items))
        lo = 0
        for its, fut in jobs:
            fut.set_result(out[lo : lo + len(its)])
            lo += len(its)
