"""The manifest's records: what `manifest.json` says, as typed values.

Each record reads itself from the manifest's JSON (`from_json`, every field checked; a
wrong one is refused in one line naming the file and the field) and writes itself back
(`to_json`) with the keys in the order xm has always written them, so that the same
content gives the same bytes and an unchanged build rewrites nothing.

Values are kept as the JSON had them (a logit scale written as 100 stays 100): a record
read and written back is the document it was read from. Keys that older manifests lack
(format 1, early format 2) are optional here and stay absent when written back.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pyarrow as pa

from xm.errors import XMError
from xm.indexes.layout import FORMAT


class _NotRecorded(enum.Enum):
    NOT_RECORDED = "not recorded"

    def __repr__(self) -> str:
        return "NOT_RECORDED"


# a key the manifest predates (absent), as opposed to one written as null
NOT_RECORDED = _NotRecorded.NOT_RECORDED


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _map_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and all(isinstance(k, str) and check(x) for k, x in v.items())


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


class _Fields:
    """One JSON object of the manifest being read: its fields checked one by one, an error
    naming the file and the field's path (`encoders[ViT-B-32:openai].probe`)."""

    def __init__(self, data: Any, file: str, path: str) -> None:
        if not isinstance(data, dict):
            what = f"field {path}" if path else "the manifest"
            raise XMError(f"{file}: {what} is {_kind(data)}, expected an object; the manifest is damaged")
        self.data, self.file, self.path = data, file, path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def wrong(self, key: str, value: Any, expected: str) -> NoReturn:
        raise XMError(f"{self.file}: field {self.at(key)} is {_kind(value)}, expected {expected}; the manifest is damaged")

    def get(self, key: str, check: Callable[[Any], bool], expected: str) -> Any:
        if key not in self.data:
            raise XMError(f"{self.file}: field {self.at(key)} is missing; the manifest is damaged")
        return self.optional(key, check, expected, None)

    def optional(self, key: str, check: Callable[[Any], bool], expected: str, absent: Any) -> Any:
        if key not in self.data:
            return absent
        value = self.data[key]
        if not check(value):
            self.wrong(key, value, expected)
        return value

    def obj(self, key: str) -> _Fields:
        return _Fields(self.get(key, lambda v: True, "an object"), self.file, self.at(key))

    def items(self, key: str) -> list[tuple[str, _Fields]]:
        """The entries of an object of objects (`encoders`, `files`)."""
        value = self.get(key, lambda v: isinstance(v, dict), "an object")
        return [(k, _Fields(v, self.file, f"{self.at(key)}[{k}]")) for k, v in value.items()]

    def elements(self, key: str) -> list[_Fields]:
        """The elements of a list of objects (`parts`, `indexes`, `shards`)."""
        value = self.get(key, lambda v: isinstance(v, list), "a list")
        return [_Fields(v, self.file, f"{self.at(key)}[{i}]") for i, v in enumerate(value)]


_STR, _INT, _NUM = "a string", "an integer", "a number"
_STRS, _INT_OR_NULL = "a list of strings", "an integer or null"
_STR_MAP, _INT_MAP = "an object of strings", "an object of integers"


@dataclass(frozen=True)
class SourceEntry:
    """What the index was built from (`xm build-index --source` and its selection)."""

    kind: str
    source: str
    limit: int | None
    parts: list[int] | None
    shard_size: int | None = None  # None: not recorded (format 1)

    @classmethod
    def from_json(cls, f: _Fields) -> SourceEntry:
        return cls(kind=f.get("kind", _is_str, _STR), source=f.get("source", _is_str, _STR),
                   limit=f.get("limit", _or_null(_is_int), _INT_OR_NULL),
                   parts=f.get("parts", _or_null(_list_of(_is_int)), "a list of integers or null"),
                   shard_size=f.optional("shard_size", _is_int, _INT, None))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "source": self.source, "limit": self.limit, "parts": self.parts}
        if self.shard_size is not None:
            out["shard_size"] = self.shard_size
        return out


