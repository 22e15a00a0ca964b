"""The HTTP layer of `xm serve`: Starlette routes served by uvicorn (h11), one or N processes.

    from xm.server.app import ServeConfig, serve
    serve(ServeConfig(indexes=[("mine", Path("indexes/mine"))]), on_ready=print)

HTTP parsing, keep-alive, header limits, routing (405 for a known path with another method) and
multipart come from uvicorn, h11, Starlette and python-multipart; `server/protocol.py` adds the
read deadline and the per-address limits uvicorn lacks; xm's own logic is `server/service.py`.

Routes (clip back's first, then xm's):
  POST /knn-service  POST /metadata  GET /indices-list       clip-retrieval's `clip back` API
  POST /classify                                            any method, `xm classify --json`'s answer
  GET /  /static/*                                          the web page
  GET /healthz  GET /metrics  GET /openapi.json             liveness, Prometheus text, the API's description
  GET /xm/indices  GET /xm/methods  GET /xm/image/NAME/ID   what the page and RemoteMemory read
  GET /xm/embedding/NAME/ID                                 an item's stored embedding (the page's "similar")

Every error is JSON `{"error": "...", "status": N}` with a 4xx status (5xx only for overload, or
a bug, which is logged and answered without a traceback). `/healthz` never waits for a compute
slot: it answers however busy the workers are.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import ipaddress
import json
import os
import pickle
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from xm.errors import XMError
from xm.server import protocol
from xm.server.openapi import openapi
from xm.server.service import (
    STREAM_HEADER,
    UNHONOURED_HEADER,
    Limits,
    RequestError,
    Service,
    check_strings,
    finite_json,
)

STATIC = Path(__file__).parent / "static"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/static/style.css": ("style.css", "text/css; charset=utf-8")}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self' data: blob: http: https:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
OPEN_PATHS = {"/", "/static/app.js", "/static/style.css", "/healthz", "/openapi.json"}  # no data: no token needed
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
CONFIG_ENV = "XM_SERVE_CONFIG"  # how `--workers N` hands the parsed options to its processes


@dataclass
class ServeConfig:
    indexes: list[tuple[str, Path]]
    host: str = "127.0.0.1"
    port: int = 1234
    workers: int = 1  # processes behind the one port, each with its own memory-mapped index and encoders
    concurrency: int = 16  # requests computed at once per process; more wait (up to the request timeout)
    token: str | None = None
    insecure_no_auth: bool = False
    allow_url_fetch: bool = False
    inline_images: bool = False
    columns: list[str] | None = None
    cors_origins: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    access_log: bool = False
    batch_items: int = 32
    batch_wait_ms: float = 4.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 | int8: how every encoder runs (see xm.encoders.PRECISIONS)
    unhonoured: str = "header"  # header: name unhonoured filters in X-XM-Unhonoured-Options; refuse: 400
    violence_prompts: Path | None = None  # clip back's violence detector: a (2, dim) prompt-embedding .npy
    device: Any = None  # where they run: a Device or its text (None: auto), parsed by Service


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise XMError(f"--token-file {path}: unreadable ({exc.strerror or exc})") from exc
    if len(token) < 16 or any(c.isspace() for c in token):
        raise XMError(f"--token-file {path}: the token must be one line of at least 16 characters without spaces")
    return token


def check_config(cfg: ServeConfig) -> None:
    if not is_loopback(cfg.host) and cfg.token is None and not cfg.insecure_no_auth:
        raise XMError(f"--host {cfg.host}: serving beyond this machine needs --token-file F (a bearer token), "
                      "or --insecure-no-auth to serve anyone who can reach the port")
    if cfg.workers < 1:
        raise XMError(f"--workers {cfg.workers}: must be at least 1")
    if cfg.concurrency < 1:
        raise XMError(f"--concurrency {cfg.concurrency}: must be at least 1")
    if not 0 <= cfg.port <= 65535:
        raise XMError(f"--port {cfg.port}: must be 0..65535")
    if cfg.unhonoured not in ("header", "refuse"):
        raise XMError(f"--unhonoured {cfg.unhonoured}: choose header or refuse")


def make_service(cfg: ServeConfig) -> Service:
    return Service(cfg.indexes, cfg.limits, allow_url_fetch=cfg.allow_url_fetch, inline_images=cfg.inline_images,
                   columns=cfg.columns, batch_items=cfg.batch_items, batch_wait_s=cfg.batch_wait_ms / 1e3,
                   precision=cfg.precision, unhonoured=cfg.unhonoured, violence_prompts=cfg.violence_prompts,
                   device=cfg.device)


# --- responses ---------------------------------------------------------------------------------
def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(finite_json(data), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return Response(body, status, {"Cache-Control": "no-store", **(headers or {})}, "application/json; charset=utf-8")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    extra = dict(headers or {})
    if status in (408, 411, 413, 431):
        extra["Connection"] = "close"  # the body is not read (or not whole): the connection cannot be reused
    return json_response(status, {"error": message, "status": status}, extra)


class Guard:
    """Before routing: DNS rebinding (a foreign Host on a loopback server without a token), the
    bearer token, and the security headers every answer carries."""

    def __init__(self, app: ASGIApp, cfg: ServeConfig) -> None:
        self.app = app
        self.token = cfg.token
        self.check_host = cfg.token is None and is_loopback(cfg.host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        problem = self.problem(scope, headers)
        if problem is not None:
            return await error_response(*problem)(scope, receive, send)

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff"),
                                      (b"referrer-policy", b"no-referrer")]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def problem(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
        hosts = [v for k, v in headers if k == b"host"]
        if len(hosts) > 1:
            return 400, "header host given twice"
        if self.check_host:
            host = hosts[0].decode("latin-1") if hosts else ""
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
            if not (name.lower() in LOOPBACK_NAMES or is_loopback(name)):
                return 421, "Host header is not this machine (start with --token-file to serve other names)"
        path = scope["path"].rstrip("/") or "/"
        if self.token is None or path in OPEN_PATHS or scope["method"] == "OPTIONS":
            return None
        given = ""
        auth = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        else:
            from urllib.parse import parse_qs

            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if query.get("token"):
                given = query["token"][0]  # for clients that cannot set headers (ClipClient takes a URL)
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return 401, "missing or wrong bearer token (Authorization: Bearer TOKEN)"
        return None


class Http:
    """The endpoints of one process: parse the request, hand it to the service in a worker
    thread (bounded: `concurrency` at once), answer JSON."""

    def __init__(self, cfg: ServeConfig, service: Service) -> None:
        self.cfg = cfg
        self.service = service
        self.pages = {path: (STATIC / name).read_bytes() for path, (name, _) in PAGES.items()}
        self.spec = json.dumps(openapi(service)).encode()
        self._slots: asyncio.Semaphore | None = None  # made on the serving loop, at the first request
        self._threads: Any = None

    # --- plumbing -------------------------------------------------------------------------------
    def endpoint(self, fn: Callable[[Request], Awaitable[Response]], label: str) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(fn)
        async def handler(request: Request) -> Response:
            t0 = time.perf_counter()
            self.service.metrics.begin()
            response: Response | None = None
            try:
                response = await fn(request)
            except RequestError as exc:
                response = error_response(exc.status, exc.message)
            except XMError as exc:
                response = error_response(400, str(exc))
            except HTTPException as exc:  # Starlette's own refusals inside a handler (a multipart body without a boundary)
                response = error_response(exc.status_code, str(exc.detail))
            except ClientDisconnect:
                response = Response(b"", 400, {"Connection": "close"})  # nobody is listening any more
            except Exception as exc:  # a bug: logged here, never sent
                traceback.print_exc(file=sys.stderr)
                response = error_response(500, f"internal error ({type(exc).__name__}); see the server's log")
            finally:
                status = response.status_code if response is not None else 500
                self.service.metrics.end(label, status, time.perf_counter() - t0)
                if self.cfg.access_log:  # the path only: a ?token= never reaches the log
                    client = request.client.host if request.client else "-"
                    sys.stderr.write(f"xm serve: {client} {request.method} {request.url.path} {status}\n")
            return response

        return handler

    async def compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work (decoding, encoders, FAISS, the store) in a worker thread, at most
        `concurrency` at once; a request that waits longer than the request timeout gets a 503."""
        import anyio

        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.concurrency)
            self._threads = anyio.CapacityLimiter(self.cfg.concurrency)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.service.limits.request_timeout_s)
        except asyncio.TimeoutError as exc:
            raise RequestError(503, "all workers are busy; retry later") from exc
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._threads)
        finally:
            self._slots.release()

    async def body(self, request: Request) -> bytes:
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            raise RequestError(411, "chunked bodies are not accepted; send Content-Length")
        length = request.headers.get("content-length")
        if length is None:
            raise RequestError(411, "Content-Length required")
        try:
            n = int(length)
        except ValueError as exc:
            raise RequestError(400, f"Content-Length {length[:20]!r} is not a number") from exc
        limit = self.service.limits.max_body_bytes
        if n < 0 or n > limit:
            raise RequestError(413, f"body of {n} bytes is over the limit of {limit >> 20} MiB")
        return await request.body()  # uvicorn stops at Content-Length; protocol.py bounds the time it takes

    # --- endpoints ------------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        path = request.url.path
        headers = {"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
        return Response(self.pages[path], 200, headers, PAGES[path][1])

    async def healthz(self, request: Request) -> Response:
        return json_response(200, {"status": "ok", "indices": self.service.indices_list(), "pid": os.getpid()})

    async def metrics(self, request: Request) -> Response:
        text = self.service.metrics.text(extra={"xm_unfinished_requests": protocol.pending_count()})
        return Response(text.encode(), 200, {"Cache-Control": "no-store"}, "text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, request: Request) -> Response:
        return Response(self.spec, 200, {"Cache-Control": "no-cache"}, "application/json")

    async def indices_list(self, request: Request) -> Response:
        return json_response(200, self.service.indices_list())

    async def xm_indices(self, request: Request) -> Response:
        return json_response(200, self.service.describe())

    async def xm_methods(self, request: Request) -> Response:
        return json_response(200, self.service.methods())

    async def xm_image(self, request: Request) -> Response:
        name, sep, item = request.path_params["rest"].rpartition("/")
        if not sep:
            raise RequestError(404, "expected /xm/image/INDICE/ID")
        data, ctype = await self.compute(self.service.local_image, name, item)
        return Response(data, 200, {"Cache-Control": "max-age=3600", "Content-Security-Policy": "default-src 'none'"}, ctype)

    async def xm_embedding(self, request: Request) -> Response:
        name, sep, item = request.path_params["rest"].rpartition("/")
        if not sep:
            raise RequestError(404, "expected /xm/embedding/INDICE/ID")
        modality = request.query_params.get("modality", "image")
        return json_response(200, await self.compute(self.service.embedding, name, item, modality))

    async def knn(self, request: Request) -> Response:
        data = await self.body(request)
        results, headers = await self.compute(lambda: self.service.knn(parse_json(data)))
        return json_response(200, results, headers)

    async def metadata(self, request: Request) -> Response:
        data = await self.body(request)
        return json_response(200, await self.compute(lambda: self.service.metadata(parse_json(data))))

    async def classify(self, request: Request) -> Response:
        data = await self.body(request)
        stream = request.headers.get(STREAM_HEADER)
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            fields = await self.form(request)
            result, headers = await self.compute(self.service.classify_form, fields, stream)
        else:
            result, headers = await self.compute(lambda: self.service.classify(parse_json(data), stream))
        return json_response(200, result, headers)

    async def form(self, request: Request) -> dict[str, list[Any]]:
        """multipart/form-data as python-multipart parses it: each field's values, files as
        (filename, bytes); the service decides what they mean (`Service.classify_form`)."""
        lim = self.service.limits
        form = await request.form(max_files=lim.max_images + 1, max_fields=lim.max_labels + 64,
                                  max_part_size=lim.max_body_bytes)
        out: dict[str, list[Any]] = {}
        try:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    out.setdefault(name, []).append((value.filename or name, await value.read()))
                else:
                    out.setdefault(name, []).append(value)
        finally:
            await form.close()
        return out


def parse_json(data: bytes) -> Any:
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"body is not UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except RecursionError as exc:
        raise RequestError(400, "malformed JSON (nested too deeply)") from exc
    except ValueError as exc:  # an integer of more than 4,300 digits, say
        raise RequestError(400, f"malformed JSON ({str(exc)[:120]})") from exc
    check_strings(value)
    return value


def build_app(cfg: ServeConfig, service: Service) -> Starlette:
    lim = cfg.limits
    protocol.configure(lim.read_timeout_s, lim.max_pending_per_address, lim.max_connections, lim.max_head_bytes)
    h = Http(cfg, service)
    ep = h.endpoint
    routes = [Route(p, ep(h.page, "/ (page)" if p == "/" else p), methods=["GET"]) for p in PAGES]
    routes += [
        Route("/healthz", ep(h.healthz, "/healthz"), methods=["GET"]),
        Route("/metrics", ep(h.metrics, "/metrics"), methods=["GET"]),
        Route("/openapi.json", ep(h.openapi, "/openapi.json"), methods=["GET"]),
        Route("/indices-list", ep(h.indices_list, "/indices-list"), methods=["GET"]),
        Route("/xm/indices", ep(h.xm_indices, "/xm/indices"), methods=["GET"]),
        Route("/xm/methods", ep(h.xm_methods, "/xm/methods"), methods=["GET"]),
        Route("/xm/image/{rest:path}", ep(h.xm_image, "/xm/image"), methods=["GET"]),
        Route("/xm/embedding/{rest:path}", ep(h.xm_embedding, "/xm/embedding"), methods=["GET"]),
        Route("/knn-service", ep(h.knn, "/knn-service"), methods=["POST"]),
        Route("/metadata", ep(h.metadata, "/metadata"), methods=["POST"]),
        Route("/classify", ep(h.classify, "/classify"), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        service.metrics.end_other(status)
        if status == 404:
            message = f"no such endpoint: {request.method} {request.url.path[:80]}"
        elif status == 405:
            message = f"method {request.method} not allowed on {request.url.path[:80]}"
        else:
            message = str(exc.detail)
        return error_response(status, message, dict(exc.headers or {}))

    middleware = [Middleware(Guard, cfg=cfg)]
    if cfg.cors_origins:
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                                        allow_headers=["Content-Type", "Authorization", STREAM_HEADER],
                                        expose_headers=[UNHONOURED_HEADER, STREAM_HEADER], max_age=600))
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})


