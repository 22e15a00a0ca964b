"""RECO training: neighbour tables, the loss, the training loop, writing checkpoints.

RECO (METHODS.md section 2) refines a frozen CLIP's embeddings with what a memory of
image-text pairs holds: an image's k nearest memory IMAGES contribute their TEXT
embeddings, a text's k nearest memory TEXTS contribute their IMAGE embeddings, and a
one-layer transformer per branch fuses [query; k retrieved] into the refined embedding.
Every choice the paper leaves open is made here and listed in docs/reco.md; the ones a
reader most needs are in the docstrings below (near-duplicate rule: `NeighbourRule`,
the loss: `reco_loss`) and in methods/reco_model.py (the token read: `Fusion`, the
temperature: `RecoModel`), where the model lives beside the method that runs it.

Files in the output folder (default `<index>/trained/reco/<encoder slug>/`):

    neighbours-image.npy   int64 (N, k): memory ids of each training pair's image->image
                           neighbours (-1 = none), excluded items removed
    neighbours-text.npy    the same for text->text
    neighbours.json        what the tables were computed for (`key`) and rows done, so an
                           interrupted computation resumes and other settings recompute
    reco.safetensors       the fusion weights (image.*, text.*, logit_scale)
    reco-optim.safetensors AdamW moments, for resuming
    reco.json              settings, ties (index id, encoder, weights fingerprint), the
                           weights' sha256, epochs done, losses; written last, so a
                           checkpoint is the pair whose digest matches

Training reads precomputed embeddings only (memory-mapped float16 parts); it never
decodes an image nor loads the CLIP model.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xm.encoders.device import CPU, Device, is_out_of_memory, out_of_memory
from xm.errors import XMError
from xm.indexes.records import EncoderEntry
from xm.memories.filtered import FilteredMemory
from xm.methods.reco_model import FORMAT, META, WEIGHTS, RecoModel, build_model, default_dir
from xm.training.exact_knn import DeviceBlocks, exact_knn
from xm.training.neighbours_option import Neighbours

OPTIM = "reco-optim.safetensors"
TABLES_META = "neighbours.json"
MODALITIES = ("image", "text")
# the near-duplicate rule refuses a threshold that more than this share of random
# memory image pairs exceed (the space is too concentrated for it, e.g. random weights)
MAX_RANDOM_DUP_SHARE = 0.01
RULE_VERSION = 1

Progress = Callable[[str, "int | None"], Callable[[int], None]]


def _no_progress(label: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


# ------------------------------------------------------------------------ the loss
# (the model itself, and applying it, live beside the method: methods/reco_model.py)

def nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between rows of a and b (matching rows are the positives), the mean
    of both directions' cross-entropy, as CLIP computes it."""
    logits = scale * a @ b.T
    labels = torch.arange(len(a), device=a.device)
    f = torch.nn.functional.cross_entropy
    return (f(logits, labels) + f(logits.T, labels)) / 2


