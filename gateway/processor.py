"""The stream processor that turns completions and feedback on Kafka into preference records.

A Kafka consumer group over the completions and feedback topics.  Each polled batch is handled in
order; for each record:

* **decode + validate** with the same functions the gateway uses (:mod:`gateway.validation`), so a
  producer writing JSON to Kafka directly gets the same rules; a bad record goes to the dead-letter
  topic with the reason and the field (stages ``decode``, ``validate``, ``check``).
* **completions** are kept in Redis for ``completion_ttl_s`` (``prefstream:completion:<id>``), and
  feedback parked for them is released.
* **feedback** about a completion not seen yet is **parked** in Redis (``prefstream:parked:<id>``,
  deadline in ``prefstream:parked_index``); it is retried when the completion arrives and every
  ``pending_retry_s``, and dead-lettered (stage ``timeout``) after ``pending_timeout_s``.
* otherwise the pure rules of :mod:`gateway.derive` give the records (thumbs through the per-prompt
  vote state ``prefstream:thumbs:<prompt hash>``).

Delivery: at least once, with deterministic record ids.  Outputs (preference records and dead
letters) are sent with acks=all and awaited; only then are offsets committed.  A crash in between
replays the batch; Redis side effects are idempotent (keyed by event id) and the replay derives
records with the same ids -- which are also remembered (``prefstream:emitted:<record id>``) so a
replay normally re-sends nothing.  Records with split TEST are written to the preference topic like
the others with ``split = SPLIT_TEST``; the trainer keeps them for evaluation only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from gateway import metrics
from gateway.config import GatewayConfig
from gateway.derive import Target, ThumbVote, derive, derive_criteria, derive_thumbs, target_of, thumb_vote
from gateway.events import Completion, Feedback, Thumbs
from gateway.kafka_writer import MAX_REQUEST_BYTES
from gateway.validation import Limits, check_feedback_against, completion_from_proto, feedback_from_proto, parse_json
from prefstream.events.v1.events_pb2 import Completion as CompletionProto
from prefstream.events.v1.events_pb2 import DeadLetter as DeadLetterProto
from prefstream.events.v1.events_pb2 import Feedback as FeedbackProto
from services import topics
from services.codec import encode_event
from services.criteria import Criterion
from services.criteria_eval import TRIM_MODES, prefix_trimmer
from services.criteria_store import CriteriaStore, CriterionNotFound
from services.errors import InvalidArgument, PrefstreamError, Unavailable
from services.kafka import RenewingProducer, make_consumer
from services.redis_client import connect
from services.schemas import PreferenceRecord, float_to_ts, prompt_hash

log = logging.getLogger(__name__)

_COMPLETION = "prefstream:completion:{}"
_PARKED = "prefstream:parked:{}"
_PARKED_INDEX = "prefstream:parked_index"
_THUMBS = "prefstream:thumbs:{}"
_EMITTED = "prefstream:emitted:{}"
#: The largest output record written (the producer's per-record limit less room for batch headers).
MAX_OUTPUT_BYTES = MAX_REQUEST_BYTES - 4096
#: How much of a dead-lettered record's payload the letter carries.
MAX_DEAD_PAYLOAD_BYTES = 256 * 1024


@dataclass
class _Source:
    """Where a record came from (for dead letters and parking)."""

    topic: str
    partition: int
    offset: int
    value: bytes
    timestamp_ms: int

    @property
    def coordinates_id(self) -> str:
        """The event id of a record that came without one: stable across replays."""
        return f"kafka:{self.topic}:{self.partition}:{self.offset}"


@dataclass
class _Batch:
    """Everything one poll batch produces; applied only after Kafka acknowledged the outputs."""

    outputs: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    records: list[PreferenceRecord] = field(default_factory=list)
    dead_letters: int = 0
    unpark: list[tuple[str, str]] = field(default_factory=list)  # (completion_id, event_id)
    completions: dict[str, Completion] = field(default_factory=dict)


class Processor:
    """One member of the processor consumer group (see the module docstring)."""

    def __init__(self, cfg: GatewayConfig, kafka_bootstrap: str, redis_url: str) -> None:
        self.cfg = cfg
        self.limits = Limits.from_config(cfg)
        self.bootstrap = kafka_bootstrap
        self.redis = connect(redis_url)
        self.criteria = CriteriaStore(self.redis)  # the criteria feedback switch (per project, per criterion)
        self._definitions: dict[tuple[str, str], Criterion] = {}  # (project, name@version): immutable
        self.t_completions = cfg.topic(topics.COMPLETIONS)
        self.t_feedback = cfg.topic(topics.FEEDBACK)
        self.t_preferences = cfg.topic(topics.PREFERENCES)
        self.t_dead = cfg.topic(topics.DEAD_LETTER)
        self._consumer: KafkaConsumer | None = None
        self._producer: RenewingProducer | None = None
        self._last_sweep = 0.0
        self.assigned = threading.Event()

    # ------------------------------------------------------------------------------------------
    # lifecycle

    def connect(self) -> None:
        if self._producer is None:
            self._producer = RenewingProducer(self.bootstrap)
        if self._consumer is None:
            consumer = make_consumer(self.bootstrap, group_id=self.cfg.processor_group)
            wanted = {self.t_completions, self.t_feedback, self.t_preferences, self.t_dead}
            missing = sorted(wanted - set(consumer.topics()))
            if missing:
                consumer.close(autocommit=False)
                raise Unavailable(f"Kafka topics {', '.join(missing)} do not exist; create them (`prefstream stack up` does)")
            consumer.subscribe([self.t_completions, self.t_feedback], listener=_AssignmentListener(self.assigned))
            self._consumer = consumer

    def run(self, stop: threading.Event) -> None:
        """Process until ``stop`` is set; Kafka or Redis outages are retried with backoff."""
        backoff = 0.5
        while not stop.is_set():
            try:
                self.connect()
                self.step()
                backoff = 0.5
            except (PrefstreamError, KafkaError, redis.RedisError, OSError, _OutputFailed) as e:
                log.warning("processor: %s: %s; retrying in %.1fs", type(e).__name__, e, backoff)
                self._rewind()
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:  # noqa: BLE001 - keep the processor alive; the batch is retried
                log.exception("processor: unexpected error; retrying in %.1fs", backoff)
                self._rewind()
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        self.close()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None

    def _rewind(self) -> None:
        """Go back to the committed offsets so a batch whose outputs failed is processed again."""
        if self._consumer is None:
            return
        try:
            for tp in self._consumer.assignment():
                committed = self._consumer.committed(tp)
                if committed is not None:
                    self._consumer.seek(tp, committed)
                else:
                    self._consumer.seek_to_beginning(tp)
        except (KafkaError, OSError) as e:  # cannot even ask: start over with a fresh consumer
            log.warning("processor: rewinding failed (%s); reconnecting", type(e).__name__)
            try:
                self._consumer.close(autocommit=False)
            finally:
                self._consumer = None

    # ------------------------------------------------------------------------------------------
    # one poll

    def step(self, timeout_ms: int = 500) -> int:
        """Poll once, process the batch, write outputs, commit; returns the records consumed."""
        if self._consumer is None:
            raise RuntimeError("call connect() first")
        polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=500)
        batch = _Batch()
        n = 0
        for tp_records in polled.values():
            for rec in tp_records:
                n += 1
                src = _Source(rec.topic, rec.partition, rec.offset, rec.value or b"", rec.timestamp)
                try:
                    if rec.topic == self.t_completions:
                        self._on_completion(src, batch)
                    else:
                        self._on_feedback(src, batch, parked_since=None)
                except (redis.RedisError, OSError, KafkaError):
                    raise  # infrastructure: the whole batch is retried
                except Exception:  # noqa: BLE001 - a poison record must not stop the processor for good
                    log.exception("processor: unexpected error on %s[%d]@%d", src.topic, src.partition, src.offset)
                    self._dead(batch, src, PrefstreamError("internal error while processing this record; see the processor log"),
                               stage="internal", event_id=_peek_event_id(src.value))
        if time.monotonic() - self._last_sweep >= self.cfg.pending_retry_s:
            self._sweep_parked(batch)
            self._last_sweep = time.monotonic()
        self._flush(batch)
        if n:
            self._consumer.commit()
        return n

    def _on_completion(self, src: _Source, batch: _Batch) -> None:
        stage = "decode"
        try:
            msg = parse_json(src.value, CompletionProto, root="completion")
            stage = "validate"
            c = completion_from_proto(msg, self.limits, assigned_event_id=src.coordinates_id)
        except InvalidArgument as e:
            self._dead(batch, src, e, stage=stage, event_id=_peek_event_id(src.value))
            metrics.PROCESSED.labels("completion", "dead_letter").inc()
            return
        if not c.acked_at:
            c = replace(c, acked_at=src.timestamp_ms / 1000.0)
        self.redis.set(_COMPLETION.format(c.completion_id), encode_event(c.to_proto()), px=int(self.cfg.completion_ttl_s * 1000))
        batch.completions[c.completion_id] = c
        metrics.PROCESSED.labels("completion", "stored").inc()
        if c.criteria is not None:
            self._criteria_feedback(c, batch, src)
        parked = self.redis.hgetall(_PARKED.format(c.completion_id))
        for _event_id, raw in sorted(parked.items()):
            src_parked, since = _unpark_entry(raw)
            self._on_feedback(src_parked, batch, parked_since=since, completion=c)

    def _criteria_feedback(self, c: Completion, batch: _Batch, src: _Source) -> None:
        """A completion ranked by named criteria is feedback in itself, unless switched off."""
        from services.criteria import split_ref

        mode = self.criteria.feedback_mode(c.project, [split_ref(r)[0] for r in c.criteria.refs])
        if mode is None:
            metrics.PROCESSED.labels("criteria", "switched_off").inc()
            return
        trim = prefix_trimmer(self._criteria_of(c)) if mode in TRIM_MODES else None
        records = derive_criteria(c, mode, now=time.time(), trim=trim)
        self._emit(batch, records, src, c.event_id)
        metrics.PROCESSED.labels("criteria", "derived" if records else "no_preference").inc()

    def _criteria_of(self, c: Completion) -> list[Criterion]:
        """The definitions that ranked ``c`` (a ``name@version`` never changes, so each is read once);
        empty when one was deleted since, and mode ``trim`` then builds its length-matched pair."""
        found = []
        for ref in c.criteria.refs:
            k = (c.project, ref)
            if k not in self._definitions:
                try:
                    self._definitions[k] = self.criteria.get(c.project, ref)
                except CriterionNotFound:
                    return []
            found.append(self._definitions[k])
        return found

    def _on_feedback(
        self,
        src: _Source,
        batch: _Batch,
        *,
        parked_since: float | None,
        completion: Completion | None = None,
    ) -> None:
        stage = "decode"
        try:
            msg = parse_json(src.value, FeedbackProto, root="feedback")
            stage = "validate"
            fb = feedback_from_proto(msg, self.limits, assigned_event_id=src.coordinates_id)
        except InvalidArgument as e:
            self._dead(batch, src, e, stage=stage, event_id=_peek_event_id(src.value))
            metrics.PROCESSED.labels("feedback", "dead_letter").inc()
            return
        if not fb.acked_at:
            fb = replace(fb, acked_at=src.timestamp_ms / 1000.0)
        if fb.inline is None:
            completion = completion or batch.completions.get(fb.completion_id) or self._load_completion(fb.completion_id)
            if completion is None:
                if parked_since is None:
                    self._park(fb, src)
                    metrics.PROCESSED.labels("feedback", "parked").inc()
                return
            if completion.project != fb.project:
                self._dead(batch, src, InvalidArgument("feedback.completion_id", f"completion {fb.completion_id} belongs to another project"),
                           stage="check", event_id=fb.event_id)
                self._done_parked(batch, fb, parked_since)
                return
        target = target_of(fb, completion)
        try:
            check_feedback_against(fb, target.outputs)
        except InvalidArgument as e:
            self._dead(batch, src, e, stage="check", event_id=fb.event_id)
            self._done_parked(batch, fb, parked_since)
            metrics.PROCESSED.labels("feedback", "dead_letter").inc()
            return
        records = self._derive(fb, target)
        self._emit(batch, records, src, fb.event_id)
        self._done_parked(batch, fb, parked_since)
        metrics.PROCESSED.labels("feedback", "derived" if records else "no_preference").inc()

    def _derive(self, fb: Feedback, target: Target) -> list[PreferenceRecord]:
        now = time.time()
        if not isinstance(fb.action, Thumbs):
            return derive(fb, target, now=now, max_pairs=self.cfg.max_pairs_per_prompt, weights=self.cfg.attribute_weights)
        key = _THUMBS.format(prompt_hash(fb.project, target.prompt))
        vote = thumb_vote(fb, target)
        others = [ThumbVote.from_dict(json.loads(v)) for v in self.redis.hgetall(key).values()]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, vote.event_id, json.dumps(vote.to_dict()))
        pipe.pexpire(key, int(self.cfg.thumbs_ttl_s * 1000))
        pipe.execute()
        return derive_thumbs(vote, others, project=fb.project, prompt=target.prompt, now=now, max_pairs=self.cfg.max_pairs_per_prompt)

    def _load_completion(self, completion_id: str) -> Completion | None:
        raw = self.redis.get(_COMPLETION.format(completion_id))
        if raw is None:
            return None
        msg = parse_json(raw, CompletionProto, root="completion")
        return completion_from_proto(msg, self.limits)

    # ------------------------------------------------------------------------------------------
    # parking

    def _park(self, fb: Feedback, src: _Source) -> None:
        now = time.time()
        entry = {"src": {"topic": src.topic, "partition": src.partition, "offset": src.offset,
                         "value": src.value.decode("utf-8"), "timestamp_ms": src.timestamp_ms}, "since": now}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(_PARKED.format(fb.completion_id), fb.event_id, json.dumps(entry))
        pipe.zadd(_PARKED_INDEX, {f"{fb.completion_id}\x00{fb.event_id}": now + self.cfg.pending_timeout_s}, nx=True)
        pipe.execute()

    def _done_parked(self, batch: _Batch, fb: Feedback, parked_since: float | None) -> None:
        if parked_since is not None:
            batch.unpark.append((fb.completion_id, fb.event_id))

    def _sweep_parked(self, batch: _Batch) -> None:
        """Retry parked feedback whose completion is known now; dead-letter what waited too long."""
        entries = self.redis.zrange(_PARKED_INDEX, 0, 999, withscores=True)
        metrics.PARKED.set(self.redis.zcard(_PARKED_INDEX))
        now = time.time()
        handled = set(batch.unpark)
        for member, deadline in entries:
            completion_id, _, event_id = member.decode().partition("\x00")
            if (completion_id, event_id) in handled:  # released by its completion earlier in this batch
                continue
            raw = self.redis.hget(_PARKED.format(completion_id), event_id)
            if raw is None:  # released by another member of the group
                self.redis.zrem(_PARKED_INDEX, member)
                continue
            src, since = _unpark_entry(raw)
            completion = batch.completions.get(completion_id) or self._load_completion(completion_id)
            if completion is not None:
                self._on_feedback(src, batch, parked_since=since, completion=completion)
            elif deadline <= now:
                waited = now - since
                err = InvalidArgument(
                    "feedback.completion_id",
                    f"completion {completion_id} was not seen within {waited:.0f}s (pending_timeout_s={self.cfg.pending_timeout_s:g}); "
                    "log the completion before its feedback, or send the feedback inline",
                )
                self._dead(batch, src, err, stage="timeout", event_id=event_id)
                batch.unpark.append((completion_id, event_id))
                metrics.PROCESSED.labels("feedback", "dead_letter").inc()

    # ------------------------------------------------------------------------------------------
    # outputs

    def _emit(self, batch: _Batch, records: list[PreferenceRecord], src: _Source, event_id: str) -> None:
        if not records:
            return
        seen = self.redis.mget([_EMITTED.format(r.record_id) for r in records])
        for r, was in zip(records, seen):
            if was is not None or any(r.record_id == b.record_id for b in batch.records):
                continue
            key, value = prompt_hash(r.project, r.prompt).encode(), r.to_kafka()
            if len(key) + len(value) > MAX_OUTPUT_BYTES:
                # Kafka would refuse it on every retry and hold up the partition behind it for good.
                self._dead(batch, src, InvalidArgument("preference", f"the record derived from this event is "
                           f"{len(key) + len(value)} bytes; Kafka takes at most {MAX_OUTPUT_BYTES} bytes per record: "
                           "shorten the prompt or the outputs"), stage="too_large", event_id=event_id)
                continue
            batch.records.append(r)
            batch.outputs.append((self.t_preferences, key, value))

    def _dead(self, batch: _Batch, src: _Source, err: PrefstreamError, *, stage: str, event_id: str = "") -> None:
        payload = src.value[:MAX_DEAD_PAYLOAD_BYTES].decode("utf-8", errors="replace")
        if len(src.value) > MAX_DEAD_PAYLOAD_BYTES:  # the letter itself must fit in Kafka; the source keeps it all
            payload += f"... [truncated: {len(src.value)} bytes; read {src.topic}[{src.partition}]@{src.offset}]"
        letter = DeadLetterProto(
            source_topic=src.topic,
            partition=src.partition,
            offset=src.offset,
            payload=payload,
            reason=err.message,
            field=err.field or "",
            event_id=event_id,
            at=float_to_ts(time.time()),
        )
        batch.outputs.append((self.t_dead, event_id.encode() if event_id else None, encode_event(letter)))
        batch.dead_letters += 1
        metrics.DEAD_LETTERS.labels(stage).inc()
        log.info("dead letter from %s[%d]@%d (stage %s): %s: %s", src.topic, src.partition, src.offset, stage, err.field, err.message)

    def _flush(self, batch: _Batch) -> None:
        """Write the batch's outputs, wait for acks=all, then apply its bookkeeping."""
        if self._producer is None:
            raise RuntimeError("call connect() first")
        failed = self._producer.send_all(batch.outputs, timeout=30)  # renews a producer that stopped acking
        if failed:
            raise _OutputFailed(f"{failed} of {len(batch.outputs)} output record(s) were not acknowledged by Kafka")
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for r in batch.records:
            pipe.set(_EMITTED.format(r.record_id), b"1", px=int(self.cfg.completion_ttl_s * 1000))
            metrics.PREFERENCES.labels(r.source_kind, r.split).inc()
            if r.source_acked_at:
                metrics.FRESHNESS_SECONDS.observe(max(0.0, now - r.source_acked_at))
        for completion_id, event_id in batch.unpark:
            pipe.hdel(_PARKED.format(completion_id), event_id)
            pipe.zrem(_PARKED_INDEX, f"{completion_id}\x00{event_id}")
        pipe.execute()


