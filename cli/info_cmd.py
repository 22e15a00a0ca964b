"""`xm info` and `xm search`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from xm.cli.app import app
from xm.cli.device_option import DEVICE_HELP, parse_device
from xm.cli.output import console, print_json, table

if TYPE_CHECKING:
    from xm.indexes.records import EncoderEntry


@app.command("info")
def info_cmd(
    index: Path = typer.Argument(..., help="index folder"),
    verify: bool = typer.Option(False, "--verify", help="checksum every file against the manifest"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Print an index's manifest readably (and check it against the files)."""
    from xm.memories import open_index

    memory = open_index(index, verify=True if verify else None)
    m = memory.manifest
    if as_json:
        print_json(m.to_json())
        return
    console.print(table(f"xm index {index}", ["", ""], [
        ("id", m.id), ("format", m.format + (f" (read from {memory.format_read})" if memory.format_read != m.format else "")),
        ("created", m.created), ("items", m.count),
        ("source", f"{m.source.kind}: {m.source.source}"), ("parts", len(m.parts)),
        ("files", f"{len(m.files)}, {m.total_bytes / 1e6:.1f} MB"),
        ("verified", "sizes and checksums" if verify else
         "sizes (checksums up to 256 MB)" if len(m.files) <= 1_000 else "the sizes of 1,000 files spread over the list (--verify: all)"),
    ]))
    console.print(table("roles (X-MoRe's defaults)", ["role", "encoder"], [
        ("coarse", m.roles.coarse), ("fine", m.roles.fine),
        *[("inference", s) for s in m.roles.inference],
    ]))
    indexed = {(e.encoder, e.modality) for e in m.indexes}
    console.print(table("encoders", ["encoder", "dim", "embedded", "indexed", "norms", "stored as", "folder"], [
        (spec, e.dim, ", ".join(e.embedded), ", ".join(mod for mod in ("image", "text") if (spec, mod) in indexed),
         ", ".join(e.norms), _stored_as(e), f"embeddings/{e.slug}") for spec, e in m.encoders.items()
    ]))
    console.print(table("kNN indexes", ["encoder", "modality", "faiss key", "search params", "shards", "vectors"], [
        (e.encoder, e.modality, e.key,
         e.params + (f", refine x{e.refine_k_factor}" if e.refine_k_factor else ""),
         len(e.shards), sum(s.ntotal for s in e.shards))
        for e in m.indexes
    ]))
    fails = m.stats.failures
    if fails:
        console.print(table("failures", ["reason", "count"], sorted(fails.items(), key=lambda kv: -kv[1])))
    console.print(table("built with", ["package", "version"], sorted(m.versions.items())))


@app.command("search")
def search_cmd(
    index: Path = typer.Argument(..., help="index folder"),
    image: Path | None = typer.Option(None, "--image", help="query image"),
    text: str | None = typer.Option(None, "--text", help="query text"),
    k: int = typer.Option(10, "-k", "--k", min=1, help="number of results"),
    modality: str = typer.Option("image", help="which memory index to search: image | text"),
    encoder: str | None = typer.Option(None, "--encoder", help="indexed encoder to search with (default: the coarse role)"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines output"),
    precision: str = typer.Option("fp32", "--precision", help="encoder inference precision: fp32 | bf16 | fp16 | int8 (see bench/bench_precision.py)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Nearest memory items to an image or a text: id, similarity, caption, url."""
    from xm.encoders.precision import Precision
    from xm.errors import XMError
    from xm.methods.retrieval import search_memory

    query_precision = Precision.parse(precision)  # parsed once, before any work
    where = parse_device(device, "search")
    if (image is None) == (text is None):
        raise XMError("xm search: give exactly one of --image or --text")
    if modality not in ("image", "text"):
        raise XMError(f"--modality {modality!r}: choose image or text")
    hits = search_memory(index, image=image, text=text, k=k, modality=modality, encoder=encoder,
                         precision=query_precision, device=where)
    if as_json:
        for h in hits:
            print_json(h)
        return
    console.print(table(f"{k} nearest in {index} ({modality} index)", ["rank", "id", "similarity", "caption", "url"], [
        (r + 1, h["id"], h["similarity"], h["caption"], h["url"]) for r, h in enumerate(hits)
    ]))


@app.command("indexes")
def indexes_cmd(
    default: str | None = typer.Option(None, "--default", help="make this index (a name listed here) the default"),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
) -> None:
    """The indexes in your xm folder ($XM_HOME/indexes) and which one is the default."""
    from xm.indexes import home
    from xm.indexes.manifest import read_manifest

    if default is not None:
        home.set_default(default)
    current = home.default_index()
    rows = []
    for path in home.list_indexes():
        m = read_manifest(path)
        rows.append({"name": path.name, "default": path == current, "items": m.count, "created": m.created,
                     "source": f"{m.source.kind}: {m.source.source}", "path": str(path)})
    if as_json:
        print_json({"home": str(home.home()), "indexes": rows})
        return
    console.print(table(f"indexes in {home.indexes_dir()}", ["", "name", "items", "created", "source"],
                        [("*" if r["default"] else "", r["name"], r["items"], r["created"], r["source"]) for r in rows]))
    if not rows:
        console.print("none yet: `xm build-index --source ...` without --out builds one here and makes it the default")


def _stored_as(entry: EncoderEntry) -> str:
    """float16, or the codec of each compressed modality; and where precomputed arrays came from."""
    codecs = entry.codecs
    kinds = [f"{m}: {codecs[m]} codes" if m in codecs else f"{m}: float16" for m in entry.embedded]
    sources = entry.precomputed
    return ", ".join(kinds) + (f" (from {', '.join(sources.values())})" if sources else "")