def reco_loss(model: RecoModel, v: torch.Tensor, t: torch.Tensor, v_nb: torch.Tensor, v_valid: torch.Tensor,
              t_nb: torch.Tensor, t_valid: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """L = NCE(V', T') + NCE(V', T) + NCE(V, T'), primes refined (paper eq. 2), one shared
    learned temperature. v, t: the pair's original embeddings (B, d); v_nb: the TEXT
    embeddings of v's image->image neighbours (B, k, d); t_nb: the IMAGE embeddings of
    t's text->text neighbours."""
    v_ref = model.image(v, v_nb, v_valid)
    t_ref = model.text(t, t_nb, t_valid)
    s = model.logit_scale.exp()
    parts = (nce(v_ref, t_ref, s), nce(v_ref, t, s), nce(v, t_ref, s))
    return parts[0] + parts[1] + parts[2], parts


# --------------------------------------------------------------- neighbour tables

@dataclass(frozen=True)
class NeighbourRule:
    """Which memory items a training pair may not retrieve.

    Pair i may not retrieve memory item j (in either table) when
      * j IS the pair: the pairs come from the memory itself and j == i (same global id
        of the same index id);
      * j's image is a near-duplicate of the pair's image: cos(v_i, v_j) >= dup_threshold,
        computed exactly from the stored embeddings (so the same photo re-posted with
        another caption cannot hand its caption to the image branch, nor its image to
        the text branch). Default 0.95 (a near-copy under a trained CLIP ViT-B/32);
        a threshold above 1 turns the check off;
      * only with `exclude_same_caption`: j's caption hash equals the pair's. Off by
        default: an identical caption is not by itself a duplicate; where many items share
        one (class-prompt captions, stock captions), it is the shared concept, and excluding
        it would train the fusion only on neighbours whose captions never match its own.
    The remaining candidates keep the index's order (similarity); the first k are kept, and
    rows short of k after exclusion are searched again with more candidates.
    """

    dup_threshold: float = 0.95
    exclude_same_caption: bool = False


def tables_key(memory: Any, pairs: Any, spec: str, k: int, rule: NeighbourRule, search: str = "index",
               hidden: Hidden | None = None) -> dict[str, Any]:
    """What the tables depend on. `search` and `hidden` are absent from the key when they have
    their former meaning (the index search, nothing hidden), so tables computed before they
    existed are kept."""
    key = {"format": FORMAT, "rule_version": RULE_VERSION, "memory": memory.id, "pairs": pairs.id,
           "encoder": str(spec), "k": int(k), "pairs_count": int(pairs.count), "memory_count": int(memory.count),
           **asdict(rule)}
    if search != "index":
        key["search"] = search
    if hidden is not None and hidden.any:
        key["hidden"] = hidden.digest()
    return key


@dataclass(frozen=True, eq=False)
class Hidden:
    """Items a training run may neither retrieve nor train on: near-duplicates of test images
    (`xm train reco --decontaminate-against DATASET`), found by the benchmark's own code
    (`xm.evaluation.decontaminate.against_datasets`) at the edge that parses the option.

    `memory`: memory ids no table may hold; `pairs`: training pairs left out (their table rows
    stay -1 and no step reads them; the same ids when the pairs are the memory's own);
    `datasets`: per dataset what was searched and how many were found (recorded as it is)."""

    memory: np.ndarray
    pairs: np.ndarray
    datasets: tuple[dict[str, Any], ...] = ()

    @property
    def any(self) -> bool:
        return bool(len(self.memory) or len(self.pairs))

    def digest(self) -> str:
        import hashlib

        h = hashlib.sha256(np.asarray(self.memory, np.int64).tobytes())
        h.update(b"|" + np.asarray(self.pairs, np.int64).tobytes())
        return h.hexdigest()[:20]

    def record(self) -> dict[str, Any]:
        """What the checkpoint says of it (`reco.json`'s `decontamination`): the datasets, the
        counts and the memory ids themselves, which `xm benchmark` compares with the ids its run hides."""
        return {"datasets": list(self.datasets), "hidden_memory": int(len(self.memory)), "hidden_pairs": int(len(self.pairs)),
                "digest": self.digest(), "memory_ids": np.asarray(self.memory, np.int64).tolist()}


def check_dup_threshold(memory: Any, spec: str, rule: NeighbourRule, seed: int = 0, samples: int = 4000) -> float:
    """The share of random memory image pairs at or above the threshold; refuse in one line
    a threshold that marks more than 1% of them near-duplicates."""
    if rule.dup_threshold > 1 or memory.count < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, memory.count, (2, samples))
    keep = a != b
    emb = memory.embeddings(spec, "image")
    sims = np.einsum("nd,nd->n", emb.gather(a[keep]), emb.gather(b[keep]))
    share = float((sims >= rule.dup_threshold).mean()) if len(sims) else 0.0
    if share > MAX_RANDOM_DUP_SHARE:
        raise XMError(f"--dup-threshold {rule.dup_threshold:g}: {share:.0%} of random image pairs of {memory.root} "
                      f"under {spec} are that similar (median {np.median(sims):.3f}), so it would exclude ordinary "
                      f"neighbours as near-duplicates; pass a higher --dup-threshold (above 1: the item itself only)")
    return share


def _filter(ids: np.ndarray, rows: np.ndarray, pair_img: np.ndarray, pair_hash: np.ndarray | None,
            mem_img: Any, mem_hash: np.ndarray | None, same_index: bool, rule: NeighbourRule) -> np.ndarray:
    """Candidates (n, f) with excluded ones set to -1."""
    ids = ids.copy()
    bad = ids < 0
    if same_index:
        bad |= ids == rows[:, None]
    if rule.dup_threshold <= 1:
        safe = np.where(bad, 0, ids)
        cand = mem_img.gather(safe.ravel()).reshape(*ids.shape, -1)
        bad |= np.einsum("nfd,nd->nf", cand, pair_img) >= rule.dup_threshold
    if rule.exclude_same_caption and pair_hash is not None and mem_hash is not None:
        bad |= mem_hash[np.where(bad, 0, ids)] == pair_hash[:, None]
    ids[bad] = -1
    return ids


def _first_k(ids: np.ndarray, k: int) -> np.ndarray:
    """The first k non-negative entries of each row, in order, padded with -1."""
    out = np.full((len(ids), k), -1, np.int64)
    valid = ids >= 0
    rank = np.cumsum(valid, axis=1) - 1
    take = valid & (rank < k)
    r, c = np.nonzero(take)
    out[r, rank[r, c]] = ids[r, c]
    return out


