"""`xm export clip-back`: an index in the layout clip-retrieval's `clip back` loads."""

from __future__ import annotations

from pathlib import Path

import typer

from xm.cli.app import app
from xm.cli.output import console, print_json, table

export_app = typer.Typer(help="Write an index in another tool's layout.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("clip-back")
def clip_back_cmd(
    index: Path = typer.Argument(..., help="index folder"),
    out: Path = typer.Argument(..., help="new folder for clip back's files"),
    name: str | None = typer.Option(None, "--name", help="indice name (default: the index folder's name)"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty OUT"),
    as_json: bool = typer.Option(False, "--json", help="print what was written as JSON"),
) -> None:
    """image.index + text.index (shards merged), metadata/ in id order, and an indices JSON for `clip back`."""
    from xm.server.export import export_clip_back

    info = export_clip_back(index, out, name=name, force=force)
    if as_json:
        print_json(info)
        return
    console.print(table(f"clip back files in {out}", ["", ""], [
        ("indice", info["name"]), ("clip_model", info["clip_model"]), ("items", info["count"]),
        ("kNN indexes", ", ".join(info["indexes"])), ("metadata", f"{info['metadata_files']} parquet file(s): {', '.join(info['columns'])}"),
        ("indices JSON", info["indices_paths"]), ("run", info["run"]),
    ]))
