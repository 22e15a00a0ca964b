"""`xm build-index`: select -> download -> embed -> index -> store -> manifest.

Every stage is resumable: re-running the same command skips what is finished
(img2dataset's incremental shards, per-part embed markers, indexes whose build record
matches the row count) and redoes only what a kill interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from xm.encoders import availability_problems
from xm.errors import XMError
from xm.indexes import object_store
from xm.indexes.layout import FILE_MODE, Layout, write_json
from xm.indexes.manifest import write_manifest
from xm.indexes.records import (
    STORE_SHARDS,
    BuildStats,
    EncoderEntry,
    IndexEntry,
    Manifest,
    PartEntry,
    Roles,
    ShardEntry,
    SourceEntry,
    StoreEntry,
)
from xm.indexes.store import SHARD_ROWS, shard_ranges
from xm.pipeline import compress, index_training, staging
from xm.pipeline.config import STAGES, BuildConfig
from xm.pipeline.download import download
from xm.pipeline.embed import embed_part, read_marker, slug_of, unloaded_encoder_entry
from xm.pipeline.index_stage import build_modality_index, index_is_current
from xm.pipeline.multi_device import describe_spread, embed_on_devices, spread
from xm.pipeline.pins import pin_params
from xm.pipeline.runners.base import Runner
from xm.pipeline.sources.base import OPENAI_LOGIT_SCALE, Source
from xm.pipeline.task_mirror import embed_reads
from xm.pipeline.tasks import (
    create_hash_file,
    embed_task,
    hasher_for,
    load_plan_encoders,
    part_hashes_dir,
    read_part_hashes,
    shard_name,
    store_task,
    write_hash_rows,
)


@dataclass
class BuildSummary:
    out: str
    source_kind: str
    count: int = 0
    selected: int | None = None
    failures: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifest_id: str | None = None
    ran_on: str = "this machine"  # or the Spark master and its task slots
    device: str = "cpu"  # where the encoders ran (`Device.describe`); never in the manifest
    parts_per_device: dict[str, int] = field(default_factory=dict)  # several GPUs: how the parts were shared out


Progress = Callable[[str, int | None], Callable[[int], None]]


def _no_progress(label: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


def _embedded_parts(layout: Layout) -> list[dict[str, Any]]:
    """Markers of every embedded part on disk, in part order (what later stages build from)."""
    folder = layout.done_dir("embed")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def build_index(cfg: BuildConfig, progress: Progress = _no_progress) -> BuildSummary:
    """Run the requested stages of the pipeline; return what happened."""
    unknown = set(cfg.stages) - set(STAGES)
    if unknown:
        raise XMError(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    # an --out or inputs on object storage: built in a local staging folder, pushed after each stage
    url, push = staging.stage(cfg)
    cfg.validate()
    layout = Layout(cfg.out)
    fresh = not layout.root.exists()
    layout.root.mkdir(parents=True, exist_ok=True)
    try:
        # where the stages' units of work run: here, or as tasks on the build's one Spark session
        # (created before img2dataset and autofaiss look for it; every executor checked first)
        with contextlib.closing(cfg.runner_kind.open(cfg, layout)) as runner:
            summary = _run_stages(cfg, layout, progress, runner, push)
        push()  # what the last stage left (last_build.json)
        if url is not None:
            summary.out = url
        return summary
    except BaseException:
        # a first run that failed before writing anything leaves no empty --out behind
        if fresh and not any(p.is_file() for p in layout.root.rglob("*")):
            shutil.rmtree(layout.root, ignore_errors=True)
        raise


def _pause_point(stage: str) -> None:
    """Fault-injection for tests and debugging: XM_PAUSE_AT=<stage> waits at the stage's start
    (so that a signal can be sent there), XM_PAUSE_SECONDS long (default 30)."""
    if os.environ.get("XM_PAUSE_AT") == stage:
        print(f"xm: paused at stage {stage} (XM_PAUSE_AT)", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("XM_PAUSE_SECONDS", "30")))


def _run_stages(cfg: BuildConfig, layout: Layout, progress: Progress, runner: Runner,
                push: Callable[[], int] = lambda: 0) -> BuildSummary:
    source = cfg.kind
    kind = source.name  # as the summary and the manifest record it
    summary = BuildSummary(out=str(layout.root), source_kind=kind, ran_on=runner.description,
                           device=cfg.target.describe() if runner.in_process else
                           "each task: the GPU Spark gives it (spark.task.resource.gpu.amount), else its CPU")
    encoders_needed = "embed" in cfg.stages or "manifest" in cfg.stages
    # where the parts are: here, or only in the bucket when the tasks write there themselves
    files_at = staging.StoredFiles(layout, cfg.bucket)

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        if stage not in cfg.stages:
            return None
        _pause_point(stage)
        t0 = time.perf_counter()
        result = fn()
        push()  # --out on object storage: this stage's files are there before the next stage starts
        files_at.refresh()
        summary.stage_seconds[stage] = round(time.perf_counter() - t0, 3)
        return result

    plan = cfg.plan()
    codecs = cfg.codecs()  # parsed once: each parse builds a FAISS codec to check it
    if encoders_needed:
        _preflight(cfg, source, plan)
    if source.needs_download:
        summary.selected = timed("select", lambda: source.select(cfg, layout))
        timed("download", lambda: download(cfg, layout))
    _add_failures(summary, source.failures(cfg, layout))  # an img2dataset folder's own download failures count too

    encoders = load_plan_encoders(cfg, plan) if encoders_needed else {}
    # pinned once they load: a first run that fails on an unavailable encoder may be retried with another
    pin_params(layout.work / "encoders.json", {"coarse": cfg.coarse, "fine": cfg.fine, "inference": list(cfg.inference),
                                               **({"encoders": list(cfg.encoders)} if cfg.encoders else {})}, "encoders")
    if encoders_needed:  # every part is embedded at one precision, the one the manifest records
        pin_params(layout.work / "precision.json", {"precision": cfg.precision}, "--precision")

    def embed() -> None:
        parts = source.parts(cfg, layout)
        todo = [p for p in parts if read_marker(layout, p.name) is None]
        if len(todo) < len(parts):
            summary.skipped.append(f"embed: {len(parts) - len(todo)} part(s) already done")
        sizes = [p.size for p in todo if p.size is not None]
        total = sum(sizes) if len(sizes) == len(todo) else None
        texts = sum(1 for parts in plan.values() if "text" in parts)
        if runner.in_process:  # here: progress by rows, the encoders loaded once above
            images = progress("embed images", total)
            captions = progress(f"embed captions ({texts} encoder{'s' if texts != 1 else ''})", total * texts if total else None)
            devices = spread(cfg.target)
            if len(devices) > 1:  # several GPUs of this machine: disjoint parts per device
                summary.parts_per_device = describe_spread(embed_on_devices(cfg, todo, plan, layout, devices, images, captions))
            for part in todo if len(devices) == 1 else []:
                embed_part(part, encoders, plan, layout, cfg.batch_size, on_rows=images, on_captions=captions,
                           num_workers=cfg.workers())
        else:
            jobs = [{"config": cfg.to_dict(), "part": p.name,
                     "reads": embed_reads(layout, p.name, source.task_inputs(cfg, layout, p.name))} for p in todo]
            runner.map(embed_task, jobs, "xm embed", on_done=progress(f"embed ({len(jobs)} parts as {runner.tasks})", len(jobs)))

    timed("embed", embed)
    markers = _embedded_parts(layout)
    for m in markers:
        _add_failures(summary, m["failures"])
    done = [m for m in markers if m["rows"] > 0]
    summary.count = sum(m["rows"] for m in done)
    empty = sum(m.get("empty_captions", 0) for m in done)
    if empty:
        summary.warnings.append(f"{empty} of {summary.count} items have an empty caption"
                                + source.empty_caption_hint)
    later = set(cfg.stages) & {"index", "store", "manifest"}
    if later and summary.count == 0:
        raise XMError(f"{cfg.source}: no usable image-text pairs embedded (failures: {dict(summary.failures) or 'none'})")
    coarse_slug = slug_of(cfg.coarse)

    def index() -> None:
        todo = _indexed(plan)
        stale = [(slug_of(spec), modality, None) for spec, modality in todo
                 if not index_is_current(layout, slug_of(spec), modality, summary.count, cfg.shards)]
        if stale and runner.autofaiss_distributed is not None:
            # on a cluster every stale index trains at once, one executor task each, and is kept
            # (pipeline/index_training.py); the loop below then only fills them
            trained = index_training.train_all(cfg, layout, stale, runner.map,
                                               progress(f"index: train {len(stale)} on executors at once", len(stale)))
            summary.skipped += [f"index/{slug}/{modality}: training reused" for (slug, modality), r in trained.items()
                                if r.get("reused")]
        tick = progress(f"index ({len(todo)} kNN index{'es' if len(todo) != 1 else ''}, autofaiss)", len(todo))
        for spec, modality in todo:
            slug = slug_of(spec)
            if index_is_current(layout, slug, modality, summary.count, cfg.shards):
                summary.skipped.append(f"index/{slug}/{modality}: current")
            else:
                build_modality_index(cfg, layout, slug, modality, summary.count)
            tick(1)

    timed("index", index)
    # after the index stage (kNN indexes are built from the float16 parts): codes + codec
    timed("compress", lambda: summary.skipped.extend(
        compress.run_stage(layout, codecs, [(m["part"], m["rows"]) for m in done], progress, runner)))

    def store() -> None:
        if _store_stage(layout, coarse_slug, done, runner, progress, files_at):
            summary.skipped.append("store: current")

    timed("store", store)

    def manifest() -> None:
        written = _write_manifest(cfg, layout, kind, done, encoders, plan, summary, codecs, hasher_for(runner), files_at)
        summary.manifest_id = written.id
        compress.drop_superseded(layout, written)  # float16 parts of compressed roles: only once no manifest lists them
        _drop_superseded_rows(layout, written)

    timed("manifest", manifest)
    write_json(layout.work / "last_build.json", summary.__dict__)
    return summary


def _store_stage(layout: Layout, slug: str, done: list[dict[str, Any]], runner: Runner, progress: Progress,
                 files_at: staging.StoredFiles | None = None, shard_rows: int = SHARD_ROWS) -> bool:
    """Write the caption store of the embedded parts `done` (one task per shard of `shard_rows`
    ids, each reading the rows of the parts it spans) and its hash file; True if it was current
    already."""
    files_at = files_at or staging.StoredFiles(layout, None)
    record = {"parts": [[m["part"], m["rows"]] for m in done], "shard_rows": shard_rows}
    if _store_is_current(layout, record, files_at):
        return True
    firsts = np.concatenate([[0], np.cumsum([m["rows"] for m in done])]).astype(int)
    count = int(firsts[-1])
    # every task writes its rows of the hash file in place (no driver collect); renamed when all are in
    building = layout.caption_hash.with_name(f".{layout.caption_hash.name}.building")
    create_hash_file(building, count)
    spans = [[m["part"], int(first), int(m["rows"])] for m, first in zip(done, firsts)]
    jobs: list[dict[str, Any]] = []
    ranges = shard_ranges(count, shard_rows)
    for i, (start, stop) in enumerate(ranges):
        spanned = [sp for sp in spans if sp[1] < stop and sp[1] + sp[2] > start]
        # tasks writing to the bucket have no shared file: each leaves its shard's hashes there (hashes: None)
        jobs.append({"out": str(layout.root), "slug": slug, "shard": i, "first": start, "stop": stop,
                     "hashes": None if files_at.bucket else str(building), "parts": spanned,
                     "reads": [layout.rel(f) for name, _, _ in spanned
                               for f in (layout.part_rows(name), layout.metadata_file(slug, name))]})
    rows = runner.map(store_task, jobs, "xm store", on_done=progress("store", len(jobs)))
    if sum(rows) != count:
        raise XMError(f"{layout.rel(layout.store)}: the store tasks wrote {sum(rows)} rows, {count} are embedded")
    if files_at.bucket is not None:  # streamed into place here (8 bytes an item), never a Spark result
        for i, (start, _) in enumerate(ranges):
            write_hash_rows(building, start, read_part_hashes(files_at.bucket, layout, shard_name(i)))
    os.chmod(building, FILE_MODE)
    os.replace(building, layout.caption_hash)
    write_json(_store_record(layout), record)
    if files_at.bucket is not None:
        object_store.remove(files_at.bucket, layout.rel(part_hashes_dir(layout)), "--out")
    return False


def _drop_superseded_rows(layout: Layout, written: Manifest) -> None:
    """Once a manifest lists the store shards, the rows' copies a build begun before them left
    (the Parquet store parts, the first encoder's metadata/ parts) go: captions and URLs are kept
    once in the memory. metadata/ parts move to `_work/rows/`, the store stage's input, rather
    than go, so a later store rewrite still finds every part's rows."""
    if written.store is None:
        return
    for part in written.parts:
        layout.store_part(part.name).unlink(missing_ok=True)
        for entry in written.encoders.values():
            legacy = layout.metadata_file(entry.slug, part.name)
            if legacy.is_file():
                rows = layout.part_rows(part.name)
                rows.parent.mkdir(parents=True, exist_ok=True)
                if rows.is_file():
                    legacy.unlink()
                else:
                    os.replace(legacy, rows)


def _store_record(layout: Layout) -> Path:
    return layout.work / "done" / "store.json"


def _store_is_current(layout: Layout, record: dict[str, Any], files_at: staging.StoredFiles) -> bool:
    """The store was written for exactly these parts and every file of it is still there."""
    path = _store_record(layout)
    if not path.is_file() or json.loads(path.read_text()) != record or not layout.caption_hash.is_file():
        return False
    count = sum(rows for _, rows in record["parts"])
    return all(files_at.exists(layout.store_shard(i)) for i in range(len(shard_ranges(count, record["shard_rows"]))))


def _preflight(cfg: BuildConfig, source: Source, plan: dict[str, tuple[str, ...]]) -> None:
    """Everything that cannot be had here, said at once in one line, before any download or
    work (offline: LAION's metadata and the encoders' weights)."""
    problems = source.problems(cfg, plan)
    # an encoder whose every embedding the source provides is never loaded: its weights need not exist
    problems += availability_problems(source.encoders_to_load(cfg, plan), cfg.cache_dir)
    if problems:
        raise XMError("; ".join(problems))


def _add_failures(summary: BuildSummary, counts: dict[str, int]) -> None:
    """Failures are summed over parts and sources, reason by reason."""
    summary.failures = dict(Counter(summary.failures) + Counter({k: int(v) for k, v in counts.items()}))


def _indexed(plan: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    return [(spec, p.removeprefix("index-")) for spec, parts in plan.items() for p in parts if p.startswith("index-")]


def encoder_entry(enc: Any, embedded: list[str], norms: list[str], codecs: dict[str, str] | None = None) -> EncoderEntry:
    """The manifest's record of one encoder: who it is (weights probe) and what it contributed
    (`codecs`: modalities stored as codes of a FAISS codec instead of float16, `--text-codec`)."""
    return EncoderEntry(slug=enc.spec.slug, dim=enc.dim, logit_scale=enc.logit_scale, probe=enc.probe(),
                        embedded=embedded, norms=norms, precision=getattr(enc, "precision", "fp32"), codecs=dict(codecs or {}))


def index_entry(layout: Layout, spec: str, modality: str, count: int) -> tuple[IndexEntry, list]:
    """The manifest's record of one kNN index (from its build.json) and its shard files."""
    slug = slug_of(spec)
    info_path = layout.index_build_info(slug, modality)
    if not info_path.is_file():
        raise XMError(f"{info_path}: missing; run the index stage")
    info = json.loads(info_path.read_text())
    if info["count"] != count:
        raise XMError(f"{info_path}: index holds {info['count']} rows but {count} are embedded; run the index stage")
    folder = layout.index_dir(slug, modality)
    shards = [ShardEntry(file=sh["file"], ntotal=sh["ntotal"], id_offset=sh["id_offset"], id_range=tuple(sh["id_range"]))
              for sh in info["shards"]]
    # refine_k_factor: a search parameter LocalMemory.search applies
    entry = IndexEntry(key=info["key"], params=info["params"], metric=info["metric"], dim=info["dim"], shards=shards,
                       k_target=info["k_target"],
                       refine_k_factor=int(info["refine_k_factor"]) if info.get("refine_k_factor", 0) > 1 else None,
                       encoder=spec, modality=modality, dir=layout.rel(folder))
    return entry, [folder / sh.file for sh in shards]


def _write_manifest(cfg: BuildConfig, layout: Layout, kind: str, done: list[dict], encoders: dict,
                    plan: dict[str, tuple[str, ...]], summary: BuildSummary, codecs: dict[str, dict[str, str]],
                    hasher: Callable[[list[Path]], list[str]] | None = None,
                    files_at: staging.StoredFiles | None = None) -> Manifest:
    files_at = files_at or staging.StoredFiles(layout, None)
    files = []
    enc_entries = {}
    for spec, parts in plan.items():
        slug = slug_of(spec)
        embedded: list[str] = [m for m in ("image", "text") if m in parts]
        # precomputed caption arrays are unit-norm already and bring no norms
        norms = ["text"] if "text" in parts and all(files_at.exists(layout.norm_file(slug, "text", m["part"])) for m in done) else []
        enc_entry = (encoder_entry(encoders[spec], embedded, norms) if spec in encoders else
                     unloaded_encoder_entry(layout, spec, embedded, norms, [m["part"] for m in done],
                                            OPENAI_LOGIT_SCALE, files_at))
        coded = compress.finished_codecs(layout, spec, slug, codecs.get(spec, {}), [m["part"] for m in done])
        # which source array is which; codes + codec instead of float16 parts (pipeline/compress.py)
        enc_entries[spec] = replace(enc_entry, precomputed=cfg.kind.precomputed(cfg, spec, embedded),
                                    codecs=coded)
        for modality in embedded:
            files += compress.embedding_files(layout, slug, modality, [m["part"] for m in done], coded.get(modality))
        files += [layout.norm_file(slug, "text", m["part"]) for m in done] if norms else []
    indexes = []
    for spec, modality in _indexed(plan):
        entry, shard_files = index_entry(layout, spec, modality, summary.count)
        indexes.append(entry)
        files += shard_files
    files += [layout.store_shard(i) for i in range(len(shard_ranges(summary.count, SHARD_ROWS)))] + [layout.caption_hash]
    for f in files:
        if not files_at.exists(f):
            raise XMError(f"{f}: missing; run the stage that writes it (see --stages)")
    manifest = Manifest(
        count=summary.count,
        source=SourceEntry(kind=kind, source=cfg.source_given or cfg.source, limit=cfg.limit, parts=cfg.parts, shard_size=cfg.shard_size),
        roles=Roles(coarse=cfg.coarse, fine=cfg.fine, inference=list(cfg.inference)),
        encoders=enc_entries,
        parts=[PartEntry(name=m["part"], rows=m["rows"]) for m in done],
        indexes=indexes,
        stats=BuildStats(failures=summary.failures, selected=summary.selected,
                         empty_captions=sum(m.get("empty_captions", 0) for m in done)),
        store=StoreEntry(format=STORE_SHARDS, shard_rows=SHARD_ROWS),
    )
    return write_manifest(layout, manifest, files, hasher=hasher, keep_if_same=True, stat=files_at.stat)
