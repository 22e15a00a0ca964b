"""`xm export clip-back`: an index in the layout clip-retrieval's `clip back` loads; `xm export
embeddings`: its embeddings in clip-retrieval's float16 layout (embedding-reader, autofaiss)."""

from __future__ import annotations

from pathlib import Path

import typer

from xm.cli.app import app
from xm.cli.output import console, err_console, print_json, safe_text, table

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
    err_console.print(safe_text(f"xm: warning: {info['warning']}"))
    if as_json:
        print_json(info)
        return
    console.print(table(f"clip back files in {out}", ["", ""], [
        ("indice", info["name"]), ("clip_model", info["clip_model"]), ("items", info["count"]),
        ("kNN indexes", ", ".join(info["indexes"])), ("metadata", f"{info['metadata_files']} parquet file(s): {', '.join(info['columns'])}"),
        ("indices JSON", info["indices_paths"]), ("run", info["run"]),
    ]))


@export_app.command("embeddings")
def embeddings_cmd(
    index: Path = typer.Argument(..., help="index folder"),
    out: Path = typer.Argument(..., help="new folder: OUT/<encoder>/{img_emb,text_emb,metadata}/"),
    encoder: list[str] = typer.Option([], "--encoder", metavar="SPEC", help="only this encoder (repeatable; default: every one)"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty OUT"),
    as_json: bool = typer.Option(False, "--json", help="print what was written as JSON"),
) -> None:
    """Float16 embedding parts and row-aligned metadata per encoder, as clip-retrieval writes them
    (codes of --text-codec/--image-codec decoded), for embedding-reader, autofaiss and clip-retrieval."""
    from xm.indexes.export_embeddings import export_embeddings

    info = export_embeddings(index, out, encoders=list(encoder) or None, force=force)
    if as_json:
        print_json(info)
        return
    console.print(table(f"embeddings of {info['count']} items in {info['parts']} part(s) -> {out}", ["encoder", "folder", "embeddings", "decoded from codes"],
                        [(spec, e["folder"], ", ".join(e["modalities"]), ", ".join(e["decoded"]) or "-")
                         for spec, e in info["encoders"].items()]))
