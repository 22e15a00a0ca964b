"""Request counters and latency histograms, exposed as Prometheus text at GET /metrics."""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.buckets, self.counts):
            running += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.n}")
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batches: dict[str, Histogram] = {}
        self.inflight = 0

    def begin(self) -> None:
        with self._lock:
            self.inflight += 1

    def end(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.inflight -= 1
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(BUCKETS)).observe(seconds)

    def end_other(self, status: int) -> None:
        """A request the router answered itself (no such path, a method the path does not take)."""
        with self._lock:
            self.requests[("other", status)] += 1

    def batch(self, name: str, size: int) -> None:
        with self._lock:
            self.batches.setdefault(name, Histogram(BATCH_BUCKETS)).observe(size)

    def text(self, extra: dict[str, float] | None = None) -> str:
        with self._lock:
            lines = ["# HELP xm_requests_total Requests answered, by endpoint and status.",
                     "# TYPE xm_requests_total counter"]
            for (ep, status), n in sorted(self.requests.items()):
                lines.append(f'xm_requests_total{{endpoint="{ep}",status="{status}"}} {n}')
            lines += ["# HELP xm_request_seconds Time from request line to response, by endpoint.",
                      "# TYPE xm_request_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                lines += h.lines("xm_request_seconds", f'endpoint="{ep}"')
            lines += ["# HELP xm_encoder_batch_items Items per encoder forward pass (batched across requests).",
                      "# TYPE xm_encoder_batch_items histogram"]
            for name, h in sorted(self.batches.items()):
                lines += h.lines("xm_encoder_batch_items", f'batcher="{name}"')
            lines += ["# TYPE xm_requests_in_flight gauge", f"xm_requests_in_flight {self.inflight}",
                      "# TYPE xm_uptime_seconds gauge", f"xm_uptime_seconds {time.time() - self.started:.1f}"]
            for name, value in (extra or {}).items():
                lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
