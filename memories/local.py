"""A built index folder as a memory (`LocalMemory`): kNN shards, embeddings and the caption
store, read through the artefact readers of `xm.indexes`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from functools import cached_property, wraps
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from xm.errors import XMError
from xm.indexes.embeddings import ByIdParts, CodedEmbeddingMatrix, EmbeddingMatrix
from xm.indexes.layout import Layout
from xm.indexes.manifest import read_manifest, sample_files, verify_files
from xm.indexes.open_files import OpenFiles
from xm.indexes.records import EncoderEntry, IndexEntry, Manifest
from xm.indexes.shards import ShardedIndex, top_k
from xm.indexes.store import CaptionStore, open_store
from xm.memories.base import Memory

# Checksumming every file at load is cheap for small indexes but a full read of a large
# one on every `xm classify`; above this size only sizes are checked (`xm info --verify`).
CHECKSUM_AT_LOAD_BYTES = 256 << 20
# Checking the size of every file is a stat each: 200k of them for a 40k-part memory (seconds,
# minutes on a network disk). Past this many files, opening checks the sizes of this many,
# spread evenly over the list; each part is checked against its manifest rows when first read,
# and `xm info --verify` checks every file.
SIZES_AT_LOAD_FILES = 1_000

F = TypeVar("F", bound=Callable[..., Any])


def _locked(fn: F) -> F:
    """Run a method under its memory's lock: a lazily opened reader is opened once, whichever
    request threads ask first."""

    @wraps(fn)
    def run(self: LocalMemory, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return run  # type: ignore[return-value]


def rescore(queries: np.ndarray, ids: np.ndarray, matrix: EmbeddingMatrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The refine step: candidates of an approximate (IVF-PQ) search re-scored exactly against the
    embeddings on disk (memory-mapped float16), the best k kept per query, ties by id."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n, m = ids.shape
    valid = ids >= 0
    uniq, inverse = np.unique(ids[valid], return_inverse=True)
    vecs = matrix.gather(uniq)
    sims = np.full((n, m), -np.inf, np.float32)
    rows = np.nonzero(valid)[0]
    sims[valid] = np.einsum("ij,ij->i", vecs[inverse], q[rows])
    return top_k(sims, np.where(valid, ids, -1), k)


class LocalMemory(Memory):
    """A built xm index: kNN over the coarse encoder, captions, and caption embeddings.

    Safe for concurrent readers: kNN shards, embeddings and norms are read-only once opened
    (opening takes the lock); the caption store's row-group cache is used under the lock."""

    kind = "local"
    root: Path

    def __init__(self, root: str | Path, verify: bool | None = None) -> None:
        self.layout = Layout(root)
        self.root = self.layout.root
        self.manifest: Manifest = read_manifest(root)
        total = self.manifest.total_bytes
        checksums = (total <= CHECKSUM_AT_LOAD_BYTES) if verify is None else verify
        # opened without --verify: a summary past SIZES_AT_LOAD_FILES files, never their checksums
        many = verify is None and len(self.manifest.files) > SIZES_AT_LOAD_FILES
        verify_files(root, self.manifest, checksums=checksums and not many,
                     only=sample_files(self.manifest, SIZES_AT_LOAD_FILES) if many else None)
        self.count: int = int(self.manifest.count)
        self.parts: list[str] = [p.name for p in self.manifest.parts]
        self.part_rows: list[int] = [p.rows for p in self.manifest.parts]
        # every reader's memory maps and open part files, together, least recently used out first
        self.opened = OpenFiles()
        self._matrices: dict[tuple[str, str], EmbeddingMatrix] = {}
        self._indexes: dict[str, ShardedIndex] = {}
        self._norms: dict[tuple[str, str], ByIdParts] = {}
        self._lock = threading.RLock()
        if verify:
            self.check_counts()

    def check_counts(self) -> None:
        """The manifest's counts against the files themselves (`xm info --verify`): parts, every
        embedding part, every kNN index. A re-hashed manifest with an edited count fails here."""
        rows = sum(p.rows for p in self.manifest.parts)
        if rows != self.count:
            raise XMError(f"{self.layout.manifest}: parts hold {rows} rows, the manifest says count {self.count}")
        for entry in self.manifest.encoders.values():
            for modality in entry.embedded:
                for part in self.manifest.parts:
                    coded = modality in entry.codecs
                    f = (self.layout.code_file if coded else self.layout.emb_file)(entry.slug, modality, part.name)
                    n = np.load(f, mmap_mode="r").shape[0]
                    if n != part.rows:
                        raise XMError(f"{f}: {n} rows, the manifest says {part.rows}")
        for index in self.manifest.indexes:
            self.index(index.modality, index.encoder)  # refuses shards that disagree with the count

    def __repr__(self) -> str:
        return f"LocalMemory({self.root}, {self.count} items, id {self.id})"

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def roles(self) -> dict[str, Any]:
        return self.manifest.roles.to_json()

    @property
    def encoders(self) -> list[str]:
        return list(self.manifest.encoders)

    @property
    def format_read(self) -> str:
        """The format the manifest was written in (v1 manifests are read as v2)."""
        return self.manifest.format_read or self.manifest.format

    def default_model(self) -> str:
        """The encoder `--model` defaults to: the index's first inference encoder."""
        inference = self.roles.get("inference") or []
        if inference:
            return inference[0]
        texts = [s for s, e in self.manifest.encoders.items() if "text" in e.embedded]
        if not texts:
            raise XMError(f"{self.layout.manifest}: no encoder with caption embeddings; give --model")
        return texts[0]

    def encoder_entry(self, spec: str) -> EncoderEntry | None:
        return self.manifest.encoders.get(str(spec))

    def probe(self, spec: str) -> list[float] | None:
        entry = self.encoder_entry(spec)
        return entry.probe if entry is not None else None

    def has_embeddings(self, spec: str, modality: str) -> bool:
        entry = self.encoder_entry(spec)
        return bool(entry and modality in entry.embedded)

    def has_norms(self, spec: str, modality: str) -> bool:
        entry = self.encoder_entry(spec)
        return bool(entry and modality in entry.norms)

    def index_entry(self, spec: str, modality: str) -> IndexEntry | None:
        return self.manifest.index_entry(str(spec), modality)

    def has_index(self, spec: str, modality: str) -> bool:
        return self.index_entry(spec, modality) is not None

    @_locked
    def embeddings(self, spec: str, modality: str) -> EmbeddingMatrix:
        key = (str(spec), modality)
        if key not in self._matrices:
            entry = self.encoder_entry(spec)
            if entry is None or modality not in entry.embedded:
                raise XMError(f"{self.root}: no {modality} embeddings for encoder {spec} in this index; "
                              f"add them with `xm build-index --out {self.root} --add-encoder {spec}={modality}`")
            codec = entry.codecs.get(modality)
            if codec:  # compressed (`--text-codec`): the same gather, decoded rows
                files = self.layout.code_files(entry.slug, modality, self.parts)
                matrix: EmbeddingMatrix = CodedEmbeddingMatrix(files, self.layout.codec_file(entry.slug, modality),
                                                               self.part_rows, self.opened)
            else:
                files = self.layout.emb_files(entry.slug, modality, self.parts)
                matrix = EmbeddingMatrix(files, self.part_rows, self.opened)
            if len(matrix) != self.count:
                raise XMError(f"{self.layout.emb_dir(entry.slug, modality)}: {len(matrix)} rows, manifest says {self.count}")
            self._matrices[key] = matrix
        return self._matrices[key]

    @_locked
    def norms(self, spec: str, modality: str) -> ByIdParts:
        """Per-item norms of the embeddings before normalisation (float32, by global id: `[ids]`),
        read part by part through the memory's bounded cache of maps."""
        key = (str(spec), f"{modality}-norm")
        if key not in self._norms:
            entry = self.encoder_entry(spec)
            if entry is None or modality not in entry.norms:
                raise XMError(f"{self.root}: no {modality} embedding norms for encoder {spec} in this index")
            files = self.layout.norm_files(entry.slug, modality, self.parts)
            self._norms[key] = ByIdParts(files, self.part_rows, self.opened)
        return self._norms[key]

    @_locked
    def index(self, modality: str, encoder: str | None = None) -> ShardedIndex:
        """The kNN index over `encoder`'s `modality` embeddings (default: the coarse encoder)."""
        spec = str(encoder or self.roles["coarse"])
        key = f"{spec}|{modality}"
        if key not in self._indexes:
            entry = self.index_entry(spec, modality)
            if entry is None:
                raise XMError(f"{self.root}: this index has no {modality} kNN index for {spec}; add it with "
                              f"`xm build-index --out {self.root} --add-encoder {spec}=index-{modality}`")
            folder = self.root / entry.dir
            files = [folder / s.file for s in entry.shards]
            # IVF shards store global ids (their id range); Flat/HNSW local ones plus an offset
            ranges = [s.id_range if s.id_offset == 0 else (0, s.ntotal) for s in entry.shards]
            idx = ShardedIndex(files, [s.id_offset for s in entry.shards], entry.params, ranges)
            if idx.ntotal != self.count:
                raise XMError(f"{folder}: shards hold {idx.ntotal} vectors, manifest says {self.count}")
            self._indexes[key] = idx
        return self._indexes[key]

    def search(self, modality: str, queries: np.ndarray, k: int, encoder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """kNN (inner product) of query embeddings under `encoder` (default coarse) against memory items.

        An index entry with `refine_k_factor` F > 1 (a compressed index) fetches k*F candidates
        and re-scores them exactly with the stored embeddings (`rescore`): its similarities are
        then exact inner products with the float16 embeddings (with the decoded rows, for
        embeddings stored as codes: `--image-codec`)."""
        spec = str(encoder or self.roles["coarse"])
        entry = self.index_entry(spec, modality)
        factor = int(entry.refine_k_factor or 0) if entry is not None else 0
        refine = factor > 1 and self.has_embeddings(spec, modality)
        fetch = min(k * factor, self.count) if refine else k
        sims, ids = self.index(modality, spec).search(queries, max(k, fetch))
        if ids.size and int(ids.max()) >= self.count:  # an index from elsewhere is not trusted
            raise XMError(f"{self.root / entry.dir if entry is not None else self.root}: returned id {int(ids.max())} for an index of {self.count} items; the shards are damaged")
        if refine:
            q = np.asarray(queries, dtype=np.float32)
            sims, ids = rescore(q[None] if q.ndim == 1 else q, ids, self.embeddings(spec, modality), k)
        return sims, ids

    @cached_property
    def store(self) -> CaptionStore:
        return open_store(self.layout, self.manifest, self.opened)

    @property
    def caption_hashes(self) -> np.ndarray:
        return self.store.hashes  # type: ignore[return-value]

    def rows(self, ids: Sequence[int], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        with self._lock:  # the store's row-group cache is not thread-safe
            return self.store.fetch(ids, columns)

    def captions(self, ids: Sequence[int]) -> list[str]:
        with self._lock:
            return self.store.captions(ids)

    def columns(self) -> list[str]:
        """The columns of the caption store (its first file's; every file has the same)."""
        with self._lock:
            return self.store.columns()

    def describe(self) -> dict[str, Any]:
        encoders = {s: {"dim": e.dim, "probe": e.probe, "embedded": e.embedded, "norms": e.norms}
                    for s, e in self.manifest.encoders.items()}
        return {"kind": self.kind, "location": str(self.root), "id": self.id, "count": self.count, "roles": self.roles,
                "encoders": encoders, "source": self.manifest.source.to_json(),
                "columns": [c for c in self.columns() if c != "id"]}

    def close(self) -> None:
        """Drop the open part files and maps, and the shards' search threads."""
        with self._lock:
            for idx in self._indexes.values():
                idx.close()
            self._indexes.clear()
            self._matrices.clear()
            self._norms.clear()
            self.__dict__.pop("store", None)
            self.opened.clear()

    def preload(self) -> None:
        for index in self.manifest.indexes:
            self.index(index.modality, index.encoder)
        for spec, entry in self.manifest.encoders.items():
            for modality in entry.embedded:
                self.embeddings(spec, modality)
            for modality in entry.norms:
                self.norms(spec, modality)
        _ = self.caption_hashes

    def check_encoder(self, encoder: Any, role: str) -> None:
        """Refuse an encoder whose name or weights differ from the one that built this index.
        An entry with no probe (`probe: null`: embeddings taken precomputed from the source, the
        encoder never loaded) cannot be verified and is accepted by name."""
        expected = self.roles.get(role) if role in ("coarse", "fine") else None
        if expected is not None and str(encoder.spec) != expected:
            raise XMError(f"{self.layout.manifest}: built with {role} encoder {expected}, not {encoder.spec}")
        entry = self.encoder_entry(str(encoder.spec))
        if entry is not None and entry.probe is not None and not encoder.fingerprint_matches(entry.probe):
            raise XMError(
                f"{self.layout.manifest}: encoder {encoder.spec} has other weights than the ones that built this index"
            )


def open_index(root: str | Path, verify: bool | None = None) -> LocalMemory:
    """Open a built index, refusing one whose manifest and files disagree."""
    return LocalMemory(root, verify=verify)
