"""The scorer's Prometheus metrics, in one place.

Each :class:`ScorerMetrics` owns its own ``CollectorRegistry`` so several scorers can live in one
process (integration tests, the benchmark) without name clashes; the ``__main__`` entry point exposes
it on ``metrics_port``.  Names carry units; labels are bounded (model names come from configuration
and the registry, methods and outcomes are fixed sets).
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from services.metrics import LATENCY_BUCKETS_S, SIZE_BUCKETS

_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_SWAP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ScorerMetrics:
    """Latency, batching, queue, serving-version and hot-swap metrics of one scorer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "prefstream_scorer_request_duration_seconds", "RPC handling time", ["method"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.requests_total = Counter(
            "prefstream_scorer_requests_total", "RPCs by outcome (gRPC code name)", ["method", "code"], registry=r,
        )
        # The autoscaling signal (k8s/: the scorer HPA scales on its per-pod average): requests being served
        # now, queued ones included; CPU says little about a replica that waits on a GPU.
        self.in_flight = Gauge(
            "prefstream_scorer_requests_in_flight", "RPCs being handled now (queued included)", registry=r,
        )
        self.batch_size = Histogram(
            "prefstream_scorer_batch_size_sequences", "sequences per model batch", ["model"],
            buckets=SIZE_BUCKETS, registry=r,
        )
        self.batch_tokens = Histogram(
            "prefstream_scorer_batch_padded_tokens", "padded tokens per model batch", ["model"],
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.batch_seconds = Histogram(
            "prefstream_scorer_batch_duration_seconds", "model time per batch", ["model"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.batch_failures = Counter(
            "prefstream_scorer_batch_failures_total", "batches whose forward pass raised", ["model"], registry=r,
        )
        self.padding_ratio = Gauge(
            "prefstream_scorer_last_batch_padding_ratio", "real / padded tokens of the last batch", ["model"], registry=r,
        )
        self.sequences_total = Counter(
            "prefstream_scorer_sequences_scored_total", "sequences scored", ["model"], registry=r,
        )
        self.queue_depth = Gauge(
            "prefstream_scorer_queue_depth_sequences", "sequences waiting for a batch", ["model"], registry=r,
        )
        self.serving_version = Gauge(
            "prefstream_scorer_serving_version_info", "1 for the version being served, with the dtype it runs in",
            ["model", "kind", "version", "dtype"],
            registry=r,
        )
        self.swap_seconds = Histogram(
            "prefstream_scorer_swap_duration_seconds", "verify + load + warm-up + swap time", ["model"],
            buckets=_SWAP_BUCKETS, registry=r,
        )
        self.swap_phase_seconds = Histogram(
            "prefstream_scorer_swap_phase_seconds",
            "time of each phase of a swap: fetch_verify (open and check the checkpoint), load, warmup, install",
            ["model", "phase"], buckets=_PHASE_BUCKETS, registry=r,
        )
        self.swap_loads = Counter(
            "prefstream_scorer_swap_loads_total",
            "versions loaded, by path: in_place (weights copied into a retired copy) or full (from_pretrained)",
            ["model", "path"], registry=r,
        )
        self.swaps_total = Counter(
            "prefstream_scorer_swaps_total", "checkpoint swaps completed", ["model"], registry=r,
        )
        self.swap_failures = Counter(
            "prefstream_scorer_swap_failures_total", "checkpoints refused (corrupt, unloadable, failed warm-up)",
            ["model", "reason"], registry=r,
        )
        self.generation_seconds = Histogram(
            "prefstream_scorer_generation_duration_seconds", "policy sampling time per best-of-N request", ["model"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self._lock = threading.Lock()
        self._serving: dict[str, tuple[str, str, str]] = {}

    def set_serving(self, model: str, kind: str, version: str, dtype: str) -> None:
        """Replace the model's serving-version series (the old version's series is removed)."""
        with self._lock:
            old = self._serving.get(model)
            if old is not None and old != (kind, version, dtype):
                try:
                    self.serving_version.remove(model, *old)
                except KeyError:
                    pass
            self._serving[model] = (kind, version, dtype)
            self.serving_version.labels(model, kind, version, dtype).set(1)

    def batch_observer(self, model: str) -> "_BatchObserver":
        return _BatchObserver(self, model)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose this registry on http://host:port/metrics (0 disables)."""
        if port > 0:
            start_http_server(port, addr=host, registry=self.registry)


class _BatchObserver:
    """Adapter from the batcher's callbacks to one model's series."""

    def __init__(self, metrics: ScorerMetrics, model: str) -> None:
        self._size = metrics.batch_size.labels(model)
        self._tokens = metrics.batch_tokens.labels(model)
        self._seconds = metrics.batch_seconds.labels(model)
        self._failures = metrics.batch_failures.labels(model)
        self._padding = metrics.padding_ratio.labels(model)
        self._sequences = metrics.sequences_total.labels(model)
        self._depth = metrics.queue_depth.labels(model)

    def on_batch(self, size: int, real_tokens: int, padded_tokens: int, duration_s: float, ok: bool) -> None:
        self._size.observe(size)
        self._tokens.observe(padded_tokens)
        self._seconds.observe(duration_s)
        self._padding.set(real_tokens / padded_tokens if padded_tokens else 1.0)
        if ok:
            self._sequences.inc(size)
        else:
            self._failures.inc()

    def on_queue_depth(self, depth: int) -> None:
        self._depth.set(depth)


__all__ = ["ScorerMetrics"]