@dataclass(frozen=True)
class Roles:
    """X-MoRe's named encoders (defaults for the methods; `MemoryIndex.roles`)."""

    coarse: str
    fine: str
    inference: list[str]

    @classmethod
    def from_json(cls, f: _Fields) -> Roles:
        return cls(coarse=f.get("coarse", _is_str, _STR), fine=f.get("fine", _is_str, _STR),
                   inference=f.get("inference", _list_of(_is_str), _STRS))

    def to_json(self) -> dict[str, Any]:
        return {"coarse": self.coarse, "fine": self.fine, "inference": list(self.inference)}


@dataclass(frozen=True)
class EncoderEntry:
    """One encoder: who it is (`probe`, its weights' fingerprint; None when it was never
    loaded) and what it contributed: `embedded` and `norms` modalities, `codecs` (modalities
    stored as codes of a FAISS codec, `--text-codec`), `precomputed` (modality -> the source
    array it was copied from)."""

    slug: str
    dim: int | None
    logit_scale: float
    probe: list[float] | None
    embedded: list[str]
    norms: list[str]
    # the precision it ran at; None: never ran (precomputed); NOT_RECORDED: older manifests
    precision: str | None | _NotRecorded = NOT_RECORDED
    precomputed: dict[str, str] = field(default_factory=dict)
    codecs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, f: _Fields) -> EncoderEntry:
        return cls(slug=f.get("slug", _is_str, _STR), dim=f.get("dim", _or_null(_is_int), _INT_OR_NULL),
                   logit_scale=f.get("logit_scale", _is_number, _NUM),
                   probe=f.get("probe", _or_null(_list_of(_is_number)), "a list of numbers or null"),
                   embedded=f.get("embedded", _list_of(_is_str), _STRS), norms=f.get("norms", _list_of(_is_str), _STRS),
                   precision=f.optional("precision", _or_null(_is_str), "a string or null", NOT_RECORDED),
                   precomputed=f.optional("precomputed", _map_of(_is_str), _STR_MAP, {}),
                   codecs=f.optional("codecs", _map_of(_is_str), _STR_MAP, {}))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"slug": self.slug, "dim": self.dim, "logit_scale": self.logit_scale, "probe": self.probe,
                               "embedded": list(self.embedded), "norms": list(self.norms)}
        if self.precision is not NOT_RECORDED:
            out["precision"] = self.precision
        if self.precomputed:
            out["precomputed"] = dict(self.precomputed)
        if self.codecs:
            out["codecs"] = dict(self.codecs)
        return out


@dataclass(frozen=True)
class ShardEntry:
    """One FAISS shard file of a kNN index: IVF shards store global ids (`id_offset` 0,
    `id_range` their ids), Flat/HNSW ones local ids plus `id_offset`."""

    file: str
    ntotal: int
    id_offset: int
    id_range: tuple[int, int]

    @classmethod
    def from_json(cls, f: _Fields) -> ShardEntry:
        lo, hi = f.get("id_range", lambda v: _list_of(_is_int)(v) and len(v) == 2, "a list of two integers")
        return cls(file=f.get("file", _is_str, _STR), ntotal=f.get("ntotal", _is_int, _INT),
                   id_offset=f.get("id_offset", _is_int, _INT), id_range=(lo, hi))

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "ntotal": self.ntotal, "id_offset": self.id_offset, "id_range": list(self.id_range)}


@dataclass(frozen=True)
class IndexEntry:
    """One kNN index (an encoder's modality) under `dir`, as autofaiss built and tuned it."""

    key: str
    params: str
    metric: str
    dim: int
    shards: list[ShardEntry]
    k_target: int
    encoder: str
    modality: str
    dir: str
    refine_k_factor: int | None = None  # only for an index that re-scores (> 1)

    @classmethod
    def from_json(cls, f: _Fields) -> IndexEntry:
        return cls(key=f.get("key", _is_str, _STR), params=f.get("params", _is_str, _STR),
                   metric=f.get("metric", _is_str, _STR), dim=f.get("dim", _is_int, _INT),
                   shards=[ShardEntry.from_json(s) for s in f.elements("shards")], k_target=f.get("k_target", _is_int, _INT),
                   refine_k_factor=f.optional("refine_k_factor", _is_int, _INT, None),
                   encoder=f.get("encoder", _is_str, _STR), modality=f.get("modality", _is_str, _STR),
                   dir=f.get("dir", _is_str, _STR))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "params": self.params, "metric": self.metric, "dim": self.dim,
                               "shards": [s.to_json() for s in self.shards], "k_target": self.k_target}
        if self.refine_k_factor is not None:
            out["refine_k_factor"] = self.refine_k_factor
        return out | {"encoder": self.encoder, "modality": self.modality, "dir": self.dir}


