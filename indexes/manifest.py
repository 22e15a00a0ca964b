"""The manifest: what an index holds, how it was built, and checksums of every file."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from xm.errors import XMError
from xm.indexes.layout import FORMAT, FORMAT_V1, Layout, sha256_file, write_json

_VERSIONED = ("xm-retrieval", "torch", "open_clip_torch", "faiss-cpu", "autofaiss", "img2dataset", "pyarrow", "numpy")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def file_entries(layout: Layout, paths: list[Path], known: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file; `known` entries (an earlier manifest's) are reused for
    files whose size and modification time are unchanged since that manifest was written."""
    known = known or {}
    out = {}
    for p in sorted(set(paths)):
        rel, st = layout.rel(p), p.stat()
        prior = known.get(rel)
        if prior and prior["bytes"] == st.st_size and prior.get("mtime_ns") == st.st_mtime_ns:
            out[rel] = prior
        else:
            out[rel] = {"bytes": st.st_size, "sha256": sha256_file(p), "mtime_ns": st.st_mtime_ns}
    return out


def write_manifest(layout: Layout, body: dict[str, Any], files: list[Path],
                   known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    entries = file_entries(layout, files, known)
    manifest = {
        "format": FORMAT,
        # the id names the content: it hashes each file's size and checksum, not its mtime
        "id": hashlib.sha256(json.dumps({k: [e["bytes"], e["sha256"]] for k, e in entries.items()}, sort_keys=True).encode()).hexdigest()[:16],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **body,
        "versions": package_versions(),
        "files": entries,
    }
    write_json(layout.manifest, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    layout = Layout(root)
    if not layout.root.is_dir():
        raise XMError(f"{layout.root}: no such index folder")
    if not layout.manifest.is_file():
        raise XMError(f"{layout.manifest}: missing; {layout.root} is not a finished xm index (re-run xm build-index to complete it)")
    try:
        manifest = json.loads(layout.manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise XMError(f"{layout.manifest}: unreadable manifest ({exc})") from exc
    if manifest.get("format") == FORMAT_V1:
        return upgrade_v1(manifest)
    if manifest.get("format") != FORMAT:
        raise XMError(f"{layout.manifest}: format {manifest.get('format')!r}, expected {FORMAT!r} or {FORMAT_V1!r}")
    return manifest


def upgrade_v1(manifest: dict[str, Any]) -> dict[str, Any]:
    """A v1 manifest read as v2, in memory (the files stay where v1 put them).

    v1 knew roles only: the coarse encoder had image and text embeddings and the kNN
    indexes (under index/<modality>/), every other encoder caption embeddings; no norms.
    The manifest is rewritten as v2 only when the index is next changed (`--add-encoder`).
    """
    m = dict(manifest)
    m["format"] = FORMAT
    m["format_read"] = FORMAT_V1
    m["encoders"] = {spec: {**{k: v for k, v in e.items() if k != "modalities"}, "embedded": list(e["modalities"]), "norms": []}
                     for spec, e in manifest["encoders"].items()}
    m["indexes"] = [{**entry, "modality": modality, "dir": f"index/{modality}"}
                    for modality, entry in manifest["indexes"].items()]
    return m


def verify_files(root: str | Path, manifest: dict[str, Any], checksums: bool) -> None:
    """Raise XMError on the first file that is missing, resized, or (with checksums) altered."""
    layout = Layout(root)
    for rel, entry in manifest["files"].items():
        path = layout.root / rel
        if not path.is_file():
            raise XMError(f"{path}: missing (the manifest lists it); the index is incomplete")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise XMError(f"{path}: {size} bytes, the manifest says {entry['bytes']}; the file is damaged")
        if checksums and sha256_file(path) != entry["sha256"]:
            raise XMError(f"{path}: checksum differs from the manifest; the file is damaged")
