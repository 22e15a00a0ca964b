"""`xm classify`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from xm.cli.app import app
from xm.cli.device_option import DEVICE_HELP, parse_device
from xm.cli.method_options import method_options
from xm.cli.output import console, err_console, print_json, table

if TYPE_CHECKING:  # the command modules load at every `xm` start: numpy only when a command runs
    from xm.methods.base import ExplanationSection


@app.command("classify")
def classify_cmd(
    images: list[Path] = typer.Argument(..., metavar="IMAGE", help="images, classified as one stream in this order"),
    labels: Path = typer.Option(..., "--labels", help="class names, one per line"),
    index: str | None = typer.Option(None, "--index", help="an index built by xm build-index, or http://HOST:PORT/?indice_name=NAME (a clip-retrieval back)"),
    method: str = typer.Option("xmore", "--method", help="a method or variant (see `xm methods`)"),
    model: str | None = typer.Option(None, "--model", help="inference encoder ARCH:PRETRAINED (default: the index's first inference encoder)"),
    template: list[str] = typer.Option(["a photo of a {}."], "--template", metavar="TEMPLATE", help="prompt template(s); several are averaged"),
    protocol: str = typer.Option("authors", "--protocol", help="authors | xm: X-MoRe's retrieval switches (see `xm methods`)"),
    k_coarse: int | None = typer.Option(None, "--k-coarse", help="X-MoRe: captions kept from the coarse image kNN (128)"),
    k_fine: int | None = typer.Option(None, "--k-fine", help="X-MoRe: captions kept after fine re-ranking (16)"),
    ensemble: str | None = typer.Option(None, "--ensemble", help="X-MoRe: l1 | modal | equal | raw | image | text"),
    retrieval: str | None = typer.Option(None, "--retrieval", help="X-MoRe: direct (fine re-rank) | indirect (coarse order)"),
    reco_mode: str | None = typer.Option(None, "--reco-mode", help="RECO: refine image | text | both"),
    reco_checkpoint: Path | None = typer.Option(None, "--reco-checkpoint", help="RECO: trained fusion checkpoint"),
    descriptions: Path | None = typer.Option(None, "--descriptions", help="CODER: class descriptions (DCLIP JSON)"),
    texts_file: Path | None = typer.Option(None, "--texts-file", help="CODER: text sets written by `xm texts`"),
    opt: list[str] = typer.Option([], "--opt", metavar="NAME=VALUE", help="any method option, NAME=VALUE (repeatable; see `xm methods`)"),
    state: Path | None = typer.Option(None, "--state", help="JSON file continuing the stream across invocations"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="images encoded together (order is kept)"),
    explain: bool = typer.Option(False, "--explain", help="show what the method used (captions, texts) and their votes"),
    timings: bool = typer.Option(False, "--timings", help="show where each query's time went (batch average per image)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per image"),
    precision: str = typer.Option("fp32", "--precision", help="encoder inference precision: fp32 | bf16 | fp16 | int8 (see bench/bench_precision.py)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Classify images with any method over a built index (default: X-MoRe, the authors' protocol)."""
    from xm.classify import Classifier
    from xm.encoders.precision import Precision
    from xm.indexes import home
    from xm.methods.registry import get

    inference_precision = Precision.parse(precision)  # parsed once, before any work
    where = parse_device(device, "classify")
    if index is None and get(method).method.needs_memory:
        index = str(home.require_index(None))
    options = method_options(opt, k_coarse=k_coarse, k_fine=k_fine, ensemble=ensemble, retrieval=retrieval,
                             mode=reco_mode, checkpoint=reco_checkpoint, descriptions=descriptions, texts_file=texts_file)
    clf = Classifier(index, labels, method=method, model=model, templates=template, protocol_name=protocol,
                     options=options, state_file=state, precision=inference_precision, device=where)
    failed = skipped = 0
    for result in clf.run(images, batch_size=batch_size, explain=explain):
        if "error" in result:
            failed += 1
            print(f"xm: error: {result['error']}", file=sys.stderr)
            if as_json:
                print_json(result)
            continue
        if result.get("skipped"):
            skipped += 1
            err_console.print(f"xm: {result['image']}: skipped ({result['skipped']})", markup=False)
        if as_json:
            print_json(result if timings else {k: v for k, v in result.items() if k != "timings"})
            continue
        show_result(result, clf.method.explanation_view(result) if explain else [], timings)
    clf.save_state()
    if failed:
        err_console.print(f"{failed} image(s) could not be classified")
        raise typer.Exit(1)


def show_result(result: dict, explanation: Sequence[ExplanationSection], timings: bool) -> None:
    comps = [k for k in result["top5"][0] if k not in ("class", "prob")]
    title = f"{result['image']} · {result['method']}"
    if "stream_position" in result:
        title += f" · stream #{result['stream_position']}"
    if "weights" in result:
        w, wn, c = result["weights"], result["weights_normalised"], result["confidence"]
        title += (f" · weights img {w['img']:.3f} / txt {w['txt']:.3f} (normalised {wn['img']:.2f} / {wn['txt']:.2f})"
                  f" · confidence img {c['img']:.3f} / txt {c['txt']:.3f}")
    console.print(table(title, ["rank", "class", "prob", *comps],
                        [(r + 1, t["class"], t["prob"], *[t[k] for k in comps]) for r, t in enumerate(result["top5"])]))
    for section in explanation:  # whatever the method shows of what it used (Method.explanation_view)
        console.print(table(section.title, section.columns, section.rows))
    if timings:
        console.print(table(f"time per image (ms, batch average, on {result.get('device', 'cpu')})", ["step", "ms"],
                            [(k, f"{v * 1e3:.1f}") for k, v in result["timings"].items()]))
