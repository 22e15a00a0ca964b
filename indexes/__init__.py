"""The artefact format of an xm index and its readers: shards, embeddings, caption store, manifest."""

from xm.indexes import home
from xm.indexes.embeddings import EmbeddingMatrix
from xm.indexes.layout import Layout
from xm.indexes.manifest import read_manifest
from xm.indexes.shards import ShardedIndex
from xm.indexes.store import CaptionStore

__all__ = ["home", "CaptionStore", "EmbeddingMatrix", "Layout", "ShardedIndex", "read_manifest"]
