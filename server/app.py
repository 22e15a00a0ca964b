"""The HTTP layer of `xm serve`: the standard library's ThreadingHTTPServer, HTTP/1.1 keep-alive.

    from xm.server.app import ServeConfig, make_server
    server = make_server(ServeConfig(indexes=[("mine", Path("indexes/mine"))]))
    server.serve_forever()

Routes (clip back's first, then xm's):
  POST /knn-service  POST /metadata  GET /indices-list       clip-retrieval's `clip back` API
  POST /classify                                            any method, `xm classify --json`'s answer
  GET /  /static/*                                          the web page
  GET /healthz  GET /metrics                                liveness, Prometheus text
  GET /xm/indices  GET /xm/methods  GET /xm/image/NAME/ID   what the page and RemoteMemory read

Every error is JSON `{"error": "..."}` with a 4xx status (5xx only for overload, or a
bug, which is logged and answered without a traceback).
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import hmac
import ipaddress
import json
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from xm.errors import XMError
from xm.server.service import STREAM_HEADER, UNHONOURED_HEADER, Limits, RequestError, Service, decode_image, finite_json

STATIC = Path(__file__).parent / "static"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/static/style.css": ("style.css", "text/css; charset=utf-8")}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self' data: blob: http: https:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
OPEN_PATHS = {"/", "/static/app.js", "/static/style.css", "/healthz"}  # no data: no token needed
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass
class ServeConfig:
    indexes: list[tuple[str, Path]]
    host: str = "127.0.0.1"
    port: int = 1234
    workers: int = 16  # requests computed at once; more wait (up to the request timeout) for a turn
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
    if not 0 <= cfg.port <= 65535:
        raise XMError(f"--port {cfg.port}: must be 0..65535")


class XMServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, cfg: ServeConfig, service: Service) -> None:
        self.cfg = cfg
        self.service = service
        self.workers = threading.BoundedSemaphore(cfg.workers)
        self._conn_lock = threading.Lock()
        self.connections = 0
        self.pages = {path: (STATIC / name).read_bytes() for path, (name, _) in PAGES.items()}
        self.check_host = cfg.token is None and is_loopback(cfg.host)
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self.address_family = family
        super().__init__((cfg.host, cfg.port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # an AF_INET(6) server's host; the stubs allow bytes too
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            over = self.connections >= self.service.limits.max_connections
            if not over:
                self.connections += 1
        if over:  # refuse at once rather than queue unboundedly
            try:
                body = b'{"error": "too many connections; retry later"}'
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self.connections -= 1

    def server_close(self) -> None:
        super().server_close()
        self.service.close()


def make_server(cfg: ServeConfig, service: Service | None = None) -> XMServer:
    check_config(cfg)
    if service is None:
        service = Service(cfg.indexes, cfg.limits, allow_url_fetch=cfg.allow_url_fetch, inline_images=cfg.inline_images,
                          columns=cfg.columns, batch_items=cfg.batch_items, batch_wait_s=cfg.batch_wait_ms / 1e3,
                          precision=cfg.precision, device=cfg.device)
    try:
        return XMServer(cfg, service)
    except OSError as exc:
        service.close()
        raise XMError(f"--host {cfg.host} --port {cfg.port}: cannot listen ({exc.strerror or exc})") from exc


def parse_multipart(content_type: str, body: bytes, max_pixels: int) -> dict[str, Any]:
    """multipart/form-data fields of /classify: `image` (file), `labels` (text or file), the
    other named fields as text, repeated `templates`; anything else is a method option."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise RequestError(400, "multipart body without parts (is the boundary right?)")
    out: dict[str, Any] = {}
    images: list[Any] = []
    for part in msg.iter_parts():
        param = part.get_param("name", header="content-disposition")
        # an RFC 2231 parameter (`name*=utf-8''...`) comes as (charset, language, value)
        name = email.utils.collapse_rfc2231_value(param) if isinstance(param, tuple) else param
        if not name:
            raise RequestError(400, "multipart: a part without a name")
        payload = part.get_payload(decode=True)  # the part's bytes; None for a nested multipart
        data = payload if isinstance(payload, bytes) else b""
        if name in ("image", "images"):
            images.append(decode_image(data, max_pixels, part.get_filename() or name))
            continue
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise RequestError(400, f"multipart field {name}: not UTF-8 text") from exc
        if name in ("templates", "template"):
            out.setdefault("templates", []).append(text)
        elif name == "explain":
            out["explain"] = text.strip().lower() in ("1", "true", "yes", "on")
        elif name in out:
            raise RequestError(400, f"multipart field {name}: given twice")
        else:
            out[name] = text.strip() if name != "labels" else text
    if len(images) == 1:
        out["image"] = images[0]
    elif images:
        out["images"] = images
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "xm-serve"
    sys_version = ""
    server: XMServer

    def setup(self) -> None:
        super().setup()
        # the per-server limit on socket reads, as StreamRequestHandler.setup applies its class-wide timeout
        self.connection.settimeout(self.server.service.limits.request_timeout_s)  # slow clients are dropped

    # --- plumbing --------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.cfg.access_log:
            sys.stderr.write(f"xm serve: {self.client_address[0]} {format % args}\n")

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if self.server.cfg.access_log:  # the path only: a ?token= never reaches the log
            path = urlsplit(self.path).path if hasattr(self, "path") else "-"
            sys.stderr.write(f"xm serve: {self.client_address[0]} {self.command} {path} {code}\n")

    def _cors(self) -> dict[str, str]:
        origin = self.headers.get("Origin")
        allowed = self.server.cfg.cors_origins
        if origin and ("*" in allowed or origin in allowed):
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                    "Access-Control-Expose-Headers": f"{UNHONOURED_HEADER}, {STREAM_HEADER}"}
        return {}

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in {**self._cors(), **(headers or {})}.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._status = status

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(finite_json(data), ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", {"Cache-Control": "no-store", **(headers or {})})

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": message, "status": status}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long, ...) as JSON too."""
        self.close_connection = True
        try:
            self._error(code, message or self.responses.get(code, ("error",))[0])
        except OSError:
            pass

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        token = self.server.cfg.token
        if token is None:
            return True
        given = ""
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif query.get("token"):
            given = query["token"][0]  # for clients that cannot set headers (ClipClient takes a URL)
        return hmac.compare_digest(given.encode(), token.encode())

    def _host_ok(self) -> bool:
        """Without a token on loopback, a page elsewhere must not reach us by DNS rebinding."""
        if not self.server.check_host:
            return True
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        return name.lower() in LOOPBACK_NAMES or is_loopback(name)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(411, "chunked bodies are not accepted; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length required")
        try:
            n = int(length)
        except ValueError as exc:
            self.close_connection = True
            raise RequestError(400, f"Content-Length {length[:20]!r} is not a number") from exc
        limit = self.server.service.limits.max_body_bytes
        if n < 0 or n > limit:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise RequestError(413, f"body of {n} bytes is over the limit of {limit >> 20} MiB")
        data = self.rfile.read(n)
        if len(data) < n:
            self.close_connection = True
            raise RequestError(400, "body shorter than its Content-Length")
        return data

    def _json_body(self, data: bytes) -> Any:
        try:
            return json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise RequestError(400, f"body is not UTF-8 (byte {exc.start})") from exc
        except json.JSONDecodeError as exc:
            raise RequestError(400, f"malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
        except RecursionError as exc:
            raise RequestError(400, "malformed JSON (nested too deeply)") from exc

    # --- methods -------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_OPTIONS(self) -> None:  # noqa: N802
        headers = self._cors()
        if headers:
            headers.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                            "Access-Control-Allow-Headers": f"Content-Type, Authorization, {STREAM_HEADER}",
                            "Access-Control-Max-Age": "600"})
        self._send(204, b"", "text/plain", {"Allow": "GET, POST, OPTIONS", **headers})

    def _other(self) -> None:
        self.close_connection = True  # the body, if any, is not read
        self._error(405, f"method {self.command} not allowed", {"Allow": "GET, POST, OPTIONS"})

    do_PUT = do_DELETE = do_PATCH = _other  # noqa: N815

    def _handle(self, verb: str) -> None:
        t0 = time.perf_counter()
        service = self.server.service
        self._status = 500
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        endpoint = path if path in PAGES or path in ROUTES.get(verb, {}) or path.startswith("/xm/image/") else "other"
        service.metrics.begin()
        try:
            self._route(verb, path, parse_qs(parts.query))
        except RequestError as exc:
            self._error(exc.status, exc.message)
        except XMError as exc:
            self._error(400, str(exc))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # a bug: logged here, never sent
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            try:
                self._error(500, f"internal error ({type(exc).__name__}); see the server's log")
            except OSError:
                pass
        finally:
            service.metrics.end(endpoint if endpoint != "/" else "/ (page)", self._status, time.perf_counter() - t0)

    def _route(self, verb: str, path: str, query: dict[str, list[str]]) -> None:
        if not self._host_ok():
            self.close_connection = True
            raise RequestError(421, "Host header is not this machine (start with --token-file to serve other names)")
        if path not in OPEN_PATHS and not self._authorised(query):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        service = self.server.service
        if verb == "GET":
            if path in PAGES:
                headers = {"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
                return self._send(200, self.server.pages[path], PAGES[path][1], headers)
            if path.startswith("/xm/image/"):
                rest = unquote(path[len("/xm/image/"):])
                name, sep, item = rest.rpartition("/")
                if not sep:
                    raise RequestError(404, "expected /xm/image/INDICE/ID")
                data, ctype = service.local_image(name, item)
                return self._send(200, data, ctype, {"Cache-Control": "max-age=3600",
                                                     "Content-Security-Policy": "default-src 'none'"})
            fn = ROUTES["GET"].get(path)
            if fn is None:
                raise RequestError(404, f"no such endpoint: GET {path[:80]}")
            return fn(self, service)
        fn = ROUTES["POST"].get(path)
        if fn is None:
            raise RequestError(404 if path not in ROUTES["GET"] and path not in PAGES else 405,
                               f"no such endpoint: POST {path[:80]}")
        data = self._body()
        if not self.server.workers.acquire(timeout=service.limits.request_timeout_s):
            raise RequestError(503, "all workers are busy; retry later")
        try:
            return fn(self, service, data)
        finally:
            self.server.workers.release()

    # --- endpoints ---------------------------------------------------------------------
    def healthz(self, service: Service) -> None:
        self._json(200, {"status": "ok", "indices": service.indices_list()})

    def metrics(self, service: Service) -> None:
        self._send(200, service.metrics.text().encode(), "text/plain; version=0.0.4; charset=utf-8",
                   {"Cache-Control": "no-store"})

    def indices_list(self, service: Service) -> None:
        self._json(200, service.indices_list())

    def xm_indices(self, service: Service) -> None:
        self._json(200, service.describe())

    def xm_methods(self, service: Service) -> None:
        self._json(200, service.methods())

    def knn(self, service: Service, data: bytes) -> None:
        results, headers = service.knn(self._json_body(data))
        self._json(200, results, headers)

    def metadata(self, service: Service, data: bytes) -> None:
        self._json(200, service.metadata(self._json_body(data)))

    def classify(self, service: Service, data: bytes) -> None:
        ctype = self.headers.get("Content-Type", "")
        if ctype.lower().startswith("multipart/form-data"):
            body = parse_multipart(ctype, data, service.limits.max_pixels)
        else:
            body = self._json_body(data)
        result, headers = service.classify(body, self.headers.get(STREAM_HEADER))
        self._json(200, result, headers)


ROUTES: dict[str, dict[str, Any]] = {
    "GET": {"/healthz": Handler.healthz, "/metrics": Handler.metrics, "/indices-list": Handler.indices_list,
            "/xm/indices": Handler.xm_indices, "/xm/methods": Handler.xm_methods},
    "POST": {"/knn-service": Handler.knn, "/metadata": Handler.metadata, "/classify": Handler.classify},
}
