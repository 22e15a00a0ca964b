"""What `xm serve` computes, independent of HTTP: clip back's kNN and metadata answers over
xm memories, and classification through the one method interface.

Every request body arrives here as parsed JSON (or multipart fields); every problem with
it is a `RequestError` (status + one line), which the HTTP layer sends as JSON.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
import secrets
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xm.encoders.device import CPU, Device
from xm.errors import XMError
from xm.methods.base import Queries
from xm.server.batching import Batcher
from xm.server.filters import connected_dedup, load_violence_prompts, safety_column, unsafe, violent
from xm.server.metrics import Metrics

# what clip back would honour and xm does not (they are accepted, named in this header, not failed)
UNHONOURED_HEADER = "X-XM-Unhonoured-Options"
STREAM_HEADER = "X-XM-Stream"
# method options naming files on the server: never taken from a request
FILE_OPTIONS = {"checkpoint", "descriptions", "texts_file", "wordnet_dir"}
# method options naming an encoder: only the served index's own encoders
ENCODER_OPTIONS = {"coarse", "fine", "encoder"}
# /classify fields that are not method options
CLASSIFY_FIELDS = {"image", "images", "labels", "method", "model", "templates", "protocol", "explain", "stream",
                   "indice_name", "options"}
STREAM_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
KNN_FIELDS = {"text", "image", "image_url", "embedding_input", "modality", "num_images", "num_result_ids",
              "indice_name", "deduplicate", "use_safety_model", "use_violence_detector", "use_mclip",
              "aesthetic_score", "aesthetic_weight", "verbose"}


class RequestError(Exception):
    """A request the server refuses: HTTP status and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Limits:
    max_body_bytes: int = 16 << 20  # request bodies (a 12 MB photo, base64-encoded)
    max_pixels: int = 40_000_000  # decoded image size: decompression bombs refused before decoding
    max_results: int = 10_000  # num_images, num_result_ids, /metadata ids, numeric method options
    max_text_chars: int = 4096
    max_labels: int = 1000
    max_label_chars: int = 200
    max_templates: int = 32
    max_images: int = 16  # images in one /classify request
    max_aspect: float = 20.0  # an image's long side over its short side (CLIP's resize scales the short side)
    max_request_pixels: int = 64_000_000  # decoded + resized pixels of all the images of one request
    resize_side: int = 336  # CLIP's input side the budget assumes: the largest common one (ViT-L-14-336)
    request_timeout_s: float = 60.0  # waiting for a compute slot, and for an encoder batch
    read_timeout_s: float = 20.0  # a request's line, headers and body must arrive within this (slowloris)
    max_pending_per_address: int = 32  # unfinished requests from one client address; the oldest is closed past it
    max_head_bytes: int = 16 * 1024  # request line and headers
    url_fetch_bytes: int = 16 << 20
    url_fetch_timeout_s: float = 10.0
    max_streams: int = 10_000  # least recently used streams are dropped beyond this
    max_classifiers: int = 32  # (labels, method, options) combinations kept warm
    max_connections: int = 1024  # open connections per process; past it the oldest unfinished one is closed


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(400, f"{key}: expected true or false, got {type(v).__name__}")
    return v


def _int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise RequestError(400, f"{key}: expected an integer, got {json.dumps(v)[:40]}")
    v = int(v)
    if not lo <= v <= hi:
        raise RequestError(400, f"{key}: {v} is outside {lo}..{hi}")
    return v


def _str(body: dict, key: str, max_chars: int) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise RequestError(400, f"{key}: expected a string, got {type(v).__name__}")
    if len(v) > max_chars:
        raise RequestError(413, f"{key}: {len(v)} characters, over the limit of {max_chars}")
    return v


def _number(v: Any) -> float | None:
    try:
        return float(v) if isinstance(v, str) else None
    except ValueError:
        return None


def decode_base64(text: str, what: str = "image") -> bytes:
    if text.startswith("data:"):
        _, sep, text = text.partition(",")
        if not sep:
            raise RequestError(400, f"{what}: a data URL without data")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"{what}: not valid base64 ({exc})") from exc


