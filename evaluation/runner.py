"""`xm benchmark`: every method side by side, on the same images, through the one method interface.

1. Evidence, per method (cached): one pass over the images, in batches; each batch's
   `Queries` computes an encoder's features once for every method that asks, and the
   features are cached too, so a few-shot method fitted for many shot counts and seeds
   never re-encodes the test images. A method's evidence cache key is everything it
   depends on (`Method.evidence_key`: index id, encoders, class names, templates,
   options, fitted or trained state) plus the image list. While a pass runs, its finished
   chunks are kept (evaluation/cache.py), so an interrupted benchmark resumes there.
2. Per method and seed: the stream in the protocol's seeded order through `decide`. Test
   labels are used only here, to score; no method ever sees them.
3. Few-shot methods (`fit`): per shot count and seed, a support set drawn from the
   train split and a validation set (the dataset's validation split when it has one);
   the test split is never used to choose anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xm.encoders.device import Device
from xm.encoders.precision import DEFAULT_PRECISION, Precision
from xm.errors import XMError
from xm.evaluation.cache import FAILED, ROWS, EvidenceChunks, chunk_spans
from xm.evaluation.datasets import DatasetSplit, load_dataset
from xm.evaluation.decontaminate import Decontamination, decontaminate
from xm.evaluation.metrics import zeroshot_metrics
from xm.evaluation.results import merge_csv, plot, write_outputs  # noqa: F401  (the output files live in results.py)
from xm.evaluation.stream_order import stream_order
from xm.indexes.layout import atomic_path
from xm.memories import Memory
from xm.methods.base import Context, Decision, Example, Method, Queries, Support, stack_evidence, take_rows
from xm.methods.protocols import DEFAULT_PROTOCOL, protocol
from xm.methods.registry import create, get

Progress = Callable[[str, int], Callable[[int], None]]
DEFAULT_METHODS = ["clip", "captions", "xmore", "xmore-minmax", "xmore-equal", "xmore-raw", "xmore-indirect"]


@dataclass
class BenchmarkConfig:
    dataset: str
    data_dir: Path
    index: Path | None
    model: str | None = None  # default: the index's first inference encoder
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    protocol: str = DEFAULT_PROTOCOL
    seeds: list[int] | None = None  # default: the protocol's
    split: str = "test"
    split_file: Path | None = None
    classnames_file: Path | None = None
    templates: str | None = None  # a template set name or a file; default: the protocol's, else "paper"
    limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # method options, for every method that takes them
    shots: list[int] = field(default_factory=lambda: [16])  # few-shot methods only
    val_per_class: int = 16
    batch_size: int = 32
    precision: Precision | str = DEFAULT_PRECISION  # encoder inference precision, parsed by run_benchmark
    # test near-duplicates hidden from the memory for the run (default: when it outnumbers the test set)
    decontaminate: Decontamination = field(default_factory=Decontamination)
    device: Device | str | None = None  # where encoders and methods run (None: auto), parsed by run_benchmark
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())


def default_cache_dir() -> Path:
    """The benchmark's evidence cache (also where `xm train reco --decontaminate-against` keeps what it found)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xm" / "benchmark"


def resolve_templates(ds: DatasetSplit, templates: str) -> list[str]:
    if templates in ds.templates:
        return ds.templates[templates]
    path = Path(templates)
    if path.is_file():
        from xm.methods.zeroshot import check_templates

        return check_templates([line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip() and not line.startswith("#")])
    raise XMError(f"--templates {templates!r}: neither a template set ({', '.join(ds.templates)}) nor a file")


def _subset(ds: DatasetSplit, limit: int | None) -> DatasetSplit:
    if limit is None or limit >= len(ds.items):
        return ds
    keep = np.sort(np.random.default_rng(0).choice(len(ds.items), limit, replace=False))
    return DatasetSplit(ds.dataset, ds.split, ds.split_source, ds.classnames, [ds.items[i] for i in keep], ds.templates)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