def neighbours_for(memory: Any, pairs: Any, spec: str, modality: str, rows: np.ndarray, k: int,
                   rule: NeighbourRule, max_fetch: int = 4096) -> np.ndarray:
    """Table rows for training pairs `rows`: the first k allowed neighbours by `modality` search
    of the memory's index (a memory hiding items, `FilteredMemory`, never returns them)."""
    same_index = pairs.items_id == memory.items_id
    queries = pairs.embeddings(spec, modality).gather(rows)
    pair_img = queries if modality == "image" else pairs.embeddings(spec, "image").gather(rows)
    mem_img = memory.embeddings(spec, "image")
    pair_hash = mem_hash = None
    if rule.exclude_same_caption:
        pair_hash = np.asarray(pairs.caption_hashes)[rows]
        mem_hash = np.asarray(memory.caption_hashes)
    out = np.full((len(rows), k), -1, np.int64)
    todo = np.arange(len(rows))
    fetch = min(memory.count, 2 * k + 1)
    while len(todo):
        _, ids = memory.search(modality, queries[todo], fetch, encoder=spec)
        kept = _first_k(_filter(ids, rows[todo], pair_img[todo], pair_hash[todo] if pair_hash is not None else None,
                                mem_img, mem_hash, same_index, rule), k)
        out[todo] = kept
        short = (kept < 0).any(axis=1)
        if fetch >= min(memory.count, max_fetch):
            break  # what is left short has fewer than k allowed neighbours within reach
        todo = todo[short]
        fetch = min(memory.count, max_fetch, fetch * 4)
    return out


@dataclass
class ExactMemory:
    """The memory as the exact search of one table reads it, on the device, made once per table
    (not per chunk of pairs): its `modality` embeddings in blocks, its image embeddings for the
    text table's near-duplicate check, the hidden items as a mask and the caption hashes."""

    blocks: DeviceBlocks
    image_blocks: DeviceBlocks | None = None
    hidden: torch.Tensor | None = None  # bool (count,): never returned
    hashes: torch.Tensor | None = None  # int64 (count,): with exclude_same_caption

    @classmethod
    def of(cls, memory: Any, spec: str, modality: str, rule: NeighbourRule, device: Device,
           hidden: np.ndarray | None, image_blocks: DeviceBlocks | None = None) -> ExactMemory:
        where = device.torch
        blocks = DeviceBlocks(memory.embeddings(spec, modality), memory.count, device)
        if modality == "image":
            image_blocks = blocks
        elif rule.dup_threshold <= 1 and image_blocks is None:
            image_blocks = DeviceBlocks(memory.embeddings(spec, "image"), memory.count, device)
        mask = None
        if hidden is not None and len(hidden):
            m = np.zeros(memory.count, bool)
            m[hidden] = True
            mask = torch.from_numpy(m).to(where)
        hashes = None
        if rule.exclude_same_caption:
            hashes = torch.from_numpy(np.asarray(memory.caption_hashes[np.arange(memory.count)], np.int64)).to(where)
        return cls(blocks, image_blocks if rule.dup_threshold <= 1 else None, mask, hashes)


def exact_neighbours_for(memory: Any, pairs: Any, spec: str, modality: str, rows: np.ndarray, k: int,
                         rule: NeighbourRule, exact: ExactMemory) -> np.ndarray:
    """Table rows for training pairs `rows`: the first k allowed neighbours by an exact search of
    every stored `modality` embedding on the device (`training/exact_knn.py`). The rule and the
    hidden items are applied inside the search, so no row comes out short while the memory has
    k allowed items; ties are ordered by id."""
    where = exact.blocks.device.torch
    same_index = pairs.items_id == memory.items_id
    queries = pairs.embeddings(spec, modality).gather(rows)
    check_dups = rule.dup_threshold <= 1
    pair_img = None
    if check_dups and modality == "text":
        pair_img = torch.from_numpy(pairs.embeddings(spec, "image").gather(rows)).to(where)
    own = torch.from_numpy(np.asarray(rows, np.int64)).to(where)[:, None]
    pair_hash = None
    if exact.hashes is not None:
        pair_hash = torch.from_numpy(np.asarray(pairs.caption_hashes[rows], np.int64)).to(where)[:, None]

    def exclude(lo: int, hi: int, sims: torch.Tensor) -> torch.Tensor | None:
        bad: torch.Tensor | None = None

        def add(b: torch.Tensor) -> None:
            nonlocal bad
            bad = b if bad is None else bad | b

        if same_index and bool(((own >= lo) & (own < hi)).any()):
            add(own == torch.arange(lo, hi, device=where)[None, :])
        if check_dups:
            if modality == "image":
                add(sims >= rule.dup_threshold)  # the query is the pair's image: sims are the image cosines
            else:
                assert exact.image_blocks is not None and pair_img is not None
                add((pair_img @ exact.image_blocks.block(lo).T) >= rule.dup_threshold)
        if exact.hashes is not None and pair_hash is not None:
            add(exact.hashes[lo:hi][None, :] == pair_hash)
        if exact.hidden is not None:
            add(exact.hidden[lo:hi][None, :].expand(len(sims), -1))
        return bad

    _, ids = exact_knn(queries, exact.blocks, k, exclude)
    return ids


