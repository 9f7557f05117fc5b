"""Helpers to run a real gateway against a real stack from synchronous code (integration tests, demo).

``GatewayHarness`` runs :class:`gateway.service.Gateway` on its own event loop thread, on topics of
its own (``topic_prefix``) so runs sharing one Kafka never see each other's events, and stops it
cleanly.  ``read_topic`` consumes a topic from the beginning up to its current end.  Nothing here is
used by the gateway itself.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any, Callable, Iterable

from gateway.config import GatewayConfig, load_gateway_config
from gateway.service import Gateway
from services.topics import TOPICS, TopicSpec, ensure_topics, prefixed


def create_prefixed_topics(bootstrap: str, prefix: str) -> None:
    """The prefstream topics under ``prefix`` (same partitions and configs as the real ones)."""
    ensure_topics(bootstrap, prefixed(TOPICS, prefix))


class GatewayHarness:
    """A gateway (and by default its processor) on a background event loop; see the module docstring."""

    def __init__(self, kafka_bootstrap: str, redis_url: str, *, prefix: str | None = None,
                 create_topics: bool = True, **overrides: Any) -> None:
        self.prefix = prefix if prefix is not None else f"t{uuid.uuid4().hex[:8]}."
        values = {
            "grpc_port": 0,
            "http_port": 0,
            "kafka_bootstrap": kafka_bootstrap,
            "redis_url": redis_url,
            "topic_prefix": self.prefix,
            "processor_group": f"{self.prefix}processor",
            "pending_retry_s": 1.0,
            "drain_grace_s": 1.0,
            "auth_cache_s": 0.0,
            **overrides,
        }
        self.cfg: GatewayConfig = load_gateway_config(overrides=values, env={})
        if create_topics:
            create_prefixed_topics(kafka_bootstrap, self.prefix)
        self.gateway = Gateway(self.cfg)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gateway-loop", daemon=True)

    def topic(self, spec: TopicSpec) -> str:
        return self.cfg.topic(spec)

    def start(self, wait_processor_s: float = 60.0) -> "GatewayHarness":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.gateway.start(), self._loop).result(120)
        if self.gateway.processor is not None and wait_processor_s:
            if not self.gateway.processor.processor.assigned.wait(wait_processor_s):
                raise TimeoutError("the processor was not assigned partitions in time")
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(1.0), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "GatewayHarness":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return self.gateway.grpc_address

    @property
    def http_url(self) -> str:
        return self.gateway.http_url


def read_topic(bootstrap: str, topic: str, *, timeout_s: float = 30.0) -> list[Any]:
    """Every record of ``topic`` from the beginning to its end offsets now (ConsumerRecords)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout_s}s")
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
        return out
    finally:
        consumer.close()


def wait_for_records(
    bootstrap: str,
    topic: str,
    predicate: Callable[[dict], bool],
    *,
    count: int,
    timeout_s: float = 60.0,
    settle_s: float = 1.0,
) -> list[dict]:
    """JSON values of ``topic`` matching ``predicate`` once at least ``count`` exist (then ``settle_s``
    more, so a test also sees records that should not be there)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [v for v in _values(read_topic(bootstrap, topic)) if predicate(v)]
        if len(found) >= count:
            time.sleep(settle_s)
            return [v for v in _values(read_topic(bootstrap, topic)) if predicate(v)]
        if time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _values(records: Iterable[Any]) -> list[dict]:
    out = []
    for r in records:
        try:
            out.append(json.loads(r.value))
        except (ValueError, TypeError):
            continue
    return out
