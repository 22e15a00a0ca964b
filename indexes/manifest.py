"""The manifest: what an index holds, how it was built, and checksums of every file.

Its records are typed (`indexes/records.py`); this module reads them (`read_manifest`,
format 1 upgraded in memory) and is their one writer (`write_manifest`).

A manifest that lists more than `INLINE_FILES` files keeps its per-part records (`parts`,
`files`) in two Parquet tables beside it, `manifest/parts-<sha>.parquet` and
`manifest/files-<sha>.parquet`, which manifest.json names with their row counts and
checksums: at 400M items in 40k parts the inline lists were 90-300 MB of JSON read on every
open. The tables are named by their content and written before manifest.json, so the
previous manifest stays whole until the new one replaces it; tables no manifest names are
removed after. Below the threshold (every laptop-sized memory) the manifest is one JSON
document, as before."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from xm.errors import XMError
from xm.indexes.layout import FORMAT, FORMAT_V1, Layout, atomic_path, sha256_file, write_json
from xm.indexes.records import (
    FileEntry,
    FilesTable,
    Manifest,
    TableRef,
    files_from_table,
    files_table,
    parts_from_table,
    parts_table,
)

# past this many listed files, parts and files go to Parquet tables (a few hundred parts)
INLINE_FILES = 2_000
TABLES_DIR = "manifest"

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


Stat = Callable[[Path], tuple[int, int]]


def _local_stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def file_entries(layout: Layout, paths: list[Path], known: Mapping[str, FileEntry] | None = None,
                 hasher: Hasher | None = None, stat: Stat | None = None) -> dict[str, FileEntry]:
    """Size and sha256 of each file; `known` entries (an earlier manifest's) are reused for
    files whose size and modification time are unchanged since that manifest was written.
    `hasher` checksums the rest (here by default; a distributed build spreads it over tasks);
    `stat` gives (bytes, mtime_ns) (here by default; the bucket's listing for files only it holds)."""
    known = dict(known.items()) if known else {}  # a files table read once, not looked up per file
    out: dict[str, FileEntry] = {}
    todo: list[tuple[str, Path, tuple[int, int]]] = []
    for p in sorted(set(paths)):
        rel, st = layout.rel(p), (stat or _local_stat)(p)
        prior = known.get(rel)
        if prior and prior.bytes == st[0] and prior.mtime_ns == st[1]:
            out[rel] = prior
        else:
            todo.append((rel, p, st))
    for (rel, _, st), digest in zip(todo, (hasher or _sha256_files)([p for _, p, _ in todo])):
        out[rel] = FileEntry(bytes=st[0], sha256=digest, mtime_ns=st[1])
    return dict(sorted(out.items()))


def write_manifest(layout: Layout, manifest: Manifest, files: list[Path],
                   known: Mapping[str, FileEntry] | None = None, hasher: Hasher | None = None,
                   keep_if_same: bool = False, stat: Stat | None = None) -> Manifest:
    """The one writer of manifest.json: `manifest` (what an author built: count ... stats)
    stamped with the format, the files' sizes and checksums, the id, the time and the
    package versions, written last and atomically. With `keep_if_same`, an existing manifest
    that already says exactly this (same files, same content) is left as it is: a rerun
    changes nothing."""
    before = _read_existing(layout) if keep_if_same or known is None else None
    if known is None and before is not None:
        known = before.files
    entries = file_entries(layout, files, known, hasher, stat)
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
    tables = _write_tables(layout, stamped) if len(entries) > INLINE_FILES else {}
    write_json(layout.manifest, stamped.to_json(tables))
    _drop_unlisted_tables(layout, tables)
    return stamped


def _write_tables(layout: Layout, manifest: Manifest) -> dict[str, TableRef]:
    """The parts and files tables, each written once under a name that is its checksum."""
    import pyarrow.parquet as pq

    folder = layout.root / TABLES_DIR
    refs = {}
    for key, table in (("parts", parts_table(manifest.parts)), ("files", files_table(manifest.files))):
        staged = folder / f".{key}.parquet"
        with atomic_path(staged) as tmp:  # whole, under a name no manifest uses
            pq.write_table(table, tmp, compression="zstd")
        digest = sha256_file(staged)
        target = folder / f"{key}-{digest[:16]}.parquet"
        os.replace(staged, target)  # the same name is the same content: replacing it changes nothing
        refs[key] = TableRef(table=layout.rel(target), rows=table.num_rows, sha256=digest)
    return refs


def _drop_unlisted_tables(layout: Layout, tables: dict[str, TableRef]) -> None:
    keep = {layout.root / t.table for t in tables.values()}
    folder = layout.root / TABLES_DIR
    for old in folder.glob("*.parquet") if folder.is_dir() else []:
        if old not in keep:
            old.unlink(missing_ok=True)


def _from_data(layout: Layout, data: Any) -> Manifest:
    """A format-2 manifest's JSON, its tables (if any) read back and checked against their checksums."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = str(layout.manifest)
    refs = Manifest.table_refs(data, file)
    if not refs:
        return Manifest.from_json(data, file)
    lists: dict[str, Any] = {}
    for key, ref in refs.items():
        path = layout.root / ref.table
        if not path.is_file():
            raise XMError(f"{path}: missing (the manifest keeps its {key} there); the index is incomplete")
        if sha256_file(path) != ref.sha256:
            raise XMError(f"{path}: checksum differs from the manifest's; the manifest's {key} table is damaged")
        try:
            table = pq.ParquetFile(path).read()  # (pq.read_table would import pyarrow.dataset: seconds)
        except (OSError, pa.ArrowException) as exc:
            raise XMError(f"{path}: unreadable manifest table ({str(exc).splitlines()[0][:160]})") from exc
        if table.num_rows != ref.rows:
            raise XMError(f"{path}: {table.num_rows} rows, the manifest says {ref.rows}; the manifest's {key} table is damaged")
        lists[key] = parts_from_table(table, str(path)) if key == "parts" else files_from_table(table, str(path))
    head = Manifest.from_json({**data, **{key: [] if key == "parts" else {} for key in refs}}, file)
    return replace(head, **lists)


def _read_existing(layout: Layout) -> Manifest | None:
    try:
        data = json.loads(layout.manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    try:
        return _from_data(layout, data)
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
    return _from_data(layout, data)


def upgrade_v1(manifest: dict[str, Any], file: str = "manifest.json") -> Manifest:
    """A v1 manifest read as v2, in memory (the files stay where v1 put them).

    v1 knew roles only: the coarse encoder had image and text embeddings and the kNN
    indexes (under index/<modality>/), every other encoder caption embeddings; no norms.
    The manifest is rewritten as v2 only when the index is next changed (`--add-encoder`).
    """
    return Manifest.from_v1_json(manifest, file)


def sample_files(manifest: Manifest, n: int) -> dict[str, FileEntry]:
    """`n` of the listed files, evenly spread over them (always the same ones): what opening
    a memory of many files checks, instead of every one."""
    files = manifest.files
    if len(files) <= n:
        return dict(files.items())
    positions = sorted({round(j * (len(files) - 1) / max(1, n - 1)) for j in range(n)})
    if isinstance(files, FilesTable):
        return files.at(positions)
    rels = list(files)
    return {rels[i]: files[rels[i]] for i in positions}


def verify_files(root: str | Path, manifest: Manifest, checksums: bool, only: dict[str, FileEntry] | None = None) -> None:
    """Raise XMError on the first file that is missing, resized, or (with checksums) altered;
    `only`: just these of the listed files (`sample_files`)."""
    layout = Layout(root)
    for rel, entry in (manifest.files if only is None else only).items():
        path = layout.root / rel
        if not path.is_file():
            raise XMError(f"{path}: missing (the manifest lists it); the index is incomplete")
        size = path.stat().st_size
        if size != entry.bytes:
            raise XMError(f"{path}: {size} bytes, the manifest says {entry.bytes}; the file is damaged")
        if checksums and sha256_file(path) != entry.sha256:
            raise XMError(f"{path}: checksum differs from the manifest; the file is damaged")