class EvidencePass:
    """Evidence of several methods over one image list, in one pass, with caching."""

    def __init__(self, ds: DatasetSplit, cfg: BenchmarkConfig, progress: Progress) -> None:
        self.ds, self.cfg, self.progress = ds, cfg, progress
        self.items_key = _digest([ds.dataset, ds.split, ds.split_source, [i.key for i in ds.items]])
        self.readable: np.ndarray | None = None  # indices of the images that decoded
        self.failed: list[int] = []
        self.features: dict[str, np.ndarray] = {}
        self.seconds: dict[str, float] = {}
        self.cache_hits: dict[str, bool] = {}
        self.resumed: dict[str, int] = {}  # images whose evidence an interrupted pass had kept, per method

    def _path(self, kind: str, key: str) -> Path:
        return self.cfg.cache_dir / f"{self.ds.dataset}-{self.items_key}-{kind}-{key}.npz"

    def _load(self, path: Path) -> dict[str, np.ndarray] | None:
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError):
            return None  # a damaged cache entry is recomputed

    def _save(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        self.cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    def run(self, methods: dict[str, Method], label: str = "evidence") -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        todo: dict[str, Method] = {}
        for name, m in methods.items():
            cached = self._load(self._path("ev", m.evidence_key()))
            self.cache_hits[name] = cached is not None
            if cached is not None:
                self.readable = cached.pop("_readable")
                out[name] = cached
            else:
                todo[name] = m
        if not todo:
            return out
        # finished chunks of an interrupted pass (evaluation/cache.py): only the missing ones run
        parts = {n: EvidenceChunks(self._path("ev", m.evidence_key()).with_suffix(".parts")) for n, m in todo.items()}
        chunks: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in todo}
        spent = {n: 0.0 for n in todo}
        feature_chunks: dict[str, list[np.ndarray]] = {}
        readable: list[int] = []
        failed: list[int] = []
        feats_known = self.readable is not None and bool(self.features)
        rows = self.readable.tolist() if feats_known and self.readable is not None else list(range(len(self.ds.items)))
        spans = chunk_spans(len(rows), self.cfg.batch_size)
        have = [{n: parts[n].load(lo, rows[lo:hi]) for n in todo} for lo, hi in spans]
        for n in todo:
            self.resumed[n] = sum(hi - lo for (lo, hi), h in zip(spans, have) if h[n] is not None)
        resumed = sum(hi - lo for (lo, hi), h in zip(spans, have) if all(v is not None for v in h.values()))
        if resumed:  # the bar counts the images left, so its rate and ETA are this run's
            label = f"{label} (resumed: {resumed} of {len(rows)} images already done)"
        # features are kept for later passes only if every chunk computed every method's
        whole_features = not any(v is not None for h in have for v in h.values())
        tick = self.progress(label, len(rows) - resumed)
        for (lo, hi), kept in zip(spans, have):
            span = rows[lo:hi]
            need = {n: m for n, m in todo.items() if kept[n] is None}
            span_ok: list[int] = []
            span_failed: list[int] = []
            span_ev: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in need}
            if not need:
                first = next(v for v in kept.values() if v is not None)
                span_ok, span_failed = first[ROWS].tolist(), first[FAILED].tolist()
            for b in range(0, len(span) if need else 0, self.cfg.batch_size):
                batch = span[b : b + self.cfg.batch_size]
                if feats_known:
                    # features cached: images are decoded only if a method asks for an encoder not yet seen
                    sel = np.arange(lo + b, lo + b + len(batch))
                    queries = Queries(_LazyImages(self.ds, batch), features={k: v[sel] for k, v in self.features.items()})
                    ok = batch
                else:
                    images, ok = [], []
                    for i in batch:
                        try:
                            images.append(self.ds.items[i].image())
                            ok.append(i)
                        except XMError:
                            span_failed.append(i)
                    queries = Queries(images)
                span_ok += ok
                if ok:
                    for name, m in need.items():
                        t = time.perf_counter()
                        span_ev[name].append(m.evidence(queries))
                        spent[name] += time.perf_counter() - t
                    for k, v in queries.computed().items():
                        feature_chunks.setdefault(k, []).append(v)
                tick(len(batch))
            readable += span_ok
            failed += span_failed
            for name in todo:
                c = kept[name]
                if c is None:
                    ev = stack_evidence(span_ev[name])
                    parts[name].save(lo, span, ev, span_ok, span_failed)
                else:
                    ev = {k: v for k, v in c.items() if k not in (ROWS, FAILED)}
                if ev:  # a chunk whose images all failed holds no evidence
                    chunks[name].append(ev)
        self.readable = np.asarray(readable, np.int64)
        self.failed = sorted(set(self.failed) | set(failed))
        if not feats_known:
            self.features = {k: np.concatenate(v) for k, v in feature_chunks.items()} if whole_features else {}
        for name, m in todo.items():
            ev = stack_evidence(chunks[name])
            self._save(self._path("ev", m.evidence_key()), {**ev, "_readable": self.readable})
            parts[name].discard()
            out[name] = ev
            self.seconds[name] = spent[name]
        return out


class _LazyImages(Sequence):
    """A batch's images, decoded only when a method needs pixels (its features are cached)."""

    def __init__(self, ds: DatasetSplit, rows: list[int]) -> None:
        self.ds, self.rows = ds, rows
        self._images: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:
        if self._images is None:
            self._images = [self.ds.items[r].image() for r in self.rows]
        return self._images[i]


