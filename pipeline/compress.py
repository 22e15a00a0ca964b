"""The compress stage (`--text-codec SPEC=CODEC`, `--image-codec SPEC=CODEC`): an encoder's
float16 caption (or image) embeddings replaced by the uint8 codes of a FAISS standalone codec
(`indexes/codecs.py`). Image codes serve the refine step of the coarse image kNN index.

It runs after the index stage (a kNN index is built from the float16 embeddings) and before
the manifest. Order, so that no manifest ever points at a missing file:

  1. the codec is trained on a deterministic sample (evenly spaced ids) and written beside
     the codes; then its record (`_work/done/compress-<slug>-<modality>/codec.json`, the
     codec string and the codec file's checksum), the point after which the codec is fixed;
  2. each part's codes are written (temporary name, renamed), then the part's marker;
  3. the manifest stage lists the codes and the codec instead of the float16 parts (and the
     encoder entry says `"codecs": {"text": CODEC}`) only once every part's marker exists;
  4. only after that manifest is written are the float16 parts removed (`drop_superseded`).

A kill anywhere leaves the previous manifest's files in place; a re-run skips what is done.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from xm.encoders import EncoderSpec
from xm.encoders.loader import _register_configs
from xm.errors import XMError
from xm.indexes import codecs
from xm.indexes.embeddings import EmbeddingMatrix
from xm.indexes.layout import Layout, atomic_path, sha256_file, write_json
from xm.indexes.records import Manifest
from xm.pipeline.quiet import captured_stderr
from xm.pipeline.runners.base import Runner
from xm.pipeline.runners.local import LocalRunner

FLAG = "--text-codec"
FLAGS = {"text": FLAG, "image": "--image-codec"}  # the same mechanism for the coarse image refine embeddings
ENCODE_ROWS = 65_536  # rows encoded at once: bounded memory for any part size


def parse_codecs(flags: list[str], plan: dict[str, tuple[str, ...]], modality: str = "text",
                 out: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    """`SPEC=CODEC` flags -> {spec: {modality: codec}} (added to `out`), each checked against the plan."""
    flag, what = FLAGS[modality], "captions" if modality == "text" else "images"
    out = {} if out is None else out
    for text in flags:
        spec, sep, codec = (s.strip() for s in text.partition("="))
        if not sep or not spec or not codec:
            raise XMError(f"{flag} {text!r}: expected SPEC=CODEC, e.g. ViT-L-14:openai=SQ8")
        embedded = [s for s, parts in plan.items() if modality in parts]
        if spec not in embedded:
            raise XMError(f"{flag} {text!r}: {spec} embeds no {what} in this build; choose from {', '.join(embedded)}")
        codec = codecs.check_codec(codec, flag)
        dim = _embed_dim(spec)
        if dim is not None:  # before any work: a codec that cannot fit would fail after hours of embedding
            codecs.make_codec(codec, dim, f"{flag} {text!r}:")
        prior = out.get(spec, {}).get(modality)
        if prior is not None and prior != codec:
            raise XMError(f"{flag} {text!r}: {spec} is given two codecs ({prior} and {codec})")
        out.setdefault(spec, {})[modality] = codec
    return out


def _embed_dim(spec: str) -> int | None:
    """The embedding width of an open_clip architecture from its config (no weights loaded);
    None when unknown here (the compress stage checks it against the loaded encoder anyway)."""
    try:
        import open_clip  # heavy (torch): only when a codec flag is given

        _register_configs()
        config = open_clip.get_model_config(EncoderSpec.parse(spec).arch)
        return int(config["embed_dim"]) if config and "embed_dim" in config else None
    except (ImportError, XMError, ValueError, TypeError):
        return None


def _record_path(layout: Layout, slug: str, modality: str) -> Path:
    return layout.compress_done_dir(slug, modality) / "codec.json"


def _marker(layout: Layout, slug: str, modality: str, part: str) -> Path:
    return layout.compress_done_dir(slug, modality) / f"{part}.json"


def read_record(layout: Layout, slug: str, modality: str) -> dict[str, Any] | None:
    path = _record_path(layout, slug, modality)
    return json.loads(path.read_text()) if path.is_file() else None


def _write_codes(path: Path, codes: np.ndarray) -> None:
    """One part's codes, renamed into place whole (a kill leaves no partial file)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, codes)


def _train(layout: Layout, spec: str, slug: str, modality: str, codec: str, parts: list[tuple[str, int]]) -> Any:
    """Train on evenly spaced rows of every part's float16 embeddings; write codec, then record."""
    files = [layout.emb_file(slug, modality, p) for p, _ in parts]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise XMError(f"{missing[0]}: missing; the float16 embeddings a codec is trained on are gone (re-embed with a new --out)")
    source = EmbeddingMatrix(files)
    sample = source.gather(codecs.train_sample_ids(len(source)))
    lines: list[str] = []
    with captured_stderr(lines):  # faiss' k-means warns per sub-quantizer on small samples
        index = codecs.train_codec(codec, sample, where=f"{FLAGS[modality]} {spec}={codec}:")
    target = layout.codec_file(slug, modality)
    with atomic_path(target) as tmp:
        codecs.write_codec(index, tmp)
    write_json(_record_path(layout, slug, modality), {
        "encoder": spec, "modality": modality, "codec": codec, "dim": int(index.d),
        "code_size": int(index.sa_code_size()), "train_rows": int(len(sample)), "codec_sha256": sha256_file(target)})
    return index


