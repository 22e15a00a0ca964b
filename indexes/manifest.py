"""The manifest: what an index holds, how it was built, and checksums of every file.

Its records are typed (`indexes/records.py`); this module reads them (`read_manifest`,
format 1 upgraded in memory) and is their one writer (`write_manifest`)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from xm.errors import XMError
from xm.indexes.layout import FORMAT, FORMAT_V1, Layout, sha256_file, write_json
from xm.indexes.records import FileEntry, Manifest

_VERSIONED = ("xm-retrieval", "torch", "open_clip_torch", "faiss-cpu", "autofaiss", "img2dataset", "pyarrow", "numpy")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


Hasher = Callable[[list[Path]], list[str]]


def _sha256_files(paths: list[Path]) -> list[str]:
    return [sha256_file(p) for p in paths]


def file_entries(layout: Layout, paths: list[Path], known: dict[str, FileEntry] | None = None,
                 hasher: Hasher | None = None) -> dict[str, FileEntry]:
    """Size and sha256 of each file; `known` entries (an earlier manifest's) are reused for
    files whose size and modification time are unchanged since that manifest was written.
    `hasher` checksums the rest (here by default; a distributed build spreads it over tasks)."""
    known = known or {}
    out: dict[str, FileEntry] = {}
    todo: list[tuple[str, Path, os.stat_result]] = []
    for p in sorted(set(paths)):
        rel, st = layout.rel(p), p.stat()
        prior = known.get(rel)
        if prior and prior.bytes == st.st_size and prior.mtime_ns == st.st_mtime_ns:
            out[rel] = prior
        else:
            todo.append((rel, p, st))
    for (rel, _, st), digest in zip(todo, (hasher or _sha256_files)([p for _, p, _ in todo])):
        out[rel] = FileEntry(bytes=st.st_size, sha256=digest, mtime_ns=st.st_mtime_ns)
    return dict(sorted(out.items()))


def write_manifest(layout: Layout, manifest: Manifest, files: list[Path],
                   known: dict[str, FileEntry] | None = None, hasher: Hasher | None = None,
                   keep_if_same: bool = False) -> Manifest:
    """The one writer of manifest.json: `manifest` (what an author built: count ... stats)
    stamped with the format, the files' sizes and checksums, the id, the time and the
    package versions, written last and atomically. With `keep_if_same`, an existing manifest
    that already says exactly this (same files, same content) is left as it is: a rerun
    changes nothing."""
    before = _read_existing(layout) if keep_if_same or known is None else None
    if known is None and before is not None:
        known = before.files
    entries = file_entries(layout, files, known, hasher)
    stamped = replace(
        manifest,
        format=FORMAT,
        # the id names the content: it hashes each file's size and checksum, not its mtime
        id=hashlib.sha256(json.dumps({k: [e.bytes, e.sha256] for k, e in entries.items()}, sort_keys=True).encode()).hexdigest()[:16],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=package_versions(),
        files=entries,
        format_read=None,
    )
    if keep_if_same and before is not None and replace(before, created=stamped.created) == stamped:
        return before
    write_json(layout.manifest, stamped.to_json())
    return stamped


def _read_existing(layout: Layout) -> Manifest | None:
    try:
        data = json.loads(layout.manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    try:
        return Manifest.from_json(data, str(layout.manifest))
    except XMError:  # a damaged manifest is rewritten, not reused
        return None


def read_manifest(root: str | Path) -> Manifest:
    layout = Layout(root)
    if not layout.root.is_dir():
        raise XMError(f"{layout.root}: no such index folder")
    if not layout.manifest.is_file():
        raise XMError(f"{layout.manifest}: missing; {layout.root} is not a finished xm index (re-run xm build-index to complete it)")
    try:
        data = json.loads(layout.manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise XMError(f"{layout.manifest}: unreadable manifest ({exc})") from exc
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt == FORMAT_V1:
        return upgrade_v1(data, str(layout.manifest))
    if fmt != FORMAT:
        raise XMError(f"{layout.manifest}: format {fmt!r}, expected {FORMAT!r} or {FORMAT_V1!r}")
    return Manifest.from_json(data, str(layout.manifest))


def upgrade_v1(manifest: dict[str, Any], file: str = "manifest.json") -> Manifest:
    """A v1 manifest read as v2, in memory (the files stay where v1 put them).

    v1 knew roles only: the coarse encoder had image and text embeddings and the kNN
    indexes (under index/<modality>/), every other encoder caption embeddings; no norms.
    The manifest is rewritten as v2 only when the index is next changed (`--add-encoder`).
    """
    return Manifest.from_v1_json(manifest, file)


def verify_files(root: str | Path, manifest: Manifest, checksums: bool) -> None:
    """Raise XMError on the first file that is missing, resized, or (with checksums) altered."""
    layout = Layout(root)
    for rel, entry in manifest.files.items():
        path = layout.root / rel
        if not path.is_file():
            raise XMError(f"{path}: missing (the manifest lists it); the index is incomplete")
        size = path.stat().st_size
        if size != entry.bytes:
            raise XMError(f"{path}: {size} bytes, the manifest says {entry.bytes}; the file is damaged")
        if checksums and sha256_file(path) != entry.sha256:
            raise XMError(f"{path}: checksum differs from the manifest; the file is damaged")
