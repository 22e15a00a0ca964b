"""Readable tables, JSON, and progress bars for the commands."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

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
from rich.text import Text
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


# C0 and C1 control characters (escape sequences, bells, carriage returns) and DEL
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if c not in (0x09,)}


def safe_text(value: Any) -> Text:
    """Data (captions, class names, file names) as plain text: never rich markup, never
    terminal control codes (they are shown escaped, e.g. \\x1b)."""
    return Text(str(value).translate(_CONTROL))


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
    """A factory of progress bars on stderr: `tick = make(label, total); tick(n)`."""
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
            task = prog.add_task(label, total=total)
            return lambda n: prog.advance(task, n)

        yield make
