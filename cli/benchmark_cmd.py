"""`xm benchmark`."""

from __future__ import annotations

from pathlib import Path

import typer

from xm.cli.app import app
from xm.cli.device_option import DEVICE_HELP, parse_device
from xm.cli.method_options import method_options
from xm.cli.output import console, err_console, print_json, progress_bars, safe_text, table


def _ints(flag: str, text: str) -> list[int]:
    from xm.errors import XMError

    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise XMError(f"{flag} {text!r}: expected integers like 1,2,3") from exc
    if not values:
        raise XMError(f"{flag} {text!r}: expected integers like 1,2,3")
    return values


@app.command("benchmark")
def benchmark_cmd(
    dataset: str | None = typer.Option(None, "--dataset", help="eurosat, caltech101, cifar10, oxford_pets, ... or imagefolder"),
    suite: str | None = typer.Option(None, "--suite", help="a published table instead of one dataset: xmore-table1 | xmore-table2 | "
                                     "reco-table5 | coder-zeroshot (datasets from $XM_DATA; see docs/benchmark-suites.md)"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="the dataset in its native layout (default: $XM_DATA/<dataset>, then $XM_HOME/data/<dataset>)"),
    index: Path | None = typer.Option(None, "--index", help="an index built by xm build-index"),
    model: str | None = typer.Option(None, "--model", help="inference encoder ARCH:PRETRAINED (default: the index's first inference encoder)"),
    methods: str = typer.Option("clip,captions,xmore,xmore-minmax,xmore-equal,xmore-raw,xmore-indirect", help="comma-separated (see `xm methods`)"),
    protocol: str = typer.Option("authors", "--protocol", help="authors (reproduces the X-MoRe tables) | xm; sets retrieval switches, templates, class names, seeds"),
    seeds: str | None = typer.Option(None, help="stream orders (and support-set draws), comma-separated; default: the protocol's"),
    shots: str = typer.Option("16", "--shots", help="few-shot methods: support images per class, comma-separated"),
    split: str = typer.Option("test", help="split to evaluate"),
    split_file: Path | None = typer.Option(None, "--split-file", help="CoOp split_zhou_<Dataset>.json"),
    classnames: Path | None = typer.Option(None, "--classnames", help="file of class names overriding the dataset's"),
    templates: str | None = typer.Option(None, help="paper | coop | clip_benchmark | a file of templates (default: the protocol's)"),
    limit: int | None = typer.Option(None, min=1, help="evaluate a seeded random subset of this many images"),
    k_coarse: int | None = typer.Option(None, "--k-coarse", help="X-MoRe: K (128)"),
    k_fine: int | None = typer.Option(None, "--k-fine", help="X-MoRe: k (16)"),
    descriptions: Path | None = typer.Option(None, "--descriptions", help="CODER: class descriptions (DCLIP JSON)"),
    texts_file: Path | None = typer.Option(None, "--texts-file", help="CODER: text sets written by `xm texts`"),
    reco_checkpoint: Path | None = typer.Option(None, "--reco-checkpoint", help="RECO: trained fusion checkpoint"),
    opt: list[str] = typer.Option([], "--opt", metavar="NAME=VALUE", help="any method option, NAME=VALUE, for every method that takes it (repeatable)"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="images per evidence batch (every method shares one pass)"),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="evidence cache (default ~/.cache/xm/benchmark)"),
    out: Path | None = typer.Option(None, "--out", help="folder for JSON per method, merged CSV and PNG chart"),
    as_json: bool = typer.Option(False, "--json", help="print the whole result as JSON"),
    precision: str = typer.Option("fp32", "--precision", help="encoder inference precision: fp32 | bf16 | fp16 | int8 (see bench/bench_precision.py)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    decontaminate: bool | None = typer.Option(None, "--decontaminate/--no-decontaminate", help="hide the memory's near-duplicates of the test images from every method for the run (default: on when the memory holds more items than the test set)"),
    decontaminate_threshold: float = typer.Option(0.95, "--decontaminate-threshold", help="coarse-encoder cosine at or above which a memory image is a near-duplicate (plus exact pHash where the memory's images are local)"),
) -> None:
    """Evaluate methods side by side on the same images, through the one method interface."""
    from xm.encoders.precision import Precision
    from xm.evaluation.datasets import load_dataset
    from xm.evaluation.decontaminate import Decontamination
    from xm.evaluation.results import write_outputs
    from xm.evaluation.runner import BenchmarkConfig, run_benchmark
    from xm.indexes import home
    from xm.memories import open_index
    from xm.methods.protocols import protocol as get_protocol
    from xm.methods.registry import get

    inference_precision = Precision.parse(precision)  # parsed once, before any work
    decontamination = Decontamination(enabled=decontaminate, threshold=decontaminate_threshold)
    published = None
    if suite is not None:
        from xm.evaluation.suites import load_suite

        published = load_suite(suite)  # an unknown name is one line before anything is said or loaded
    where = parse_device(device, "benchmark")
    if published is not None:
        from xm.cli.suite_cmd import run_suite_command

        run_suite_command(published, index, model, limit, _ints("--seeds", seeds) if seeds else None,
                          method_options(opt, k_coarse=k_coarse, k_fine=k_fine, descriptions=descriptions,
                                         texts_file=texts_file, checkpoint=reco_checkpoint),
                          batch_size, inference_precision, cache_dir, out, as_json, device=where,
                          decontaminate=decontamination)
        return
    if dataset is None:
        from xm.errors import XMError

        raise XMError("--dataset: required (or --suite NAME for a published table's datasets)")
    proto = get_protocol(protocol)
    method_names = [m.strip() for m in methods.split(",") if m.strip()]
    if index is None and any(get(m).method.needs_memory for m in method_names):
        index = home.require_index(None)
    data_dir = home.find_dataset(dataset, data_dir)
    options = method_options(opt, k_coarse=k_coarse, k_fine=k_fine, descriptions=descriptions, texts_file=texts_file,
                             checkpoint=reco_checkpoint)
    cfg = BenchmarkConfig(dataset=dataset, data_dir=data_dir, index=index, model=model, protocol=protocol,
                          methods=method_names,
                          seeds=_ints("--seeds", seeds) if seeds else None, shots=_ints("--shots", shots), split=split,
                          split_file=split_file, classnames_file=classnames, templates=templates, limit=limit,
                          options=options, batch_size=batch_size, precision=inference_precision, device=where,
                          decontaminate=decontamination)
    if cache_dir is not None:
        cfg.cache_dir = cache_dir
    ds = load_dataset(dataset, data_dir, split, split_file, classnames, names=proto["classnames"])
    memory = open_index(index) if index is not None else None
    with progress_bars() as make:
        result = run_benchmark(cfg, ds, memory, progress=make)
    if out is not None:
        result["outputs"] = {k: str(v) for k, v in write_outputs(result, out).items()}
    if as_json:
        print_json(result)
        return
    show_benchmark(result)