@dataclass(frozen=True)
class PartEntry:
    """One part (a download shard or folder chunk): its name and rows, in global-id order."""

    name: str
    rows: int

    @classmethod
    def from_json(cls, f: _Fields) -> PartEntry:
        return cls(name=f.get("name", _is_str, _STR), rows=f.get("rows", _is_int, _INT))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows}


# the caption store's layouts: Arrow IPC shards of `shard_rows` ids; a manifest without a
# `store` entry has the Parquet part files of earlier memories (`indexes/store.py`)
STORE_SHARDS = "xm-store/2"


@dataclass(frozen=True)
class StoreEntry:
    """How the caption store is laid out: `format` (STORE_SHARDS) and the ids per shard file."""

    format: str
    shard_rows: int

    @classmethod
    def from_json(cls, f: _Fields) -> StoreEntry:
        fmt = f.get("format", _is_str, _STR)
        if fmt != STORE_SHARDS:
            raise XMError(f"{f.file}: field {f.at('format')} is {fmt!r}; this xm reads caption stores of format "
                          f"{STORE_SHARDS} (or none recorded): upgrade xm")
        rows = f.get("shard_rows", _is_int, _INT)
        if rows < 1:
            f.wrong("shard_rows", rows, "a positive integer")
        return cls(format=fmt, shard_rows=rows)

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "shard_rows": self.shard_rows}


@dataclass(frozen=True)
class BuildStats:
    """What the build met: failures by reason, items selected, empty captions."""

    failures: dict[str, int]
    selected: int | None
    empty_captions: int | None = None  # None: not recorded (older manifests)

    @classmethod
    def from_json(cls, f: _Fields) -> BuildStats:
        return cls(failures=f.get("failures", _map_of(_is_int), _INT_MAP),
                   selected=f.get("selected", _or_null(_is_int), _INT_OR_NULL),
                   empty_captions=f.optional("empty_captions", _is_int, _INT, None))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"failures": dict(self.failures), "selected": self.selected}
        if self.empty_captions is not None:
            out["empty_captions"] = self.empty_captions
        return out


@dataclass(frozen=True)
class FileEntry:
    """One listed file: size and checksum; `mtime_ns` lets a rewrite reuse the checksum of a
    file untouched since (format 1 did not record it)."""

    bytes: int
    sha256: str
    mtime_ns: int | None = None

    @classmethod
    def from_json(cls, f: _Fields) -> FileEntry:
        return cls(bytes=f.get("bytes", _is_int, _INT), sha256=f.get("sha256", _is_str, _STR),
                   mtime_ns=f.optional("mtime_ns", _is_int, _INT, None))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bytes": self.bytes, "sha256": self.sha256}
        if self.mtime_ns is not None:
            out["mtime_ns"] = self.mtime_ns
        return out


@dataclass(frozen=True)
class TableRef:
    """Where a large manifest keeps a list of records (`parts`, `files`): a Parquet table beside
    manifest.json (`manifest/<kind>-<sha>.parquet`), its row count and checksum."""

    table: str
    rows: int
    sha256: str

    @classmethod
    def from_json(cls, f: _Fields) -> TableRef:
        return cls(table=f.get("table", _is_str, _STR), rows=f.get("rows", _is_int, _INT), sha256=f.get("sha256", _is_str, _STR))

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "rows": self.rows, "sha256": self.sha256}


_PARTS_SCHEMA = pa.schema([("name", pa.string()), ("rows", pa.int64())])
_FILES_SCHEMA = pa.schema([("path", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string()), ("mtime_ns", pa.int64())])


def parts_table(parts: list[PartEntry]) -> pa.Table:
    """The parts as a table (name, rows), in global-id order."""
    return pa.table([pa.array([p.name for p in parts], pa.string()), pa.array([p.rows for p in parts], pa.int64())],
                    schema=_PARTS_SCHEMA)


