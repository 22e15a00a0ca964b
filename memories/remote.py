"""A memory on the other side of clip-retrieval's HTTP API (xm's `xm serve` or clip-retrieval's
own `clip back`), used by X-MoRe as the X-MoRe authors ran it: kNN on the back, everything
else here.

    xm classify photo.jpg --labels classes.txt --index "http://host:1234/?indice_name=NAME"

    from xm.memories import open_memory
    memory = open_memory("http://127.0.0.1:1234/?indice_name=NAME")   # a RemoteMemory
    Classifier(memory, labels, method="xmore")

What crosses the wire: the query's coarse embedding (`embedding_input`) to `/knn-service`
(deduplicate, safety and aesthetic options off: X-MoRe de-duplicates captions itself), and
ids to `/metadata` for captions not already returned. What is computed here and cached: the
caption embeddings (and their norms, for the raw-dot re-ranking) under the fine and
inference encoders, keyed by the caption's text, in memory and on disk
(`~/.cache/xm/remote-captions/`, or XM_CACHE_DIR).

URL parameters: `indice_name` (default: the back's only indice), and where the back is not
xm's (it cannot say which encoders it was built with) `coarse=ARCH:PRETRAINED` (required: the
encoder the back's index holds, e.g. ViT-L-14:openai for LAION's), `fine=` (default: coarse),
`inference=` (default: coarse). A bearer token comes from `token=` or XM_TOKEN.
"""

from __future__ import annotations

import atexit
import hashlib
import http.client
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import numpy as np

from xm.errors import XMError
from xm.indexes.layout import caption_hash
from xm.memories.base import Memory

UNKNOWN_COUNT = 1 << 40  # a clip back does not say how many items it holds
ENDPOINTS = ("/knn-service", "/metadata", "/indices-list")


def _cache_root() -> Path:
    return Path(os.environ.get("XM_CACHE_DIR") or Path.home() / ".cache" / "xm") / "remote-captions"


