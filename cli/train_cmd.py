"""`xm train reco`: train RECO's fusion model on an index's precomputed embeddings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from xm.cli.app import app
from xm.cli.device_option import DEVICE_HELP, parse_device
from xm.cli.output import console, err_console, print_json, table
from xm.training.neighbours_option import NEIGHBOURS_HELP

train_app = typer.Typer(help="Train the state a method needs (RECO's fusion model).", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("reco")
def train_reco_cmd(
    index: Path = typer.Option(..., "--index", help="the memory: a built xm index with image and text embeddings and kNN indexes"),
    encoder: str = typer.Option("", "--encoder", help="the frozen CLIP E (ARCH:PRETRAINED); default: the index's coarse encoder"),
    k: int = typer.Option(10, "--k", help="neighbours retrieved per image and per text"),
    epochs: int = typer.Option(10, "--epochs", min=1, help="passes over the training pairs"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="pairs per step (default: 4096, halved down to 32 until an epoch has at least 8 steps; capped by the number of pairs)"),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate, decayed to 0 on a cosine"),
    weight_decay: float = typer.Option(1e-5, "--weight-decay", min=0.0, help="AdamW weight decay (weight matrices only)"),
    pairs: Path | None = typer.Option(None, "--pairs", help="train on another index's (image, caption) pairs (default: the memory's own)"),
    out: Path | None = typer.Option(None, "--out", help="checkpoint folder (default: IDX/trained/reco/<encoder>)"),
    seed: int = typer.Option(0, "--seed", help="seeds initialisation and every epoch's order (a resumed run ends identical)"),
    dup_threshold: float = typer.Option(0.95, "--dup-threshold", help="exclude memory items whose image has at least this cosine with the pair's image (above 1: only the item itself)"),
    exclude_same_caption: bool = typer.Option(False, "--exclude-same-caption", help="also exclude memory items with the pair's exact caption"),
    heads: int = typer.Option(0, "--heads", help="attention heads (0: width / 64)"),
    mlp_ratio: float = typer.Option(1.0, "--mlp-ratio", help="MLP width / embedding width (1: the paper's 3.16M parameters at d=512)"),
    restart: bool = typer.Option(False, "--restart", help="replace a checkpoint trained with other settings"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " (CUDA trains under bf16 autocast, fp16 with loss scaling where bf16 is missing)"),
    neighbours: str = typer.Option("auto", "--neighbours", help=NEIGHBOURS_HELP + "; recorded in neighbours.json and reco.json"),
    decontaminate_against: list[str] = typer.Option([], "--decontaminate-against", metavar="DATASET[=FOLDER]",
                                                    help="hide the near-duplicates of this dataset's test images (found as "
                                                         "`xm benchmark --decontaminate` finds them) from the neighbour tables "
                                                         "and the training pairs; repeatable; recorded in the checkpoint"),
    decontaminate_threshold: float = typer.Option(0.95, "--decontaminate-threshold", help="coarse-encoder cosine at or above which a memory image is a near-duplicate (as xm benchmark's)"),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="where the near-duplicates found are cached (default: xm benchmark's)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Train RECO's two fusion transformers (CLIP frozen; only precomputed embeddings are read).

    Re-running the same command resumes after the last finished epoch; neighbour tables
    are computed once into the checkpoint folder and resumed where they stopped.
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from xm.training.neighbours_option import Neighbours
    from xm.training.reco import TrainConfig, train_reco

    search = Neighbours.parse(neighbours)  # parsed once, before any work
    where = parse_device(device, "train reco")
    hidden = None
    if decontaminate_against:
        from xm.encoders.precision import Precision
        from xm.evaluation.decontaminate import Decontamination, hidden_for_training, splits_named
        from xm.evaluation.runner import default_cache_dir
        from xm.memories import open_index

        settings = Decontamination(enabled=True, threshold=decontaminate_threshold)
        tests = splits_named(decontaminate_against)
        memory = open_index(index)
        hidden = hidden_for_training(memory, open_index(pairs) if pairs else None, tests, settings, Precision.parse("fp32"),
                                     cache_dir or default_cache_dir())
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(index=index, encoder=encoder, k=k, epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, pairs=pairs, out=out, seed=seed, dup_threshold=dup_threshold,
                      exclude_same_caption=exclude_same_caption, heads=heads, mlp_ratio=mlp_ratio, restart=restart,
                      device=where, neighbours=search, hidden=hidden)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("[cyan]{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err_console, transient=False) as prog:
        tasks: dict[str, TaskID] = {}

        def make(label: str, total: int | None) -> Callable[[int], None]:
            tasks[label] = prog.add_task(label, total=total, note="")
            return lambda n: prog.advance(tasks[label], n)

        def on_step(s: dict) -> None:
            label = next((t for t in tasks if t.startswith("train")), None)
            if label is not None:
                rate = f"{s['pairs_per_s']:,.0f} pairs/s" if s["pairs_per_s"] else ""
                prog.update(tasks[label], note=f"epoch {s['epoch'] + 1} loss {s['loss']:.4f} {rate}")

        summary = train_reco(cfg, progress=make, on_step=on_step)
    if as_json:
        print_json(summary.__dict__)
        return
    rows = [("checkpoint", summary.checkpoint), ("encoder", summary.encoder), ("training pairs", summary.pairs),
            ("memory items", summary.memory), ("parameters", f"{summary.parameters:,}"),
            ("epochs done", summary.epochs_done), ("steps", summary.steps),
            ("batch size", f"{summary.batch_size}" + (" (derived from the pairs; --batch-size to set)" if summary.batch_derived else ""))]
    if summary.already_done:
        rows.append(("note", "already trained with these settings; nothing to do (--restart to retrain)"))
    elif summary.resumed_from_epoch:
        rows.append(("resumed after epoch", summary.resumed_from_epoch))
    rows += [(f"loss, epoch {i + 1}", f"{loss:.4f}") for i, loss in enumerate(summary.losses)]
    if summary.pairs_per_s:
        rows.append(("training speed", f"{summary.pairs_per_s:,.0f} pairs/s"))
    rows.append(("device", summary.device))
    rows.append(("neighbour tables", "exact kNN on the device" if summary.neighbours == "exact" else "the memory's kNN index"))
    if hidden is not None:
        against = ", ".join(sorted({str(d["dataset"]) for d in hidden.datasets}))
        rows.append(("decontaminated against", f"{against}: {summary.memory_hidden} memory item(s) out of the tables, "
                                               f"{summary.pairs_hidden} training pair(s) left out"))
    rows += [(f"neighbour table {m}", f"{s:.1f} s") for m, s in summary.table_seconds.items()]
    rows += [(f"pairs short of k ({m})", n) for m, n in summary.short_rows.items() if n]
    rows.append(("peak RSS", f"{summary.peak_rss_mb:,.0f} MB"))
    console.print(table(f"xm train reco -> {summary.out}", ["", ""], rows))
