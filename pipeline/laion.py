"""Where LAION-400M's metadata and precomputed embeddings live, and fetching them.

Offline, a part that is neither on disk nor reachable fails at once with one line
naming it and how to supply it (`--metadata-root` / `--embeddings-root` pointing at
a folder holding the same file names).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from xm.errors import XMError
from xm.indexes.layout import atomic_path

METADATA_ROOT = "https://the-eye.eu/public/AI/cah/laion400m-met-release/laion400m-meta"
METADATA_PARTS = 32
EMBEDDINGS_ROOT = "https://the-eye.eu/public/AI/cah/laion400m-met-release/laion400m-embeddings"
EMBEDDING_PARTS = 410
# a part's files are fetched together, and parts by several tasks at once; each request is
# retried (urllib3's Retry: backoff, honouring Retry-After) before the part fails
FETCH_THREADS = 4
FETCH_RETRIES = 5
FETCH_TIMEOUT_S = 60
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
    import requests

    try:
        with _session().get(url, stream=True, timeout=FETCH_TIMEOUT_S) as response, atomic_path(dest) as tmp:
            response.raise_for_status()
            response.raw.decode_content = True  # a server that gzips the transfer still gives the file's bytes
            with open(tmp, "wb") as f:
                shutil.copyfileobj(response.raw, f, 1 << 20)
    except (requests.RequestException, OSError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise XMError(
            f"{url}: cannot download {what} ({reason}); fetch it on a connected machine and pass {flag} FOLDER"
        ) from exc
    return dest


def fetch_many(jobs: Sequence[tuple[str, str, Path, str, str]], threads: int = FETCH_THREADS) -> list[Path]:
    """`fetch` for each (root, rel, dest, what, flag), `threads` at a time; in order. The first
    failure is raised once the others have finished (a retried task finds those in place)."""
    if len(jobs) <= 1:
        return [fetch(*job) for job in jobs]
    with ThreadPoolExecutor(min(threads, len(jobs)), thread_name_prefix="xm-fetch") as pool:
        futures = [pool.submit(fetch, *job) for job in jobs]
        return [f.result() for f in futures]


_SESSIONS: dict[int, Any] = {}


def _session() -> Any:
    """A requests session per process whose every request is retried by urllib3 (connection
    errors, 429 and 5xx answers, with exponential backoff): one flaky answer out of the 1,230
    files of LAION's embeddings no longer fails a build."""
    pid = os.getpid()  # a forked worker makes its own connections
    if pid not in _SESSIONS:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        retry = Retry(total=FETCH_RETRIES, connect=FETCH_RETRIES, read=FETCH_RETRIES, backoff_factor=0.5,
                      status_forcelist=(429, 500, 502, 503, 504), allowed_methods=frozenset({"GET"}),
                      respect_retry_after_header=True, raise_on_status=True)
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=max(FETCH_THREADS, 8))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _SESSIONS[pid] = session
    return _SESSIONS[pid]