class _Client:
    """clip-retrieval's HTTP API as a client: JSON over HTTP/1.1, one keep-alive connection per thread."""

    def __init__(self, base: str, token: str | None, timeout: float) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise XMError(f"--index {base}: expected http://HOST:PORT/?indice_name=NAME")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.base = base
        self.token = token
        self.timeout = timeout
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = cls(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _exchange(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        """(status, body) of one request; a kept-alive connection the server closed is retried once."""
        try:
            return self._exchange_once(method, path, data, headers)
        except (http.client.HTTPException, ConnectionError, OSError):
            pass
        try:
            return self._exchange_once(method, path, data, headers)
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            raise XMError(f"{self.base}: {method} {path} failed ({type(exc).__name__}: {exc})") from exc

    def _exchange_once(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        conn = self._conn()
        try:
            conn.request(method, self.prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (http.client.HTTPException, ConnectionError, OSError):
            conn.close()
            self._local.conn = None
            raise

    def request(self, method: str, path: str, body: Any = None, quiet_404: bool = False) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        status, raw = self._exchange(method, path, data, headers)
        if status == 404 and quiet_404:
            return None
        if status != 200:
            try:
                msg = json.loads(raw).get("error", "")
            except (ValueError, AttributeError):
                msg = raw[:200].decode("utf-8", "replace")
            raise XMError(f"{self.base}: {method} {path} answered {status}" + (f": {msg}" if msg else ""))
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise XMError(f"{self.base}: {method} {path} answered something that is not JSON") from exc


class _CaptionVectors:
    """Caption embeddings (and norms) under one encoder, computed here from fetched captions,
    cached by the caption's text hash; `gather(ids)` is what `EmbeddingMatrix.gather` is."""

    def __init__(self, memory: RemoteMemory, spec: str) -> None:
        from xm.encoders import load_encoder

        self.memory = memory
        self.encoder = load_encoder(spec, quiet=True)
        self.dim = self.encoder.dim
        self._lock = threading.Lock()
        self.emb: dict[int, np.ndarray] = {}
        self.norm: dict[int, float] = {}
        probe = hashlib.sha256(json.dumps(self.encoder.probe()).encode()).hexdigest()[:12]
        self.file = _cache_root() / f"{self.encoder.spec.slug}-{probe}.npz"
        self._loaded_n = 0
        if memory.disk_cache and self.file.is_file():
            try:
                with np.load(self.file) as z:
                    self.emb = dict(zip(z["hashes"].tolist(), z["emb"]))
                    self.norm = dict(zip(z["hashes"].tolist(), z["norms"].tolist()))
                    self._loaded_n = len(self.emb)
            except (OSError, ValueError, KeyError):
                self.emb, self.norm = {}, {}
        if memory.disk_cache:
            atexit.register(self.save)

    def _ensure(self, ids: np.ndarray) -> list[int]:
        hashes = self.memory.hashes_of(ids)
        missing = [h for h in dict.fromkeys(hashes) if h not in self.emb]
        if missing:
            by_hash = self.memory.captions_by_hash(ids)
            texts = [by_hash[h] for h in missing]
            emb, norms = self.encoder.encode_texts_with_norms(texts)
            emb = emb.astype(np.float16).astype(np.float32)  # as a built index stores them
            with self._lock:
                self.emb.update(zip(missing, emb))
                self.norm.update(zip(missing, norms.tolist()))
        return hashes

    def gather(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.emb[h] for h in self._ensure(ids)]).astype(np.float32)

    def norms(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        return np.asarray([self.norm[h] for h in self._ensure(ids)], np.float32)

    def save(self) -> None:
        if len(self.emb) == self._loaded_n:
            return
        from xm.indexes.layout import atomic_path

        with self._lock:
            hashes = np.fromiter(self.emb, np.int64, len(self.emb))
            emb = np.stack([self.emb[h] for h in hashes.tolist()]).astype(np.float16) if len(hashes) else np.zeros((0, self.dim), np.float16)
            norms = np.asarray([self.norm[h] for h in hashes.tolist()], np.float32)
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.file) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, hashes=hashes, emb=emb, norms=norms)
            self._loaded_n = len(hashes)
        except OSError:
            pass  # a cache that cannot be written is only slower next time


class _Norms:
    """Indexable like the norms array of a local index (`norms[ids]`)."""

    def __init__(self, vectors: _CaptionVectors) -> None:
        self.vectors = vectors

    def __getitem__(self, ids: Any) -> np.ndarray:
        return self.vectors.norms(np.atleast_1d(np.asarray(ids, np.int64)))


class _Hashes:
    """Indexable like `caption_hash.npy` (`hashes[i]`), from the captions the back returned."""

    def __init__(self, memory: RemoteMemory) -> None:
        self.memory = memory

    def __getitem__(self, i: Any) -> Any:
        ids = np.atleast_1d(np.asarray(i, np.int64))
        out = np.asarray(self.memory.hashes_of(ids), np.int64)
        return out if np.ndim(i) else out[0]


class RemoteMemory(Memory):
    """A memory whose kNN index is on a clip-retrieval back (X-MoRe's retrieval over HTTP).

    It holds no folder: search and rows are asked of the back; caption embeddings and norms
    are computed here from the captions, for any encoder; what a back cannot give (image
    embeddings, kNN indexes for other encoders) is refused in one line.

    Safe for concurrent readers: the fetched rows and computed vectors are cached under locks,
    and each thread keeps its own connection.
    """

    kind = "remote"
    remote = True

    def __init__(self, url: str, indice_name: str | None = None, coarse: str | None = None, fine: str | None = None,
                 inference: str | None = None, token: str | None = None, timeout: float = 120.0, parallel: int = 8,
                 disk_cache: bool = True) -> None:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        path = parts.path.rstrip("/")
        for ep in ENDPOINTS:  # a ClipClient-style URL names the endpoint: the base is what precedes it
            if path.endswith(ep):
                path = path[: -len(ep)]
        base = f"{parts.scheme}://{parts.netloc}{path}"
        self.url = url
        self.root = base  # what error messages name
        self.disk_cache = disk_cache
        self.client = _Client(base, token or query.get("token") or os.environ.get("XM_TOKEN"), timeout)
        self.parallel = max(1, parallel)
        names = self.client.request("GET", "/indices-list")
        if not isinstance(names, list) or not names:
            raise XMError(f"{base}: /indices-list answered no indices")
        name = indice_name or query.get("indice_name")
        if name is None:
            if len(names) > 1:
                raise XMError(f"{base}: serves {', '.join(map(str, names))}; choose one with ?indice_name=NAME")
            name = names[0]
        if name not in names:
            raise XMError(f"{base}: no indice {name!r}; it serves {', '.join(map(str, names))}")
        self.indice_name = name
        info = self.client.request("GET", "/xm/indices", quiet_404=True)  # xm's back says what it holds
        info = info.get(name) if isinstance(info, dict) else None
        coarse = coarse or query.get("coarse")
        fine = fine or query.get("fine")
        inference = inference or query.get("inference")
        if info is not None:
            roles = info["roles"]
            if coarse and coarse != roles["coarse"]:
                raise XMError(f"{base}: indice {name} was built with coarse encoder {roles['coarse']}, not {coarse}")
            self._roles = {"coarse": roles["coarse"], "fine": fine or roles["fine"],
                           "inference": [inference] if inference else list(roles["inference"])}
            self.count = int(info["count"])
            self._id = f"remote-{info['id']}"
            self._encoders: dict[str, dict[str, Any]] = dict(info["encoders"])
            self._probes = {s: e["probe"] for s, e in info["encoders"].items()}
            self._modalities = list(info.get("modalities", ["image", "text"]))
            self._columns = list(info.get("columns", ["caption", "url"]))
        else:
            if not coarse:
                raise XMError(f"{base}: a clip back does not say its encoder; add &coarse=ARCH:PRETRAINED "
                              "(the encoder its index was built with) to the URL")
            self._roles = {"coarse": coarse, "fine": fine or coarse, "inference": [inference or coarse]}
            self.count = UNKNOWN_COUNT
            self._id = "remote-" + hashlib.sha256(f"{base}|{name}|{coarse}".encode()).hexdigest()[:16]
            self._encoders = {}
            self._probes = {}
            self._modalities = ["image", "text"]
            self._columns = ["caption", "url"]
        self._meta: dict[int, dict[str, Any]] = {}
        self._meta_lock = threading.Lock()
        self._vectors: dict[str, _CaptionVectors] = {}
        self._vectors_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="xm-remote")

    def __repr__(self) -> str:
        return f"RemoteMemory({self.root}, indice {self.indice_name})"

    # --- what the back says of itself --------------------------------------------------
    @property
    def id(self) -> str:
        return self._id

    @property
    def roles(self) -> dict[str, Any]:
        return self._roles

    @property
    def encoders(self) -> list[str]:
        """The back's encoders (an xm back says them), or the roles' (a clip back does not)."""
        if self._encoders:
            return list(self._encoders)
        return list(dict.fromkeys([self._roles["coarse"], self._roles["fine"], *self._roles["inference"]]))

    def default_model(self) -> str:
        return self._roles["inference"][0]

    def probe(self, spec: str) -> list[float] | None:
        return self._probes.get(str(spec))

    def describe(self) -> dict[str, Any]:
        parts = urlsplit(self.url)  # the URL as given, less any token in it
        query = urlencode([(k, v) for k, v in parse_qs(parts.query).items() if k != "token"], doseq=True)
        location = parts._replace(query=query).geturl()
        return {"kind": self.kind, "location": location, "id": self.id, "count": self.count, "roles": self.roles,
                "encoders": dict(self._encoders), "source": {"kind": "remote", "source": location},
                "columns": list(self._columns), "indice_name": self.indice_name}

    def has_embeddings(self, spec: str, modality: str) -> bool:
        return modality == "text"  # caption embeddings: computed here, for any encoder

    def has_norms(self, spec: str, modality: str) -> bool:
        return modality == "text"

    def has_index(self, spec: str, modality: str) -> bool:
        return str(spec) == self._roles["coarse"] and modality in self._modalities

    def check_encoder(self, encoder: Any, role: str) -> None:
        expected = self._roles.get(role) if role in ("coarse", "fine") else None
        if expected is not None and str(encoder.spec) != expected:
            raise XMError(f"{self.root}: indice {self.indice_name} uses {role} encoder {expected}, not {encoder.spec}")
        probe = self._probes.get(str(encoder.spec))
        if role == "coarse" and probe is not None and not encoder.fingerprint_matches(probe):
            raise XMError(f"{self.root}: encoder {encoder.spec} has other weights than the ones that built indice "
                          f"{self.indice_name}")

    # --- caption embeddings and norms, computed here ---------------------------------
    def _vectors_for(self, spec: str) -> _CaptionVectors:
        with self._vectors_lock:
            if spec not in self._vectors:
                self._vectors[spec] = _CaptionVectors(self, spec)
            return self._vectors[spec]

    def embeddings(self, spec: str, modality: str) -> _CaptionVectors:
        if modality != "text":
            raise XMError(f"{self.root}: a remote memory has no {modality} embeddings (only its kNN index is remote)")
        return self._vectors_for(str(spec))

    def norms(self, spec: str, modality: str) -> _Norms:
        if modality != "text":
            raise XMError(f"{self.root}: a remote memory has no {modality} embedding norms")
        return _Norms(self._vectors_for(str(spec)))

    # --- the back -------------------------------------------------------------------------
    def _knn_one(self, vector: np.ndarray, modality: str, k: int) -> list[dict[str, Any]]:
        body = {"text": None, "image": None, "image_url": None, "embedding_input": [float(x) for x in vector],
                "modality": modality, "num_images": int(k), "num_result_ids": int(k), "indice_name": self.indice_name,
                "deduplicate": False, "use_safety_model": False, "use_violence_detector": False, "use_mclip": False,
                "aesthetic_score": "", "aesthetic_weight": ""}
        rows = self.client.request("POST", "/knn-service", body)
        if not isinstance(rows, list):
            raise XMError(f"{self.root}: /knn-service answered {type(rows).__name__}, not a list")
        return rows

    def search(self, modality: str, queries: np.ndarray, k: int, encoder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        spec = str(encoder or self._roles["coarse"])
        if not self.has_index(spec, modality):
            raise XMError(f"{self.root}: indice {self.indice_name} has no {modality} kNN index for {spec}")
        q = np.atleast_2d(np.asarray(queries, np.float32))
        answers = list(self._pool.map(lambda v: self._knn_one(v, modality, k), q))
        sims = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        with self._meta_lock:
            for r, rows in enumerate(answers):
                for j, row in enumerate(rows[:k]):
                    ids[r, j], sims[r, j] = int(row["id"]), float(row["similarity"])
                    if "caption" in row:  # the metadata came with the result: no /metadata call
                        self._meta[int(row["id"])] = {c: v for c, v in row.items() if c not in ("id", "similarity", "image")}
        return sims, ids

    def metadata(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        ids = [int(i) for i in ids]
        with self._meta_lock:
            missing = [i for i in dict.fromkeys(ids) if i not in self._meta]
        for lo in range(0, len(missing), 1000):
            chunk = missing[lo : lo + 1000]
            answer = self.client.request("POST", "/metadata", {"ids": chunk, "indice_name": self.indice_name})
            got = {int(a["id"]): dict(a.get("metadata") or {}) for a in answer}
            with self._meta_lock:
                for i in chunk:
                    self._meta[i] = got.get(i, {})
        with self._meta_lock:
            return [self._meta[i] for i in ids]

    def hashes_of(self, ids: np.ndarray) -> list[int]:
        return [caption_hash(m.get("caption") or "") for m in self.metadata(np.asarray(ids).tolist())]

    def captions_by_hash(self, ids: np.ndarray) -> dict[int, str]:
        return {caption_hash(c): c for c in (m.get("caption") or "" for m in self.metadata(np.asarray(ids).tolist()))}

    def rows(self, ids: Sequence[int], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The back's metadata as rows of a caption store (id, caption, url, and what else it sends)."""
        out = []
        for i, r in zip(ids, self.metadata(ids)):
            row = {"id": int(i), **{k: v for k, v in r.items() if k not in ("id", "similarity", "image")}}
            row.setdefault("caption", None)
            row.setdefault("url", None)
            out.append({c: row.get(c) for c in columns} if columns else row)
        return out

    def captions(self, ids: Sequence[int]) -> list[str]:
        return [r.get("caption") or "" for r in self.metadata(ids)]

    @property
    def caption_hashes(self) -> _Hashes:
        return _Hashes(self)

    def close(self) -> None:
        for v in self._vectors.values():
            if self.disk_cache:
                v.save()
        self._pool.shutdown(wait=False)

