"""Watches the running loop from the outside: registry, checkpoints, Kafka lag, dead letters, ledger.

Everything the demo shows comes from the system's own durable records, never from guesses:
versions and their metrics from the Redis registry, what each version trained on from checkpoint
metadata (cached as checkpoints appear, so checkpoint retention cannot erase history), the trainer's
lag from its consumer group's committed offsets, and the ledger from the preference and dead-letter
topics themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

from kafka import KafkaConsumer, TopicPartition

from demo.freshness import VersionContents
from prefstream.events.v1.events_pb2 import DeadLetter as DeadLetterProto
from services import topics
from services.checkpoints import CheckpointStore
from services.codec import decode_event
from services.kafka import end_offsets
from services.registry import ModelRegistry
from services.schemas import PreferenceRecord

log = logging.getLogger(__name__)


@dataclass
class CheckpointInfo:
    version: str
    order: int
    records_seen: int
    # record_id -> source_acked_at of the records this checkpoint added
    added: dict[str, float]
    world_size: int = 1  # trainer processes (Ray Train workers) that made it


@dataclass
class LoopMonitor:
    """Polls the loop's durable state; cheap enough to call every few seconds."""

    registry: ModelRegistry
    store: CheckpointStore
    kafka_bootstrap: str
    model_name: str = "reward"
    trainer_group: str = "prefstream-trainer"
    checkpoints: dict[str, CheckpointInfo] = field(default_factory=dict)
    _consumer: KafkaConsumer | None = None

    def poll_checkpoints(self) -> None:
        for ref in self.store.list(self.model_name):
            if ref.version in self.checkpoints:
                continue
            try:
                meta = self.store.read_metadata(ref)
            except Exception as e:  # noqa: BLE001 - a checkpoint being garbage-collected right now
                log.debug("skipping checkpoint %s: %s", ref.version, e)
                continue
            added = {r["record_id"]: float(r.get("source_acked_at") or 0.0) for r in meta.get("records", [])}
            self.checkpoints[ref.version] = CheckpointInfo(
                ref.version, len(self.checkpoints), int(meta.get("records_seen", 0)), added,
                int((meta.get("trainer") or {}).get("world_size", 1)),
            )

    def versions(self) -> dict[str, str]:
        """version -> registry state (published, rejected, rolled_back)."""
        try:
            return {v.version: v.state for v in self.registry.versions(self.model_name, include_rejected=True)}
        except Exception:  # noqa: BLE001 - the model does not exist before the first checkpoint
            return {}

    def accuracy_of(self, version: str) -> float | None:
        try:
            v = self.registry.get(self.model_name, version)
        except Exception:  # noqa: BLE001
            return None
        acc = v.metrics.get("accuracy") if v else None
        return float(acc) if acc is not None else None

    def version_contents(self) -> list[VersionContents]:
        states = self.versions()
        ordered = sorted(self.checkpoints.values(), key=lambda c: c.version)
        return [
            VersionContents(c.version, i, tuple(c.added), published=states.get(c.version) == "published")
            for i, c in enumerate(ordered)
        ]

    def acked_at(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.checkpoints.values():
            for rid, t in c.added.items():
                if t:
                    out.setdefault(rid, t)
        return out

    def records_trained(self) -> int:
        return max((c.records_seen for c in self.checkpoints.values()), default=0)

    def trainer_lag(self) -> int | None:
        """Preference records not yet covered by a durable trainer checkpoint (committed offsets)."""
        try:
            if self._consumer is None:
                # Reads the group's committed offsets without joining it (no subscribe, no rebalance).
                self._consumer = KafkaConsumer(bootstrap_servers=self.kafka_bootstrap, group_id=self.trainer_group,
                                               enable_auto_commit=False)
            ends = end_offsets(self._consumer, topics.PREFERENCES.name)
            return sum(max(0, end - (self._consumer.committed(tp) or 0)) for tp, end in ends.items())
        except Exception as e:  # noqa: BLE001 - progress display only
            log.debug("lag unavailable: %s", e)
            return None

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()


def read_topic(bootstrap: str, topic: str, *, idle_s: float = 3.0) -> Iterable[bytes]:
    """Every value currently in ``topic``, from the beginning (no consumer group, nothing committed)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=int(idle_s * 1000))
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            batch = consumer.poll(timeout_ms=1000)
            for msgs in batch.values():
                for m in msgs:
                    yield m.value
    finally:
        consumer.close()


@dataclass
class Ledger:
    """Where every acknowledged event ended up."""

    trained: int = 0
    evaluated: int = 0
    dead_lettered: int = 0
    pending: int = 0
    unaccounted: list[str] = field(default_factory=list)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.unaccounted and not self.pending

    def to_dict(self) -> dict:
        return {"trained": self.trained, "evaluated": self.evaluated, "dead_lettered": self.dead_lettered,
                "pending": self.pending, "unaccounted": len(self.unaccounted),
                "dead_letter_reasons": self.dead_letter_reasons}


def build_ledger(
    bootstrap: str,
    *,
    feedback_events: Iterable[str],
    completion_events: dict[str, str],
    trained_record_ids: set[str],
) -> Ledger:
    """Account for every acked event: trained, evaluated, or dead-lettered with a reason.

    A feedback event is accounted for when a preference record derived from it was trained (its
    record id is in a checkpoint's metadata) or is a TEST record (evaluation only), or when the event
    is in the dead-letter topic.  A completion is accounted for through the records that joined it.
    ``completion_events`` maps completion event id -> assigned completion id.
    """
    by_event: dict[str, list[PreferenceRecord]] = {}
    by_completion: dict[str, list[PreferenceRecord]] = {}
    for value in read_topic(bootstrap, topics.PREFERENCES.name):
        rec = PreferenceRecord.from_kafka(value)
        for e in rec.source_event_ids:
            by_event.setdefault(e, []).append(rec)
        if rec.completion_id:
            by_completion.setdefault(rec.completion_id, []).append(rec)
    dead: dict[str, str] = {}
    for value in read_topic(bootstrap, topics.DEAD_LETTER.name):
        dl = decode_event(value, DeadLetterProto)
        if dl.event_id:
            dead[dl.event_id] = dl.reason
    ledger = Ledger()

    def settle(event_id: str, records: list[PreferenceRecord]) -> None:
        if event_id in dead:
            ledger.dead_lettered += 1
            reason = dead[event_id].split(":")[0][:80]
            ledger.dead_letter_reasons[reason] = ledger.dead_letter_reasons.get(reason, 0) + 1
        elif any(r.is_eval for r in records):
            ledger.evaluated += 1
        elif records and all(r.record_id in trained_record_ids for r in records):
            ledger.trained += 1
        elif records:
            ledger.pending += 1  # derived, not yet in a durable checkpoint
        else:
            ledger.unaccounted.append(event_id)

    for e in feedback_events:
        settle(e, by_event.get(e, []))
    for e, completion_id in completion_events.items():
        settle(e, by_event.get(e, []) or by_completion.get(completion_id, []))
    return ledger
