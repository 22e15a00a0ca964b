"""A build whose `--out` or inputs are on object storage (`s3://`, `gs://`, `hdfs://`; `file://`
is a plain path), mirrored through a local staging folder (`xm.indexes.object_store`).

* inputs (`--source`, `--metadata-root`, `--embeddings-root`) are copied into the cache once
  and the build reads the copies;
* `--out URL` is built in a staging folder pulled from the URL first (a rerun, or a rerun on
  another machine after a lost driver, resumes from what the URL holds) and pushed to it after
  every stage, the manifest last.

The staging folder is `--stage-dir` (default `$XM_HOME/cache`); on a cluster it must be a
folder every executor sees, as `--out` itself must be today.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from xm.indexes import home, object_store
from xm.pipeline.config import BuildConfig


def base(cfg: BuildConfig | None) -> Path:
    """Where object storage is mirrored: --stage-dir, else $XM_HOME/cache."""
    return Path(cfg.stage_dir).expanduser() if cfg is not None and cfg.stage_dir else home.home() / "cache"


def stage(cfg: BuildConfig) -> tuple[str | None, Callable[[], int]]:
    """Make `cfg` local: inputs fetched, `--out` staged. Returns (the URL --out names, or None;
    a function that pushes the staging folder to it, a no-op for a local --out)."""
    base_dir = base(cfg)
    source = object_store.unmangled(cfg.source)
    if object_store.is_remote(source):
        cfg.source = object_store.fetch_input(source, base_dir, "--source")
    elif object_store.protocol_of(source) == "file":
        cfg.source = object_store.local_path(source)
    for name in ("metadata_root", "embeddings_root"):
        value = getattr(cfg, name)
        flag = f"--{name.replace('_', '-')}"
        if value and object_store.is_remote(value):
            setattr(cfg, name, object_store.fetch_input(value, base_dir, flag))
        elif value and object_store.protocol_of(value) == "file":
            setattr(cfg, name, object_store.local_path(value))
    out = object_store.unmangled(cfg.out)
    if object_store.protocol_of(out) == "file":
        cfg.out = Path(object_store.local_path(out))
        return None, lambda: 0
    if not object_store.is_remote(out):
        return None, lambda: 0
    object_store.check_writable(out, "--out")  # a bad bucket or no credentials: one line, nothing made here
    folder = object_store.cache_folder(out, base_dir, "stage")
    object_store.pull(out, folder, "--out")
    cfg.out = folder
    return out, lambda: object_store.push(folder, out, "--out")
