"""Prometheus metrics of the gateway and its feedback processor (names carry units; labels are bounded).

Labels take values from small fixed sets: ``kind`` is completion/feedback, ``transport`` grpc/http,
``outcome`` a lower-case gRPC code name or "duplicate", ``stage`` where a dead letter was produced.
"""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram

from services.metrics import LATENCY_BUCKETS_S, SIZE_BUCKETS

EVENTS = Counter(
    "prefstream_gateway_events_total",
    "Events answered by the gateway, by kind, transport and outcome (ok, duplicate, invalid_argument, ...).",
    ["kind", "transport", "outcome"],
)
ACK_SECONDS = Histogram(
    "prefstream_gateway_ack_seconds",
    "From an event reaching the gateway to Kafka acknowledging it (acks=all).",
    ["kind"],
    buckets=LATENCY_BUCKETS_S,
)
KAFKA_BATCH = Histogram(
    "prefstream_gateway_kafka_batch_events",
    "Events handed to the Kafka producer together.",
    buckets=SIZE_BUCKETS,
)
KAFKA_FAILURES = Counter(
    "prefstream_gateway_kafka_failures_total",
    "Events Kafka did not acknowledge in time (answered UNAVAILABLE).",
)
RATE_LIMITED = Counter(
    "prefstream_gateway_rate_limited_total",
    "Events refused because their project was over its ingest limit (answered RESOURCE_EXHAUSTED).",
)
STREAMS = Gauge("prefstream_gateway_open_streams", "StreamEvents calls in progress.")

PROCESSED = Counter(
    "prefstream_processor_events_total",
    "Events the processor consumed, by topic kind and outcome (derived, parked, no_preference, dead_letter, stored).",
    ["kind", "outcome"],
)
PREFERENCES = Counter(
    "prefstream_processor_preferences_total",
    "Preference records written, by source kind and split.",
    ["source_kind", "split"],
)
DEAD_LETTERS = Counter(
    "prefstream_processor_dead_letters_total",
    "Records sent to the dead-letter topic, by stage (decode, validate, check, timeout, internal).",
    ["stage"],
)
PARKED = Gauge("prefstream_processor_parked_feedback", "Feedback events waiting for their completion.")
FRESHNESS_SECONDS = Histogram(
    "prefstream_processor_freshness_seconds",
    "From the source feedback's acknowledgement to its preference record being written.",
    buckets=LATENCY_BUCKETS_S,
)


@lru_cache(maxsize=512)
def events_counter(kind: str, transport: str, outcome: str) -> Counter:
    """The EVENTS child for these labels (cached: labels() costs more than inc() on the hot path)."""
    return EVENTS.labels(kind, transport, outcome)


@lru_cache(maxsize=8)
def ack_histogram(kind: str) -> Histogram:
    return ACK_SECONDS.labels(kind)