class PixelBudget:
    """What one request's images may cost, counted from their headers before any decoding: each
    image's decoded pixels and those of CLIP's resize (short side to `resize_side`: a thin
    image's long side grows with it), bounded per image (`max_pixels`, `max_aspect`) and summed
    over the request (`max_request_pixels`)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.used = 0

    def take(self, w: int, h: int, name: str) -> None:
        lim = self.limits
        if w * h > lim.max_pixels:
            raise RequestError(413, f"{name}: {w}x{h} pixels is over the server's limit of {lim.max_pixels / 1e6:g} megapixels")
        short, long = min(w, h), max(w, h)
        if short < 1 or long / short > lim.max_aspect:
            raise RequestError(413, f"{name}: {w}x{h} has an aspect ratio over the server's limit of {lim.max_aspect:g} "
                                    f"(CLIP's resize would make it {lim.resize_side}x{lim.resize_side * long // max(short, 1)})")
        resized = lim.resize_side * math.ceil(lim.resize_side * long / short)
        self.used += w * h + resized
        if self.used > lim.max_request_pixels:
            raise RequestError(413, f"{name}: the request's images decode and resize to over "
                                    f"{lim.max_request_pixels / 1e6:g} megapixels, the server's limit per request")


def probe_image(data: bytes, budget: PixelBudget, name: str = "image") -> None:
    """Charge an image's cost to the request's budget from its header alone (nothing decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(400, f"{name}: empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RequestError(400, f"{name}: not a readable image ({type(exc).__name__})") from exc
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"{name}: over the pixel limit (a decompression bomb?)") from exc
    budget.take(w, h, name)


def decode_images(images: Sequence[tuple[bytes, str]], budget: PixelBudget) -> list[Any]:
    """RGB PIL images from untrusted bytes: every image's cost is checked on its header before
    any is decoded, so a request over its budget costs no decoding at all."""
    from xm.encoders import load_image

    for data, name in images:
        probe_image(data, budget, name)
    out = []
    for data, name in images:
        try:
            out.append(load_image(data, name=name))
        except XMError as exc:
            raise RequestError(400, str(exc)) from exc
    return out


def decode_image(data: bytes, max_pixels: int | PixelBudget, name: str = "image") -> Any:
    """One image (`decode_images`); an int is a pixel limit with the other limits at their defaults."""
    budget = max_pixels if isinstance(max_pixels, PixelBudget) else PixelBudget(Limits(max_pixels=max_pixels))
    return decode_images([(data, name)], budget)[0]


def check_strings(value: Any, where: str = "body") -> None:
    """JSON may carry strings that are not text (a lone surrogate, `"\\ud800"`): refused here,
    before a tokenizer or the UTF-8 answer trips on them."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise RequestError(400, f"{where}: a string holds a lone surrogate ({v[exc.start]!a}); send UTF-8 text") from exc
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def check_template(t: str) -> None:
    """A prompt template has one `{}` (or `{c}`) where the class name goes, nothing else in braces."""
    import string

    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(t.replace("{c}", "{}")) if f is not None]
    except ValueError:  # an unmatched brace
        fields = []
    if len(fields) != 1 or fields[0][0] not in ("", "0") or fields[0][1] or fields[0][2]:
        raise RequestError(400, f"templates: {t[:60]!r} must hold exactly one {{}} (where the class name goes) "
                                "and no other braces (write {{{{ or }}}} for a literal brace)")


class ServedIndex:
    """One memory as clip back serves one indice: its coarse encoder embeds the queries.
    Request threads share the memory, which is safe for concurrent readers (`Memory`)."""

    def __init__(self, name: str, path: Path, columns: Sequence[str] | None = None, precision: str = "fp32",
                 violence_prompts: np.ndarray | None = None, device: Device = CPU) -> None:
        from xm.encoders import load_encoder
        from xm.memories import Memory, open_memory

        self.name = name
        self.path = Path(path)
        self.memory: Memory = open_memory(self.path)
        m = self.memory
        self.spec = m.roles["coarse"]
        self.encoder = load_encoder(self.spec, quiet=True, precision=precision, device=device)
        m.check_encoder(self.encoder, "coarse")
        self.modalities = [mod for mod in ("image", "text") if m.has_index(self.spec, mod)]
        m.preload()  # shards, embeddings, norms, caption hashes: opened before the first request
        self.info = m.describe()
        available = list(self.info["columns"])
        if columns:
            unknown = [c for c in columns if c not in available]
            if unknown:
                raise XMError(f"--columns: {', '.join(unknown)} not in {path}'s caption store ({', '.join(available)})")
            available = [c for c in available if c in columns]
        self.columns = available
        # clip back's filters this memory can honour (server/filters.py); the rest is said at start
        self.safety_column = safety_column(list(self.info["columns"]))
        dim = self.encoder.dim
        self.violence = violence_prompts if violence_prompts is not None and violence_prompts.shape[1] == dim else None
        self.cannot: dict[str, str] = {
            "use_mclip": "M-CLIP is not part of an xm index",
            "aesthetic_score": "the aesthetic embeddings are not part of an xm index"}
        if self.safety_column is None:
            self.cannot["use_safety_model"] = "the caption store has no NSFW or punsafe column (LAION metadata has)"
        if self.violence is None:
            self.cannot["use_violence_detector"] = (
                "no --violence-prompts FILE (clip back's violence_detection_*.npy)" if violence_prompts is None else
                f"--violence-prompts has dimension {violence_prompts.shape[1]}, the coarse encoder {dim}")
        src = self.info.get("source", {})
        root = Path(src.get("source", "")) if src.get("source") else None
        # local source files (the web page's thumbnails) are read only from under these folders
        self.image_roots = [r.resolve() for r in (root, self.path) if r is not None and r.is_dir()]

    def describe(self) -> dict[str, Any]:
        i = self.info
        filters = ["deduplicate"] + [f for f in ("use_safety_model", "use_violence_detector") if f not in self.cannot]
        return {"id": i["id"], "count": i["count"], "roles": i["roles"], "modalities": self.modalities, "columns": self.columns,
                "encoders": i["encoders"], "filters": filters, "has_local_images": bool(self.image_roots)}

    def local_image(self, row: dict) -> Path | None:
        """The source file of a memory item, if it lies under a served folder; else None."""
        rel = row.get("image_path")
        if not rel or not isinstance(rel, str) or "\x00" in rel:
            return None
        from xm.encoders import IMAGE_SUFFIXES

        for root in self.image_roots:
            try:
                p = (root / rel).resolve()
            except (OSError, RuntimeError):
                continue
            if p.is_relative_to(root) and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                return p
        return None


class Service:
    def __init__(self, indexes: Sequence[tuple[str, Path]], limits: Limits | None = None, allow_url_fetch: bool = False,
                 inline_images: bool = False, columns: Sequence[str] | None = None, batch_items: int = 32,
                 batch_wait_s: float = 0.004, precision: str | None = None, unhonoured: str = "header",
                 violence_prompts: Path | None = None, device: str | Device | None = None) -> None:
        from xm.encoders.precision import Precision

        self.precision = Precision.parse(precision)  # the server config's edge: every encoder the server runs
        self.device = Device.parse(device).single("xm serve")  # where they run, their batches included (None: auto)
        self.limits = limits or Limits()
        self.allow_url_fetch = allow_url_fetch
        self.inline_images = inline_images
        self.batch_items, self.batch_wait_s = batch_items, batch_wait_s
        self.metrics = Metrics()
        self.refuse_unhonoured = unhonoured == "refuse"  # --unhonoured refuse: a 400 rather than a header
        prompts = load_violence_prompts(violence_prompts) if violence_prompts is not None else None
        self.indices: dict[str, ServedIndex] = {}
        for name, path in indexes:
            if name in self.indices:
                raise XMError(f"indice name {name!r} is given twice; name them NAME=PATH")
            self.indices[name] = ServedIndex(name, path, columns, self.precision, prompts, self.device)
        if not self.indices:
            raise XMError("xm serve: give at least one index")
        self._lock = threading.Lock()
        self._batchers: dict[tuple[str, str], Batcher] = {}
        self._classifiers: OrderedDict[str, Any] = OrderedDict()
        self._classifier_locks: dict[str, threading.Lock] = {}
        self._streams: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def unhonoured_lines(self) -> list[str]:
        """What clip back would do and this server cannot, per indice: printed at start."""
        how = "refused (400)" if self.refuse_unhonoured else f"ignored, named in {UNHONOURED_HEADER}"
        lines = []
        for name, s in self.indices.items():
            for flag, why in s.cannot.items():
                lines.append(f"{name}: {flag} cannot be honoured ({why}); {how}")
        return lines

    # --- shared pieces -------------------------------------------------------------
    def index(self, name: Any) -> ServedIndex:
        if name is None or name == "":
            return next(iter(self.indices.values()))
        if not isinstance(name, str):
            raise RequestError(400, f"indice_name: expected a string, got {type(name).__name__}")
        if name not in self.indices:
            raise RequestError(404, f"indice_name {name[:80]!r}: unknown; this server has {', '.join(self.indices)}")
        return self.indices[name]

    def batcher(self, encoder: Any, kind: str) -> Batcher:
        key = (Queries.feature_key(encoder), kind)
        with self._lock:
            b = self._batchers.get(key)
            if b is None:
                fn = encoder.encode_images if kind == "image" else encoder.encode_texts
                name = f"{encoder.spec} {kind}"
                b = Batcher(name, fn, self.batch_items, self.batch_wait_s, lambda n: self.metrics.batch(name, n))
                self._batchers[key] = b
        return b

    def encode(self, encoder: Any, kind: str, items: Sequence[Any]) -> np.ndarray:
        from concurrent.futures import TimeoutError as FutureTimeout

        try:
            return self.batcher(encoder, kind)(items, timeout=self.limits.request_timeout_s)
        except FutureTimeout as exc:
            raise RequestError(503, f"the {kind} encoder is overloaded (no result within "
                                    f"{self.limits.request_timeout_s:g} s); retry later") from exc

    def close(self) -> None:
        for b in self._batchers.values():
            b.close()

    def fetch_url(self, url: str) -> bytes:
        if not self.allow_url_fetch:
            raise RequestError(403, "image_url: this server does not fetch URLs (start xm serve with --allow-url-fetch)")
        if not url.lower().startswith(("http://", "https://")):
            raise RequestError(400, "image_url: only http and https URLs are fetched")
        req = urllib.request.Request(url, headers={"User-Agent": "xm-serve"})
        try:
            with urllib.request.urlopen(req, timeout=self.limits.url_fetch_timeout_s) as r:  # noqa: S310 (scheme checked)
                data = r.read(self.limits.url_fetch_bytes + 1)
        except Exception as exc:  # any network failure is the URL's problem, not the server's
            raise RequestError(400, f"image_url: could not fetch ({type(exc).__name__}: {str(exc)[:120]})") from exc
        if len(data) > self.limits.url_fetch_bytes:
            raise RequestError(413, f"image_url: over {self.limits.url_fetch_bytes >> 20} MiB")
        return data

    def budget(self) -> PixelBudget:
        """What one request's images may cost (decoded and resized pixels)."""
        return PixelBudget(self.limits)

    def image_from(self, value: Any, what: str, budget: PixelBudget) -> Any:
        if not isinstance(value, str):
            raise RequestError(400, f"{what}: expected a base64 string, got {type(value).__name__}")
        return decode_image(decode_base64(value, what), budget, what)

    # --- clip back: /knn-service, /metadata, /indices-list ---------------------------
    def indices_list(self) -> list[str]:
        return list(self.indices)

    def rows(self, served: ServedIndex, ids: Sequence[int]) -> list[dict[str, Any]]:
        rows = served.memory.rows(list(ids), columns=tuple(served.columns)) if len(ids) else []
        out = []
        for r in rows:
            meta = {c: r.get(c) for c in served.columns}
            if self.inline_images:
                path = served.local_image(r)
                if path is not None:
                    meta["image"] = _jpeg_base64(path)
            out.append(meta)
        return out

    def knn(self, body: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """POST /knn-service, as clip back answers it."""
        lim = self.limits
        if not isinstance(body, dict):
            raise RequestError(400, "expected a JSON object")
        served = self.index(body.get("indice_name"))
        modality = body.get("modality", "image")
        if modality not in ("image", "text"):
            raise RequestError(400, f"modality: {json.dumps(modality)[:40]}; choose image or text")
        if modality not in served.modalities:
            raise RequestError(400, f"modality {modality}: indice {served.name} has no {modality} index")
        num_images = _int(body, "num_images", 40, 1, lim.max_results)
        num_ids = _int(body, "num_result_ids", num_images, 1, lim.max_results)
        dedup = _bool(body, "deduplicate")
        asked = {flag for flag in ("use_safety_model", "use_violence_detector", "use_mclip") if _bool(body, flag)}
        score, weight = body.get("aesthetic_score"), body.get("aesthetic_weight")
        for key, v in (("aesthetic_score", score), ("aesthetic_weight", weight)):
            if v not in (None, "") and (isinstance(v, bool) or not isinstance(v, (int, float, str))):
                raise RequestError(400, f"{key}: expected a number or \"\"")
        if score not in (None, ""):
            asked.add("aesthetic_score")
        order = ("use_safety_model", "use_violence_detector", "use_mclip", "aesthetic_score")
        unhonoured = [f for f in order if f in asked and f in served.cannot]
        if unhonoured and self.refuse_unhonoured:
            raise RequestError(400, f"{', '.join(unhonoured)}: indice {served.name} cannot honour "
                               f"{'it' if len(unhonoured) == 1 else 'them'} ({'; '.join(served.cannot[f] for f in unhonoured)}); "
                               "send them false (or aesthetic_score \"\")")
        text = _str(body, "text", lim.max_text_chars)
        inputs = {k: body.get(k) for k in ("text", "image", "image_url", "embedding_input") if body.get(k) is not None}
        if len(inputs) != 1:
            raise RequestError(400, "give exactly one of text, image, image_url, embedding_input"
                               + (f" (got {', '.join(inputs)})" if inputs else ""))
        enc = served.encoder
        if text is not None:
            query = self.encode(enc, "text", [text])
        elif "image" in inputs:
            query = self.encode(enc, "image", [self.image_from(inputs["image"], "image", self.budget())])
        elif "image_url" in inputs:
            url = _str(body, "image_url", 4096)
            assert url is not None  # in `inputs`: given, not None
            query = self.encode(enc, "image", [decode_image(self.fetch_url(url), self.budget(), "image_url")])
        else:
            vec = inputs["embedding_input"]
            if not isinstance(vec, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vec):
                raise RequestError(400, "embedding_input: expected a list of numbers")
            if len(vec) != enc.dim:
                raise RequestError(400, f"embedding_input: {len(vec)} numbers; indice {served.name} has dimension {enc.dim}")
            query = np.asarray(vec, np.float32)[None]
            if not np.isfinite(query).all():
                raise RequestError(400, "embedding_input: not finite")
        m = served.memory
        sims, ids = m.search(modality, query, min(num_ids, m.count), encoder=served.spec)
        sims, ids = sims[0], ids[0]
        stop = np.nonzero(ids < 0)[0]
        if len(stop):
            sims, ids = sims[: stop[0]], ids[: stop[0]]
        sims, ids = self.post_filter(served, modality, sims, ids, dedup, "use_safety_model" in asked,
                                     "use_violence_detector" in asked)
        metas = self.rows(served, ids[:num_images].tolist())
        out = []
        for j, (i, s) in enumerate(zip(ids, sims)):
            row = dict(metas[j]) if j < len(metas) else {}
            row["id"] = int(i)
            row["similarity"] = float(s)
            out.append(row)
        headers = {UNHONOURED_HEADER: ", ".join(unhonoured) if unhonoured else "none"}
        return out, headers

    def post_filter(self, served: ServedIndex, modality: str, sims: np.ndarray, ids: np.ndarray, dedup: bool,
                    safety: bool, violence: bool) -> tuple[np.ndarray, np.ndarray]:
        """clip back's post_filter: what each asked-for filter drops, computed over all results, then dropped."""
        drop: set[int] = set()
        m = served.memory
        if len(ids) and (dedup or (violence and served.violence is not None)):
            emb = m.embeddings(served.spec, modality).gather(ids)
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            if dedup:
                drop |= set(range(len(ids))) - {int(i) for i in connected_dedup(emb)}
            if violence and served.violence is not None:
                drop |= {int(i) for i in violent(emb, served.violence)}
        if len(ids) and safety and served.safety_column is not None:
            col = served.safety_column
            drop |= {int(i) for i in unsafe([r.get(col) for r in m.rows(list(ids), columns=(col,))])}
        if not drop:
            return sims, ids
        keep = np.array([i for i in range(len(ids)) if i not in drop], dtype=np.int64)
        return sims[keep], ids[keep]

    def metadata(self, body: Any) -> list[dict[str, Any]]:
        """POST /metadata: [{"id": .., "metadata": {..}}] for the given ids, in order."""
        if not isinstance(body, dict):
            raise RequestError(400, "expected a JSON object")
        ids = body.get("ids")
        if not isinstance(ids, list):
            raise RequestError(400, "ids: expected a list of integers")
        if len(ids) > self.limits.max_results:
            raise RequestError(413, f"ids: {len(ids)}, over the limit of {self.limits.max_results}")
        served = self.index(body.get("indice_name"))
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise RequestError(400, f"ids: {json.dumps(i)[:40]} is not an integer")
            if not 0 <= i < served.memory.count:
                raise RequestError(400, f"ids: {i} is outside 0..{served.memory.count - 1}")
        return [{"id": i, "metadata": meta} for i, meta in zip(ids, self.rows(served, ids))]

    # --- the web page's helpers -----------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {name: {**s.describe(), "image_url": self.allow_url_fetch} for name, s in self.indices.items()}

    def embedding(self, name: str, item: str, modality: str) -> dict[str, Any]:
        """A memory item's stored coarse embedding (the page's "similar": its kNN through embedding_input)."""
        served = self.index(name)
        if not re.fullmatch(r"[0-9]{1,18}", item) or not 0 <= int(item) < served.memory.count:
            raise RequestError(404, f"no item {item[:20]!r} in indice {served.name}")
        if modality not in ("image", "text") or not served.memory.has_embeddings(served.spec, modality):
            raise RequestError(400, f"modality {modality[:20]!r}: indice {served.name} keeps no such embeddings")
        vec = served.memory.embeddings(served.spec, modality).gather(np.array([int(item)]))[0].astype(np.float32)
        vec /= max(float(np.linalg.norm(vec)), 1e-12)
        return {"id": int(item), "modality": modality, "embedding": [float(x) for x in vec]}

    def methods(self) -> list[dict[str, Any]]:
        from xm.methods.registry import variants

        out = []
        for name, v in variants().items():
            if v.method.few_shot:
                continue
            out.append({"name": name, "summary": v.summary, "needs_memory": v.method.needs_memory,
                        "options": [{"name": o.name, "default": o.default, "help": o.help,
                                     "choices": list(o.choices) if o.choices else None}
                                    for o in v.method.options if o.name not in FILE_OPTIONS]})
        return out

    def local_image(self, name: str, item: str) -> tuple[bytes, str]:
        served = self.index(name)
        if not re.fullmatch(r"[0-9]{1,18}", item) or not 0 <= int(item) < served.memory.count:
            raise RequestError(404, f"no item {item[:20]!r} in indice {served.name}")
        row = served.memory.rows([int(item)])[0]
        path = served.local_image(row)
        if path is None:
            raise RequestError(404, f"item {item} of indice {served.name} has no local image under a served folder")
        size = path.stat().st_size
        if size > self.limits.url_fetch_bytes:
            raise RequestError(413, f"item {item}: image file over {self.limits.url_fetch_bytes >> 20} MiB")
        ctype = {".png": "image/png", ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp"}.get(
            path.suffix.lower(), "image/jpeg")
        if path.suffix.lower() in (".tif", ".tiff"):
            return _jpeg_bytes(path), "image/jpeg"
        return path.read_bytes(), ctype

    # --- /classify -----------------------------------------------------------------------
    def _labels(self, value: Any) -> list[str]:
        lim = self.limits
        if isinstance(value, str):  # a labels file's text: one per line, # comments
            value = [ln.strip() for ln in value.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise RequestError(400, "labels: expected a list of class names (or a labels file's text)")
        if len(value) > lim.max_labels:
            raise RequestError(413, f"labels: {len(value)}, over the limit of {lim.max_labels}")
        if any(len(x) > lim.max_label_chars for x in value):
            raise RequestError(413, f"labels: a class name over {lim.max_label_chars} characters")
        labels = [x.strip() for x in value]
        if len(labels) < 2:
            raise RequestError(400, "labels: classification needs at least two class names")
        if any(not x for x in labels):
            raise RequestError(400, "labels: an empty class name")
        seen: dict[str, str] = {}
        for x in labels:
            key = " ".join(x.lower().split())
            if key in seen:
                raise RequestError(400, f"labels: {seen[key]!r} and {x!r} are the same class to CLIP's tokenizer")
            seen[key] = x
        return labels

    def _options(self, served: ServedIndex, body: dict) -> dict[str, Any]:
        opts = body.get("options") or {}
        if not isinstance(opts, dict):
            raise RequestError(400, "options: expected an object of method options")
        flat = {k: v for k, v in body.items() if k not in CLASSIFY_FIELDS}
        both = sorted(set(opts) & set(flat))
        if both:
            raise RequestError(400, f"option(s) {', '.join(both)} given twice (top level and in options)")
        opts = {**flat, **opts}
        encoders = set(served.memory.encoders)
        for k, v in opts.items():
            if k in FILE_OPTIONS and v not in (None, ""):
                raise RequestError(403, f"option {k}: names a file on the server; not accepted over HTTP")
            if k in ENCODER_OPTIONS and v not in (None, "") and v not in encoders:
                raise RequestError(400, f"option {k}: {str(v)[:80]!r} is not an encoder of indice {served.name} "
                                        f"({', '.join(sorted(encoders))})")
            if isinstance(v, (dict, list)):
                raise RequestError(400, f"option {k}: expected a number, string or boolean")
            number = v if isinstance(v, (int, float)) and not isinstance(v, bool) else _number(v)
            if number is not None and abs(number) > self.limits.max_results:
                raise RequestError(400, f"option {k}: {v} is over the server's limit of {self.limits.max_results}")
            if isinstance(v, str) and len(v) > 200:
                raise RequestError(400, f"option {k}: over 200 characters")
        return opts

    def classifier(self, body: dict) -> tuple[Any, ServedIndex]:
        from xm.classify import Classifier
        from xm.methods.protocols import DEFAULT_PROTOCOL
        from xm.methods.zeroshot import DEFAULT_TEMPLATE

        lim = self.limits
        served = self.index(body.get("indice_name"))
        labels = self._labels(body.get("labels"))
        method = body.get("method", "xmore")
        if not isinstance(method, str) or len(method) > 64:
            raise RequestError(400, "method: expected a method name (see GET /xm/methods)")
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or model not in served.memory.encoders):
            raise RequestError(400, f"model: {str(model)[:80]!r} is not an encoder of indice {served.name} "
                                    f"({', '.join(served.memory.encoders)})")
        templates = body.get("templates") or [DEFAULT_TEMPLATE]
        if isinstance(templates, str):
            templates = [templates]
        if (not isinstance(templates, list) or not all(isinstance(t, str) and len(t) <= 300 for t in templates)
                or len(templates) > lim.max_templates):
            raise RequestError(400, f"templates: expected up to {lim.max_templates} strings, each with a {{}}")
        for t in templates:
            check_template(t)
        protocol = body.get("protocol") or DEFAULT_PROTOCOL
        if not isinstance(protocol, str):
            raise RequestError(400, "protocol: expected a string (authors | xm)")
        options = self._options(served, body)
        key = json.dumps([served.name, labels, method, model, templates, protocol, options], sort_keys=True, default=str)
        with self._lock:
            clf = self._classifiers.get(key)
            if clf is not None:
                self._classifiers.move_to_end(key)
                return clf, served
            build_lock = self._classifier_locks.setdefault(key, threading.Lock())
        with build_lock:  # one build per combination, however many requests ask at once
            with self._lock:
                clf = self._classifiers.get(key)
            if clf is None:
                try:
                    clf = Classifier(served.memory, labels, method=method, model=model, templates=templates,
                                     protocol_name=protocol, options=options, precision=self.precision,
                                     device=self.device)
                except XMError as exc:
                    raise RequestError(400, str(exc)) from exc
                clf.evidence_lock = None if clf.method.thread_safe_evidence else threading.Lock()
                with self._lock:
                    self._classifiers[key] = clf
                    while len(self._classifiers) > lim.max_classifiers:
                        old, _ = self._classifiers.popitem(last=False)
                        self._classifier_locks.pop(old, None)
        return clf, served

    def _stream(self, clf: Any, stream: str | None) -> tuple[dict[str, Any] | None, str | None]:
        if stream is None:
            return None, None
        with self._lock:
            s = self._streams.get(stream)
            if s is None:
                s = {"key": clf.stream_key, "state": clf.method.new_state(), "lock": threading.Lock()}
                self._streams[stream] = s
                while len(self._streams) > self.limits.max_streams:
                    self._streams.popitem(last=False)
            elif s["key"] != clf.stream_key:
                raise RequestError(409, f"stream {stream}: belongs to a stream with another index, label set, model, "
                                        "method or options; use a new stream id")
            self._streams.move_to_end(stream)
        return s, stream

    def classify(self, body: Any, stream_header: str | None = None) -> tuple[Any, dict[str, str]]:
        """POST /classify: what `xm classify --json` prints for each image (explanation included)."""
        from xm.classify import result_rows

        if not isinstance(body, dict):
            raise RequestError(400, "expected a JSON object (or multipart form fields)")
        single = "images" not in body
        raw = [body.get("image")] if single else body.get("images")
        if single and body.get("image") is None:
            raise RequestError(400, "image: required (base64, or a multipart file field)")
        if not isinstance(raw, list) or not raw:
            raise RequestError(400, "images: expected a non-empty list of base64 images")
        if len(raw) > self.limits.max_images:
            raise RequestError(413, f"images: {len(raw)}, over the limit of {self.limits.max_images} per request")
        explain = _bool(body, "explain", True)
        stream = body.get("stream")
        if stream is None:
            stream = stream_header
        if stream is True:
            stream = "s-" + secrets.token_urlsafe(12)
        if stream is not None and (not isinstance(stream, str) or not STREAM_ID.match(stream)):
            raise RequestError(400, "stream: expected an id of 1-64 letters, digits, '_', '-', '.' or ':' (or true for a new one)")
        if all(isinstance(v, str) for v in raw):
            names = ["image"] if single else [f"images[{i}]" for i in range(len(raw))]
            images = decode_images([(decode_base64(v, n), n) for v, n in zip(raw, names)], self.budget())
        else:  # multipart: decoded already (classify_form)
            images = raw
        if not all(hasattr(im, "size") for im in images):
            raise RequestError(400, "image: expected a base64 string")
        clf, _ = self.classifier(body)
        s, stream_id = self._stream(clf, stream)
        method = clf.method
        queries = BatchedQueries(self, images)
        try:
            if clf.evidence_lock is None:
                evidence = method.evidence(queries)
            else:
                with clf.evidence_lock:
                    evidence = method.evidence(queries)
            if s is None:
                decision = method.decide(evidence, method.new_state())
            else:
                with s["lock"]:
                    decision = method.decide(evidence, s["state"])
        except XMError as exc:
            raise RequestError(400, str(exc)) from exc
        rows = result_rows(method, clf.classnames, decision, evidence, explain)
        headers = {STREAM_HEADER: stream_id} if stream_id else {}
        return (rows[0] if single else rows), headers


    def classify_form(self, fields: dict[str, list[Any]], stream_header: str | None = None) -> tuple[Any, dict[str, str]]:
        """/classify as multipart/form-data: `image` (file, repeatable), `labels` (text or a file),
        the other fields as text, repeated `templates`; anything else is a method option."""
        out: dict[str, Any] = {}
        files: list[tuple[bytes, str]] = []
        for name, values in fields.items():
            check_strings(name, "multipart field name")
            for value in values:
                if name in ("image", "images"):
                    if not isinstance(value, tuple):
                        raise RequestError(400, f"multipart field {name}: expected a file")
                    files.append((value[1], str(value[0])[:80] or name))
                    continue
                if isinstance(value, tuple):  # a file: its text (labels files, mostly)
                    try:
                        value = value[1].decode("utf-8-sig")
                    except UnicodeDecodeError as exc:
                        raise RequestError(400, f"multipart field {name}: not UTF-8 text") from exc
                check_strings(value, f"multipart field {name}")
                if name in ("templates", "template"):
                    out.setdefault("templates", []).append(value)
                elif name == "explain":
                    out["explain"] = value.strip().lower() in ("1", "true", "yes", "on")
                elif name in out:
                    raise RequestError(400, f"multipart field {name}: given twice")
                else:
                    out[name] = value.strip() if name != "labels" else value
        images = decode_images(files, self.budget())
        if len(images) == 1:
            out["image"] = images[0]
        elif images:
            out["images"] = images
        return self.classify(out, stream_header)


class BatchedQueries(Queries):
    """`Queries` whose image features come from the shared, cross-request encoder batchers."""

    def __init__(self, service: Service, images: Sequence[Any]) -> None:
        super().__init__(images)
        self.service = service

    def _encode(self, encoder: Any, batch_size: int) -> np.ndarray:
        t = time.perf_counter()
        out = self.service.encode(encoder, "image", self.images)
        self.add_time(f"encode {encoder.spec}", time.perf_counter() - t)
        return out


def _jpeg_bytes(path: Path) -> bytes:
    from xm.encoders import load_image

    buf = io.BytesIO()
    load_image(path).save(buf, format="JPEG")  # PIL's default quality, as clip back encodes them
    return buf.getvalue()


def _jpeg_base64(path: Path) -> str | None:
    try:
        return base64.b64encode(_jpeg_bytes(path)).decode("ascii")
    except XMError:
        return None


def finite_json(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, np.generic):
        return finite_json(value.item())
    return value


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