def files_table(files: Mapping[str, FileEntry]) -> pa.Table:
    """The listed files as a table (path, bytes, sha256, mtime_ns; null where not recorded)."""
    entries = list(files.items())
    return pa.table([pa.array([p for p, _ in entries], pa.string()), pa.array([e.bytes for _, e in entries], pa.int64()),
                     pa.array([e.sha256 for _, e in entries], pa.string()),
                     pa.array([e.mtime_ns for _, e in entries], pa.int64())], schema=_FILES_SCHEMA)


def _columns(table: pa.Table, schema: pa.Schema, file: str, nullable: tuple[str, ...] = ()) -> list[list[Any]]:
    """The table's columns as lists, checked first (`_check_columns`)."""
    _check_columns(table, schema, file, nullable)
    return [table.column(fld.name).to_pylist() for fld in schema]


def _check_columns(table: pa.Table, schema: pa.Schema, file: str, nullable: tuple[str, ...] = ()) -> None:
    """Refuse (one line) a schema other than `schema` or a null where one is not allowed: the
    types are checked once per column, not per record."""
    for fld in schema:
        if fld.name not in table.column_names:
            raise XMError(f"{file}: no column {fld.name!r}; the manifest's table is damaged")
        if not table.schema.field(fld.name).type.equals(fld.type):
            raise XMError(f"{file}: column {fld.name!r} is {table.schema.field(fld.name).type}, expected {fld.type}; "
                          "the manifest's table is damaged")
        if fld.name not in nullable and table.column(fld.name).null_count:
            raise XMError(f"{file}: column {fld.name!r} has nulls; the manifest's table is damaged")


def parts_from_table(table: pa.Table, file: str) -> list[PartEntry]:
    names, rows = _columns(table, _PARTS_SCHEMA, file)
    return [PartEntry(name=n, rows=r) for n, r in zip(names, rows)]


class FilesTable(Mapping[str, FileEntry]):
    """The files table as the manifest's `files` mapping (path -> FileEntry), read lazily: a
    40,000-part memory lists 200,000 files, which opening it needs only as a count, a total
    and a sample. The paths are read when first looked up, an entry when asked for."""

    def __init__(self, table: pa.Table) -> None:
        self._table = table
        self._index: dict[str, int] | None = None

    def _paths(self) -> dict[str, int]:
        if self._index is None:
            self._index = {p: i for i, p in enumerate(self._table.column("path").to_pylist())}
        return self._index

    def __getitem__(self, path: str) -> FileEntry:
        i = self._paths()[path]
        mtime = self._table.column("mtime_ns")[i].as_py()
        return FileEntry(bytes=self._table.column("bytes")[i].as_py(), sha256=self._table.column("sha256")[i].as_py(),
                         mtime_ns=mtime)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths())

    def __len__(self) -> int:
        return self._table.num_rows

    def items(self) -> Any:  # every entry at once: one pass over the columns, not a lookup each
        return self._entries(self._table)

    @staticmethod
    def _entries(table: pa.Table) -> list[tuple[str, FileEntry]]:
        paths, sizes, digests, mtimes = (table.column(c).to_pylist() for c in ("path", "bytes", "sha256", "mtime_ns"))
        return [(p, FileEntry(bytes=b, sha256=h, mtime_ns=t)) for p, b, h, t in zip(paths, sizes, digests, mtimes)]

    def at(self, positions: list[int]) -> dict[str, FileEntry]:
        """The entries at these positions in the list (no path index built)."""
        return dict(self._entries(self._table.take(pa.array(positions, pa.int64()))))

    def values(self) -> Any:
        return [e for _, e in self.items()]

    def total_bytes(self) -> int:
        return int(self._table.column("bytes").to_numpy().sum())