def _die_with_parent() -> None:
    """A worker whose supervisor is gone (killed, or stopped while it was still starting) exits
    rather than serve on as an orphan: Linux's parent-death signal."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(0)


def app_from_env() -> Starlette:
    """The application of one `--workers` process: the parent's parsed options, its own service."""
    _die_with_parent()
    cfg: ServeConfig = pickle.loads(base64.b64decode(os.environ[CONFIG_ENV]))  # noqa: S301 (written by our parent)
    return build_app(cfg, make_service(cfg))


def bind(cfg: ServeConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as exc:
        sock.close()
        raise XMError(f"--host {cfg.host} --port {cfg.port}: cannot listen ({exc.strerror or exc})") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def serve(cfg: ServeConfig, on_ready: Callable[[str, Service], None]) -> None:
    """Load the indexes, listen, call `on_ready(url, service)`, serve until interrupted."""
    import uvicorn

    check_config(cfg)
    service = make_service(cfg)  # a bad index or option fails here, in one line, before listening
    try:
        sock = bind(cfg)
    except XMError:
        service.close()
        raise
    common: dict[str, Any] = {"http": protocol.XMProtocol, "lifespan": "off", "log_level": "warning",
                              "access_log": False, "timeout_keep_alive": 5, "timeout_graceful_shutdown": 5,
                              "h11_max_incomplete_event_size": cfg.limits.max_head_bytes, "server_header": False}
    if cfg.workers == 1:
        server = uvicorn.Server(uvicorn.Config(build_app(cfg, service), **common))
        on_ready(url_of(sock), service)
        try:
            server.run(sockets=[sock])
        finally:
            service.close()
        return
    from uvicorn.supervisors import Multiprocess

    os.environ[CONFIG_ENV] = base64.b64encode(pickle.dumps(cfg)).decode()
    # a worker loads torch, its encoders and the index before it serves: give its health pings time
    config = uvicorn.Config("xm.server.app:app_from_env", factory=True, workers=cfg.workers, timeout_worker_healthcheck=120,
                            **common)
    on_ready(url_of(sock), service)
    service.close()  # each worker process opens its own (memory-mapped) copy
    del service
    Multiprocess(config, sockets=[sock]).run()
