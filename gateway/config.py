"""The gateway's one configuration object.

Every knob of the gateway process (ports, where Kafka and Redis are, authentication, the limits that
validation enforces, the Kafka timeouts that bound how long a caller waits for an acknowledgement,
and the feedback processor's timers) lives in :class:`GatewayConfig`, built by
:func:`services.config.load_config` with section ``gateway``: defaults < ``--config`` file <
``PREFSTREAM_GATEWAY_*`` env < CLI flags.  ``validate()`` fails at start-up naming the field to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from services.config import fill_endpoints, load_config, require
from services.tls import TlsSettings
from services.topics import TopicSpec, check_prefix, topic_name

#: HelpSteer attribute names that multi-attribute scores may use.
DEFAULT_ATTRIBUTES: tuple[str, ...] = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


@dataclass(frozen=True)
class GatewayConfig(TlsSettings):
    """How one gateway process listens, authenticates, validates, writes to Kafka and processes feedback."""

    # --- listeners -------------------------------------------------------------------------------
    host: str = field(default="127.0.0.1", metadata={"help": "interface the gRPC and HTTP servers bind"})
    grpc_port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)"})
    http_port: int = field(default=8080, metadata={"help": "HTTP/JSON port (0 picks a free one; -1 disables HTTP)"})
    metrics_port: int = field(default=0, metadata={"help": "separate Prometheus exporter port; 0: /metrics on the HTTP port only"})
    drain_grace_s: float = field(default=10.0, metadata={"help": "seconds in-flight RPCs get to finish on SIGTERM"})
    scorer_tls_ca_file: str = field(default="", metadata={"help": (
        "PEM CA that signed the scorer's certificate, when the scorer at scorer_address speaks TLS")})

    # --- dependencies ----------------------------------------------------------------------------
    stack_run_dir: str = field(
        default="",
        metadata={"help": "run dir of `prefstream stack up` whose stack.json gives Kafka/Redis when the URLs below are "
                          "unset; empty = PREFSTREAM_STACK_RUN_DIR or .run/stack"},
    )
    kafka_bootstrap: str | None = field(default=None, metadata={"help": "Kafka bootstrap servers host:port[,host:port]"})
    redis_url: str | None = field(default=None, repr=False, metadata={"help": "Redis URL for dedup, API keys and processor state"})
    kafka_ack_timeout_s: float = field(
        default=10.0,
        metadata={"help": "longest a caller waits for Kafka's acks=all before getting UNAVAILABLE (the producer gives up on the record at the same time)"},
    )
    kafka_producer_process: bool = field(
        default=True,
        metadata={"help": "run the kafka-python producer in a child process (its CPU then runs beside gRPC's, not under one interpreter lock)"},
    )
    kafka_linger_ms: int = field(default=2, metadata={"help": "producer linger: how long a record waits for companions in a batch"})
    kafka_compression: str = field(default="none", metadata={"help": "producer compression: none, gzip, snappy, lz4 or zstd"})
    topic_prefix: str = field(
        default="",
        metadata={"help": "prefix of every topic name (e.g. 'staging.'); the names come from services/topics.py"},
    )
    scorer_address: str | None = field(
        default=None,
        metadata={"help": "scorer gRPC host:port; when set, the OpenAI-compatible routes are mounted on the HTTP port"},
    )
    scorer_timeout_s: float = field(
        default=300.0,
        metadata={"help": ("longest an OpenAI-compatible request waits for the scorer before it is answered 504: a "
                           "best-of-N decodes n replies and, on a busy scorer, waits behind other generations, so "
                           "keep it at or above what your HTTP clients wait (the OpenAI SDK waits 600s)")},
    )

    # --- auth ------------------------------------------------------------------------------------
    auth_enabled: bool = field(default=True, metadata={"help": "require a project API key on every call (disable only for local dev)"})
    auth_pepper: str = field(
        default="",
        metadata={"help": "server-side secret mixed into every API-key hash (HMAC key); set it in production via PREFSTREAM_GATEWAY_AUTH_PEPPER"},
    )
    auth_cache_s: float = field(
        default=5.0,
        metadata={"help": "how long a verified key is trusted without asking Redis again (a revoke takes effect within this)"},
    )

    # --- validation limits -----------------------------------------------------------------------
    max_prompt_messages: int = field(default=256, metadata={"help": "most chat turns in a prompt"})
    max_message_chars: int = field(default=100_000, metadata={"help": "most characters in one prompt turn"})
    max_candidates: int = field(default=16, metadata={"help": "most candidate outputs in one completion (and K of a ranking)"})
    max_output_chars: int = field(default=100_000, metadata={"help": "most characters in one candidate output or edited text"})
    max_metadata_entries: int = field(default=64, metadata={"help": "most metadata entries on one event"})
    max_metadata_chars: int = field(default=2048, metadata={"help": "most characters in one metadata key or value"})
    max_id_chars: int = field(default=128, metadata={"help": "most characters in event ids, completion ids, project and model names"})
    score_attributes: tuple[str, ...] = field(
        default=DEFAULT_ATTRIBUTES,
        metadata={"help": "attribute names multi-attribute scores may use (HelpSteer's five by default)"},
    )
    http_idle_timeout_s: float = field(
        default=15.0,
        metadata={"help": "an HTTP connection that has not sent a whole request within this many seconds of opening, or "
                          "idles that long between requests, is closed (slow clients cannot hold connections open)"},
    )
    rate_limit_events_per_s: float = field(
        default=0.0,
        metadata={"help": "per-project ingest limit of this gateway replica, events per second (0 = none); over it an "
                          "event is RESOURCE_EXHAUSTED / HTTP 429 with when to retry"},
    )
    rate_limit_burst: float = field(
        default=0.0, metadata={"help": "events a project may send at once above the rate (default: one second's worth, at least 1)"},
    )
    max_batch_events: int = field(default=1000, metadata={"help": "most events in one HTTP /v1/events:batch body or one StreamEvents EventBatch"})

    # --- dedup -----------------------------------------------------------------------------------
    dedup_pending_ttl_s: float = field(
        default=30.0,
        metadata={"help": "lifetime of the in-flight marker of an event id; must exceed kafka_ack_timeout_s so a live write is never taken over"},
    )
    dedup_ttl_s: float = field(default=7 * 24 * 3600.0, metadata={"help": "how long a written event id is remembered (the retry window)"})

    # --- feedback processor ----------------------------------------------------------------------
    run_processor: bool = field(default=True, metadata={"help": "run the feedback->preference processor inside the gateway process"})
    processor_group: str = field(default="prefstream-processor", metadata={"help": "Kafka consumer group of the processor"})
    completion_ttl_s: float = field(default=7 * 24 * 3600.0, metadata={"help": "how long logged completions are kept in Redis for feedback to refer to"})
    pending_timeout_s: float = field(
        default=600.0,
        metadata={"help": "how long feedback waits for its completion before going to the dead-letter topic"},
    )
    pending_retry_s: float = field(default=10.0, metadata={"help": "how often parked feedback is re-checked"})
    thumbs_ttl_s: float = field(default=30 * 24 * 3600.0, metadata={"help": "how long thumbs per prompt are kept for pairing"})
    max_pairs_per_prompt: int = field(
        default=16,
        metadata={"help": "cap on pairs derived from one prompt's scores (largest margins first) and from its thumbs"},
    )
    attribute_weights: dict = field(
        default_factory=lambda: {"helpfulness": 1.0},
        metadata={"help": "JSON object: weights that turn multi-attribute scores into the ranking score when no scalar score is given"},
    )

    def validate(self) -> None:
        self.validate_tls()
        for name in ("grpc_port",):
            port = getattr(self, name)
            require(0 <= port <= 65535, name, f"{port} is not a TCP port; use 0-65535 (0 picks a free port)")
        require(check_prefix(self.topic_prefix) is None, "topic_prefix", str(check_prefix(self.topic_prefix)))
        require(-1 <= self.http_port <= 65535, "http_port", f"{self.http_port} is not a TCP port; use 0-65535, or -1 to disable HTTP")
        require(0 <= self.metrics_port <= 65535, "metrics_port", f"{self.metrics_port} is not a TCP port")
        require(self.kafka_ack_timeout_s > 0, "kafka_ack_timeout_s", "must be > 0 seconds")
        require(self.scorer_timeout_s > 0, "scorer_timeout_s", "must be > 0 seconds")
        require(self.http_idle_timeout_s > 0, "http_idle_timeout_s", "must be > 0 seconds")
        require(self.rate_limit_events_per_s >= 0, "rate_limit_events_per_s", "must be >= 0 (0 turns the limit off)")
        require(self.rate_limit_burst >= 0, "rate_limit_burst", "must be >= 0 (0 = one second's worth)")
        require(self.kafka_linger_ms >= 0, "kafka_linger_ms", "must be >= 0")
        require(
            self.kafka_compression in ("none", "gzip", "snappy", "lz4", "zstd"),
            "kafka_compression",
            f"unknown codec {self.kafka_compression!r}; use none, gzip, snappy, lz4 or zstd",
        )
        require(
            self.dedup_pending_ttl_s > self.kafka_ack_timeout_s,
            "dedup_pending_ttl_s",
            f"must exceed kafka_ack_timeout_s ({self.kafka_ack_timeout_s}s) so an in-flight write keeps its claim",
        )
        require(self.dedup_ttl_s >= 60, "dedup_ttl_s", "must be >= 60 seconds")
        for name in ("max_prompt_messages", "max_message_chars", "max_output_chars", "max_metadata_entries",
                     "max_metadata_chars", "max_id_chars", "max_batch_events", "max_pairs_per_prompt"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(self.max_candidates >= 2, "max_candidates", "must be >= 2 (a preference needs two outputs)")
        require(len(self.score_attributes) > 0, "score_attributes", "list at least one attribute name")
        require(self.completion_ttl_s > 0 and self.thumbs_ttl_s > 0, "completion_ttl_s", "TTLs must be > 0")
        require(self.pending_timeout_s > 0, "pending_timeout_s", "must be > 0 seconds")
        require(self.pending_retry_s > 0, "pending_retry_s", "must be > 0 seconds")
        require(self.auth_cache_s >= 0, "auth_cache_s", "must be >= 0 (0 asks Redis on every call)")
        unknown = [k for k in self.attribute_weights if k not in self.score_attributes]
        require(not unknown, "attribute_weights", f"unknown attribute(s) {unknown}; known: {', '.join(self.score_attributes)}")
        for k, v in self.attribute_weights.items():
            require(isinstance(v, (int, float)) and not isinstance(v, bool), "attribute_weights", f"weight of {k} must be a number")

    def topic(self, spec: TopicSpec) -> str:
        """The name of the topic ``spec`` under ``topic_prefix`` (:func:`services.topics.topic_name`)."""
        return topic_name(spec, self.topic_prefix)

    def with_endpoints(self) -> "GatewayConfig":
        """A copy whose unset Kafka/Redis addresses are filled from the local stack's stack.json."""
        return fill_endpoints(self, {
            "kafka_bootstrap": not self.kafka_bootstrap,
            "redis_url": not self.redis_url,
        }, self.stack_run_dir)

    def endpoints(self) -> tuple[str, str]:
        """(kafka_bootstrap, redis_url): explicit settings first, else the stack's stack.json."""
        cfg = self.with_endpoints()
        return str(cfg.kafka_bootstrap), str(cfg.redis_url)


def load_gateway_config(
    file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """GatewayConfig from defaults < file < PREFSTREAM_GATEWAY_* env < overrides (None values ignored)."""
    return load_config(GatewayConfig, section="gateway", file=file, env=env, overrides=overrides)