def show_benchmark(result: dict) -> None:
    def cell(r: dict, k: str) -> str:
        return f"{100 * r['metrics'][k]:.2f} ± {100 * r['std'][k]:.2f}" if k in r["metrics"] else "-"

    rows = [(name, cell(r, "acc1"), cell(r, "acc5"), cell(r, "mean_per_class_recall"),
             r["images_scored"], f"{r['evidence_seconds']:.1f}" + (" (cached)" if r["evidence_cached"] else ""))
            for name, r in result["methods"].items()]
    console.print(table(
        f"{result['dataset']} · {result['split']} ({result['split_source']}) · {result['images_evaluated']} images · "
        f"protocol {result['protocol']} · seeds {result['seeds']} · {result['model']} · index {result['index_manifest_id']}",
        ["method", "top-1 %", "top-5 %", "mean per-class recall %", "scored", "evidence s*"], rows))
    console.print("* an encoder's forward passes count for the first method that asks for its features; "
                  "the others reuse them", markup=False)
    console.print(table("methods", ["method", "what it is"],
                        [(name, r["description"]) for name, r in result["methods"].items()]))
    diag = result["diagnostics"]
    if diag:
        ent = diag["mean_entropy"]
        console.print(table("xmore: mean entropy (Table 6)", ["image", "text"], [(ent["image"], ent["text"])]))
        console.print(table("xmore: images the ensemble got right, mean per-image L1 weight ratio (Table 8)",
                            ["case", "n", "w_img / w_txt", "w_img", "w_txt"],
                            [(case, v["n"], v["mean_ratio_img_over_txt"], v["w_img"], v["w_txt"])
                             for case, v in diag["l1_weight_ratio_by_case"].items()]))
    fits = [(name, f["seed"], ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in f.items() if k != "seed"))
            for name, r in result["methods"].items() for f in r.get("fit", [])]
    if fits:
        console.print(table("few-shot fits (chosen on the validation split)", ["method", "seed", "chosen"], fits))
    d = result.get("decontamination") or {}
    if d.get("enabled"):
        cosine = (f"{d['by_cosine']} by {d['encoder']} cosine >= {d['threshold']}" if d["threshold"] is not None
                  else f"cosine {d['cosine']}")
        console.print(f"decontaminated ({d['why']}): {d['hidden']} memory item(s) hidden as near-duplicates of the test images "
                      f"({cosine}; {d['by_phash_only']} by pHash of {d['phash_checked']} local memory images)", markup=False)
    elif d:
        console.print(f"not decontaminated ({d['why']})", markup=False)
    for name, r in result["methods"].items():  # state built before the run (RECO's checkpoint, CODER's text set)
        said = r.get("decontamination") or {}
        if said.get("line"):
            console.print(f"{name}: {said['line']}", markup=False)
        if said.get("warning"):
            err_console.print(safe_text(f"warning: {name}: {said['warning']}"))
    t = result["timing"]
    console.print(f"{t['seconds']:.1f} s in all on {t.get('device', 'cpu')}; evidence cache {t['cache_dir']}", markup=False)
    if result["images_failed"]:
        err_console.print(safe_text(f"{result['images_failed']} image(s) could not be read, e.g. {', '.join(result['failed_keys'][:3])}"))
    if "outputs" in result:
        console.print(f"wrote {', '.join(result['outputs'].values())}", markup=False)
