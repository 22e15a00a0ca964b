"""`xm build-index`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from xm.cli.app import app
from xm.cli.device_option import BUILD_DEVICE_HELP, parse_device
from xm.cli.output import console, err_console, print_json, progress_bars, table


@app.command("build-index")
def build_index_cmd(
    source: str | None = typer.Option(None, "--source", help="laion400m | laion400m-embeddings | datacomp (with --metadata-root) | a table of URLs+captions | a folder of images with .txt captions | an img2dataset output folder"),
    out: Path | None = typer.Option(None, "--out", help="index folder to create or resume, or an fsspec URL (s3://BUCKET/FOLDER, gs://, hdfs://; built in --stage-dir and pushed after each stage) (default: $XM_HOME/indexes/<source name>, which then becomes the default index)"),
    coarse: str = typer.Option("ViT-B-32:openai", help="encoder whose image embeddings are searched (ARCH:PRETRAINED)"),
    fine: str = typer.Option("ViT-L-14:openai", help="encoder that re-ranks captions"),
    inference: list[str] = typer.Option(["RN50:openai"], metavar="ARCH:PRETRAINED", help="encoder(s) that classify; repeat for several"),
    encoder: list[str] = typer.Option([], "--encoder", metavar="ARCH:PRETRAINED=PARTS", help="general form, repeatable: ARCH:PRETRAINED=image,text,index-image,index-text (added to the roles' encoders)"),
    add_encoder: str | None = typer.Option(None, "--add-encoder", help="extend the built index at --out with ARCH:PRETRAINED=parts; nothing else is rebuilt"),
    limit: int | None = typer.Option(None, help="at most this many pairs from the source"),
    parts: str | None = typer.Option(None, help="LAION part numbers, or DataComp metadata pairs by position in file-name order, e.g. 0-3,7"),
    url_col: str = typer.Option("url", help="URL column of a table source"),
    caption_col: str = typer.Option("caption", help="caption column of a table source"),
    metadata_root: str | None = typer.Option(None, help="folder or URL (http(s)://, s3://, gs://, hdfs://) holding LAION-400M metadata parquet parts; for datacomp, the folder of DataComp .parquet + .npz pairs"),
    embeddings_root: str | None = typer.Option(None, help="folder or URL (http(s)://, s3://, gs://, hdfs://) holding LAION-400M images/ texts/ metadata/ embedding parts"),
    shards: int = typer.Option(1, help="number of index shards"),
    k: int = typer.Option(128, help="neighbours a query must be able to return (autofaiss coverage target)"),
    max_index_memory: str = typer.Option("4G", help="autofaiss memory budget for one index"),
    current_memory: str = typer.Option("16G", help="memory autofaiss may use while building"),
    image_size: int = typer.Option(256, help="img2dataset resize (shortest side, only if bigger)"),
    processes: int = typer.Option(2, help="img2dataset processes"),
    threads: int = typer.Option(16, help="img2dataset threads per process"),
    shard_size: int | None = typer.Option(None, help="samples per download shard or folder part (= per embedding part); "
                                          "default: parts sized for the memory, hundreds at 400M (docs/scale.md)"),
    timeout: int = typer.Option(10, help="download timeout per image, seconds"),
    distributor: str = typer.Option("multiprocessing", help="multiprocessing (this machine) | pyspark (download, embed, index, store and hashing as Spark tasks)"),
    spark_master: str | None = typer.Option(None, "--spark-master", help="with --distributor pyspark: local[N], local[N,F], spark://HOST:PORT, yarn, k8s://... (default: the spark-submit session, else local[*])"),
    spark_conf: list[str] = typer.Option([], "--spark-conf", metavar="KEY=VALUE", help="a Spark setting, repeatable (e.g. spark.executor.memory=8g)"),
    spark_ui: bool = typer.Option(False, "--spark-ui", help="with --distributor pyspark: open Spark's web UI (on a cluster master it is off otherwise; a local master's UI listens on loopback only)"),
    stage_dir: str | None = typer.Option(None, "--stage-dir", help="local folder mirroring an --out or inputs on object storage (s3://, gs://, hdfs://); default $XM_HOME/cache; on a cluster, a folder every executor sees"),
    batch_size: int = typer.Option(64, help="images per encoder batch"),
    no_text_index: bool = typer.Option(False, "--no-text-index", help="skip the caption kNN index"),
    allow_file_urls: bool = typer.Option(False, "--allow-file-urls", help="let a table's file:// URLs read local files (off: an untrusted table must not read your disk)"),
    stages: str | None = typer.Option(None, help="comma-separated stages to run (select,download,embed,index,compress,store,manifest)"),
    refine_k_factor: int = typer.Option(4, "--refine-k-factor", help="a kNN query of k re-scores the top k*F candidates of a compressed index exactly with the stored float16 embeddings (0: off)"),
    precision: str = typer.Option("fp32", "--precision", help="encoder inference precision while embedding: fp32 | bf16 | fp16 | int8 (recorded in the manifest)"),
    text_codec: list[str] = typer.Option([], "--text-codec", metavar="ARCH:PRETRAINED=CODEC", help="store that encoder's caption embeddings as codes of a FAISS codec (SQ8, SQ4, PQ64, OPQ32,PQ32, ...) instead of float16; repeatable"),
    image_codec: list[str] = typer.Option([], "--image-codec", metavar="ARCH:PRETRAINED=CODEC", help="the same for that encoder's image embeddings (read by the kNN refine step); repeatable"),
    device: str = typer.Option("auto", "--device", help=BUILD_DEVICE_HELP),
    num_workers: int | None = typer.Option(None, "--num-workers", help="processes decoding and preprocessing images while embedding (default on a GPU: the cores but one, at most 8; on the CPU 0, a thread of this process, since the model uses every core); the artefacts are the same for any number"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Download, embed and index image-text pairs into a resumable, sharded xm index."""
    from xm.encoders.precision import Precision
    from xm.errors import XMError
    from xm.indexes import home
    from xm.pipeline import STAGES, BuildConfig, build_index
    from xm.pipeline.laion import parse_parts

    embed_precision = Precision.parse(precision)  # parsed once, before any work
    # a Spark driver need not have the GPUs its executors have: BuildConfig.validate checks the device then
    where = parse_device(device, "build-index", several=True) if distributor != "pyspark" else device
    if add_encoder is not None:
        if out is None:
            raise XMError("--add-encoder: give --out, the built index to extend")
        if source is not None:
            raise XMError("--add-encoder extends the index at --out; give no --source")
        from xm.pipeline.extend import add_encoder as extend

        cfg = BuildConfig(source="", out=out, shards=shards, k=k, max_index_memory=max_index_memory,
                          current_memory=current_memory, batch_size=batch_size, precision=embed_precision,
                          refine_k_factor=refine_k_factor, device=where)
        with progress_bars() as make:
            added = extend(str(out), add_encoder, cfg, progress=make)
        if as_json:
            print_json(added.__dict__)
            return
        # (label, value): the add-encoder summary here, the build summary below; table() formats any value
        rows: list[tuple[str, Any]] = [("added", a) for a in added.added] + [("skipped", s) for s in added.skipped] + [("manifest id", added.manifest_id)]
        console.print(table(f"xm build-index --add-encoder {added.encoder} -> {added.out}", ["", ""], rows))
        return
    if source is None:
        raise XMError("--source: required (or --add-encoder to extend a built index)")
    in_home = out is None
    out = out or home.default_out(source)
    cfg = BuildConfig(
        source=source, out=out, encoders=list(encoder), coarse=coarse, fine=fine, inference=list(inference), limit=limit,
        parts=parse_parts(parts), url_col=url_col, caption_col=caption_col, metadata_root=metadata_root,
        embeddings_root=embeddings_root, shards=shards, k=k, max_index_memory=max_index_memory,
        current_memory=current_memory, image_size=image_size, processes=processes, threads=threads,
        shard_size=shard_size, timeout=timeout, distributor=distributor, spark_master=spark_master, spark_conf=list(spark_conf), batch_size=batch_size,
        spark_ui=spark_ui, stage_dir=stage_dir,
        index_text=not no_text_index, allow_file_urls=allow_file_urls, precision=embed_precision,
        device=where, num_workers=num_workers,
        refine_k_factor=refine_k_factor, text_codecs=list(text_codec), image_codecs=list(image_codec),
        stages=tuple(s.strip() for s in stages.split(",")) if stages else STAGES,
    )
    with progress_bars() as make:
        summary = build_index(cfg, progress=make)
    for w in summary.warnings:
        err_console.print(f"xm: warning: {w}", markup=False)
    if in_home and summary.manifest_id:
        home.set_default(out.name)  # the latest complete build without --out is the default index
    if as_json:
        print_json(summary.__dict__)
        return
    rows = [("items indexed", summary.count), ("source kind", summary.source_kind), ("ran on", summary.ran_on),
            ("device", summary.device)]
    rows += [(f"parts on {d}", n) for d, n in summary.parts_per_device.items()]
    if summary.selected is not None:
        rows.append(("urls selected", summary.selected))
    rows += [(f"failed: {reason}", n) for reason, n in sorted(summary.failures.items(), key=lambda kv: -kv[1])]
    rows += [(f"time: {stage}", f"{secs:.1f} s") for stage, secs in summary.stage_seconds.items()]
    rows += [("skipped", s) for s in summary.skipped]
    rows += [("warning", w) for w in summary.warnings]
    rows.append(("manifest id", summary.manifest_id))
    console.print(table(f"xm build-index -> {summary.out}", ["", ""], rows))