def _stream_scores(method: Method, ev: dict[str, np.ndarray], labels: np.ndarray, seed: int,
                   order_kind: str = "numpy-permutation") -> tuple[dict[str, float], Decision]:
    """One seeded stream order (the protocol's, `evaluation/stream_order.py`) through `decide`;
    metrics over the scored (not skipped) images, and the decision put back in dataset order."""
    order = stream_order(len(labels), seed, order_kind)
    decision = method.decide(take_rows(ev, order), method.new_state())
    probs = np.empty_like(decision.probs)
    probs[order] = decision.probs
    skipped = np.zeros(len(labels), bool)
    if decision.skipped is not None:
        skipped[order] = decision.skipped
    # image i was decided at position argsort(order)[i]
    info = [decision.info[pos] if decision.info else {} for pos in np.argsort(order).tolist()]
    scored = ~skipped
    metrics = zeroshot_metrics(probs[scored], labels[scored]) if scored.any() else {"acc1": float("nan")}
    return metrics, Decision(probs=probs, components={k: v[np.argsort(order)] for k, v in decision.components.items()},
                             info=info, skipped=skipped)


def _fit_splits(cfg: BenchmarkConfig, ds: DatasetSplit) -> tuple[DatasetSplit, DatasetSplit | None]:
    """The train split and the validation split (None where the dataset has none), read once per run."""
    train = load_dataset(ds.dataset, cfg.data_dir, "train", cfg.split_file, cfg.classnames_file)
    try:
        val = load_dataset(ds.dataset, cfg.data_dir, "validation" if ds.dataset == "eurosat" else "val",
                           cfg.split_file, cfg.classnames_file)
    except XMError:
        val = None
    return train, val


