"""The embed stage: one part at a time, image and caption embeddings under each encoder
as the build's plan says (`BuildConfig.plan`), written in clip-retrieval's layout, with
the norms of the caption embeddings before normalisation beside them.

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


def _pixel_batches(samples: Iterable[Sample], preprocesses: dict[str, Callable], batch_size: int,
                   failures: Counter) -> Iterator[tuple[list[Sample], dict[str, Any]]]:
    """Each image decoded once, preprocessed for every image encoder (shared preprocessing once)."""
    import torch

    kept: list[Sample] = []
    pixels: dict[str, list[Any]] = {k: [] for k in preprocesses}
    for s in samples:
        try:
            image = load_image(s.read_image(), name=s.key)
            done: dict[str, Any] = {}
            row = {}
            for k, fn in preprocesses.items():
                same = repr(fn)  # torchvision transforms print their parameters: equal repr, equal output
                if same not in done:
                    done[same] = fn(image)
                row[k] = done[same]
        except (XMError, OSError):
            failures["failed_to_decode"] += 1
            continue
        for k, v in row.items():
            pixels[k].append(v)
        kept.append(s)
        if len(kept) == batch_size:
            yield kept, {k: torch.stack(v) for k, v in pixels.items()}
            kept, pixels = [], {k: [] for k in preprocesses}
    if kept:
        yield kept, {k: torch.stack(v) for k, v in pixels.items()}


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


def _save_npy(path, array: np.ndarray, dtype: Any = np.float16) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array).astype(dtype))


def write_text_embeddings(layout: Layout, enc: Encoder, part: str, captions: list[str],
                          on_batch: Callable[[int], None] | None = None) -> None:
    """One part's caption embeddings and their norms under `enc`."""
    text, norms = enc.encode_texts_with_norms(captions, on_batch=on_batch)
    _save_npy(layout.norm_file(enc.spec.slug, "text", part), norms, np.float32)
    _save_npy(layout.emb_file(enc.spec.slug, "text", part), text)


def embed_part(
    part: Part,
    encoders: dict[str, Encoder],
    plan: dict[str, tuple[str, ...]],
    layout: Layout,
    batch_size: int,
    on_rows: Callable[[int], None] = lambda n: None,
    on_captions: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Embed one part as `plan` says (the first encoder also writes the metadata); return its
    marker (rows kept, failures by reason)."""
    failures: Counter = Counter()
    first = next(iter(plan))
    image_specs = [spec for spec, parts in plan.items() if "image" in parts]
    images: dict[str, np.ndarray] = {}
    precomputed_text = None
    if part.precomputed is None:
        kept: list[Sample] = []
        chunks: dict[str, list[np.ndarray]] = {spec: [] for spec in image_specs}
        preprocesses = {spec: encoders[spec].preprocess for spec in image_specs}
        if not image_specs:  # caption-only plan: still decode, so the same rows are kept
            preprocesses = {first: encoders[first].preprocess}
        for batch, pixels in prefetch(_pixel_batches(part.samples(), preprocesses, batch_size, failures)):
            for spec in image_specs:
                chunks[spec].append(encoders[spec].encode_pixels(pixels[spec]))
            kept.extend(batch)
            on_rows(len(batch))
        images = {spec: np.concatenate(c) if c else np.zeros((0, encoders[spec].dim), np.float32) for spec, c in chunks.items()}
    else:
        # LAION's precomputed parts are the first (coarse) encoder's image and caption embeddings
        kept = list(part.samples())
        images = {first: np.load(part.precomputed["img_emb"], mmap_mode="r")}
        precomputed_text = np.load(part.precomputed["text_emb"], mmap_mode="r")
        for name, arr in (("img_emb", images[first]), ("text_emb", precomputed_text)):
            if arr.shape != (len(kept), encoders[first].dim):
                raise XMError(
                    f"{part.precomputed[name]}: shape {arr.shape}, expected ({len(kept)}, {encoders[first].dim}) "
                    f"to match its metadata and the encoder {first}"
                )
        other_images = [s for s in image_specs if s != first]
        if other_images:
            raise XMError(f"{part.precomputed['img_emb']}: precomputed embedding parts carry no images; "
                          f"image embeddings under {', '.join(other_images)} cannot be made")
        on_rows(len(kept))
    marker = {"part": part.name, "rows": len(kept), "failures": dict(failures)}
    if kept:
        captions = [s.caption for s in kept]
        marker["empty_captions"] = sum(1 for c in captions if not c.strip())
        for spec, parts in plan.items():
            enc = encoders[spec]
            if "text" in parts:
                if spec == first and precomputed_text is not None:
                    _save_npy(layout.emb_file(enc.spec.slug, "text", part.name), np.asarray(precomputed_text))
                    on_captions(len(captions))
                else:
                    write_text_embeddings(layout, enc, part.name, captions, on_batch=on_captions)
            if "image" in parts:
                _save_npy(layout.emb_file(enc.spec.slug, "image", part.name), np.asarray(images[spec]))
        with atomic_path(layout.metadata_file(encoders[first].spec.slug, part.name)) as tmp:
            pq.write_table(_metadata_table(kept), tmp)
    write_json(layout.done_marker("embed", part.name), marker)
    return marker


def read_marker(layout: Layout, part: str) -> dict[str, Any] | None:
    path = layout.done_marker("embed", part)
    return json.loads(path.read_text()) if path.is_file() else None
