"""Kafka access shared by every service: durable producers, exact consumers, one wire format.

Wire format: each Kafka record value is the proto3 JSON of one event message (field names as in the
.proto, snake_case), so producers that write JSON lines directly use the same schema as the gRPC API.

Producers are built for "acknowledged means durable": ``acks='all'``, idempotence, bounded retries
and bounded blocking, so an unreachable broker surfaces as :class:`~services.errors.Unavailable`
instead of a hang or a silent drop.  Consumers never auto-commit: callers commit offsets only after
their own outputs are durable.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Iterable, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata, RecordMetadata

from services.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

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


def send(
    producer: KafkaProducer,
    topic: str,
    value: bytes,
    *,
    key: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> FutureRecordMetadata:
    """Start an asynchronous send; failures to even enqueue are raised as Unavailable."""
    try:
        return producer.send(topic, value=value, key=key, headers=headers)
    except KafkaError as e:
        raise Unavailable(f"Kafka rejected the write to {topic}: {type(e).__name__}") from e


def send_sync(
    producer: KafkaProducer,
    topic: str,
    value: bytes,
    *,
    key: bytes | None = None,
    timeout_s: float = 30.0,
) -> RecordMetadata:
    """Send and wait for the broker's acknowledgement (acks=all)."""
    future = send(producer, topic, value, key=key)
    try:
        return future.get(timeout=timeout_s)
    except KafkaError as e:
        raise Unavailable(f"Kafka did not acknowledge the write to {topic}: {type(e).__name__}") from e


def wait_acked(future: FutureRecordMetadata, *, timeout_s: float = 30.0) -> asyncio.Future:
    """An asyncio future resolved when Kafka acknowledges ``future`` (or failed with Unavailable).

    kafka-python completes futures on its I/O thread; the callbacks hop back to the event loop, so
    an async handler waits for durability without blocking the loop.
    """
    loop = asyncio.get_running_loop()
    result: asyncio.Future = loop.create_future()

    def ok(meta: RecordMetadata) -> None:
        loop.call_soon_threadsafe(lambda: result.done() or result.set_result(meta))

    def failed(exc: BaseException) -> None:
        err = Unavailable(f"Kafka did not acknowledge the write: {type(exc).__name__}")
        loop.call_soon_threadsafe(lambda: result.done() or result.set_exception(err))

    future.add_callback(ok)
    future.add_errback(failed)
    if timeout_s:
        return asyncio.ensure_future(_with_timeout(result, timeout_s))
    return result


async def _with_timeout(fut: asyncio.Future, timeout_s: float) -> RecordMetadata:
    try:
        return await asyncio.wait_for(fut, timeout_s)
    except asyncio.TimeoutError:
        raise Unavailable(f"Kafka did not acknowledge the write within {timeout_s:.0f}s") from None


async def send_async(
    producer: KafkaProducer,
    topic: str,
    value: bytes,
    *,
    key: bytes | None = None,
    timeout_s: float = 30.0,
) -> RecordMetadata:
    """Send and await the acknowledgement without blocking the event loop."""
    return await wait_acked(send(producer, topic, value, key=key), timeout_s=timeout_s)


# ---------------------------------------------------------------------------------------------
# Wire format


def encode_event(message: Message) -> bytes:
    """The proto3 JSON (snake_case field names, compact) of ``message``, UTF-8 encoded."""
    as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(as_dict, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_event(data: bytes | str, cls: type[M], *, what: str | None = None) -> M:
    """Parse proto3 JSON into ``cls``; malformed input raises InvalidArgument naming the problem.

    Unknown fields are rejected (a typo must not silently drop data).
    """
    what = what or cls.DESCRIPTOR.name
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise InvalidArgument(what, f"record is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(what, f"record is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(what, f"record must be a JSON object, got {type(obj).__name__}")
    try:
        return json_format.ParseDict(obj, cls())
    except json_format.ParseError as e:
        raise InvalidArgument(what, f"does not match the {cls.DESCRIPTOR.full_name} schema: {e}") from None


def committed_offsets(consumer: KafkaConsumer, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    """The group's committed offsets (missing partitions omitted)."""
    out = {}
    for tp in partitions:
        off = consumer.committed(tp)
        if off is not None:
            out[tp] = off
    return out


def end_offsets_total(consumer: KafkaConsumer, topic: str) -> int:
    """Sum of the end offsets of every partition of ``topic`` (records ever written, minus retention)."""
    parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in parts]
    return sum(consumer.end_offsets(tps).values()) if tps else 0
