"""`xm benchmark`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from xm.cli.app import app
from xm.cli.output import console, err_console, print_json, progress_bars, table


def _ints(text: str) -> list[int]:
    from xm.errors import XMError

    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise XMError(f"--seeds {text!r}: expected integers like 1,2,3") from exc


@app.command("benchmark")
def benchmark_cmd(
    dataset: str = typer.Option(..., "--dataset", help="eurosat, caltech101, cifar10, oxford_pets, ... or imagefolder"),
    data_dir: Path = typer.Option(..., "--data-dir", help="the dataset in its native layout"),
    index: Path = typer.Option(..., "--index", help="an index built by xm build-index"),
    model: str = typer.Option("RN50:openai", "--model", help="inference encoder ARCH:PRETRAINED"),
    methods: str = typer.Option("clip,captions,xmore,xmore-l1,xmore-equal,xmore-raw,xmore-indirect", help="comma-separated"),
    seeds: str = typer.Option("1,2,3", help="stream orders, comma-separated"),
    split: str = typer.Option("test", help="split to evaluate"),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="CoOp split_zhou_<Dataset>.json"),
    classnames: Optional[Path] = typer.Option(None, "--classnames", help="file of class names overriding the dataset's"),
    templates: str = typer.Option("paper", help="paper | coop | clip_benchmark | a file of templates"),
    limit: Optional[int] = typer.Option(None, help="evaluate a seeded random subset of this many images"),
    k_coarse: int = typer.Option(128, "--k-coarse"),
    k_fine: int = typer.Option(16, "--k-fine"),
    batch_size: int = typer.Option(32, "--batch-size"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="retrieval cache (default ~/.cache/xm/benchmark)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for JSON per method, merged CSV and PNG chart"),
    as_json: bool = typer.Option(False, "--json", help="print the whole result as JSON"),
) -> None:
    """Zero-shot evaluation of every method side by side on the same images and retrieved captions."""
    from xm.evaluation.datasets import load_dataset
    from xm.evaluation.runner import BenchmarkConfig, run_benchmark, write_outputs
    from xm.indexes import open_index

    cfg = BenchmarkConfig(dataset=dataset, data_dir=data_dir, index=index, model=model,
                          methods=[m.strip() for m in methods.split(",") if m.strip()], seeds=_ints(seeds), split=split,
                          split_file=split_file, classnames_file=classnames, templates=templates, limit=limit,
                          k_coarse=k_coarse, k_fine=k_fine, batch_size=batch_size)
    if cache_dir is not None:
        cfg.cache_dir = cache_dir
    ds = load_dataset(dataset, data_dir, split, split_file, classnames)
    memory = open_index(index)
    with progress_bars() as make:
        result = run_benchmark(cfg, ds, memory, progress=make)
    if out is not None:
        result["outputs"] = {k: str(v) for k, v in write_outputs(result, out).items()}
    if as_json:
        print_json(result)
        return
    def cell(r: dict, k: str) -> str:
        return f"{100 * r['metrics'][k]:.2f} ± {100 * r['std'][k]:.2f}" if k in r["metrics"] else "-"

    rows = [(name, cell(r, "acc1"), cell(r, "acc5"), cell(r, "mean_per_class_recall"), r["description"])
            for name, r in result["methods"].items()]
    t = result["timing"]
    console.print(table(
        f"{result['dataset']} · {result['split']} ({result['split_source']}) · {result['images_evaluated']} images · "
        f"seeds {result['seeds']} · {result['model']} · index {result['index_manifest_id']}",
        ["method", "top-1 %", "top-5 %", "mean per-class recall %", ""], rows))
    ent = result["diagnostics"]["mean_entropy"]
    console.print(table("mean entropy (Table 6)", ["image", "text"], [(ent["image"], ent["text"])]))
    console.print(table("X-MoRe adjusted weights by correctness (Table 8)", ["case", "n", "w_img", "w_txt", "w_img / w_txt"], [
        (case, v["n"], v.get("w_img"), v.get("w_txt"), v.get("ratio_img_over_txt"))
        for case, v in result["diagnostics"]["xmore_weights_by_case"].items()]))
    console.print(f"evidence: {t['evidence_seconds']:.1f} s"
                  + (f" ({t['images_per_second']:.1f} images/s)" if not t["cache_hit"] else " (from cache)")
                  + f"; cache {t['cache']}")
    if result["images_failed"]:
        err_console.print(f"{result['images_failed']} image(s) could not be read, e.g. {', '.join(result['failed_keys'][:3])}")
    if out is not None:
        console.print(f"wrote {', '.join(result['outputs'].values())}")
