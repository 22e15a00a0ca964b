"""Object storage and other fsspec filesystems (`s3://`, `gs://`, `hdfs://`, `file://`) for
xm's artefacts and inputs, through fsspec, the layer img2dataset, autofaiss and
embedding-reader already use (s3fs: the `s3` extra; gcsfs, pyarrow's HDFS: their packages).

xm reads and writes its artefacts through memory maps, faiss files and atomic renames, none of
which object storage has. So a location on it is *mirrored*: a build works in a local staging
folder that is pulled from the location first (a rerun resumes from what is there) and pushed
to it after every stage (the manifest last, so a reader never sees a manifest whose files are
not there yet); a memory is copied to a local cache once and then opened as a folder.
`file://` URLs are plain local paths.

Every failure (no such bucket, no credentials, no filesystem package) is one line naming the
option and the location.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from xm.errors import XMError

# fsspec protocols that are not object storage for xm: plain paths and the HTTP sources xm reads itself
_LOCAL = {"file", "local"}
_HTTP = {"http", "https"}
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# where to get a protocol's filesystem (what the one-line error says)
_PACKAGES = {"s3": "s3fs (pip install 'xm-retrieval[s3]')", "s3a": "s3fs (pip install 'xm-retrieval[s3]')",
             "gs": "gcsfs", "gcs": "gcsfs", "hdfs": "pyarrow with libhdfs", "abfs": "adlfs", "az": "adlfs"}
MANIFEST = "manifest.json"
# a part is done when its marker exists: markers are written after every other file
MARKERS = "_work/done/"
# whole-object writes: an object is visible only once its upload completed (S3's PutObject and
# CompleteMultipartUpload, GCS's uploads, Azure's block-list commit), never part-written, and S3
# reads are strongly consistent after a write (since December 2020), so the final key is written
# directly. Elsewhere (HDFS, a mounted folder) a file is visible while it is written: a temporary
# name in the same folder first, then a rename.
_WHOLE_OBJECT_PUT = {"s3", "s3a", "gs", "gcs", "abfs", "az", "memory"}


def protocol_of(location: str | Path) -> str | None:
    """'s3' for 's3://bucket/key'; None for a plain path."""
    match = _URL.match(str(location))
    return match.group(1).lower() if match else None


def is_remote(location: str | Path | None) -> bool:
    """A location xm must mirror: an fsspec URL that is neither a local path nor HTTP."""
    if location is None:
        return False
    protocol = protocol_of(location)
    return protocol is not None and protocol not in _LOCAL | _HTTP


def unmangled(location: str | Path) -> str:
    """`Path("s3://b/k")` is `s3:/b/k`: give such a value back its URL form, so that a URL passed
    through a Path never becomes a local folder named `s3:`."""
    text = str(location)
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):/(?!/)", text)
    if match and match.group(1).lower() in _LOCAL:  # file:/abs/path: the path is absolute
        return f"{match.group(1)}:///{text[len(match.group(0)):]}"
    if match and match.group(1).lower() in _PACKAGES:
        return f"{match.group(1)}://{text[len(match.group(0)):]}"
    return text


def local_path(location: str) -> str:
    """`file:///x/y` -> `/x/y`; anything else as it is."""
    return location[len("file://"):] if location.lower().startswith("file://") else location


def filesystem(url: str, flag: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`, or one line naming `flag`."""
    import fsspec

    protocol = protocol_of(url) or "file"
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        need = _PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise XMError(f"{flag} {url}: {protocol}:// needs {need} ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from exc
    if not path.strip("/"):
        raise XMError(f"{flag} {url}: give a bucket and a folder ({protocol}://BUCKET/FOLDER)")
    return fs, path.rstrip("/")


def _fail(flag: str, url: str, exc: BaseException) -> XMError:
    """One line for what object storage answered (the cause kept)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    name = type(exc).__name__
    if "NoCredentials" in name or "credentials" in text.lower():
        return XMError(f"{flag} {url}: no credentials for this storage ({text}); set AWS_ACCESS_KEY_ID/"
                       "AWS_SECRET_ACCESS_KEY or a profile (s3), or the filesystem's own")
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "does not exist" in text:
        return XMError(f"{flag} {url}: not found ({text})")
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return XMError(f"{flag} {url}: access denied ({text})")
    return XMError(f"{flag} {url}: {name}: {text}")


def _signature(info: dict[str, Any]) -> str:
    """What says a stored file changed: its size and its ETag (object storage) or mtime."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return f"{int(info.get('size') or 0)}:{tag}"


def _listing(fs: Any, path: str, flag: str, url: str, must_exist: bool) -> dict[str, tuple[int, str]]:
    """{path relative to `path`: (size, signature)} of every file under it; the bucket must exist."""
    bucket = path.split("/", 1)[0]
    try:
        # fs.exists answers False for any failure: ls says which (no bucket, no credentials, denied)
        fs.ls(bucket if protocol_of(url) not in _LOCAL else path.rsplit("/", 1)[0] or "/", refresh=True)
        found = fs.find(path, detail=True, refresh=True) if fs.exists(path) else {}
    except Exception as exc:  # botocore, aiohttp and fsspec raise many types
        raise _fail(flag, url, exc) from exc
    if must_exist and not found:
        raise XMError(f"{flag} {url}: not found (nothing stored under it)")
    return {name[len(path):].lstrip("/"): (int(info.get("size") or 0), _signature(info)) for name, info in found.items()
            if info.get("type", "file") == "file"}


# what a folder records of its last push/pull, beside it (never inside: a staged --out must look
# like an xm index folder): {relative path: {"local": [size, mtime_ns], "remote": signature or None}}
def _record_path(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.xm-sync.json")


def _read_record(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(_record_path(folder).read_text())
    except (OSError, ValueError):
        return {}


def _write_record(folder: Path, record: dict[str, dict[str, Any]]) -> None:
    path = _record_path(folder)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, path)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _only(fs: Any, path: str, flag: str, url: str, only: Iterable[str]) -> dict[str, tuple[int, str]]:
    """The listing of just `only` (relative keys; a trailing "/" names a folder): what one task
    reads, without listing the whole location."""
    out: dict[str, tuple[int, str]] = {}
    for rel in only:
        if rel.endswith("/"):
            out.update({f"{rel}{k}": v for k, v in _listing(fs, f"{path}/{rel.rstrip('/')}", flag, url, False).items()})
            continue
        try:
            info = fs.info(f"{path}/{rel}")
        except FileNotFoundError:
            continue
        except Exception as exc:
            raise _fail(flag, url, exc) from exc
        if info.get("type", "file") == "file":
            out[rel] = (int(info.get("size") or 0), _signature(info))
    return out


def pull(url: str, folder: Path, flag: str, must_exist: bool = False, skip: tuple[str, ...] = (),
         only: Iterable[str] | None = None) -> int:
    """Copy what is under `url` into `folder`: every file that changed there since this folder
    last saw it (or that is missing or changed here); `skip`: relative path prefixes left out;
    `only`: just these keys (a trailing "/": a folder). Returns the number of files copied. The
    bucket must exist; `must_exist`: and something under `url`."""
    fs, path = filesystem(url, flag)
    remote = _listing(fs, path, flag, url, must_exist) if only is None else _only(fs, path, flag, url, only)
    folder.mkdir(parents=True, exist_ok=True)
    record = _read_record(folder)
    copied = 0
    for rel, (size, sig) in sorted(remote.items()):
        if rel.startswith(skip) if skip else False:
            continue
        target = folder / rel
        seen = record.get(rel, {})
        here = target.is_file() and seen.get("local") == _stamp(target) and target.stat().st_size == size
        if here and seen.get("remote") in (sig, None):  # None: pushed from here, unchanged since
            record[rel] = {"local": _stamp(target), "remote": sig}
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.pull")
        try:
            fs.get_file(f"{path}/{rel}", str(tmp))
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise _fail(flag, url, exc) from exc
        os.replace(tmp, target)
        record[rel] = {"local": _stamp(target), "remote": sig}
        copied += 1
    _write_record(folder, record)
    return copied


def _local_files(folder: Path) -> Iterable[Path]:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink() and not p.name.endswith((".tmp", ".pull", ".building")):  # whole files only
            yield p


def put_whole(fs: Any, local: str, remote: str, protocol: str | None) -> None:
    """Write `local` to `remote` so that no reader ever sees it part-written (`_WHOLE_OBJECT_PUT`):
    object storage's own upload, elsewhere a temporary name in the same folder and a rename."""
    if protocol in _WHOLE_OBJECT_PUT:
        fs.put_file(local, remote)
        return
    parent, _, name = remote.rpartition("/")
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
    fs.put_file(local, tmp)
    try:
        if fs.exists(remote):  # HDFS renames onto no existing file; the marker, written later, says done
            fs.rm(remote)
        fs.mv(tmp, remote)
    except BaseException:
        fs.rm(tmp)
        raise


def _push_order(rel: str) -> int:
    """Data files first, then markers, then the manifest: what says "done" comes after what it says is there."""
    return 2 if rel == MANIFEST else 1 if rel.startswith(MARKERS) else 0


def push(folder: Path, url: str, flag: str, skip: tuple[str, ...] = (), deletions: bool = False,
         on_file: Callable[[int], None] | None = None) -> int:
    """Copy to `url` every file of `folder` changed since the last push or pull (size or mtime),
    each whole (`put_whole`), data files first, `_work/done/` markers next, `manifest.json` last;
    `skip`: relative prefixes never pushed; `deletions`: files pulled or pushed from here and
    removed since are removed there too (after everything else). `on_file(1)` after each file.
    Returns the number of files copied."""
    fs, path = filesystem(url, flag)
    protocol = protocol_of(url)
    record = _read_record(folder)
    todo = [p for p in _local_files(folder) if record.get(p.relative_to(folder).as_posix(), {}).get("local") != _stamp(p)
            and not (skip and p.relative_to(folder).as_posix().startswith(skip))]
    todo.sort(key=lambda p: _push_order(p.relative_to(folder).as_posix()))
    gone = [rel for rel in record if deletions and not (folder / rel).is_file()]
    try:
        for i, p in enumerate(todo, 1):
            rel = p.relative_to(folder).as_posix()
            try:
                put_whole(fs, str(p), f"{path}/{rel}", protocol)
            except Exception as exc:
                raise _fail(flag, url, exc) from exc
            record[rel] = {"local": _stamp(p), "remote": None}
            if on_file is not None:
                on_file(1)
            if i % 256 == 0:  # a killed push resumes about where it stopped
                _write_record(folder, record)
        for rel in gone:
            try:
                fs.rm(f"{path}/{rel}")
            except FileNotFoundError:
                pass
            except Exception as exc:
                raise _fail(flag, url, exc) from exc
            record.pop(rel, None)
    finally:
        _write_record(folder, record)
    return len(todo)


def stats(url: str, flag: str, under: str = "") -> dict[str, tuple[int, int]]:
    """{relative path: (bytes, modification time in ns)} of every file under `url`/`under`: what
    the manifest records of files only the bucket holds (written there by the tasks)."""
    fs, path = filesystem(url, flag)
    root = f"{path}/{under.strip('/')}" if under.strip("/") else path
    try:
        found = fs.find(root, detail=True, refresh=True) if fs.exists(root) else {}
    except Exception as exc:
        raise _fail(flag, url, exc) from exc
    out = {}
    for name, info in found.items():
        if info.get("type", "file") != "file":
            continue
        when = info.get("LastModified") or info.get("last_modified") or info.get("mtime") or 0
        ns = int(when.timestamp() * 1e9) if hasattr(when, "timestamp") else int(float(when) * 1e9)
        out[name[len(path):].lstrip("/")] = (int(info.get("size") or 0), ns)
    return out


def sha256_of(url: str, flag: str = "--out") -> str:
    """sha256 of the file at `url`, streamed (never stored here)."""
    import fsspec

    digest = hashlib.sha256()
    try:
        with fsspec.open(url, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except Exception as exc:
        raise _fail(flag, url, exc) from exc
    return digest.hexdigest()


def read_bytes(url: str, rel: str, flag: str) -> bytes:
    """One (small) file under `url`."""
    fs, path = filesystem(url, flag)
    try:
        return fs.cat_file(f"{path}/{rel}")
    except Exception as exc:
        raise _fail(flag, url, exc) from exc


def remove(url: str, rel: str, flag: str) -> None:
    """Remove a file or folder under `url` (a temporary one); absent is fine."""
    fs, path = filesystem(url, flag)
    try:
        if fs.exists(f"{path}/{rel}"):
            fs.rm(f"{path}/{rel}", recursive=True)
    except Exception as exc:
        raise _fail(flag, url, exc) from exc


def check_writable(url: str, flag: str) -> None:
    """The bucket exists and these credentials may list it (before any work)."""
    fs, path = filesystem(url, flag)
    _listing(fs, path, flag, url, must_exist=False)


def cache_folder(url: str, base: Path, kind: str) -> Path:
    """A stable local folder for `url` under `base` (`kind`: stage, memory, source)."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1]).strip("._") or "root"
    return base / "object-store" / kind / f"{name}-{digest}"


def fetch_input(url: str, base: Path, flag: str) -> str:
    """A local copy of an input (a file or a folder) at `url`, pulled once into the cache; its
    local path. A file stays a file (a table source's name and suffix are kept)."""
    fs, path = filesystem(url, flag)
    try:
        is_file = fs.isfile(path)
    except Exception as exc:
        raise _fail(flag, url, exc) from exc
    folder = cache_folder(url, base, "source")
    if is_file:
        target = folder / path.rsplit("/", 1)[-1]
        folder.mkdir(parents=True, exist_ok=True)
        try:
            size = int(fs.size(path))
            if not (target.is_file() and target.stat().st_size == size):
                tmp = target.with_name(f".{target.name}.pull")
                fs.get_file(path, str(tmp))
                os.replace(tmp, target)
        except Exception as exc:
            raise _fail(flag, url, exc) from exc
        return str(target)
    pull(url, folder, flag, must_exist=True)
    return str(folder)


def get_folder(url: str, rel: str, dest: Path, flag: str) -> list[Path]:
    """Copy the files under `url`/`rel` (a temporary folder of results) into `dest`, flat; their paths."""
    fs, path = filesystem(url, flag)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    try:
        for name in sorted(fs.find(f"{path}/{rel.strip('/')}", refresh=True)):
            target = dest / name.rsplit("/", 1)[-1]
            fs.get_file(name, str(target))
            out.append(target)
    except Exception as exc:
        raise _fail(flag, url, exc) from exc
    return out
