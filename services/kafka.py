"""Kafka access shared by every service: durable producers and consumers that never auto-commit.

What goes into a record value is the event codec's business (:mod:`services.codec`), so code that
only encodes or decodes events never imports kafka-python.

Producers are built for "acknowledged means durable": ``acks='all'``, idempotence, bounded retries
and bounded blocking, so an unreachable broker surfaces as :class:`~services.errors.Unavailable`
instead of a hang or a silent drop.  Consumers never auto-commit: callers commit offsets only after
their own outputs are durable.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.producer.future import RecordMetadata

from services.errors import Unavailable

log = logging.getLogger(__name__)

#: Producer settings that make an acknowledgement mean the record is on every in-sync replica.
DURABLE_PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "retries": 2**31 - 1,  # bounded by delivery_timeout_ms, not by count
    "max_in_flight_requests_per_connection": 5,
    "linger_ms": 2,
    "request_timeout_ms": 10_000,
    "delivery_timeout_ms": 30_000,
    "max_block_ms": 10_000,
    "batch_size": 256 * 1024,
}


def make_producer(bootstrap: str | list[str], **overrides: Any) -> KafkaProducer:
    """A durable producer (acks=all, idempotent); raises Unavailable when no broker answers."""
    cfg = {**DURABLE_PRODUCER_DEFAULTS, **overrides}
    try:
        return KafkaProducer(bootstrap_servers=bootstrap, **cfg)
    except KafkaError as e:
        raise Unavailable(f"Kafka at {bootstrap} is unreachable: {type(e).__name__}") from e


def make_consumer(
    bootstrap: str | list[str],
    *,
    group_id: str | None,
    topics: Iterable[str] = (),
    **overrides: Any,
) -> KafkaConsumer:
    """A consumer that never auto-commits and starts from the earliest offset of a new group.

    With ``topics`` it subscribes (group-managed partitions); without, the caller ``assign()``s.
    """
    cfg: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": 500,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 2_000,
        "request_timeout_ms": 30_500,
        **overrides,
    }
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, **cfg)
    except KafkaError as e:
        raise Unavailable(f"Kafka at {bootstrap} is unreachable: {type(e).__name__}") from e
    topics = list(topics)
    if topics:
        consumer.subscribe(topics)
    return consumer


class RenewingProducer:
    """A durable producer that replaces itself when a write is not acknowledged in time.

    kafka-python's idempotent producer can stay stuck once every broker it knew died at once: after the
    chaos bench killed all three brokers and restarted them, every later write of a trainer's producer
    timed out for good while new producers worked at once.  :func:`send_sync` (one write) and
    :meth:`send_all` (a batch, the feedback processor's) call :meth:`renew` after a write Kafka did not
    acknowledge, so the next write goes through a fresh producer (the gateway's writer, a producer in a
    child process, has its own watchdog for the same reason, gateway/kafka_writer.py).  ``send``,
    ``flush`` and ``close`` are the current producer's.
    """

    def __init__(self, bootstrap: str | list[str], **overrides: Any) -> None:
        self._bootstrap, self._overrides = bootstrap, overrides
        self._producer = make_producer(bootstrap, **overrides)
        self.renewed = 0

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any:
        return self._producer.send(topic, value=value, key=key)

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        self._producer.close(timeout=timeout)

    def send_all(self, records: Iterable[tuple[str, bytes | None, bytes]], timeout: float) -> int:
        """Send every ``(topic, key, value)`` and wait for Kafka's acknowledgements; returns how many
        were not acknowledged (0: all durable).  A flush that fails, or any write left unacknowledged,
        renews the producer for the next batch; the flush's ``KafkaError`` propagates."""
        futures = [self._producer.send(topic, key=key, value=value) for topic, key, value in records]
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError:
            self.renew()
            raise
        failed = sum(1 for f in futures if not f.succeeded())
        if failed:
            self.renew()
        return failed

    def renew(self) -> None:
        """Drop the current producer (what it still holds is lost: callers only renew after a write
        they will report as failed) and connect a new one; keeps the old one if none can be made."""
        try:
            fresh = make_producer(self._bootstrap, **self._overrides)
        except Unavailable as e:
            log.warning("could not replace a stalled Kafka producer (%s); keeping it", e)
            return
        old, self._producer = self._producer, fresh
        self.renewed += 1
        try:
            old.close(timeout=0)
        except Exception:  # noqa: BLE001 - a stuck producer may fail to close; it is dropped either way
            log.debug("closing the stalled producer failed", exc_info=True)
        log.warning("replaced a Kafka producer that stopped acknowledging (%d so far)", self.renewed)


def send_sync(
    producer: KafkaProducer | RenewingProducer,
    topic: str,
    value: bytes,
    *,
    key: bytes | None = None,
    timeout_s: float = 30.0,
) -> RecordMetadata:
    """Send and wait for the broker's acknowledgement (acks=all); every failure is Unavailable (and a
    :class:`RenewingProducer` is renewed for the next write)."""
    try:
        future = producer.send(topic, value=value, key=key)
    except KafkaError as e:
        raise Unavailable(f"Kafka rejected the write to {topic}: {type(e).__name__}") from e
    try:
        return future.get(timeout=timeout_s)
    except KafkaError as e:
        if isinstance(producer, RenewingProducer):
            producer.renew()
        raise Unavailable(f"Kafka did not acknowledge the write to {topic}: {type(e).__name__}") from e


def end_offsets(consumer: KafkaConsumer, topic: str) -> dict[Any, int]:
    """The next offset of every partition of ``topic`` (TopicPartition -> offset), read without joining
    a group; empty when the topic does not exist (yet)."""
    from kafka import TopicPartition

    parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    return consumer.end_offsets(tps) if tps else {}