def _support(cfg: BenchmarkConfig, train: DatasetSplit, val_split: DatasetSplit | None, shots: int, seed: int) -> Support:
    """`shots` train images per class (seeded), and a validation set that is not the test split."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, item in enumerate(train.items):
        by_class.setdefault(item.label, []).append(i)
    chosen = {c: rng.permutation(ix)[:shots].tolist() for c, ix in by_class.items()}

    def examples(split: DatasetSplit, ix: list[int]) -> list[Example]:
        return [Example(split.items[i].image, split.items[i].label, split.items[i].key) for i in ix]

    support = [e for c in sorted(chosen) for e in examples(train, chosen[c])]
    if val_split is not None:
        pool: dict[int, list[int]] = {}
        for i, item in enumerate(val_split.items):
            pool.setdefault(item.label, []).append(i)
        val = [e for c in sorted(pool) for e in examples(val_split, rng.permutation(pool[c])[: cfg.val_per_class].tolist())]
    else:  # no validation split: train images outside the support set
        used = {i for ix in chosen.values() for i in ix}
        val = [e for c in sorted(by_class) for e in
               examples(train, [i for i in rng.permutation(by_class[c]).tolist() if i not in used][: cfg.val_per_class])]
    return Support(support, val, shots, seed)


def run_benchmark(cfg: BenchmarkConfig, ds: DatasetSplit, memory: Memory | None,
                  progress: Progress = lambda label, total: (lambda n: None)) -> dict[str, Any]:
    precision = Precision.parse(cfg.precision)  # the benchmark API's edge
    device = Device.parse(cfg.device).single("a benchmark")
    proto = protocol(cfg.protocol)
    for name in cfg.methods:
        get(name)  # unknown names fail before any work
    seeds = cfg.seeds or proto["seeds"]
    ds = _subset(ds, cfg.limit)
    index_id = memory.items_id if memory is not None else None
    memory, decontamination = decontaminate(memory, cfg.decontaminate, ds.items, precision, cfg.cache_dir)
    templates = resolve_templates(ds, cfg.templates or proto["templates"] or "paper")
    model = cfg.model or (memory.default_model() if memory is not None else None)
    if model is None:
        raise XMError("--model: required without an index")
    ctx = Context(memory, model, ds.classnames, templates, dataset=ds.dataset, precision=precision, device=device)
    takes = {o.name for n in cfg.methods for o in get(n).method.options}
    unknown = sorted(set(cfg.options) - takes)
    if unknown:
        raise XMError(f"--opt {', '.join(unknown)}: no method of {', '.join(cfg.methods)} takes it")
    opts = {**proto["method"], **cfg.options}
    plain = {n: create(n, ctx, strict=False, **opts) for n in cfg.methods if not get(n).method.few_shot}
    few = [n for n in cfg.methods if get(n).method.few_shot]

    evidence = EvidencePass(ds, cfg, progress)
    t0 = time.perf_counter()
    evs = evidence.run(plain)
    labels_all = np.array([it.label for it in ds.items])
    results: dict[str, Any] = {}
    diagnostics: dict[str, Any] = {}

    def score(name: str, m: Method, ev: dict[str, np.ndarray], run_seeds: list[int], extra: dict | None = None) -> None:
        labels = labels_all[evidence.readable]
        per_seed, t = [], time.perf_counter()
        first = None
        for seed in run_seeds:
            metrics, detail = _stream_scores(m, ev, labels, seed, proto["stream_order"])
            per_seed.append(metrics)
            first = first if first is not None else detail
        assert first is not None  # run_seeds is never empty
        # _stream_scores always sets skipped; None would mean none skipped
        skipped = first.skipped if first.skipped is not None else np.zeros(len(first.probs), bool)
        keys = per_seed[0].keys()
        results[name] = {
            "method": getattr(m, "variant", m.name), "description": get(getattr(m, "variant", m.name)).summary,
            "options": m.opts,
            "metrics": {k: float(np.mean([s[k] for s in per_seed])) for k in keys},
            "std": {k: float(np.std([s[k] for s in per_seed])) for k in keys},
            "per_seed": per_seed,
            "images_scored": int((~skipped).sum()),
            "images_skipped": int(skipped.sum()),
            # per evaluated image (first seed), -1 where skipped: for per-image comparison of methods
            "predictions": np.where(skipped, -1, first.probs.argmax(1)).tolist(),
            "decide_seconds": time.perf_counter() - t,
            "evidence_seconds": evidence.seconds.get(name, 0.0),
            "evidence_cached": evidence.cache_hits.get(name, False),
            "evidence_key": m.evidence_key(),
            **({"decontamination": d} if (d := m.decontamination()) else {}),
            **(extra or {}),
        }
        if not diagnostics:  # the first method that has any (labels reach it after its decisions)
            diagnostics.update(m.diagnostics(first, labels))

    tuned = [n for n, m in plain.items() if m.wants_validation()]
    splits = _fit_splits(cfg, ds) if few or tuned else None
    for name, m in plain.items():
        # a zero-shot method that chooses on the validation split (RECO's mode=auto): no support images
        fit = [{"seed": seeds[0], **m.fit(_support(cfg, *splits, 0, seeds[0]))}] if name in tuned and splits else None
        score(name, m, evs[name], seeds, {"fit": fit} if fit else None)
    for name in few:
        assert splits is not None  # read above whenever there are few-shot methods
        for shots in cfg.shots:
            fits, per_seed_runs = [], []
            for seed in seeds:
                m = create(name, ctx, strict=False, **opts)
                t = time.perf_counter()
                fitted = m.fit(_support(cfg, *splits, shots, seed))
                fits.append({"seed": seed, "fit_seconds": time.perf_counter() - t, **fitted})
                run = evidence.run({f"{name}@{shots}#{seed}": m}, label=f"{name} {shots}-shot seed {seed}")
                per_seed_runs.append((m, next(iter(run.values())), seed))
            # each seed has its own support set: score seed by seed, then merge
            key = f"{name}@{shots}"
            parts = []
            for m, ev, seed in per_seed_runs:
                score(key, m, ev, [seed])
                parts.append(results.pop(key))
            merged = parts[0]
            keys = merged["metrics"].keys()
            merged["per_seed"] = [p["per_seed"][0] for p in parts]
            merged["metrics"] = {k: float(np.mean([p["metrics"][k] for p in parts])) for k in keys}
            merged["std"] = {k: float(np.std([p["metrics"][k] for p in parts])) for k in keys}
            merged["shots"], merged["fit"] = shots, fits
            merged["evidence_seconds"] = sum(p["evidence_seconds"] for p in parts)
            merged["evidence_key"] = _digest([p["evidence_key"] for p in parts])
            results[key] = merged
    evidence_s = time.perf_counter() - t0
    assert evidence.readable is not None  # set by the first evidence pass (every benchmark has a method)
    n = len(ds.items)
    return {
        **ds.describe(),
        "protocol": cfg.protocol,
        "protocol_settings": {**proto, "templates": templates, "seeds": seeds},
        "images_evaluated": int(len(evidence.readable)),
        "images_key": evidence.items_key, "limit": cfg.limit, "precision": str(precision),
        "images_failed": len(evidence.failed),
        "failed_keys": [ds.items[i].key for i in evidence.failed][:20],
        "model": model,
        "index": str(cfg.index) if cfg.index is not None else None,
        "index_manifest_id": index_id,
        "decontamination": decontamination,
        "encoders": {"inference": model, **({k: memory.roles.get(k) for k in ("coarse", "fine")} if memory is not None else {})},
        "templates": templates,
        "classnames": ds.classnames,
        "seeds": seeds,
        "methods": results,
        "diagnostics": diagnostics,
        "device": str(device),
        "timing": {"seconds": evidence_s, "images_per_second": n / evidence_s if evidence_s > 0 else None,
                   "device": device.describe(), "cache_dir": str(cfg.cache_dir), "cache_hits": evidence.cache_hits,
                   "resumed_images": evidence.resumed},
    }

