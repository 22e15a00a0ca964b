"""A build whose `--out` or inputs are on object storage (`s3://`, `gs://`, `hdfs://`; `file://`
is a plain path), mirrored through a local staging folder (`xm.indexes.object_store`).

* inputs (`--source`, `--metadata-root`, `--embeddings-root`) are copied into the cache once
  and the build reads the copies;
* `--out URL` is built in a staging folder pulled from the URL first (a rerun, or a rerun on
  another machine after a lost driver, resumes from what the URL holds) and pushed to it after
  every stage, the manifest last.

The staging folder is `--stage-dir` (default `$XM_HOME/cache`). With Spark (`--distributor
pyspark`) and a source whose tasks say what they read (`Source.task_inputs`), the tasks do not
use it: each works in a folder of its own and writes its part to the URL itself
(`pipeline/task_mirror.py`), and the driver's staging folder holds only the build's state
(markers, pins, the kNN shards, the caption hashes), never a part file (`cfg.bucket` is set).
Otherwise (the local runner; a source that does not say; an input the tasks would read copied
from object storage to the driver's disk) the staging folder is where the tasks work, and on a
multi-node cluster it must be one every executor sees. A downloaded source (a URL table,
`laion400m`) takes the bucket path whatever its inputs: img2dataset writes its shards there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from xm.indexes import home, object_store
from xm.indexes.layout import Layout
from xm.pipeline.config import BuildConfig
from xm.pipeline.sources import registry as sources
from xm.pipeline.sources.base import Source
from xm.pipeline.task_mirror import PART_FILES


def base(cfg: BuildConfig | None) -> Path:
    """Where object storage is mirrored: --stage-dir, else $XM_HOME/cache."""
    return Path(cfg.stage_dir).expanduser() if cfg is not None and cfg.stage_dir else home.home() / "cache"


def stage(cfg: BuildConfig) -> tuple[str | None, Callable[[], int]]:
    """Make `cfg` local: inputs fetched, `--out` staged. Returns (the URL --out names, or None;
    a function that pushes the staging folder to it, a no-op for a local --out)."""
    base_dir = base(cfg)
    # judged before the inputs are fetched to this machine
    on_driver_only = any(object_store.is_remote(object_store.unmangled(v)) for v in (cfg.source, cfg.metadata_root, cfg.embeddings_root) if v)
    source = object_store.unmangled(cfg.source)
    if object_store.is_remote(source):
        cfg.source_given = source
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
    if not (on_driver_only and not _read_on_driver(cfg)) and tasks_write_parts(cfg):
        cfg.bucket = out
        object_store.pull(out, folder, "--out", skip=PART_FILES)
    else:
        object_store.pull(out, folder, "--out")
    cfg.out = folder
    return out, lambda: object_store.push(folder, out, "--out")


def _read_on_driver(cfg: BuildConfig) -> bool:
    """Whether the source's inputs are read by the driver alone: a downloaded source's (a URL
    table, LAION's metadata) by the select stage, its tasks reading only img2dataset's shards."""
    source = sources.find(str(cfg.source))
    return source is not None and source.needs_download


def tasks_write_parts(cfg: BuildConfig) -> bool:
    """Whether the build's tasks write their parts to --out's URL themselves: tasks on other
    machines (Spark), a source whose tasks say what they read under --out, no compressed
    embeddings (the codec is trained on the driver, from the float16 parts). The caller adds:
    no input copied from object storage (that copy is on the driver's disk only)."""
    source = sources.find(str(cfg.source))
    says = source is not None and type(source).task_inputs is not Source.task_inputs
    return not cfg.runner_kind.in_process and says and not (cfg.text_codecs or cfg.image_codecs)


class StoredFiles:
    """Where the build's files are to be found, for the stages on the driver that check or list
    them (the store's, the manifest's): the driver's folder, or, when the tasks write their parts
    to the bucket themselves (`bucket`), the bucket's listing, read once (`refresh` after a push)."""

    def __init__(self, layout: Layout, bucket: str | None) -> None:
        self.layout, self.bucket = layout, bucket
        self._listing: dict[str, tuple[int, int]] | None = None

    def refresh(self) -> None:
        self._listing = None

    def _remote(self) -> dict[str, tuple[int, int]]:
        if self._listing is None:
            assert self.bucket is not None
            self._listing = object_store.stats(self.bucket, "--out")
        return self._listing

    def exists(self, path: Path) -> bool:
        return path.is_file() if self.bucket is None else self.layout.rel(path) in self._remote()

    def readable(self, path: Path) -> str:
        """Where the driver reads a file of the build: here, or its URL in the bucket."""
        return str(path) if self.bucket is None else f"{self.bucket}/{self.layout.rel(path)}"

    def stat(self, path: Path) -> tuple[int, int]:
        if self.bucket is None:
            st = path.stat()
            return st.st_size, st.st_mtime_ns
        try:
            return self._remote()[self.layout.rel(path)]
        except KeyError:
            raise FileNotFoundError(f"{self.bucket}/{self.layout.rel(path)}") from None
