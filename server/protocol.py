"""uvicorn's HTTP/1.1 protocol (h11) with the limits a public `xm serve` needs on top.

uvicorn parses HTTP, keeps connections alive and closes idle ones; what it does not bound is a
client that sends its request slowly (a byte now and then keeps a connection and its slot
forever: slowloris) or opens hundreds of them. This subclass adds, per process:

* a **read deadline**: a request's line, headers and body must arrive within `read_timeout_s`
  of its first byte (of the connection's opening, for the first request); else 408 and close;
* a cap on **request heads still arriving per client address** (`max_pending_per_address`):
  over it, the *oldest* one is answered 408 and closed, so a new client (a health check from
  the same address included) always gets its turn. Only heads that have started and not ended
  count: a well-behaved client's head comes in one piece and never counts, however many clients
  share an address (a proxy, a benchmark), and a body that is slow because this server is busy
  reading others is not the client's fault; bodies are bounded by the deadline alone;
* a cap on open connections (`max_connections`): past it the oldest unfinished request (in
  any phase) is closed (503), or the new connection if none is unfinished;
* the request head checked before h11 sees it: its size (431), and a repeated `Host` or
  `Content-Length` (400, where h11 would merge equal copies);
* h11's own refusals (a malformed request line, a bad header) answered as JSON.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict

from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

# headers that must appear at most once (RFC 9112 §3.2 and §6.3: a repeated one is a smuggling vector)
SINGLE_HEADERS = (b"host", b"content-length", b"transfer-encoding")


class ConnectionLimits:
    """The knobs the protocol reads; set once per process before serving (`configure`)."""

    read_timeout_s: float = 20.0
    max_pending_per_address: int = 32
    max_connections: int = 1024
    max_head_bytes: int = 16 * 1024


# unfinished requests, oldest first (one event loop per process): protocol -> (address, phase);
# phase: "idle" (connected, nothing sent yet), "head" (request line and headers arriving), "body"
_pending: OrderedDict[XMProtocol, tuple[str, str]] = OrderedDict()
_limits = ConnectionLimits()


def configure(read_timeout_s: float, max_pending_per_address: int, max_connections: int, max_head_bytes: int) -> None:
    _limits.read_timeout_s = read_timeout_s
    _limits.max_pending_per_address = max_pending_per_address
    _limits.max_connections = max_connections
    _limits.max_head_bytes = max_head_bytes


def raw_answer(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message, "status": status}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def head_problem(head: bytes) -> tuple[int, str, str] | None:
    """A request head (up to the blank line) that must be refused before parsing: (status, reason, message)."""
    seen: set[bytes] = set()
    for line in head.split(b"\r\n")[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if name in SINGLE_HEADERS:
            if name in seen:
                return 400, "Bad Request", f"header {name.decode()} given twice"
            seen.add(name)
    return None


class XMProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head = b""
        self._in_head = True  # reading a request line and headers (not yet handed to h11)
        self._deadline: asyncio.TimerHandle | None = None
        self._address = self.client[0] if self.client else "?"
        if len(self.connections) > _limits.max_connections and not self._evict_oldest():
            self._refuse(503, "Service Unavailable", "too many open connections; retry later")
            return
        self._start_request("idle")

    # --- unfinished requests ----------------------------------------------------------------
    def _start_request(self, phase: str) -> None:
        """A request may start: its whole head and body must arrive before the read deadline."""
        self._in_head, self._head = True, b""
        self._arm()
        _pending[self] = (self._address, phase)
        _pending.move_to_end(self)

    def _phase(self, phase: str) -> None:
        if self in _pending:
            _pending[self] = (self._address, phase)  # the order (by start) is kept
        if phase == "head":
            heads = [p for p, (a, ph) in _pending.items() if a == self._address and ph == "head"]
            if len(heads) > _limits.max_pending_per_address:
                heads[0]._refuse(408, "Request Timeout", "too many unfinished requests from this address; the oldest is closed")

    def _evict_oldest(self) -> bool:
        for p in _pending:
            if p is not self:
                p._refuse(503, "Service Unavailable", "too many open connections; the oldest unfinished request is closed")
                return True
        return False

    def _cycle(self) -> RequestResponseCycle | None:
        """The request being answered; uvicorn types it as always set, but it is None before the first."""
        cycle: RequestResponseCycle | None = getattr(self, "cycle", None)
        return cycle

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(_limits.read_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _finished_reading(self) -> None:
        self._disarm()
        _pending.pop(self, None)

    def _expired(self) -> None:
        self._deadline = None
        cycle = self._cycle()
        if cycle is not None and cycle.response_started:
            self.transport.close()  # an answer is on its way: nothing more can be said
        else:
            self._refuse(408, "Request Timeout",
                         f"the request did not arrive within {_limits.read_timeout_s:g} s; send it whole")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._finished_reading()
        if not self.transport.is_closing():
            cycle = self._cycle()
            if cycle is None or not cycle.response_started:
                self.transport.write(raw_answer(status, reason, message))
            if cycle is not None:
                cycle.disconnected = True  # the application sees a disconnect, its answer is dropped
            self.transport.close()

    # --- uvicorn hooks -------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._in_head:
            if not self._head:
                if self._deadline is None:
                    self._start_request("head")  # the first byte of a kept-alive connection's next request
                started = True
            else:
                started = False
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if (end if end >= 0 else len(self._head)) > _limits.max_head_bytes:
                return self._refuse(431, "Request Header Fields Too Large",
                                    f"request line and headers over {_limits.max_head_bytes >> 10} KiB")
            if end < 0:
                if started:
                    self._phase("head")  # a head in pieces: counted against its address until it ends
                return
            problem = head_problem(self._head[:end])
            if problem is not None:
                return self._refuse(*problem)
            data, self._head, self._in_head = self._head, b"", False
            self._phase("body")
        super().data_received(data)
        self._check_read()

    def _check_read(self) -> None:
        c = self._cycle()
        if c is not None and not c.response_complete and not c.more_body:
            self._finished_reading()  # the whole request is in: computing it is the application's deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request h11 already holds
        self._finished_reading()
        cycle = self._cycle()
        if (cycle is not None and not cycle.response_complete) or self.conn.trailing_data[0]:
            # a pipelined request already in h11's buffer: h11 alone parses its head; the deadline still holds
            self._start_request("body")
            self._in_head = False
            self._check_read()
        else:
            # the next request, if any, starts with its first byte; until then uvicorn's keep-alive timeout applies
            self._in_head, self._head = True, b""

    def connection_lost(self, exc: Exception | None) -> None:
        self._finished_reading()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request (a malformed request line, a bad header): say so as JSON."""
        self._finished_reading()
        if not self.transport.is_closing():
            self.transport.write(raw_answer(400, "Bad Request", f"malformed HTTP request ({msg.rstrip('.')})"))
            self.transport.close()


def pending_count() -> int:
    """Unfinished requests in this process (the /metrics gauge)."""
    return len(_pending)
