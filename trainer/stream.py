"""Where the continual trainer's records come from: the Kafka preference topic, or a list in memory.

The Kafka source is a consumer-group member that never auto-commits.  It tracks, per partition, the
offset after the last record it handed out (``positions``), seeded from the latest durable checkpoint:
on every partition assignment it seeks there, so a restarted trainer resumes exactly after the last
record its checkpointed weights contain, whatever the group's committed offsets say (they can only lag,
because they are committed after the checkpoint is durable).  Undecodable records are forwarded to the
dead-letter topic and skipped, and their offsets still advance.

:class:`ListSource` feeds records from memory through the same interface, for the benchmark's
streaming run and unit tests.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

from services.errors import InvalidArgument, PrefstreamError
from services.schemas import PreferenceRecord, float_to_ts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamItem:
    """One consumed record and where it came from."""

    record: PreferenceRecord
    partition: int
    offset: int


class RecentIds:
    """The newest ``capacity`` record ids, oldest forgotten first (a bounded set, insertion ordered)."""

    def __init__(self, capacity: int, ids: Sequence[str] = ()) -> None:
        self.capacity = capacity
        self._ids: dict[str, None] = {}
        for i in ids:
            self.add(i)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, record_id: str) -> None:
        if self.capacity <= 0:
            return
        self._ids.pop(record_id, None)
        self._ids[record_id] = None
        while len(self._ids) > self.capacity:
            del self._ids[next(iter(self._ids))]


class Source(Protocol):
    """What the continual loop consumes from."""

    topic: str

    def poll(self, max_records: int, timeout_s: float) -> list[StreamItem]: ...

    def positions(self) -> dict[int, int]: ...

    def commit(self, offsets: dict[int, int]) -> None: ...

    def revoked(self) -> bool: ...

    def reject(self, item: StreamItem, reason: str, field: str) -> None:
        """A decoded record the objective cannot train on: dead-lettered; its offset still advances."""
        ...

    def close(self) -> None: ...


class KafkaSource:
    """The preference topic, consumed as a member of ``group_id``, with exact offset bookkeeping."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group_id: str,
        *,
        start_offsets: dict[int, int] | None = None,
        dead_letter_topic: str | None = None,
        producer=None,
    ) -> None:
        from kafka import ConsumerRebalanceListener

        from services.kafka import make_consumer

        self.topic = topic
        self._positions: dict[int, int] = dict(start_offsets or {})
        self._assigned: set[int] = set()
        self._revoked = threading.Event()
        self._dead_letter_topic = dead_letter_topic
        self._producer = producer
        self.dead_letters = 0
        self._closing = False
        self._consumer = make_consumer(bootstrap, group_id=group_id, max_poll_records=500)

        source = self

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):  # noqa: D401 - kafka-python callback
                lost = sorted(tp.partition for tp in revoked if tp.topic == topic)
                if lost and not source._closing:
                    log.warning("partitions %s of %s revoked; the trainer should be the group's only member", lost, topic)
                    source._revoked.set()
                source._assigned -= set(lost)

            def on_partitions_assigned(self, assigned):
                for tp in assigned:
                    if tp.topic != topic:
                        continue
                    source._assigned.add(tp.partition)
                    pos = source._positions.get(tp.partition)
                    if pos is not None:
                        source._consumer.seek(tp, pos)
                        log.info("partition %s[%d]: resuming at offset %d (after this trainer's checkpoint or "
                                 "last record)", topic, tp.partition, pos)
                    else:
                        log.info("partition %s[%d]: no checkpointed offset; starting at the group's committed "
                                 "offset or the earliest", topic, tp.partition)

        self._consumer.subscribe([topic], listener=_Listener())
        if not self._consumer.partitions_for_topic(topic):
            log.warning("topic %s does not exist (yet); waiting for it. `prefstream stack up` creates the "
                        "prefstream topics; a custom topic must be created before records can arrive", topic)

    @property
    def assigned(self) -> set[int]:
        return set(self._assigned)

    def poll(self, max_records: int, timeout_s: float) -> list[StreamItem]:
        """Up to ``max_records`` decoded records, in offset order per partition."""
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out: list[StreamItem] = []
        for tp, messages in batches.items():
            for msg in messages:
                expected = self._positions.get(tp.partition)
                if expected is not None and msg.offset < expected:
                    continue  # already trained on (a fetch raced our seek); never twice
                self._positions[tp.partition] = msg.offset + 1
                try:
                    rec = PreferenceRecord.from_kafka(msg.value)
                except PrefstreamError as e:
                    self._dead_letter(tp.partition, msg.offset, msg.value, e)
                    continue
                out.append(StreamItem(rec, tp.partition, msg.offset))
        return out

    def reject(self, item: StreamItem, reason: str, field: str) -> None:
        self._dead_letter(item.partition, item.offset, item.record.to_kafka(), InvalidArgument(field, reason))

    def _dead_letter(self, partition: int, offset: int, value: bytes, err: PrefstreamError) -> None:
        self.dead_letters += 1
        log.warning("skipping undecodable record %s[%d]@%d: %s", self.topic, partition, offset, err)
        if self._producer is None or not self._dead_letter_topic:
            return
        from prefstream.events.v1.events_pb2 import DeadLetter as DeadLetterProto
        from services.codec import encode_event
        from services.kafka import send_sync

        letter = DeadLetterProto(
            source_topic=self.topic, partition=partition, offset=offset,
            payload=(value or b"").decode("utf-8", errors="replace"), reason=err.message,
            field=err.field or "", at=float_to_ts(time.time()),
        )
        send_sync(self._producer, self._dead_letter_topic, encode_event(letter))

    def positions(self) -> dict[int, int]:
        """Next offset to consume per partition: everything before it has been handed out."""
        return dict(self._positions)

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit ``offsets`` (from a durable checkpoint) for the partitions we still own."""
        from kafka import OffsetAndMetadata, TopicPartition
        from kafka.errors import KafkaError

        owned = {p: o for p, o in offsets.items() if p in self._assigned}
        if not owned:
            return
        try:
            self._consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in owned.items()})
        except KafkaError as e:
            # Not fatal: the checkpoint holds the offsets and is what a restart seeks to.
            log.warning("committing offsets %s failed (%s); the checkpoint still records them", owned, type(e).__name__)

    def revoked(self) -> bool:
        """True once after partitions were revoked (the loop checkpoints right away)."""
        if self._revoked.is_set():
            self._revoked.clear()
            return True
        return False

    def close(self) -> None:
        self._closing = True
        self._consumer.close(autocommit=False)


class ListSource:
    """Records from memory as partition 0, offsets 0.., ``batch`` at a time; the same interface."""

    def __init__(self, records: Sequence[PreferenceRecord], topic: str = "memory", start_offset: int = 0) -> None:
        self.topic = topic
        self._records = list(records)
        self._next = start_offset
        self.committed: dict[int, int] = {}
        self.rejected: list[tuple[str, str]] = []  # (record_id, reason) of records the objective refused

    def poll(self, max_records: int, timeout_s: float) -> list[StreamItem]:
        chunk = self._records[self._next:self._next + max_records]
        items = [StreamItem(r, 0, self._next + i) for i, r in enumerate(chunk)]
        self._next += len(chunk)
        return items

    def positions(self) -> dict[int, int]:
        return {0: self._next}

    def commit(self, offsets: dict[int, int]) -> None:
        self.committed.update(offsets)

    def revoked(self) -> bool:
        return False

    def reject(self, item: StreamItem, reason: str, field: str) -> None:
        self.rejected.append((item.record.record_id, f"{field}: {reason}"))

    def exhausted(self) -> bool:
        return self._next >= len(self._records)

    def close(self) -> None:
        pass


def validate_offsets(raw: object, field_name: str = "offsets") -> dict[int, int]:
    """``{"0": 12, ...}`` from checkpoint metadata -> ``{0: 12, ...}``; InvalidArgument if malformed."""
    if not isinstance(raw, dict):
        raise InvalidArgument(field_name, f"must map partition -> next offset, got {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        try:
            p, o = int(k), int(v)
        except (TypeError, ValueError):
            raise InvalidArgument(field_name, f"partition {k!r} -> {v!r} is not an integer pair") from None
        if p < 0 or o < 0:
            raise InvalidArgument(field_name, f"partition {p} -> {o}: both must be >= 0")
        out[p] = o
    return out
