"""The download stage: img2dataset over the selected URL list, resumable by shard."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq

from xm.errors import XMError
from xm.indexes.layout import Layout
from xm.pipeline.config import BuildConfig
from xm.pipeline.part_size import DOWNLOAD_SHARD_ROWS
from xm.pipeline.quiet import stdout_to_stderr
from xm.pipeline.sources.downloaded import download_folder

# Columns img2dataset reads itself, or that the store derives; the rest travel along.
_OWN = {"url", "caption"}


def download(cfg: BuildConfig, layout: Layout) -> None:
    from img2dataset import download as img2dataset_download  # heavy, and only a downloading build needs it

    files = layout.selection_files()
    if not files:
        raise XMError(f"{layout.selection}: no selection to download; run the select stage (see --stages)")
    columns = pq.read_schema(files[0]).names
    if cfg.bucket is None:  # else img2dataset's executors write the shards to the bucket themselves
        layout.download.mkdir(parents=True, exist_ok=True)
    logging.getLogger("img2dataset").setLevel(logging.WARNING)
    # img2dataset installs a SIGINT handler that cleans its temporary folder and exits 0:
    # Ctrl-C must stay an interrupt (exit 130), during the download and after it
    previous = signal.getsignal(signal.SIGINT)
    try:
        with stdout_to_stderr():  # its progress must not mix with `--json` on stdout
            _run(img2dataset_download, cfg, layout, columns)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
        raise KeyboardInterrupt from exc
    finally:
        signal.signal(signal.SIGINT, previous)


def _run(img2dataset_download: Callable[..., Any], cfg: BuildConfig, layout: Layout, columns: list[str]) -> None:
    img2dataset_download(
        url_list=str(layout.selection),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=[c for c in columns if c not in _OWN] or None,
        output_folder=download_folder(cfg, layout),  # the bucket's, where the tasks write there themselves
        output_format="webdataset",
        image_size=cfg.image_size,
        resize_mode="keep_ratio",
        resize_only_if_bigger=True,
        processes_count=cfg.processes,
        thread_count=cfg.threads,
        number_sample_per_shard=cfg.shard_size or DOWNLOAD_SHARD_ROWS,  # parts group shards (pipeline/part_size.py)
        timeout=cfg.timeout,
        retries=0,
        distributor=cfg.runner_kind.img2dataset_distributor,  # on Spark: the build's session, already started
        incremental_mode="incremental",
        enable_wandb=False,
        compute_hash=None,
    )