class _OutputFailed(Exception):
    """Kafka did not acknowledge a batch's outputs: the batch is processed again."""


class _AssignmentListener(ConsumerRebalanceListener):
    """Sets an event once partitions are assigned (tests and `process --wait` wait on it)."""

    def __init__(self, assigned: threading.Event) -> None:
        self._assigned = assigned

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned:
            self._assigned.set()


def _unpark_entry(raw: bytes) -> tuple[_Source, float]:
    entry = json.loads(raw)
    src = _Source(**{**entry["src"], "value": entry["src"]["value"].encode("utf-8")})
    return src, float(entry["since"])


def _peek_event_id(value: bytes) -> str:
    """The event_id of a record that failed validation, when its JSON has one (for the dead letter)."""
    try:
        obj = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return ""
    ev = obj.get("event_id") if isinstance(obj, dict) else None
    return ev if isinstance(ev, str) and len(ev) <= 256 else ""


class ProcessorThread:
    """Runs a :class:`Processor` on a daemon thread (the gateway's default in-process mode)."""

    def __init__(self, cfg: GatewayConfig, kafka_bootstrap: str, redis_url: str) -> None:
        self.processor = Processor(cfg, kafka_bootstrap, redis_url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.processor.run, args=(self._stop,), name="feedback-processor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
