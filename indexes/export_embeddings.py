"""`xm export embeddings IDX OUT`: an index's embeddings in clip-retrieval's float16 layout, which
embedding-reader (and so autofaiss and clip-retrieval's tools) reads, whatever the index stores.

    OUT/<encoder-slug>/img_emb/img_emb_<part>.npy        float16, unit rows (the image embeddings)
    OUT/<encoder-slug>/text_emb/text_emb_<part>.npy      float16, unit rows (the caption embeddings)
    OUT/<encoder-slug>/metadata/metadata_<part>.parquet  the part's rows (caption, url, image_path, ...),
                                                         written from the caption store (their one owner)

one folder per encoder (or those asked for), part files row-aligned and named as the index names
its parts (zero-padded, so their sorted order, the order embedding-reader reads them in, is the
global-id order). Embeddings stored as codes (`--text-codec`, `--image-codec`: uint8) are decoded
and renormalised exactly as the index's own readers do (`CodedEmbeddingMatrix`); float16 parts
are copied as they are. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from xm.errors import XMError
from xm.indexes.embeddings import CodedEmbeddingMatrix, EmbeddingMatrix
from xm.indexes.layout import Layout, atomic_path
from xm.indexes.manifest import read_manifest
from xm.indexes.store import open_store

KINDS = {"image": "img_emb", "text": "text_emb"}


def export_embeddings(index: str | Path, out: str | Path, encoders: list[str] | None = None,
                      force: bool = False) -> dict[str, Any]:
    """Write `index`'s embeddings under `out` (see the module's doc); return what was written."""
    layout, target = Layout(index), Path(out)
    manifest = read_manifest(layout.root)
    chosen = list(manifest.encoders) if not encoders else encoders
    unknown = [s for s in chosen if s not in manifest.encoders]
    if unknown:
        raise XMError(f"--encoder {unknown[0]}: not an encoder of {layout.root} (it has {', '.join(manifest.encoders)})")
    if target.exists() and any(target.iterdir()) and not force:
        raise XMError(f"{target}: not empty; choose a new folder or pass --force")
    parts = [p.name for p in manifest.parts]
    store = open_store(layout, manifest)
    written: dict[str, Any] = {"index": str(layout.root), "out": str(target), "count": manifest.count, "parts": len(parts),
                               "encoders": {}}
    for spec in chosen:
        entry = manifest.encoders[spec]
        folder = target / entry.slug
        modalities = [m for m in ("image", "text") if m in entry.embedded]
        for modality in modalities:
            codec = entry.codecs.get(modality)
            for part in parts:
                dest = folder / KINDS[modality] / f"{KINDS[modality]}_{part}.npy"
                if codec:  # uint8 codes: decoded and renormalised as the index's readers decode them
                    _decode(CodedEmbeddingMatrix([layout.code_file(entry.slug, modality, part)],
                                                 layout.codec_file(entry.slug, modality)), dest)
                else:
                    src = layout.emb_file(entry.slug, modality, part)
                    EmbeddingMatrix([src])  # one line naming the file if it is missing or not an array
                    _copy(src, dest)
        first = 0
        for record in manifest.parts:
            rows = store.table(first, first + record.rows).drop_columns(["id"])
            first += record.rows
            with atomic_path(folder / "metadata" / f"metadata_{record.name}.parquet") as tmp:
                pq.write_table(rows, tmp)
        written["encoders"][spec] = {"folder": str(folder), "modalities": modalities,
                                     "decoded": sorted(m for m in modalities if entry.codecs.get(m))}
    return written


DECODE_ROWS = 1 << 16  # rows decoded at once: a part of millions never sits in memory as float32


def _decode(codes: CodedEmbeddingMatrix, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(codes), codes.dim))
        for start in range(0, len(codes), DECODE_ROWS):
            ids = np.arange(start, min(start + DECODE_ROWS, len(codes)))
            arr[start : start + len(ids)] = codes.gather(ids).astype(np.float16)
        arr.flush()
        del arr


def _copy(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