def files_from_table(table: pa.Table, file: str) -> FilesTable:
    """The files table checked (schema, nulls) once per column, entries read on demand."""
    _check_columns(table, _FILES_SCHEMA, file, nullable=("mtime_ns",))
    return FilesTable(table)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A whole manifest (format 2). The authors in `pipeline/` fill in what they built
    (count ... stats); `manifest.write_manifest`, the one writer, stamps the rest (format,
    id, created, versions, files). `format_read` is set only on a manifest read from
    another format (format 1, upgraded in memory)."""

    count: int
    source: SourceEntry
    roles: Roles
    encoders: dict[str, EncoderEntry]
    parts: list[PartEntry]
    indexes: list[IndexEntry]
    stats: BuildStats
    format: str = FORMAT
    id: str = ""
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    # a dict, or a large manifest's files table read lazily (`FilesTable`)
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    format_read: str | None = None
    store: StoreEntry | None = None  # None: the Parquet part files of memories built before the store shards

    @staticmethod
    def table_refs(data: Any, file: str = "manifest.json") -> dict[str, TableRef]:
        """The lists a large manifest keeps in tables (`parts`, `files`: an object naming the
        table instead of the list itself); `manifest.read_manifest` reads them."""
        f = _Fields(data, file, "")
        return {key: TableRef.from_json(f.obj(key)) for key in ("parts", "files") if isinstance(f.data.get(key), dict)
                and "table" in f.data[key]}

    @classmethod
    def from_json(cls, data: Any, file: str = "manifest.json") -> Manifest:
        """A format-2 manifest's JSON as records; one line naming `file` and the field if a
        field is missing or of the wrong type (format 1: `manifest.upgrade_v1`). Lists kept in
        tables (`table_refs`) must have been put back into `data` first."""
        f = _Fields(data, file, "")
        return cls(format=f.get("format", _is_str, _STR), id=f.get("id", _is_str, _STR),
                   created=f.get("created", _is_str, _STR), count=f.get("count", _is_int, _INT),
                   source=SourceEntry.from_json(f.obj("source")), roles=Roles.from_json(f.obj("roles")),
                   encoders={spec: EncoderEntry.from_json(e) for spec, e in f.items("encoders")},
                   parts=[PartEntry.from_json(p) for p in f.elements("parts")],
                   indexes=[IndexEntry.from_json(e) for e in f.elements("indexes")],
                   stats=BuildStats.from_json(f.obj("stats")), versions=f.get("versions", _map_of(_is_str), _STR_MAP),
                   files={rel: FileEntry.from_json(e) for rel, e in f.items("files")},
                   format_read=f.optional("format_read", _is_str, _STR, None),
                   store=StoreEntry.from_json(f.obj("store")) if "store" in f.data else None)

    @classmethod
    def from_v1_json(cls, data: Any, file: str = "manifest.json") -> Manifest:
        """A format-1 manifest read as format 2 (see `manifest.upgrade_v1`): its encoders'
        `modalities` are what they embedded (no norms), its `indexes` (by modality, the
        coarse encoder's) lie under index/<modality>/."""
        f = _Fields(data, file, "")
        encoders = {spec: {**{k: v for k, v in e.data.items() if k != "modalities"},
                           "embedded": list(e.get("modalities", _list_of(_is_str), _STRS)), "norms": []}
                    for spec, e in f.items("encoders")}
        indexes = [{**e.data, "modality": modality, "dir": f"index/{modality}"} for modality, e in f.items("indexes")]
        return cls.from_json({**data, "format": FORMAT, "encoders": encoders, "indexes": indexes, "format_read": data["format"]}, file)

    def to_json(self, tables: dict[str, TableRef] | None = None) -> dict[str, Any]:
        """The whole document; with `tables`, the lists they name (`parts`, `files`) are
        written as references to those tables instead of inline."""
        tables = tables or {}
        out: dict[str, Any] = {
            "format": self.format, "id": self.id, "created": self.created, "count": self.count,
            "source": self.source.to_json(), "roles": self.roles.to_json(),
            "encoders": {spec: e.to_json() for spec, e in self.encoders.items()},
            "parts": tables["parts"].to_json() if "parts" in tables else [p.to_json() for p in self.parts],
            "indexes": [e.to_json() for e in self.indexes],
            "stats": self.stats.to_json(), "versions": dict(self.versions),
            "files": tables["files"].to_json() if "files" in tables else {rel: e.to_json() for rel, e in self.files.items()},
        }
        if self.store is not None:  # absent in memories built before the store shards
            out["store"] = self.store.to_json()
        if self.format_read is not None:  # only in memory: a file never says it
            out["format_read"] = self.format_read
        return out

    @property
    def total_bytes(self) -> int:
        if isinstance(self.files, FilesTable):
            return self.files.total_bytes()
        return sum(e.bytes for e in self.files.values())

    def index_entry(self, spec: str, modality: str) -> IndexEntry | None:
        for entry in self.indexes:
            if entry.encoder == spec and entry.modality == modality:
                return entry
        return None