def _exact_in_halves(memory: Any, pairs: Any, spec: str, modality: str, rows: np.ndarray, k: int, rule: NeighbourRule,
                     exact: ExactMemory) -> np.ndarray:
    """`exact_neighbours_for`, its rows split in halves while the device runs out of memory
    (the similarities of a chunk of pairs against a block take chunk x block floats): the same
    answer, in smaller steps; one line where a single pair does not fit."""
    try:
        return exact_neighbours_for(memory, pairs, spec, modality, rows, k, rule, exact)
    except Exception as exc:
        if not is_out_of_memory(exc) or len(rows) == 1:
            if is_out_of_memory(exc):
                raise XMError(f"{exact.blocks.device.torch}: out of memory searching one pair against a block of "
                              f"{exact.blocks.rows} memory rows; use --neighbours index or another --device") from exc
            raise
    half = len(rows) // 2
    return np.concatenate([_exact_in_halves(memory, pairs, spec, modality, part, k, rule, exact)
                           for part in (rows[:half], rows[half:])])


def build_tables(memory: Any, pairs: Any, spec: str, k: int, rule: NeighbourRule, folder: Path,
                 progress: Progress = _no_progress, chunk: int = 2048, search: str = "index",
                 device: Device | None = None, hidden: Hidden | None = None) -> dict[str, np.ndarray]:
    """Both neighbour tables, computed once into `folder` and resumed where they stopped.

    `search`: `index` (the memory's kNN index, approximate where it is) or `exact` (every stored
    embedding, on `device`; `training/exact_knn.py`). `hidden`: memory items no row may hold
    and training pairs whose rows stay -1 (decontamination).

    Rows are done in chunks; after each, the partial table is flushed and `neighbours.json`
    records the rows done (written atomically), so a killed run recomputes at most one
    chunk. Tables for other settings (`tables_key`) are recomputed.
    """
    from xm.indexes.layout import write_json

    if search not in ("index", "exact"):
        raise ValueError(f"search {search!r}: index or exact")
    folder.mkdir(parents=True, exist_ok=True)
    device = device or CPU
    key = tables_key(memory, pairs, spec, k, rule, search, hidden)
    hide_memory = hidden.memory if hidden is not None and len(hidden.memory) else None
    hide_pairs = np.zeros(pairs.count, bool)
    if hidden is not None and len(hidden.pairs):
        hide_pairs[hidden.pairs] = True
    searched = FilteredMemory(memory, hide_memory) if hide_memory is not None and search == "index" else memory
    meta_file = folder / TABLES_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    if meta is None or meta.get("key") != key:
        for m in MODALITIES:
            for f in (folder / f"neighbours-{m}.npy", folder / f"neighbours-{m}.partial.npy"):
                f.unlink(missing_ok=True)
        meta = {"key": key, "rows_done": {m: 0 for m in MODALITIES}, "complete": {m: False for m in MODALITIES},
                "seconds": {m: 0.0 for m in MODALITIES}, "search": search,
                "device": str(device) if search == "exact" else "cpu (the memory's index)",
                "hidden": hidden.record() if hidden is not None and hidden.any else None}
        write_json(meta_file, meta)
    n = pairs.count
    tables: dict[str, np.ndarray] = {}
    image_blocks = None
    for m in MODALITIES:
        final, partial = folder / f"neighbours-{m}.npy", folder / f"neighbours-{m}.partial.npy"
        tick = progress(f"neighbours {m}->{m}", n)
        if meta["complete"][m] and final.is_file():
            tick(n)
            tables[m] = np.load(final)
            continue
        start = int(meta["rows_done"][m]) if partial.is_file() else 0
        if partial.is_file():
            table = np.lib.format.open_memmap(partial, mode="r+")
        else:
            table = np.lib.format.open_memmap(partial, mode="w+", dtype=np.int64, shape=(n, k))
            table[:] = -1
        tick(start)
        exact = None
        if search == "exact" and start < n:
            exact = ExactMemory.of(memory, spec, m, rule, device, hide_memory, image_blocks)
            image_blocks = exact.image_blocks  # the text table's check reads the image blocks kept on the device
        for lo in range(start, n, chunk):
            t0 = time.perf_counter()
            hi = min(n, lo + chunk)
            rows = np.arange(lo, hi)
            rows = rows[~hide_pairs[rows]]  # a hidden pair's row stays -1: nothing is searched for it
            out = np.full((hi - lo, k), -1, np.int64)
            if len(rows):
                if exact is not None:
                    found = _exact_in_halves(memory, pairs, spec, m, rows, k, rule, exact)
                else:
                    found = neighbours_for(searched, pairs, spec, m, rows, k, rule)
                out[rows - lo] = found
            table[lo:hi] = out
            table.flush()
            meta["rows_done"][m] = hi
            meta["seconds"][m] = float(meta["seconds"][m]) + time.perf_counter() - t0
            write_json(meta_file, meta)
            tick(hi - lo)
        del table
        exact = None
        os.replace(partial, final)
        meta["complete"][m] = True
        write_json(meta_file, meta)
        tables[m] = np.load(final)
    return tables


