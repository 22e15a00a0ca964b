"""The embed stage: one part at a time, image and caption embeddings under each encoder
as the build's plan says (`BuildConfig.plan`), written in clip-retrieval's layout, with
the norms of the caption embeddings before normalisation beside them.

A part is done when its marker exists; the marker is written after every file of the
part has been renamed into place, so a kill leaves at worst a part that is redone.

A part that brings precomputed arrays (`Part.precomputed`: LAION's embedding parts,
DataComp's npz) has them checked and copied bit for bit (float16) in place of computing
them; only what no array provides is computed, so an encoder with nothing left to
compute is not needed at all. A bad array fails the part, in one line, before any of its
arrays is renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xm.encoders import Encoder, EncoderSpec
from xm.errors import XMError
from xm.indexes.layout import Layout, atomic_path, write_json
from xm.indexes.records import EncoderEntry
from xm.pipeline.checkpoint import PartCheckpoint
from xm.pipeline.compress import read_record
from xm.pipeline.loader import part_batches, prefetch, preprocessed
from xm.pipeline.sources.base import ArrayRef, Part, Sample

__all__ = ["embed_part", "prefetch", "read_marker", "slug_of", "write_text_embeddings"]  # prefetch: now in loader.py


def _pixel_batches(samples: Iterable[Sample], preprocesses: dict[str, Callable], batch_size: int,
                   failures: Counter) -> Iterator[tuple[list[Sample], dict[str, Any]]]:
    """Each image decoded once, preprocessed for every image encoder (shared preprocessing once);
    `--add-encoder`'s image rows (a part's embed stage reads through `pipeline/loader.py`)."""
    import torch

    kept: list[Sample] = []
    pixels: dict[str, list[Any]] = {k: [] for k in preprocesses}
    for s in samples:
        row = preprocessed(s, preprocesses)
        if row is None:
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


def _save_npy(path: Path, array: np.ndarray, dtype: Any = np.float16) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array).astype(dtype))


def write_text_embeddings(layout: Layout, enc: Encoder, part: str, captions: list[str],
                          on_batch: Callable[[int], None] | None = None, tokens: Any = None) -> None:
    """One part's caption embeddings and their norms under `enc` (`tokens`: the captions already
    tokenised by the input pipeline)."""
    text, norms = enc.encode_texts_with_norms(captions, on_batch=on_batch, tokens=tokens)
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
    num_workers: int = 0,
) -> dict[str, Any]:
    """Embed one part as `plan` says (and write its rows, `Layout.part_rows`: the store stage's
    input); return its
    marker (rows kept, failures by reason). What the part brings precomputed is copied, the
    rest computed with `encoders` (which need not hold an encoder with nothing to compute),
    on the device each encoder is on. `num_workers` processes decode and preprocess
    (`pipeline/loader.py`; 0: a thread of this process); the files are the same for any number."""
    failures: Counter = Counter()
    first = next(iter(plan))
    given = part.precomputed or {}
    image_specs = [spec for spec, parts in plan.items() if "image" in parts and (spec, "image") not in given]
    images: dict[str, np.ndarray] = {}
    tokens: dict[str, Any] = {}
    checkpoint = None
    if part.precomputed is None:
        import torch

        # the embeddings made so far are saved every minute and on Ctrl-C; a re-run resumes there
        checkpoint = PartCheckpoint(layout, part.name, part.size, {"plan": plan, "batch_size": batch_size}, image_specs)
        kept, start = checkpoint.resume(part.samples)
        if checkpoint.skipped:
            failures["failed_to_decode"] += checkpoint.skipped
        on_rows(0)  # the images phase (re)starts now: progress rates count from here
        on_rows(len(kept))
        seen = start
        chunks: dict[str, list[np.ndarray]] = {spec: [] for spec in image_specs}
        for spec in image_specs:
            saved = checkpoint.images(spec)
            if saved is not None:
                chunks[spec].append(saved)
        preprocesses = {spec: encoders[spec].preprocess for spec in image_specs}
        if not image_specs:  # caption-only plan: still decode, so the same rows are kept
            preprocesses = {first: encoders[first].preprocess}
        # captions tokenised beside the decoding, not between the image and caption passes (on a
        # resumed part the captions the checkpoint covers were never tokenised: the caption pass does it)
        text_specs = [spec for spec, parts in plan.items() if "text" in parts and (spec, "text") not in given]
        token_chunks: dict[str, list[Any]] = {spec: [] for spec in text_specs}
        pin = any(str(e.device).startswith("cuda") for e in encoders.values())
        batches = part_batches(part, preprocesses, {spec: encoders[spec].tokenizer for spec in text_specs},
                               batch_size, num_workers, pin_memory=pin, start=start)
        with contextlib.closing(batches):  # on Ctrl-C the decoding thread or workers stop before the process exits
            try:
                for batch in batches:
                    seen += len(batch.samples) + batch.failed
                    if batch.failed:
                        failures["failed_to_decode"] += batch.failed
                    if not batch.samples:
                        continue
                    embedded = {spec: encoders[spec].encode_pixels(batch.pixels[spec]) for spec in image_specs}
                    checkpoint.add(batch.positions, embedded)
                    for spec in image_specs:
                        chunks[spec].append(embedded[spec])
                    for spec in text_specs:
                        token_chunks[spec].append(batch.tokens[spec])
                    kept.extend(batch.samples)
                    on_rows(len(batch.samples))
            except BaseException:
                checkpoint.save()  # Ctrl-C (or a failure) keeps every whole batch made so far
                raise
        checkpoint.images_done(seen)
        if start == 0:
            tokens = {spec: torch.cat(c) for spec, c in token_chunks.items() if c}
        images = {spec: np.concatenate(c) if c else np.zeros((0, encoders[spec].dim), np.float32) for spec, c in chunks.items()}
    else:
        if image_specs:  # the build's preflight says so first; a part never gets half its files
            origin = next(iter(given.values()))
            raise XMError(f"{origin.path}: precomputed embeddings with no images; image embeddings under "
                          f"{', '.join(image_specs)} cannot be made")
        kept = list(part.samples())
        on_rows(len(kept))
    done = read_marker(layout, part.name)
    if done is not None:  # a duplicate attempt (a Spark retry or speculative copy) finished first: keep its files
        if checkpoint is not None:
            checkpoint.discard()
        return done
    marker = {"part": part.name, "rows": len(kept), "failures": dict(failures)}
    if kept:
        captions = [s.caption for s in kept]
        marker["empty_captions"] = sum(1 for c in captions if not c.strip())
        _copy_precomputed(part, plan, layout, len(kept), encoders)
        on_captions(0)  # the captions phase starts now: progress rates (and ETAs) count from here
        for spec, parts in plan.items():
            if "text" in parts:
                texts = [layout.emb_file(slug_of(spec), "text", part.name), layout.norm_file(slug_of(spec), "text", part.name)]
                if (spec, "text") in given or (checkpoint is not None and checkpoint.has_texts(spec, texts)):
                    on_captions(len(captions))
                else:
                    write_text_embeddings(layout, encoders[spec], part.name, captions, on_batch=on_captions,
                                          tokens=tokens.get(spec))
                    if checkpoint is not None:
                        checkpoint.texts_written(spec)
            if spec in images:
                _save_npy(layout.emb_file(slug_of(spec), "image", part.name), images[spec])
        with atomic_path(layout.part_rows(part.name)) as tmp:
            pq.write_table(_metadata_table(kept), tmp)
    write_json(layout.done_marker("embed", part.name), marker)
    if checkpoint is not None:
        checkpoint.discard()
    return marker


def slug_of(spec: str) -> str:
    """The file-system name of an encoder (its embeddings folder)."""
    return EncoderSpec.parse(spec).slug


def _copy_precomputed(part: Part, plan: dict[str, tuple[str, ...]], layout: Layout, rows: int,
                      encoders: dict[str, Encoder]) -> None:
    """The part's precomputed arrays the plan asks for, checked and stored (float16, the first
    `rows`), each read once; none is renamed into place until every one has passed."""
    wanted = [(key, ref) for key, ref in (part.precomputed or {}).items() if key[1] in plan.get(key[0], ())]
    dims = {spec: encoders[spec].dim for (spec, _), _ref in wanted if spec in encoders}
    with contextlib.ExitStack() as staged:
        for (spec, modality), ref in wanted:
            arr = read_array(ref, rows, ref.dim or dims.get(spec), spec)
            dims.setdefault(spec, arr.shape[1])
            tmp = staged.enter_context(atomic_path(layout.emb_file(slug_of(spec), modality, part.name)))
            with open(tmp, "wb") as f:
                np.save(f, arr)


# float16 rounding moves a unit vector's norm by ~1e-3; anything further is not a normalised embedding
NORM_TOLERANCE = 1e-2


def read_array(ref: ArrayRef, rows: int, dim: int | None, spec: str) -> np.ndarray:
    """The first `rows` rows of a precomputed array as float16, or one line naming the file and
    what is wrong: unreadable, key absent, row count other than its metadata's, wrong width,
    not a float array, NaN/inf rows, rows not unit-norm."""
    try:
        if ref.key is None:
            arr = np.load(ref.path, mmap_mode="r")
        else:
            with np.load(ref.path) as npz:
                if ref.key not in npz.files:
                    raise XMError(f"{ref.path}: no array {ref.key!r} (it has {', '.join(npz.files) or 'none'})")
                arr = npz[ref.key]
    except FileNotFoundError as exc:
        raise XMError(f"{ref.path}: missing (the {spec} embeddings of {ref.meta or 'this part'})") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise XMError(f"{ref.path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
    expected = ref.rows if ref.rows is not None else rows
    if arr.ndim != 2:
        raise XMError(f"{ref}: shape {arr.shape}, expected (rows, dim) embeddings of {spec}")
    if arr.shape[0] != expected:
        raise XMError(f"{ref}: {arr.shape[0]} rows, but its metadata {ref.meta or ''} has {expected}; "
                      "the two must be row-aligned")
    if dim is not None and arr.shape[1] != dim:
        raise XMError(f"{ref}: {arr.shape[1]}-dim rows, expected {dim} for {spec}")
    if arr.dtype.kind != "f":
        raise XMError(f"{ref}: dtype {arr.dtype}, expected float16 or float32 embeddings")
    arr = arr[:rows]
    for start in range(0, rows, 1 << 16):
        chunk = np.asarray(arr[start : start + (1 << 16)], dtype=np.float32)
        finite = np.isfinite(chunk).all(axis=1)
        if not finite.all():
            first = start + int(np.argmin(finite))
            raise XMError(f"{ref}: row {first} is not finite (NaN or inf); {ref.label} cannot be indexed")
        norms = np.linalg.norm(chunk, axis=1)
        off = np.abs(norms - 1) > NORM_TOLERANCE
        if off.any():
            j = int(np.argmax(off))
            raise XMError(f"{ref}: row {start + j} has norm {norms[j]:.4f}, not 1; xm stores unit-normalised "
                          "embeddings (compared by inner product)")
    return np.asarray(arr, dtype=np.float16)


def unloaded_encoder_entry(layout: Layout, spec: str, embedded: list[str], norms: list[str], parts: list[str],
                           logit_scale: float, files_at: Any = None) -> EncoderEntry:
    """The manifest's record of an encoder that was never loaded (every embedding of it came from
    the source): the same keys as a loaded one's, dim from the stored arrays, no weights probe
    (`probe: null`: not verifiable) and no precision (it never ran). `files_at` (`staging.StoredFiles`):
    where the parts are, when only the bucket holds them."""
    from xm.indexes.tuning import npy_shape

    slug = slug_of(spec)
    dim = None
    for modality in embedded if parts else []:
        f = layout.emb_file(slug, modality, parts[0])
        if files_at.exists(f) if files_at is not None else f.is_file():
            dim = npy_shape(files_at.readable(f) if files_at is not None else f)[1]
            break
        record = read_record(layout, slug, modality)  # compressed: its float16 parts are gone
        if record is not None:
            dim = int(record["dim"])
            break
    return EncoderEntry(slug=slug, dim=dim, logit_scale=logit_scale, probe=None,
                        embedded=embedded, norms=norms, precision=None)


def read_marker(layout: Layout, part: str) -> dict[str, Any] | None:
    path = layout.done_marker("embed", part)
    return json.loads(path.read_text()) if path.is_file() else None