def compress(layout: Layout, spec: str, slug: str, modality: str, codec: str, parts: list[tuple[str, int]],
             progress: Callable[[str, int | None], Callable[[int], None]] | None = None, runner: Runner | None = None) -> bool:
    """Codes for every part of (spec, modality) under `codec`, trained here and applied one part
    per job on `runner` (Spark tasks on a distributed build); False if all were done already."""
    record = read_record(layout, slug, modality)
    if record is not None and record["codec"] != codec:
        raise XMError(f"{_record_path(layout, slug, modality)}: {spec}'s {modality} embeddings are compressed with "
                      f"{record['codec']}, not {codec}; build a new --out for another codec")
    todo = [(p, n) for p, n in parts if not _marker(layout, slug, modality, p).is_file()]
    if not todo:
        return False
    if record is None:
        _train(layout, spec, slug, modality, codec, parts)
    else:
        path = layout.codec_file(slug, modality)
        if not path.is_file() or sha256_file(path) != record["codec_sha256"]:
            raise XMError(f"{path}: missing or altered since its parts were coded; build a new --out")
    if runner is None:
        runner = LocalRunner()
    jobs = [{"out": str(layout.root), "slug": slug, "modality": modality, "codec": codec, "part": part, "rows": rows}
            for part, rows in todo]
    tick = progress(f"compress {spec} {modality} ({codec}, parts)", len(jobs)) if progress else None
    runner.map(code_part, jobs, f"xm compress {slug}/{modality}", on_done=tick)
    return True


def code_part(job: dict[str, Any]) -> dict[str, Any]:
    """One part's codes under the trained codec, then its marker (a unit of work: plain data in,
    files under --out written by rename, so a retried task writes the same files)."""
    layout, slug, modality, part, rows = Layout(job["out"]), job["slug"], job["modality"], job["part"], int(job["rows"])
    marker = _marker(layout, slug, modality, part)
    if marker.is_file():
        return json.loads(marker.read_text())
    index = codecs.read_codec(layout.codec_file(slug, modality))
    src = layout.emb_file(slug, modality, part)
    if not src.is_file():
        raise XMError(f"{src}: missing; cannot compress part {part} (re-embed with a new --out)")
    x = np.load(src, mmap_mode="r")
    if x.shape[0] != rows:
        raise XMError(f"{src}: {x.shape[0]} rows, its embed marker says {rows}")
    codes = np.concatenate([codecs.encode(index, x[i : i + ENCODE_ROWS]) for i in range(0, rows, ENCODE_ROWS)]) \
        if rows else np.zeros((0, index.sa_code_size()), np.uint8)
    _write_codes(layout.code_file(slug, modality, part), codes)
    done = {"part": part, "rows": rows, "codec": job["codec"]}
    write_json(marker, done)
    return done


def finished_codecs(layout: Layout, spec: str, slug: str, requested: dict[str, str], parts: list[str]) -> dict[str, str]:
    """The codecs the manifest may list for one encoder: each requested one whose parts are all
    coded. A compressed modality the command no longer asks for is refused (its float16 parts
    may be gone), as is a requested one the compress stage has not finished."""
    out = {}
    for modality in ("image", "text"):
        record, want = read_record(layout, slug, modality), requested.get(modality)
        if record is not None and want != record["codec"]:
            raise XMError(f"{_record_path(layout, slug, modality)}: {spec}'s {modality} embeddings are compressed with "
                          f"{record['codec']}; give {FLAGS[modality]} {spec}={record['codec']} (or build a new --out)")
        if want is None:
            continue
        missing = [p for p in parts if not _marker(layout, slug, modality, p).is_file()]
        if missing:
            raise XMError(f"{layout.code_dir(slug, modality)}: {len(missing)} part(s) not yet compressed with {want}; "
                          "run the compress stage (see --stages)")
        out[modality] = want
    return out


def embedding_files(layout: Layout, slug: str, modality: str, parts: list[str], codec: str | None) -> list[Path]:
    """The files that hold (slug, modality)'s embeddings: codes and codec, or float16 parts."""
    if codec:
        return [layout.code_file(slug, modality, p) for p in parts] + [layout.codec_file(slug, modality)]
    return [layout.emb_file(slug, modality, p) for p in parts]


def drop_superseded(layout: Layout, manifest: Manifest) -> list[str]:
    """Remove the float16 parts of compressed embeddings that `manifest` (already written) no
    longer lists; return what was removed (relative paths)."""
    listed = set(manifest.files)
    removed = []
    for entry in manifest.encoders.values():
        for modality in entry.codecs:
            folder = layout.emb_dir(entry.slug, modality)
            if not folder.is_dir():
                continue
            for f in sorted(folder.glob("*.npy")):
                if layout.rel(f) not in listed:
                    f.unlink()
                    removed.append(layout.rel(f))
            if not any(folder.iterdir()):
                folder.rmdir()
    return removed


def run_stage(layout: Layout, requested: dict[str, dict[str, str]], parts: list[tuple[str, int]],
              progress: Callable[[str, int | None], Callable[[int], None]], runner: Runner | None = None) -> list[str]:
    """The build's compress stage: every requested (encoder, modality); returns what was skipped."""
    skipped = []
    for spec, by_modality in requested.items():
        slug = EncoderSpec.parse(spec).slug
        for modality, codec in by_modality.items():
            if not compress(layout, spec, slug, modality, codec, parts, progress, runner):
                skipped.append(f"compress {slug}/{modality} ({codec}): current")
    return skipped
