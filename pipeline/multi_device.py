"""The embed stage over several GPUs of one machine (`--device cuda:0,1,2,3`).

One thread per device, each with the plan's encoders loaded on its device, takes the next part
nobody has taken: the parts each device embeds are disjoint, and a part is done exactly once
through the same markers as everywhere else (its files renamed into place, its marker last), so
a run interrupted on any device resumes like a one-device run. Threads rather than processes:
the forward passes release the GIL, each device gets its own decoding workers
(`pipeline/loader.py`), and Ctrl-C reaches the one process that must stop every device.
(Spark `local[N]` with GPU task resources would do the same with a JVM per build: the
`pyspark` distributor is there for clusters, where each task keeps the GPU Spark gives it.)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from xm.encoders.device import Device
from xm.indexes.layout import Layout
from xm.pipeline.config import BuildConfig
from xm.pipeline.embed import embed_part
from xm.pipeline.sources.base import Part
from xm.pipeline.tasks import load_plan_encoders


class _Stopped(Exception):
    """Raised inside a device's thread once another device failed or Ctrl-C came."""


def embed_on_devices(cfg: BuildConfig, parts: Sequence[Part], plan: dict[str, tuple[str, ...]], layout: Layout,
                     devices: Sequence[Device], on_rows: Callable[[int], None],
                     on_captions: Callable[[int], None]) -> dict[str, str]:
    """Embed `parts` spread over `devices`; return which device embedded each part."""
    todo: queue.Queue[Part] = queue.Queue()
    for p in parts:
        todo.put(p)
    stop = threading.Event()
    errors: list[BaseException] = []
    where: dict[str, str] = {}
    lock = threading.Lock()

    def unless_stopped(fn: Callable[[int], None]) -> Callable[[int], None]:
        def tick(n: int) -> None:
            if stop.is_set():  # leaves the part without its marker: it is redone on resume
                raise _Stopped
            with lock:
                fn(n)
        return tick

    def work(device: Device) -> None:
        try:
            encoders = load_plan_encoders(cfg, plan, quiet=True, device=device)
            while not stop.is_set():
                try:
                    part = todo.get_nowait()
                except queue.Empty:
                    return
                embed_part(part, encoders, plan, layout, cfg.batch_size, on_rows=unless_stopped(on_rows),
                           on_captions=unless_stopped(on_captions), num_workers=cfg.workers())
                with lock:
                    where[part.name] = device.torch
        except _Stopped:
            return
        except BaseException as exc:  # re-raised by the caller's thread, the others stopped
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=work, args=(d,), name=f"xm-embed-{d.torch}", daemon=True) for d in devices]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # short waits: Ctrl-C reaches this thread
    except BaseException:
        stop.set()
        for t in threads:
            t.join(60)
        raise
    if errors:
        raise errors[0]
    return where


def spread(device: Device) -> list[Device]:
    """Each GPU of a device list as a device of its own."""
    return [Device(device.kind, (i,), device.asked) for i in device.indices] if device.kind == "cuda" else [device]


def describe_spread(where: dict[str, str]) -> dict[str, Any]:
    """Parts per device, for the build summary."""
    counts: dict[str, Any] = {}
    for device in where.values():
        counts[device] = counts.get(device, 0) + 1
    return dict(sorted(counts.items()))
