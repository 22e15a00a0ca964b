"""Readable tables, JSON, and progress bars for the commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from xm.errors import quoted

# off a terminal (a log file, a pipe) rich would wrap tables at 80 columns: give them room
console = Console(stderr=False, width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


def safe_text(value: Any) -> Text:
    """Data (captions, class names, file names) as plain text: never rich markup, never
    terminal control codes (`xm.errors.quoted` shows them escaped, e.g. \\x1b)."""
    return Text(quoted(value))


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(title=safe_text(title) if title is not None else None, title_justify="left", show_header=any(columns))
    for c in columns:
        t.add_column(safe_text(c), overflow="fold")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t


def _fmt(v: Any) -> Text:
    if isinstance(v, float):
        return Text(f"{v:.4f}")
    return safe_text("" if v is None else v)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.1f}/s" if task.speed else "", style="cyan")


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int | None], Callable[[int], None]]]:
    """A factory of progress bars on stderr: `tick = make(label, total); tick(n)`.

    On a terminal, live bars with count, rate and ETA; otherwise (a log file, CI) plain
    lines, one per task at most every PLAIN_EVERY seconds and when it completes."""
    if not err_console.is_terminal:
        with _plain_progress() as make:
            yield make
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    ) as prog:

        def make(label: str, total: int | None) -> Callable[[int], None]:
            # the clock starts at the task's first tick (tick(0): its phase starts), not when the
            # bar is made: a stage makes its bars at its start, and a later phase's ETA would count
            # the time of the phases before it
            task = prog.add_task(safe_text(label).plain, total=total, start=False)

            def tick(n: int) -> None:
                if not prog.tasks[task].started:
                    prog.start_task(task)
                prog.advance(task, n)

            return tick

        yield make


PLAIN_EVERY = 10.0


@contextmanager
def _plain_progress() -> Iterator[Callable[[str, int | None], Callable[[int], None]]]:
    import time

    tasks: list[dict[str, Any]] = []

    def line(t: dict[str, Any]) -> None:
        elapsed = t["active"]
        rate = t["done"] / elapsed if elapsed > 0 else 0.0
        total = t["total"]
        eta = f", ETA {(total - t['done']) / rate:,.0f} s" if total and rate > 0 and t["done"] < total else ""
        count = f"{t['done']:,}/{total:,} ({100 * t['done'] / total:.0f}%)" if total else f"{t['done']:,}"
        sys.stderr.write(f"xm: {t['label']}: {count}, {rate:,.1f}/s, {elapsed:,.0f} s{eta}\n")
        sys.stderr.flush()
        t["last"] = time.monotonic()

    def make(label: str, total: int | None) -> Callable[[int], None]:
        # rates and ETAs count only the time the task's phase runs: tick(0) says it (re)starts
        # now (the build's captions phase of each part, after that part's images), and the time
        # since the task's previous tick then belongs to another phase
        now = time.monotonic()
        t: dict[str, Any] = {"label": safe_text(label).plain, "total": total, "done": 0, "since": now, "active": 0.0,
                             "last": 0.0}
        tasks.append(t)

        def tick(n: int) -> None:
            now = time.monotonic()
            if n == 0:
                t["since"] = now
                return
            t["active"] += now - t["since"]
            t["since"] = now
            t["done"] += n
            if (total and t["done"] >= total) or time.monotonic() - t["last"] >= PLAIN_EVERY:
                line(t)

        return tick

    try:
        yield make
    finally:
        for t in tasks:
            if t["done"] and not (t["total"] and t["done"] >= t["total"]):
                line(t)
