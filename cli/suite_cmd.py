"""`xm benchmark --suite NAME`: printing and writing a suite's table (the logic is
`xm.evaluation.suites`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from xm.cli.output import console, err_console, print_json, progress_bars, table

if TYPE_CHECKING:
    from xm.evaluation.decontaminate import Decontamination
    from xm.evaluation.suites import Suite


def run_suite_command(suite: Suite, index: Path | None, model: str | None, limit: int | None, seeds: list[int] | None,
                      options: dict[str, Any], batch_size: int, precision: str, cache_dir: Path | None,
                      out: Path | None, as_json: bool, device: Any = None,
                      decontaminate: Decontamination | None = None) -> None:
    from xm.evaluation.suites import SuiteConfig, missing_line, run_suite, table_rows, write_suite
    from xm.indexes import home
    from xm.memories import open_index

    if index is None:
        index = home.default_index()  # a suite runs its memory-free methods without one
    memory = open_index(index) if index is not None else None
    cfg = SuiteConfig(index=index, model=model, limit=limit, seeds=seeds, options=options, batch_size=batch_size,
                      precision=precision, cache_dir=cache_dir, device=device)
    if decontaminate is not None:
        cfg.decontaminate = decontaminate
    with progress_bars() as make:
        result = run_suite(suite, cfg, memory, progress=make)
    paths = write_suite(result, out or Path(f"xm-suite-{suite.name}"))
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    if as_json:
        print_json(result)
        return
    header, rows = table_rows(result)
    src = result["source"]
    console.print(table(f"{result['title']} · {result['metric']} · published: {src['table']} ({src['file']}) · "
                        f"xm: {result['model']}, protocol {result['protocol']} vs the paper's {result['compared_with']} rows",
                        header, [tuple(r) for r in rows]))
    line = missing_line(result)
    if line:
        err_console.print(line, markup=False)
    for note in result["notes"]:
        console.print(f"note: {note}", markup=False)
    console.print(f"wrote {', '.join(result['outputs'].values())}", markup=False)
