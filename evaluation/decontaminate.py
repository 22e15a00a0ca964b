"""Test near-duplicates out of the memory (`xm benchmark --decontaminate`), for every method.

RECO's paper removes the near-duplicates of the test images from its memory before
evaluating (§4.1); a LAION-sized memory holds copies of many benchmark images, and a method
that retrieves them reads its test labels off their captions. Here:

1. Each test image is embedded with the memory's coarse encoder and searched among the
   memory's images; every item whose cosine is at least `threshold` is a near-duplicate
   (the search widens, up to the whole memory, while its last neighbour is still above).
   Not for an encoder with random weights (`ARCH:random`, the tests' and the shipped demo's),
   whose cosines say nothing about similarity: there only step 2 applies.
2. Where the memory's images are at hand (a local file: an index built from a folder, or
   a row whose url is a local path), the `phash_k` nearest of each test image are also
   checked by perceptual hash (imagehash's pHash, 64 bits): one equal to any test image's
   hash is a near-duplicate whatever its cosine. Remote images are never fetched.
3. The items found are hidden for the run by a `FilteredMemory` (a per-run id filter over
   the kNN search), which every method's retrieval goes through; RECO's neighbours at
   inference are searches too. The index is not touched.

Default (`enabled=None`): on, under both protocols, when the memory holds more items than
the test set (a memory of LAION's kind); off for a memory no larger than the test set,
which is then a deliberate construction (the test fixtures', a memory of the test
images' own neighbours). The report says which and why, and how many were hidden.
The found ids are cached per (memory, test images, encoder, settings).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xm.encoders.loader import EncoderSpec
from xm.encoders.precision import Precision
from xm.errors import XMError
from xm.evaluation.datasets import DatasetSplit, Item
from xm.indexes.layout import atomic_path
from xm.memories import Memory
from xm.memories.filtered import FilteredMemory

DEFAULT_THRESHOLD = 0.95  # coarse-encoder cosine; CLIP B/32 places resized/re-encoded copies above it
DEFAULT_PROBE_K = 64  # neighbours read per test image before widening
DEFAULT_PHASH_K = 16  # neighbours per test image whose perceptual hash is compared


@dataclass(frozen=True)
class Decontamination:
    """What `--decontaminate` does, parsed once at the edge."""

    enabled: bool | None = None  # None: on when the memory holds more items than the test set
    threshold: float = DEFAULT_THRESHOLD
    probe_k: int = DEFAULT_PROBE_K
    phash_k: int = DEFAULT_PHASH_K

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise XMError(f"--decontaminate-threshold {self.threshold}: a cosine, between -1 and 1")
        if self.probe_k < 1 or self.phash_k < 0:
            raise XMError("--decontaminate: probe_k must be >= 1 and phash_k >= 0")


@dataclass
class Found:
    hidden: np.ndarray  # sorted global ids
    by_cosine: int
    by_phash_only: int
    phash_checked: int  # memory images whose hash was compared (0: none at hand)


def phash_bits(image: Any) -> int:
    """pHash of an image as a 64-bit integer (imagehash's DCT hash, 8 x 8)."""
    import imagehash

    h = imagehash.phash(image.convert("RGB"))
    return int("".join("1" if b else "0" for b in h.hash.flatten()), 2)


def _local_image(row: dict[str, Any], folder: Path | None) -> Path | None:
    """The memory item's image file where it is on this machine, else None (never fetched)."""
    url = row.get("url")
    if isinstance(url, str) and url:
        local = url[len("file://"):] if url.startswith("file://") else url
        if "://" not in local and Path(local).is_file():
            return Path(local)
    key = row.get("source_id")
    if folder is not None and isinstance(key, str) and (folder / key).is_file():
        return folder / key
    return None


def find_near_duplicates(memory: Memory, features: np.ndarray, test_hashes: set[int] | None, encoder: str,
                         settings: Decontamination, use_cosine: bool = True) -> Found:
    """Memory ids that are near-duplicates of the test images, given the images' coarse
    features (n x d, unit length) and, for the hash check, their perceptual hashes.
    `use_cosine=False`: the hash check alone, over the `phash_k` nearest."""
    features = np.asarray(features, np.float32)
    k = min(settings.probe_k if use_cosine else max(settings.phash_k, 1), memory.count)
    hidden: set[int] = set()
    rows = np.arange(len(features))
    nearest: np.ndarray | None = None
    while len(rows):
        sims, ids = memory.search("image", features[rows], k, encoder=encoder)
        if nearest is None:
            nearest = ids[:, : settings.phash_k]
        if not use_cosine:
            break
        hidden.update(int(i) for i in ids[(sims >= settings.threshold) & (ids >= 0)])
        if k >= memory.count:
            break
        # rows whose k-th neighbour is still above the threshold may have more: widen
        more = (ids[:, -1] >= 0) & (sims[:, -1] >= settings.threshold)
        rows, k = rows[more], min(2 * k, memory.count)
    by_cosine = len(hidden)
    checked = 0
    if test_hashes and settings.phash_k and nearest is not None:
        from xm.encoders import load_image

        source = memory.describe().get("source") or {}
        folder = Path(source["source"]) if isinstance(source.get("source"), str) and Path(source["source"]).is_dir() else None
        candidates = sorted({int(i) for i in nearest.ravel() if i >= 0} - hidden)
        for row in memory.rows(candidates, columns=("id", "url", "source_id")):
            path = _local_image(row, folder)
            if path is None:
                continue
            try:
                bits = phash_bits(load_image(path))
            except (XMError, OSError):
                continue  # an unreadable memory image cannot match
            checked += 1
            if bits in test_hashes:
                hidden.add(int(row["id"]))
    return Found(np.array(sorted(hidden), np.int64), by_cosine, len(hidden) - by_cosine, checked)


def _test_side(items: Sequence[Item], encoder: Any, batch_size: int) -> tuple[np.ndarray, set[int]]:
    """Coarse features and perceptual hashes of the test images that decode, a batch at a time."""
    features: list[np.ndarray] = []
    hashes: set[int] = set()
    for lo in range(0, len(items), batch_size):
        images = []
        for item in items[lo : lo + batch_size]:
            try:
                images.append(item.image())
            except XMError:
                continue  # the benchmark counts it as failed; it cannot be in the memory's way
        if images:
            features.append(encoder.encode_images(images))
            hashes.update(phash_bits(im) for im in images)
    return (np.concatenate(features) if features else np.zeros((0, 1), np.float32)), hashes


def decontaminate(memory: Memory | None, settings: Decontamination, items: Sequence[Item], precision: Precision,
                  cache_dir: Path, batch_size: int = 32) -> tuple[Memory | None, dict[str, Any]]:
    """The memory the run's methods read (the given one, or a view hiding the test images'
    near-duplicates) and the report recorded with the result."""
    if memory is None:
        return None, {"enabled": False, "why": "no memory"}
    n_test = len(items)
    if settings.enabled is None:
        enabled = memory.count > n_test
        why = (f"default: the memory holds more items ({memory.count}) than the test set ({n_test})" if enabled else
               f"default: the memory holds no more items ({memory.count}) than the test set ({n_test})")
    else:
        enabled = settings.enabled
        why = "--decontaminate" if enabled else "--no-decontaminate"
    if not enabled:
        return memory, {"enabled": False, "why": why}
    found, report = near_duplicates(memory, settings, items, precision, cache_dir, batch_size)
    return (FilteredMemory(memory, found.hidden) if len(found.hidden) else memory), {"enabled": True, "why": why, **report}


def near_duplicates(memory: Memory, settings: Decontamination, items: Sequence[Item], precision: Precision,
                    cache_dir: Path, batch_size: int = 32) -> tuple[Found, dict[str, Any]]:
    """The memory's near-duplicates of the test images `items` (cached) and what the report says
    of them: the one implementation behind `xm benchmark --decontaminate` and
    `xm train reco --decontaminate-against`."""
    encoder = str(memory.roles.get("coarse") or "")
    if not encoder or not memory.has_index(encoder, "image"):
        raise XMError(f"--decontaminate: {memory.root} has no image index under a coarse encoder to find near-duplicates with "
                      f"(--no-decontaminate to evaluate without)")
    # a random-weight encoder's cosine measures no similarity (unrelated images score 0.99 on
    # the tiny test encoders): only the hash check then, and the report says so
    use_cosine = not EncoderSpec.parse(encoder).is_random
    key = hashlib.sha256(json.dumps([memory.id, [i.key for i in items], encoder, str(precision), settings.threshold,
                                     settings.probe_k, settings.phash_k]).encode()).hexdigest()[:20]
    path = cache_dir / f"decontaminate-{key}.json"
    found: Found | None = None
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            found = Found(np.asarray(data["hidden"], np.int64), int(data["by_cosine"]), int(data["by_phash_only"]),
                          int(data["phash_checked"]))
        except (OSError, ValueError, KeyError, TypeError):
            found = None  # a damaged cache entry is recomputed
    if found is None:
        from xm.encoders import load_encoder

        enc = load_encoder(encoder, precision=precision)
        memory.check_encoder(enc, "coarse")
        features, hashes = _test_side(items, enc, batch_size)
        found = find_near_duplicates(memory, features, hashes, encoder, settings, use_cosine)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"hidden": found.hidden.tolist(), "by_cosine": found.by_cosine,
                                       "by_phash_only": found.by_phash_only, "phash_checked": found.phash_checked}))
    report = {"encoder": encoder,
              "threshold": settings.threshold if use_cosine else None,
              "cosine": "applied" if use_cosine else f"skipped: {encoder} has random weights, its cosine measures no similarity",
              "probe_k": settings.probe_k, "phash_k": settings.phash_k, "hidden": int(len(found.hidden)),
              "by_cosine": found.by_cosine, "by_phash_only": found.by_phash_only, "phash_checked": found.phash_checked,
              "hidden_ids": found.hidden[:50].tolist()}
    return found, report


