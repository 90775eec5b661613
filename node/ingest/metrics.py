"""Counters of the listener and an HTTP endpoint serving them (health + Prometheus text).

``GET /metrics`` answers in the Prometheus text exposition format 0.0.4; ``GET /health``
answers 200 ``ok`` while the listener runs, the spool index answers and free disk is above
the threshold, else 503 with the reason. The server is the standard library's, on a daemon
thread, so it needs no dependency and never blocks the DICOM listener.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

#: The plain counters of :class:`Metrics`.
_COUNTERS = ("received", "duplicates", "associations", "associations_rejected",
             "analyses_done", "analyses_failed", "bytes_received")

#: Upper bounds (seconds) of the store latency histogram buckets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """Thread-safe counters; the store handler and the completion workers update them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = 0
        self.duplicates = 0
        self.refused: dict[int, int] = {}  # DIMSE status -> count
        self.associations = 0
        self.associations_rejected = 0
        self.analyses_done = 0
        self.analyses_failed = 0
        self.bytes_received = 0
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0

    def stored(self, size: int, seconds: float, duplicate: bool) -> None:
        """Count one acknowledged instance and its store latency."""
        with self._lock:
            self.received += 1
            self.duplicates += int(duplicate)
            self.bytes_received += size
            self._latency_sum += seconds
            i = next((k for k, b in enumerate(LATENCY_BUCKETS) if seconds <= b), -1)
            self._buckets[i] += 1

    def snapshot(self) -> dict[str, Any]:
        """Every counter, as plain (picklable) values; :meth:`add` sums them into another."""
        with self._lock:
            return {**{name: getattr(self, name) for name in _COUNTERS},
                    "refused": dict(self.refused), "buckets": list(self._buckets),
                    "latency_sum": self._latency_sum}

    def add(self, snapshot: dict[str, Any]) -> None:
        """Add the counters of a :meth:`snapshot` (another listener process's) to these."""
        with self._lock:
            for name in _COUNTERS:
                setattr(self, name, getattr(self, name) + int(snapshot[name]))
            for status, n in snapshot["refused"].items():
                self.refused[status] = self.refused.get(status, 0) + int(n)
            self._buckets = [a + int(b) for a, b in zip(self._buckets, snapshot["buckets"],
                                                        strict=True)]
            self._latency_sum += float(snapshot["latency_sum"])

    def refused_with(self, status: int) -> None:
        """Count one instance answered with a failure status."""
        with self._lock:
            self.refused[status] = self.refused.get(status, 0) + 1

    def incr(self, name: str) -> None:
        """Add one to a plain counter attribute (``associations``, ``analyses_done`` ...)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def render(self, gauges: dict[str, float]) -> str:
        """The Prometheus text format of the counters plus ``gauges`` (name -> value)."""
        with self._lock:
            lines = [
                *_counter("liver_node_instances_received_total",
                          "Instances acknowledged with Success", self.received),
                *_counter("liver_node_instances_duplicate_total",
                          "Acknowledged instances identical to a stored one", self.duplicates),
                *_counter("liver_node_bytes_received_total", "Bytes of acknowledged instances",
                          self.bytes_received),
                "# HELP liver_node_instances_refused_total Instances answered with a failure",
                "# TYPE liver_node_instances_refused_total counter",
                *[f'liver_node_instances_refused_total{{status="0x{s:04X}"}} {n}'
                  for s, n in sorted(self.refused.items())],
                *_counter("liver_node_associations_total", "Associations accepted",
                          self.associations),
                *_counter("liver_node_associations_rejected_total", "Associations rejected",
                          self.associations_rejected),
                *_counter("liver_node_analyses_done_total", "Study analyses that succeeded",
                          self.analyses_done),
                *_counter("liver_node_analyses_failed_total", "Study analyses that failed",
                          self.analyses_failed),
                "# HELP liver_node_store_latency_seconds C-STORE handling time",
                "# TYPE liver_node_store_latency_seconds histogram",
            ]
            cumulative = 0
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self._buckets, strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'liver_node_store_latency_seconds_bucket{{le="{le}"}} {cumulative}')
            lines.append(f"liver_node_store_latency_seconds_sum {self._latency_sum:.6f}")
            lines.append(f"liver_node_store_latency_seconds_count {cumulative}")
        for name, value in gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"


def _counter(name: str, help_text: str, value: int) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]


class MetricsServer:
    """``/metrics`` and ``/health`` over HTTP on a daemon thread.

    Parameters
    ----------
    host, port:
        Listen address (port 0 picks a free port; see :attr:`port`).
    render:
        Returns the metrics text.
    health:
        Returns ``""`` when healthy, else the reason.
    """

    def __init__(
        self, host: str, port: int, render: Callable[[], str], health: Callable[[], str]
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                try:
                    if self.path == "/metrics":
                        code, body = 200, render()
                        ctype = "text/plain; version=0.0.4; charset=utf-8"
                    elif self.path == "/health":
                        reason = health()
                        code, body = (200, "ok\n") if not reason else (503, reason + "\n")
                        ctype = "text/plain; charset=utf-8"
                    else:
                        code, body, ctype = 404, "not found\n", "text/plain"
                except Exception:
                    logger.exception("metrics endpoint: %s failed", self.path)
                    code, body, ctype = 500, "internal error\n", "text/plain"
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                logger.debug("metrics http: " + format, *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The port actually listened on."""
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        """Serve on the background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)
