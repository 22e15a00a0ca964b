"""Opening a built index: the memory the methods retrieve from."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from xm.errors import XMError
from xm.indexes.embeddings import EmbeddingMatrix
from xm.indexes.layout import Layout
from xm.indexes.manifest import read_manifest, verify_files
from xm.indexes.shards import ShardedIndex
from xm.indexes.store import CaptionStore

# Checksumming every file at load is cheap for small indexes but a full read of a large
# one on every `xm classify`; above this size only sizes are checked (`xm info --verify`).
CHECKSUM_AT_LOAD_BYTES = 256 << 20


class MemoryIndex:
    """A built xm index: kNN over the coarse encoder, captions, and caption embeddings."""

    def __init__(self, root: str | Path, verify: bool | None = None) -> None:
        self.layout = Layout(root)
        self.root = self.layout.root
        self.manifest: dict[str, Any] = read_manifest(root)
        total = sum(e["bytes"] for e in self.manifest["files"].values())
        verify_files(root, self.manifest, checksums=(total <= CHECKSUM_AT_LOAD_BYTES) if verify is None else verify)
        self.count: int = int(self.manifest["count"])
        self.parts: list[str] = [p["name"] for p in self.manifest["parts"]]
        self._matrices: dict[tuple[str, str], EmbeddingMatrix] = {}
        self._indexes: dict[str, ShardedIndex] = {}

    def __repr__(self) -> str:
        return f"MemoryIndex({self.root}, {self.count} items, id {self.id})"

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def roles(self) -> dict[str, Any]:
        return self.manifest["roles"]

    def encoder_entry(self, spec: str) -> dict[str, Any] | None:
        return self.manifest["encoders"].get(str(spec))

    def has_embeddings(self, spec: str, modality: str) -> bool:
        entry = self.encoder_entry(spec)
        return bool(entry and modality in entry["modalities"])

    def embeddings(self, spec: str, modality: str) -> EmbeddingMatrix:
        key = (str(spec), modality)
        if key not in self._matrices:
            entry = self.encoder_entry(spec)
            if entry is None or modality not in entry["modalities"]:
                raise XMError(f"{self.root}: no {modality} embeddings for encoder {spec} in this index")
            files = [self.layout.emb_file(entry["slug"], modality, p) for p in self.parts]
            matrix = EmbeddingMatrix(files)
            if len(matrix) != self.count:
                raise XMError(f"{self.layout.emb_dir(entry['slug'], modality)}: {len(matrix)} rows, manifest says {self.count}")
            self._matrices[key] = matrix
        return self._matrices[key]

    def index(self, modality: str) -> ShardedIndex:
        if modality not in self._indexes:
            entry = self.manifest["indexes"].get(modality)
            if entry is None:
                raise XMError(f"{self.root}: this index has no {modality} kNN index")
            files = [self.layout.index_dir(modality) / s["file"] for s in entry["shards"]]
            idx = ShardedIndex(files, [s["id_offset"] for s in entry["shards"]], entry.get("params", ""))
            if idx.ntotal != self.count:
                raise XMError(f"{self.layout.index_dir(modality)}: shards hold {idx.ntotal} vectors, manifest says {self.count}")
            self._indexes[modality] = idx
        return self._indexes[modality]

    def search(self, modality: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """kNN (inner product) of coarse-encoder query embeddings against memory items."""
        return self.index(modality).search(queries, k)

    @cached_property
    def store(self) -> CaptionStore:
        rows = [p["rows"] for p in self.manifest["parts"]]
        return CaptionStore([self.layout.store_part(p) for p in self.parts], rows, self.layout.caption_hash)

    @property
    def caption_hashes(self) -> np.ndarray:
        return self.store.hashes  # type: ignore[return-value]

    def check_encoder(self, encoder: Any, role: str) -> None:
        """Refuse an encoder whose name or weights differ from the one that built this index."""
        expected = self.roles[role] if role != "inference" else None
        if expected is not None and str(encoder.spec) != expected:
            raise XMError(f"{self.layout.manifest}: built with {role} encoder {expected}, not {encoder.spec}")
        entry = self.encoder_entry(str(encoder.spec))
        if entry is not None and not encoder.fingerprint_matches(entry["probe"]):
            raise XMError(
                f"{self.layout.manifest}: encoder {encoder.spec} has other weights than the ones that built this index"
            )


def open_index(root: str | Path, verify: bool | None = None) -> MemoryIndex:
    """Open a built index, refusing one whose manifest and files disagree."""
    return MemoryIndex(root, verify=verify)