def against_datasets(memory: Memory, tests: Sequence[DatasetSplit], settings: Decontamination, precision: Precision,
                     cache_dir: Path, batch_size: int = 32) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The memory ids that are near-duplicates of any image of the test splits `tests` (the
    union, sorted) and one record per split (dataset, split, images, how many found): what
    `xm train reco --decontaminate-against` hides from RECO's tables and training pairs."""
    hidden: list[np.ndarray] = [np.zeros(0, np.int64)]
    records = []
    for ds in tests:
        found, report = near_duplicates(memory, settings, ds.items, precision, cache_dir, batch_size)
        hidden.append(found.hidden)
        records.append({"dataset": ds.dataset, "split": ds.split, "images": len(ds.items), "memory": memory.id,
                        **{k: v for k, v in report.items() if k != "hidden_ids"}})
    return np.unique(np.concatenate(hidden)).astype(np.int64), records


def splits_named(values: Sequence[str], flag: str = "--decontaminate-against") -> list[DatasetSplit]:
    """The test splits `values` name, each `DATASET` (found as `xm benchmark` finds it: $XM_DATA/<dataset>,
    then $XM_HOME/data/<dataset>) or `DATASET=FOLDER`; one line for a name or folder that is not there."""
    from xm.evaluation.datasets import load_dataset
    from xm.indexes import home

    out = []
    for value in values:
        name, _, folder = str(value).partition("=")
        name = name.strip()
        if not name:
            raise XMError(f"{flag} {value!r}: expected DATASET or DATASET=FOLDER")
        data_dir = home.find_dataset(name, Path(folder) if folder else None)
        out.append(load_dataset(name, data_dir, "test"))
    return out


def hidden_for_training(memory: Memory, pairs: Memory | None, tests: Sequence[DatasetSplit], settings: Decontamination,
                        precision: Precision, cache_dir: Path) -> Any:
    """What `xm train reco --decontaminate-against` hides (`xm.training.reco.Hidden`): the memory's
    near-duplicates of the test images, from its tables; the training pairs' own (the same ids
    when the pairs are the memory's), from training."""
    from xm.training.reco import Hidden

    memory_ids, records = against_datasets(memory, tests, settings, precision, cache_dir)
    pair_ids = memory_ids
    if pairs is not None and pairs.items_id != memory.items_id:
        pair_ids, pair_records = against_datasets(pairs, tests, settings, precision, cache_dir)
        records += [{**r, "of": "training pairs"} for r in pair_records]
    return Hidden(memory_ids, pair_ids, tuple(records))
