"""`xm texts`: build CODER's text sets offline and write them as JSON (docs/coder.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from xm.cli.app import app
from xm.cli.device_option import DEVICE_HELP, parse_device
from xm.cli.output import console, print_json, table


@app.command("texts")
def texts_cmd(
    labels: Path = typer.Option(..., "--labels", help="class names, one per line"),
    out: Path = typer.Option(..., "--out", help="text-set JSON to write (read back by `--texts-file`)"),
    index: Path | None = typer.Option(None, "--index", help="an index built by xm build-index (source 'memory'; default --model)"),
    descriptions: Path | None = typer.Option(None, "--descriptions", help="DCLIP-format JSON (class -> sentences), or xm's sectioned form"),
    sources: str = typer.Option("", "--sources", help="names,descriptions,wordnet,memory (default: names, + descriptions when given)"),
    model: str | None = typer.Option(None, "--model", help="encoder that filters texts, ARCH:PRETRAINED (default: the index's first inference encoder)"),
    dataset: str | None = typer.Option(None, "--dataset", help="dataset name for its name template (eurosat: 'a photo of {c}, satellite domain.')"),
    name_template: str = typer.Option("", "--name-template", help="name text template with {c} (overrides the dataset's)"),
    wordnet_dir: str = typer.Option("", "--wordnet-dir", help="WordNet database folder (default: XM_WORDNET_DIR, /usr/share/wordnet)"),
    synonym_min_sim: float = typer.Option(0.8, "--synonym-min-sim", help="WordNet lemmas kept at this similarity to their class name or more"),
    max_similarity: float = typer.Option(0.9, "--max-similarity", help="analogous classes and captions this close to another class name are dropped"),
    memory_k: int = typer.Option(8, "--memory-k", min=0, help="memory captions kept per class at most"),
    memory_search: int = typer.Option(64, "--memory-search", min=1, help="memory captions searched per class"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Build CODER's texts per class (names, descriptions, WordNet synonyms, memory captions) into a JSON file."""
    from xm.encoders import load_encoder
    from xm.errors import XMError
    from xm.methods.zeroshot import read_labels
    from xm.texts import TextOptions, build_textset

    where = parse_device(device, "texts")
    classnames = read_labels(labels)
    opts = TextOptions(sources=sources, descriptions=str(descriptions) if descriptions else "", dataset=dataset,
                       name_template=name_template, wordnet_dir=wordnet_dir, synonym_min_sim=synonym_min_sim,
                       max_similarity=max_similarity, memory_k=memory_k, memory_search=memory_search)
    opts.source_list("--sources")  # one line for a bad list before any encoder loads
    memory = None
    if index is not None:
        from xm.memories import open_index

        memory = open_index(index)
    if model is None:
        if memory is None:
            raise XMError("xm texts: give --model ARCH:PRETRAINED (or --index, whose inference encoder is the default)")
        model = memory.default_model()
    ts = build_textset(classnames, load_encoder(model, device=where), opts, memory, where="xm texts")
    ts.write(out)
    summary: dict[str, Any] = {"out": str(out), "classes": len(classnames), "vector_texts": ts.count(), "ovo_texts": ts.count(("ovo",)),
               "by_source": ts.by_source(), "dropped": len(ts.dropped),
               "classes_without_extra_texts": sum(1 for c in classnames if len(ts.of(c, ("attribute", "analogous", "caption", "synonym"))) == 0)}
    if as_json:
        print_json(summary)
        return
    rows = [(f"{source}: {kind}", n) for source, kinds in summary["by_source"].items() for kind, n in kinds.items()]
    rows += [("classes", summary["classes"]), ("CODER vector length", summary["vector_texts"]),
             ("one-vs-one texts", summary["ovo_texts"]), ("dropped by a filter", summary["dropped"]),
             ("classes with names only", summary["classes_without_extra_texts"])]
    console.print(table(f"xm texts -> {out}", ["", ""], rows))
