"""`xm build-index --out IDX --add-encoder SPEC=parts`: one more encoder's embeddings
and kNN indexes added to a built index, nothing else rebuilt.

Captions come from the caption store; images (only when `image` is asked for) from the
index's recorded source, matched to the stored rows by key. Each part is done once its
marker (`_work/done/add-<slug>/<part>.json`) exists, so a killed run resumes; the
manifest is rewritten last (as format 2, also for a v1 index), reusing the checksums of
the files it already listed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from xm.encoders import load_encoder
from xm.errors import XMError
from xm.indexes import object_store
from xm.indexes.layout import Layout, write_json
from xm.indexes.manifest import read_manifest, write_manifest
from xm.indexes.records import Manifest
from xm.indexes.store import open_store
from xm.pipeline import staging
from xm.pipeline.build import encoder_entry, index_entry
from xm.pipeline.compress import embedding_files
from xm.pipeline.config import BuildConfig, parse_encoder_flag
from xm.pipeline.embed import _pixel_batches, _save_npy, write_text_embeddings
from xm.pipeline.index_stage import build_modality_index, index_is_current


@dataclass
class AddSummary:
    out: str
    encoder: str
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    manifest_id: str | None = None


def _image_rows(cfg: BuildConfig, layout: Layout, manifest: Manifest, part: str, keys: list[str]) -> list[Any]:
    """The part's samples from the recorded source, in the stored rows' order (`keys`: the
    part's image paths, as the caption store has them)."""
    src = manifest.source
    source = src.source
    if object_store.is_remote(source):  # the manifest names the source as given: its local copy, fetched again if gone
        source = object_store.fetch_input(source, staging.base(cfg), "--source (recorded in the manifest)")
    build = BuildConfig(source=source, out=layout.root, source_kind=src.kind, limit=src.limit, parts=src.parts,
                        shard_size=src.shard_size)  # None: the part sizes the build pinned under _work/
    if not build.kind.has_images:
        raise XMError(f"{layout.root}: built from precomputed embeddings; there are no images to embed under another encoder")
    parts = {p.name: p for p in build.kind.parts(build, layout)}
    if part not in parts:
        raise XMError(f"{src.source}: part {part} of {layout.root} is no longer in the source; images cannot be re-read")
    by_key = {s.key: s for s in parts[part].samples() if s.key in set(keys)}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise XMError(f"{src.source}: {len(missing)} image(s) of part {part} are gone (e.g. {missing[0]}); cannot add image embeddings")
    return [by_key[k] for k in keys]


def add_encoder(out: str, flag: str, cfg: BuildConfig | None = None,
                progress: Callable[[str, int | None], Callable[[int], None]] = lambda label, total: (lambda n: None)) -> AddSummary:
    url = object_store.unmangled(out)
    if object_store.is_remote(url):  # a memory on object storage: extended in its staging folder, then pushed
        folder = object_store.cache_folder(url, staging.base(cfg), "stage")
        object_store.pull(url, folder, "--out", must_exist=True)
        added = add_encoder(str(folder), flag, replace(cfg, out=folder) if cfg else None, progress)
        object_store.push(folder, url, "--out")
        added.out = url
        return added
    layout = Layout(out)
    manifest = read_manifest(out)
    spec, parts = parse_encoder_flag(flag, "--add-encoder")
    cfg = cfg or BuildConfig(source="", out=layout.root)
    # the device as the command parsed it (cfg.target: auto when the API gave none); its first GPU
    enc = load_encoder(spec, cache_dir=cfg.cache_dir, precision=cfg.precision, device=cfg.target.first())
    prior = manifest.encoders.get(spec)
    if prior is not None and not enc.fingerprint_matches(prior.probe):
        raise XMError(f"{layout.manifest}: encoder {spec} has other weights than the ones that built this index")
    summary = AddSummary(out=str(layout.root), encoder=spec)
    embedded = set(prior.embedded) if prior else set()
    norms = set(prior.norms) if prior else set()
    slug = enc.spec.slug
    part_names = [p.name for p in manifest.parts]
    rows = {p.name: p.rows for p in manifest.parts}
    firsts = dict(zip(part_names, np.cumsum([0] + [p.rows for p in manifest.parts]).tolist()))
    store = open_store(layout, manifest)  # the rows' one owner: captions, image paths

    def column(part: str, name: str) -> list[Any]:
        return store.table(firsts[part], firsts[part] + rows[part], [name]).column(name).to_pylist()
    for modality in ("text", "image"):
        if modality not in parts:
            continue
        if modality in embedded and (modality != "text" or "text" in norms):
            summary.skipped.append(f"{modality} embeddings: already in the index")
            continue
        stage = f"add-{slug}-{modality}"
        tick = progress(f"embed {spec} {modality}", sum(rows.values()))
        for part in part_names:
            if layout.done_marker(stage, part).is_file():
                tick(rows[part])
                continue
            if modality == "text":
                captions = column(part, "caption")
                write_text_embeddings(layout, enc, part, [c or "" for c in captions])
            else:
                from collections import Counter

                failures: Counter = Counter()
                chunks = []
                for _, pixels in _pixel_batches(_image_rows(cfg, layout, manifest, part, column(part, "image_path")), {spec: enc.preprocess}, cfg.batch_size, failures):
                    chunks.append(enc.encode_pixels(pixels[spec]))
                if failures:
                    raise XMError(f"{manifest.source.source}: {sum(failures.values())} image(s) of part {part} no longer decode")
                _save_npy(layout.emb_file(slug, "image", part), np.concatenate(chunks))
            write_json(layout.done_marker(stage, part), {"part": part, "rows": rows[part]})
            tick(rows[part])
        embedded.add(modality)
        if modality == "text":
            norms.add("text")
        summary.added.append(f"{modality} embeddings")

    indexes = [e for e in manifest.indexes if not (e.encoder == spec and f"index-{e.modality}" in parts)]
    new_index_files = []
    for modality in ("image", "text"):
        if f"index-{modality}" not in parts:
            continue
        existing = [e for e in manifest.indexes if e.encoder == spec and e.modality == modality]
        if existing:
            summary.skipped.append(f"{modality} kNN index: already in the index")
            indexes.append(existing[0])
            continue
        if not index_is_current(layout, slug, modality, manifest.count, cfg.shards):
            build_modality_index(cfg, layout, slug, modality, manifest.count)
        entry, shard_files = index_entry(layout, spec, modality, manifest.count)
        indexes.append(entry)
        new_index_files += shard_files
        summary.added.append(f"{modality} kNN index")

    if not summary.added:
        summary.manifest_id = manifest.id
        return summary
    files = [layout.root / rel for rel in manifest.files]
    codecs = prior.codecs if prior else {}  # a compressed modality stays compressed (pipeline/compress.py)
    for modality in sorted(embedded):
        files += embedding_files(layout, slug, modality, part_names, codecs.get(modality))
    files += [layout.norm_file(slug, "text", p) for p in part_names] if "text" in norms else []
    # the rest as it was (a format-1 manifest is written back as format 2)
    changed = replace(manifest, encoders={**manifest.encoders, spec: encoder_entry(enc, sorted(embedded), sorted(norms), codecs)},
                      indexes=indexes)
    summary.manifest_id = write_manifest(layout, changed, files + new_index_files, known=manifest.files).id
    return summary

