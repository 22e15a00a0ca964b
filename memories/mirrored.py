"""A memory on object storage (`s3://BUCKET/FOLDER`, `gs://`, `hdfs://`): copied once to a local
cache (`$XM_HOME/cache/object-store/memory/`), then opened as the index folder it is, since the
kNN shards, embeddings and caption store are read through memory maps. A later open copies only
what changed there (size and ETag); the build's `_work/` state is never copied."""

from __future__ import annotations

from pathlib import Path

from xm.indexes import home, object_store
from xm.memories.local import LocalMemory


def is_mirrored(location: str | Path) -> bool:
    return object_store.is_remote(object_store.unmangled(location))


def open_mirrored(location: str | Path) -> LocalMemory:
    url = object_store.unmangled(location)
    folder = object_store.cache_folder(url, home.home() / "cache", "memory")
    object_store.pull(url, folder, "--index", must_exist=True, skip=("_work/",))
    return LocalMemory(folder)
