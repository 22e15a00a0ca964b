"""`xm classify`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from xm.cli.app import app
from xm.cli.output import console, err_console, print_json, table


@app.command("classify")
def classify_cmd(
    images: List[Path] = typer.Argument(..., help="images, classified as one stream in this order"),
    labels: Path = typer.Option(..., "--labels", help="class names, one per line"),
    index: Path = typer.Option(..., "--index", help="an index built by xm build-index"),
    model: str = typer.Option("RN50:openai", "--model", help="inference encoder ARCH:PRETRAINED"),
    template: List[str] = typer.Option(["a photo of a {}."], "--template", help="prompt template(s); several are averaged"),
    k_coarse: int = typer.Option(128, "--k-coarse", help="captions kept from the coarse image kNN"),
    k_fine: int = typer.Option(16, "--k-fine", help="captions kept after fine re-ranking"),
    ensemble: str = typer.Option("modal", "--ensemble", help="modal | equal | raw | l1 | image | text"),
    retrieval: str = typer.Option("direct", "--retrieval", help="direct (fine re-rank) | indirect (coarse order)"),
    state: Optional[Path] = typer.Option(None, "--state", help="JSON file continuing the stream across invocations"),
    batch_size: int = typer.Option(16, "--batch-size", help="images encoded together (order is kept)"),
    explain: bool = typer.Option(False, "--explain", help="show the captions used and their votes"),
    timings: bool = typer.Option(False, "--timings", help="show where each query's time went"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per image"),
) -> None:
    """Classify images with X-MoRe over a built index."""
    from xm.classify import Classifier

    clf = Classifier(index, labels, model=model, templates=template, k_coarse=k_coarse, k_fine=k_fine,
                     ensemble=ensemble, retrieval=retrieval, state_file=state)
    failed = 0
    for result in clf.run(images, batch_size=batch_size, explain=explain):
        if "error" in result:
            failed += 1
            print(f"xm: error: {result['error']}", file=sys.stderr)
            if as_json:
                print_json(result)
            continue
        if as_json:
            print_json(result if timings else {k: v for k, v in result.items() if k != "timings"})
            continue
        w = result["weights"]
        console.print(table(
            f"{result['image']}  (stream #{result['stream_position']}, weights img {w['img']:.3f} / txt {w['txt']:.3f}, "
            f"conf img {result['confidence']['img']:.3f} / txt {result['confidence']['txt']:.3f})",
            ["rank", "class", "prob", "p_img", "p_txt"],
            [(r + 1, t["class"], t["prob"], t["p_img"], t["p_txt"]) for r, t in enumerate(result["top5"])],
        ))
        if explain:
            console.print(table("captions used (fine re-ranked)", ["id", "fine sim", "vote", "vote p", "caption"], [
                (c["id"], c["fine_similarity"], c["vote"], c["vote_prob"], c["caption"]) for c in result["captions"]
            ]))
        if timings:
            console.print(table("time (ms)", ["step", "ms"], [(k, f"{v * 1e3:.1f}") for k, v in result["timings"].items()]))
    clf.save_state()
    if failed:
        err_console.print(f"{failed} image(s) could not be classified")
        raise typer.Exit(1)