# --------------------------------------------------------------------- checkpoints

def _sha256(path: Path) -> str:
    from xm.indexes.layout import sha256_file

    return sha256_file(path)


def save_checkpoint(folder: Path, model: RecoModel, optimizer: torch.optim.Optimizer | None, meta: dict[str, Any]) -> dict[str, Any]:
    """Weights and optimizer state (each written atomically), then the JSON naming their
    digests, written last: a reader never pairs a JSON with other weights."""
    from safetensors.torch import save_file

    from xm.indexes.layout import atomic_path, write_json

    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # CPU-readable from any device
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"format": FORMAT})
    if optimizer is not None:
        state = {}
        for name, p in model.named_parameters():
            s = optimizer.state.get(p)
            if s:
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    state[f"{name}|{key}"] = torch.as_tensor(s[key]).detach().cpu().clone().contiguous()
        with atomic_path(folder / OPTIM) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        meta["optim_sha256"] = _sha256(folder / OPTIM)
    meta["weights_sha256"] = _sha256(folder / WEIGHTS)
    write_json(folder / META, meta)
    return meta


def _load_optimizer(folder: Path, model: RecoModel, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    path = folder / OPTIM
    if not path.is_file() or _sha256(path) != meta.get("optim_sha256"):
        raise XMError(f"{path}: missing or not the optimizer state {META} records; pass --restart to train afresh")
    state = load_file(str(path))
    for name, p in model.named_parameters():
        if f"{name}|step" in state:
            # the moments where the parameter is (a run resumed on another device); AdamW keeps `step` on the CPU
            optimizer.state[p] = {"step": state[f"{name}|step"],
                                  **{key: state[f"{name}|{key}"].to(p.device) for key in ("exp_avg", "exp_avg_sq")}}


# ------------------------------------------------------------------------ training

@dataclass
class TrainConfig:
    index: str | Path
    encoder: str = ""  # default: the index's coarse role
    k: int = 10
    epochs: int = 10
    batch_size: int | None = None  # None: `default_batch_size(pairs)`; capped by the number of training pairs
    lr: float = 1e-3
    weight_decay: float = 1e-5
    pairs: str | Path | None = None  # another index's (image, caption) pairs; default the memory's own
    out: str | Path | None = None  # default `default_dir(memory, encoder)`
    seed: int = 0
    dup_threshold: float = 0.95
    exclude_same_caption: bool = False
    heads: int = 0  # 0: width // 64
    mlp_ratio: float = 1.0  # 1.0 gives the paper's 3.16M parameters at d = 512
    restart: bool = False  # discard a checkpoint trained with other settings (tables are kept when they fit)
    device: Device | str | None = None  # where the model trains (None: auto), parsed by train_reco; not in the key
    # how the neighbour tables are searched (`training/exact_knn.py`): auto is exact on an accelerator
    neighbours: Neighbours | str = "auto"
    hidden: Hidden | None = None  # decontamination: items neither retrieved nor trained on (`Hidden`)


@dataclass
class TrainSummary:
    out: str
    checkpoint: str
    encoder: str
    pairs: int
    memory: int
    parameters: int
    epochs_done: int
    steps: int
    resumed_from_epoch: int
    losses: list[float] = field(default_factory=list)
    pairs_per_s: float | None = None
    table_seconds: dict[str, float] = field(default_factory=dict)
    short_rows: dict[str, int] = field(default_factory=dict)  # pairs with fewer than k allowed neighbours
    peak_rss_mb: float = 0.0
    already_done: bool = False
    batch_size: int = 0  # the batch the run used (derived from the pairs unless --batch-size was given)
    batch_derived: bool = False
    device: str = "cpu"  # where it trained (`Device.describe`), and under which autocast
    neighbours: str = "index"  # how the tables were searched: exact (on the device) or index
    pairs_hidden: int = 0  # training pairs left out as near-duplicates of test images
    memory_hidden: int = 0  # memory items no table holds, for the same reason


# The default batch: the paper's 4096 where the pairs allow it, else small enough that an epoch
# is at least MIN_STEPS_PER_EPOCH optimiser steps. A fixed 4096 gives a 1,500-pair memory one
# step per epoch (10 in all), which learns nothing (reco 0.12 against clip 0.09 on held-out
# images); 8 steps per epoch (80 in all) trains it (tests/test_reco_defaults.py).
MAX_BATCH = 4096
MIN_BATCH = 32
MIN_STEPS_PER_EPOCH = 8


def default_batch_size(pairs: int) -> int:
    """The largest power of two from MIN_BATCH to MAX_BATCH with at least MIN_STEPS_PER_EPOCH
    steps per epoch over `pairs` (MIN_BATCH below 256 pairs), capped by `pairs`."""
    batch = MAX_BATCH
    while batch > MIN_BATCH and batch * MIN_STEPS_PER_EPOCH > pairs:
        batch //= 2
    return max(2, min(batch, pairs))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _require(index: Any, spec: str, what: str, search: str = "index") -> EncoderEntry:
    """The index's entry for encoder `spec`, refused unless it holds what RECO needs as `what`
    (an exact search of the tables reads the embeddings, not the kNN indexes)."""
    entry: EncoderEntry | None = index.encoder_entry(spec)
    if entry is None:
        raise XMError(f"{index.root}: no encoder {spec} in this index ({what}); it has {', '.join(index.manifest.encoders)}")
    for m in MODALITIES:
        if not index.has_embeddings(spec, m):
            raise XMError(f"{index.root}: RECO {what} needs {spec} {m} embeddings; add them with "
                          f"`xm build-index --out {index.root} --add-encoder {spec}={m}`")
    if what == "memory" and search == "index":
        for m in MODALITIES:
            if not index.has_index(spec, m):
                raise XMError(f"{index.root}: RECO needs a {m} kNN index for {spec}; add it with "
                              f"`xm build-index --out {index.root} --add-encoder {spec}=index-{m}`")
    return entry


def lr_at(step: int, total: int, lr: float) -> float:
    """Cosine decay from `lr` to 0 over all steps, no warm-up (the paper states none)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def train_key(cfg: TrainConfig, memory: Any, pairs: Any, spec: str, batch: int, dim: int, heads: int,
              search: str = "index") -> dict[str, Any]:
    return {"memory": memory.id, "pairs": pairs.id, "encoder": spec, "k": cfg.k, "epochs": cfg.epochs, "batch_size": batch,
            "lr": cfg.lr, "weight_decay": cfg.weight_decay, "seed": cfg.seed, "dim": dim, "heads": heads,
            "mlp_ratio": cfg.mlp_ratio, "dup_threshold": cfg.dup_threshold, "exclude_same_caption": cfg.exclude_same_caption,
            "neighbours": search, "hidden": cfg.hidden.digest() if cfg.hidden is not None and cfg.hidden.any else None}


# what a key written before a field existed meant by its absence
_KEY_DEFAULTS = {"neighbours": "index", "hidden": None}


def _same_key(old: dict[str, Any] | None, key: dict[str, Any]) -> bool:
    return old is not None and {**_KEY_DEFAULTS, **old} == key


def _optimizer(model: RecoModel, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices only (biases, LayerNorm gains and the logit scale
    are not decayed, as in CLIP)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def train_reco(cfg: TrainConfig, progress: Progress = _no_progress,
               on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainSummary:
    """Train (or resume) RECO's fusion model on an index; see the module docstring.

    Resume semantics: a checkpoint is written after every epoch; re-running with the same
    settings continues after the last finished epoch (a partly done epoch is redone from its
    start: the order of an epoch is a function of (seed, epoch), so the result is the same
    as an uninterrupted run's); a finished run is left as it is. Other settings in the same
    folder are refused unless `restart`.
    """
    from xm.memories import open_index

    device = Device.parse(cfg.device).single("xm train reco")  # the training API's edge
    search = Neighbours.parse(cfg.neighbours).resolve(device)
    memory = open_index(cfg.index)
    spec = str(cfg.encoder or memory.roles.get("coarse") or "")
    if not spec:
        raise XMError(f"{memory.root}: no coarse encoder in this index; give --encoder")
    probe = _require(memory, spec, "memory", search).probe
    pairs = open_index(cfg.pairs) if cfg.pairs else memory
    theirs = _require(pairs, spec, "training pairs").probe
    # a null probe (embeddings that came precomputed, the encoder never loaded) cannot be compared
    if pairs is not memory and probe is not None and theirs is not None and not np.allclose(theirs, probe, atol=2e-3):
        raise XMError(f"{pairs.root}: its {spec} embeddings come from other weights than {memory.root}'s")
    if cfg.k < 1 or cfg.epochs < 1 or (cfg.batch_size is not None and cfg.batch_size < 2):
        raise XMError(f"xm train reco: --k, --epochs must be at least 1 and --batch-size at least 2 "
                      f"(got {cfg.k}, {cfg.epochs}, {cfg.batch_size})")
    if pairs.count < 2:
        raise XMError(f"{pairs.root}: {pairs.count} training pair(s); contrastive training needs at least 2")
    out = Path(cfg.out) if cfg.out else default_dir(memory, spec)
    rule = NeighbourRule(cfg.dup_threshold, cfg.exclude_same_caption)
    hidden = cfg.hidden
    if hidden is not None:
        for ids, holder in ((hidden.memory, memory), (hidden.pairs, pairs)):
            if len(ids) and (int(np.min(ids)) < 0 or int(np.max(ids)) >= holder.count):
                raise XMError(f"{holder.root}: hidden ids must lie in 0..{holder.count - 1}")
    # the pairs trained on: all but those hidden as near-duplicates of test images
    train_rows = np.setdiff1d(np.arange(pairs.count), hidden.pairs if hidden is not None else [])
    n = len(train_rows)
    if n < 2:
        raise XMError(f"{pairs.root}: {n} training pair(s) left after decontamination; contrastive training needs at least 2")
    dim = memory.embeddings(spec, "image").dim
    heads = cfg.heads or max(1, dim // 64)
    batch = min(cfg.batch_size, n) if cfg.batch_size is not None else default_batch_size(n)
    key = train_key(cfg, memory, pairs, spec, batch, dim, heads, search)
    steps_per_epoch = math.ceil(n / batch)
    total_steps = steps_per_epoch * cfg.epochs

    meta = json.loads((out / META).read_text()) if (out / META).is_file() else None
    if meta is not None and not _same_key(meta.get("train_key"), key):
        if not cfg.restart:
            old = meta.get("train_key") or {}
            old = {**_KEY_DEFAULTS, **old}
            diff = ", ".join(f"{k}={old.get(k)!r} (now {v!r})" for k, v in key.items() if old.get(k) != v)
            raise XMError(f"{out / META}: a RECO checkpoint trained with other settings ({diff}); "
                          f"pass --restart to replace it, or --out for another folder")
        for f in (WEIGHTS, OPTIM, META):
            (out / f).unlink(missing_ok=True)
        meta = None
    if meta is not None and meta.get("complete"):
        return TrainSummary(str(out), str(out / WEIGHTS), spec, n, memory.count, int(meta["parameters"]),
                            int(meta["epochs_done"]), int(meta["steps"]), int(meta["epochs_done"]), list(meta["losses"]),
                            meta.get("pairs_per_s"), meta.get("table_seconds", {}), meta.get("short_rows", {}),
                            peak_rss_mb(), already_done=True, batch_size=batch, batch_derived=cfg.batch_size is None,
                            neighbours=search, pairs_hidden=pairs.count - n, memory_hidden=len(hidden.memory) if hidden else 0)

    check_dup_threshold(memory, spec, rule, cfg.seed)
    tables = build_tables(memory, pairs, spec, cfg.k, rule, out, progress, search=search, device=device, hidden=hidden)
    tmeta = json.loads((out / TABLES_META).read_text())
    short = {m: int((tables[m][train_rows] < 0).any(axis=1).sum()) for m in MODALITIES}

    torch.manual_seed(cfg.seed)
    model = build_model(dim, heads, cfg.mlp_ratio).to(device.torch)  # initialised on the CPU: the same on every device
    optimizer = _optimizer(model, cfg.lr, cfg.weight_decay)
    amp = Amp(device)
    start_epoch, losses, step = 0, [], 0
    if meta is not None:
        from safetensors.torch import load_file

        if _sha256(out / WEIGHTS) != meta.get("weights_sha256"):
            raise XMError(f"{out / WEIGHTS}: does not match {META}; pass --restart to train afresh")
        model.load_state_dict(load_file(str(out / WEIGHTS)))
        _load_optimizer(out, model, optimizer, meta)
        start_epoch, losses, step = int(meta["epochs_done"]), list(meta["losses"]), int(meta["steps"])

    pv, pt = pairs.embeddings(spec, "image"), pairs.embeddings(spec, "text")
    mv, mt = memory.embeddings(spec, "image"), memory.embeddings(spec, "text")
    k = cfg.k
    rate_pairs, rate_secs = 0, 0.0
    tick = progress(f"train reco ({cfg.epochs} epochs)", n * cfg.epochs)
    tick(n * start_epoch)
    model.train()
    where = device.torch

    def on_device(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(where, non_blocking=True)

    for epoch in range(start_epoch, cfg.epochs):
        order = train_rows[np.random.default_rng([cfg.seed, epoch]).permutation(n)]
        epoch_loss, seen = 0.0, 0
        for b in range(steps_per_epoch):
            t0 = time.perf_counter()
            rows = np.sort(order[b * batch:(b + 1) * batch])
            if len(rows) < 2:
                continue
            img_ids, txt_ids = tables["image"][rows], tables["text"][rows]
            v = on_device(pv.gather(rows))
            t = on_device(pt.gather(rows))
            v_nb = on_device(mt.gather(np.maximum(img_ids, 0).ravel()).reshape(len(rows), k, dim))
            t_nb = on_device(mv.gather(np.maximum(txt_ids, 0).ravel()).reshape(len(rows), k, dim))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg.lr)
            with out_of_memory(where), amp.autocast():
                loss, parts = reco_loss(model, v, t, v_nb, on_device(img_ids >= 0), t_nb, on_device(txt_ids >= 0))
            optimizer.zero_grad(set_to_none=True)
            with out_of_memory(where):
                amp.step(loss, optimizer)
            model.clamp_()
            step += 1
            dt = time.perf_counter() - t0
            rate_pairs, rate_secs = rate_pairs + len(rows), rate_secs + dt
            epoch_loss += float(loss.detach()) * len(rows)
            seen += len(rows)
            tick(len(rows))
            if on_step is not None:
                on_step({"epoch": epoch, "step": step, "steps": total_steps, "loss": float(loss.detach()),
                         "parts": [float(p.detach()) for p in parts], "pairs_per_s": len(rows) / dt if dt > 0 else None,
                         "logit_scale": float(model.logit_scale.detach().exp())})
        losses.append(epoch_loss / max(1, seen))
        meta = {"format": FORMAT, "method": "reco", "train_key": key, "index_id": memory.id, "index_root": str(memory.root),
                "pairs_id": pairs.id, "encoder": spec, "probe": probe, "dim": dim, "heads": heads, "mlp_ratio": cfg.mlp_ratio,
                "k": cfg.k, "rule": asdict(rule), "parameters": model.parameter_count(), "epochs": cfg.epochs,
                "epochs_done": epoch + 1, "steps": step, "losses": losses, "complete": epoch + 1 == cfg.epochs,
                "logit_scale": float(model.logit_scale.detach().exp()),
                "pairs_per_s": (rate_pairs / rate_secs) if rate_secs else None,
                "table_seconds": tmeta.get("seconds", {}), "short_rows": short,
                "tables": {m: f"neighbours-{m}.npy" for m in MODALITIES},
                "neighbours": {"search": search, "asked": Neighbours.parse(cfg.neighbours).asked,
                               "device": tmeta.get("device", "cpu (the memory's index)")},
                "pairs_trained": n,
                "decontamination": hidden.record() if hidden is not None and hidden.any else None,
                "device": str(device), "amp": amp.name}
        save_checkpoint(out, model, optimizer, meta)
    return TrainSummary(str(out), str(out / WEIGHTS), spec, n, memory.count, model.parameter_count(), cfg.epochs, step,
                        start_epoch, losses, (rate_pairs / rate_secs) if rate_secs else None, tmeta.get("seconds", {}),
                        short, peak_rss_mb(), batch_size=batch, batch_derived=cfg.batch_size is None,
                        device=f"{device.describe()}, autocast {amp.name}", neighbours=search,
                        pairs_hidden=pairs.count - n, memory_hidden=len(hidden.memory) if hidden else 0)


class Amp:
    """Mixed precision for training on an accelerator: bf16 autocast where the GPU has it (no loss
    scaling needed), else fp16 autocast with a gradient scaler; none on the CPU, whose results
    stay those of fp32 training."""

    def __init__(self, device: Device) -> None:
        self.dtype: torch.dtype | None = None
        self.scaler: Any = None
        if device.kind == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if self.dtype == torch.float16:
                self.scaler = torch.amp.GradScaler("cuda")
        elif device.kind == "mps":
            self.dtype = torch.float16
        self.kind = device.kind
        self.name = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> Any:
        import contextlib

        return torch.autocast(self.kind, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
