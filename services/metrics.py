"""Prometheus plumbing shared by the services: the exporter and common bucket layouts.

Each service declares its own metrics in its own ``metrics.py`` (names with units: ``_seconds``,
``_total``; bounded labels); this module only starts the HTTP exporter and holds shared buckets.
"""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

log = logging.getLogger(__name__)

#: Latency buckets from 1 ms to 30 s (request handling, acks, swaps).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
#: Batch-size buckets (dynamic batching, micro-batches).
SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_started: set[int] = set()


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on ``host:port`` (0 disables). Idempotent per port."""
    if port <= 0 or port in _started:
        return
    start_http_server(port, addr=host)
    _started.add(port)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
