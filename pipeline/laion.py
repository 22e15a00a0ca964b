"""Where LAION-400M's metadata and precomputed embeddings live, and fetching them.

Offline, a part that is neither on disk nor reachable fails at once with one line
naming it and how to supply it (`--metadata-root` / `--embeddings-root` pointing at
a folder holding the same file names).
"""

from __future__ import annotations

import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

from xm.errors import XMError
from xm.indexes.layout import atomic_path

METADATA_ROOT = "https://the-eye.eu/public/AI/cah/laion400m-met-release/laion400m-meta"
METADATA_PARTS = 32
EMBEDDINGS_ROOT = "https://the-eye.eu/public/AI/cah/laion400m-met-release/laion400m-embeddings"
EMBEDDING_PARTS = 410
# The released metadata parts carry a Spark job id in their names.
_META_SUFFIX = "-5b54c5d5-bbcf-484d-a2ce-0d6f73df1a36-c000.snappy.parquet"


def metadata_part_name(i: int) -> str:
    return f"part-{i:05d}{_META_SUFFIX}"


def embedding_part_names(i: int) -> dict[str, str]:
    """Relative paths of LAION's embedding part i: images/, texts/, metadata/."""
    return {
        "img_emb": f"images/img_emb_{i}.npy",
        "text_emb": f"texts/text_emb_{i}.npy",
        "metadata": f"metadata/metadata_{i}.parquet",
    }


def parse_parts(text: str | None) -> list[int] | None:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    if not text:
        return None
    out: list[int] = []
    for piece in text.split(","):
        lo, _, hi = piece.strip().partition("-")
        try:
            out.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError as exc:
            raise XMError(f"--parts {text!r}: expected numbers and ranges like 0-3,7") from exc
    return sorted(set(out))


def offline() -> bool:
    """XM_OFFLINE=1: xm contacts no host but this machine (no network, or a test)."""
    return os.environ.get("XM_OFFLINE", "") not in ("", "0")


def usable_offline(root: str | None) -> bool:
    """Whether a --metadata-root / --embeddings-root can be read without the network."""
    return root is not None and ("://" not in root or is_loopback(root))


def unreachable(root: str, timeout: float = 2.0) -> str | None:
    """Why a --metadata-root / --embeddings-root cannot be read from here (a few words), or None:
    said before any work, so a build offline names what it lacks at once, XM_OFFLINE or not."""
    if "://" not in root:
        return None
    if offline() and not is_loopback(root):
        return "XM_OFFLINE is set"
    from urllib.parse import urlparse

    url = urlparse(root)
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError:
        return f"{url.hostname} unreachable"
    return None


def is_loopback(url: str) -> bool:
    from urllib.parse import urlparse

    host = (urlparse(url).hostname or "").lower()
    return host == "localhost" or host.startswith("127.") or host == "::1"


def fetch(root: str, rel: str, dest: Path, what: str, flag: str) -> Path:
    """A file from a local folder or a URL root, copied to `dest` (resumable: kept if present)."""
    if dest.is_file():
        return dest
    if "://" in root and offline() and not is_loopback(root):
        raise XMError(f"{what}: not on disk and XM_OFFLINE is set; download {rel} on a connected machine and pass {flag} FOLDER")
    if "://" not in root:
        src = Path(root) / rel
        alt = Path(root) / Path(rel).name  # a flat folder of parts works too
        for candidate in (src, alt):
            if candidate.is_file():
                return candidate
        raise XMError(f"{src}: {what} not found; download it on a connected machine and point {flag} at its folder")
    url = f"{root.rstrip('/')}/{rel}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response, atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise XMError(
            f"{url}: cannot download {what} ({reason}); fetch it on a connected machine and pass {flag} FOLDER"
        ) from exc
    return dest
