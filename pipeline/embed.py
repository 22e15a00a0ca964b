"""The embed stage: one part at a time, image embeddings under the coarse encoder and
caption embeddings under every encoder, written in clip-retrieval's layout.

A part is done when its marker exists; the marker is written after every file of the
part has been renamed into place, so a kill leaves at worst a part that is redone.
"""

from __future__ import annotations

import json
import queue
import threading
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xm.encoders import Encoder, load_image
from xm.errors import XMError
from xm.indexes.layout import Layout, atomic_path, write_json
from xm.pipeline.sources import Part, Sample

T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int = 3) -> Iterator[T]:
    """Produce items in a background thread, so decoding overlaps the model's forward pass."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for item in items:
                q.put(item)
        except BaseException as exc:  # re-raised in the consumer
            errors.append(exc)
        finally:
            q.put(done)

    threading.Thread(target=run, daemon=True).start()
    while (item := q.get()) is not done:
        yield item
    if errors:
        raise errors[0]


def _pixel_batches(samples: Iterable[Sample], preprocess: Callable, batch_size: int, failures: Counter) -> Iterator[tuple[list[Sample], Any]]:
    import torch

    kept: list[Sample] = []
    pixels: list[Any] = []
    for s in samples:
        try:
            pixels.append(preprocess(load_image(s.read_image(), name=s.key)))
            kept.append(s)
        except (XMError, OSError):
            failures["failed_to_decode"] += 1
        if len(kept) == batch_size:
            yield kept, torch.stack(pixels)
            kept, pixels = [], []
    if kept:
        yield kept, torch.stack(pixels)


def _metadata_table(samples: list[Sample]) -> pa.Table:
    extra_keys = sorted({k for s in samples for k in s.extra})
    columns: dict[str, list] = {
        "image_path": [s.key for s in samples],
        "caption": [s.caption for s in samples],
        "url": [s.url for s in samples],
        "source_id": [s.key for s in samples],
    }
    for k in extra_keys:
        if k not in columns:
            columns[k] = [s.extra.get(k) for s in samples]
    return pa.table(columns)


def _save_npy(path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array.astype(np.float16))


def embed_part(
    part: Part,
    encoders: dict[str, Encoder],
    coarse: str,
    layout: Layout,
    batch_size: int,
    on_rows: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Embed one part; return its marker (rows kept, failures by reason)."""
    failures: Counter = Counter()
    coarse_enc = encoders[coarse]
    images: np.ndarray
    if part.precomputed is None:
        kept: list[Sample] = []
        chunks = []
        for batch, pixels in prefetch(_pixel_batches(part.samples(), coarse_enc.preprocess, batch_size, failures)):
            chunks.append(coarse_enc.encode_pixels(pixels))
            kept.extend(batch)
            on_rows(len(batch))
        images = np.concatenate(chunks) if chunks else np.zeros((0, coarse_enc.dim), np.float32)
        precomputed_text = None
    else:
        kept = list(part.samples())
        images = np.load(part.precomputed["img_emb"], mmap_mode="r")
        precomputed_text = np.load(part.precomputed["text_emb"], mmap_mode="r")
        for name, arr in (("img_emb", images), ("text_emb", precomputed_text)):
            if arr.shape != (len(kept), coarse_enc.dim):
                raise XMError(
                    f"{part.precomputed[name]}: shape {arr.shape}, expected ({len(kept)}, {coarse_enc.dim}) "
                    f"to match its metadata and the coarse encoder {coarse}"
                )
        on_rows(len(kept))
    marker = {"part": part.name, "rows": len(kept), "failures": dict(failures)}
    if kept:
        captions = [s.caption for s in kept]
        for spec, enc in encoders.items():
            slug = enc.spec.slug
            if spec == coarse and precomputed_text is not None:
                text = np.asarray(precomputed_text)
            else:
                text = enc.encode_texts(captions)
            _save_npy(layout.emb_file(slug, "text", part.name), text)
        _save_npy(layout.emb_file(coarse_enc.spec.slug, "image", part.name), np.asarray(images))
        with atomic_path(layout.metadata_file(coarse_enc.spec.slug, part.name)) as tmp:
            pq.write_table(_metadata_table(kept), tmp)
    write_json(layout.done_marker("embed", part.name), marker)
    return marker


def read_marker(layout: Layout, part: str) -> dict[str, Any] | None:
    path = layout.done_marker("embed", part)
    return json.loads(path.read_text()) if path.is_file() else None
