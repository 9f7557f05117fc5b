"""The durable write path shared by gRPC and HTTP: authorize, dedup, write to Kafka, answer after the ack.

Both transports turn requests into validated domain events (:mod:`gateway.validation`) and hand a
batch of them to :meth:`Ingestor.write`, which answers each event individually:

1. the caller's key must belong to the event's project (PERMISSION_DENIED otherwise);
2. feedback naming a completion this gateway logged is checked against it (index in range);
3. client-chosen event ids are claimed in Redis (:mod:`gateway.dedup`); ids seen before answer
   "duplicate" with the original completion id and ack time, and nothing is written;
4. the batch is handed to the Kafka producer in one piece (:mod:`gateway.kafka_writer`; kafka-python
   never runs on the event loop) and awaited;
5. only then is each event answered OK; a record Kafka did not acknowledge within
   ``kafka_ack_timeout_s`` is answered UNAVAILABLE and its dedup claim released so a retry writes it.

The wire value is the proto3 JSON of the event (:mod:`gateway.wire`, identical to
:func:`services.codec.encode_event` of its message).  ``acked_at``
in that value is the moment the gateway handed the event to Kafka (the record's own timestamp); the
response's ``acked_at`` is when Kafka acknowledged it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import redis
import redis.asyncio as aioredis

from gateway import metrics, wire
from gateway.auth import Principal
from gateway.config import GatewayConfig
from gateway.dedup import Claim, Deduper, dedup_key
from gateway.events import Completion, Event, Feedback
from gateway.kafka_writer import MAX_REQUEST_BYTES, KafkaWriter
from gateway.ratelimit import RateLimiter
from gateway.validation import check_feedback_indices
from services import topics
from services.errors import InvalidArgument, PrefstreamError, Unavailable
from services.schemas import prompt_hash

log = logging.getLogger(__name__)

_SHAPE_KEY = "prefstream:completion_shape:{}"
#: Most single (unary) events written together, and such batches in flight at once.
UNARY_MAX_BATCH = 256
UNARY_MAX_INFLIGHT = 8


@dataclass(frozen=True)
class Accepted:
    """An event Kafka has (now, or from an earlier attempt when ``duplicate``)."""

    event_id: str
    completion_id: str = ""
    duplicate: bool = False
    acked_at: float = 0.0


Outcome = Accepted | PrefstreamError


@dataclass
class Item:
    """One event on its way through :meth:`Ingestor.write`."""

    event: Event | PrefstreamError
    #: True when the client chose the event id (so a retry may repeat it and it must be claimed).
    client_id: bool = True
    received: float = dataclasses.field(default_factory=time.monotonic)


#: The largest encoded event (key + value) the gateway hands to Kafka: the producer's per-request
#: limit less room for the record batch's own headers.
MAX_EVENT_BYTES = MAX_REQUEST_BYTES - 4096


def new_event_id() -> str:
    """The id the gateway gives an event that came without one (no dedup needed: it is fresh)."""
    return "gw-" + uuid.uuid4().hex


def kafka_key(event: Event) -> bytes:
    """Partition key: completions and their feedback share the completion id; inline feedback its prompt."""
    if isinstance(event, Completion):
        return event.completion_id.encode()
    if event.completion_id:
        return event.completion_id.encode()
    if event.inline is None:  # validation guarantees a target; this is a programming error
        raise ValueError(f"feedback {event.event_id} has no target")
    return prompt_hash(event.project, event.inline.prompt).encode()




class Ingestor:
    """Authorize, dedup, write and answer a batch of events (see the module docstring)."""

    def __init__(self, cfg: GatewayConfig, writer: KafkaWriter, client: aioredis.Redis) -> None:
        self.cfg = cfg
        self.writer = writer
        self._redis = client
        self.dedup = Deduper(client, pending_ttl_s=cfg.dedup_pending_ttl_s, done_ttl_s=cfg.dedup_ttl_s)
        self._shape_ms = int(cfg.completion_ttl_s * 1000)
        rate = cfg.rate_limit_events_per_s
        self.limiter = RateLimiter(rate, cfg.rate_limit_burst or max(1.0, rate))
        self._completions_topic = cfg.topic(topics.COMPLETIONS)
        self._feedback_topic = cfg.topic(topics.FEEDBACK)
        # Unary calls are coalesced: concurrent LogCompletion/LogFeedback calls share a batch.
        self._queue: list[tuple[Item, Principal, asyncio.Future]] = []
        self._inflight = 0
        self._kick_scheduled = False

    async def write_one(self, item: Item, principal: Principal) -> Outcome:
        """One event, batched with whatever other single events arrive in the same loop iteration.

        Unary calls then cost one Redis script call and one Kafka hand-off per batch, not per call,
        while a lone call still goes out on the next iteration of the event loop.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._queue.append((item, principal, fut))
        if not self._kick_scheduled:
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        return await fut

    def _kick(self) -> None:
        self._kick_scheduled = False
        while self._queue and self._inflight < UNARY_MAX_INFLIGHT:
            batch, self._queue = self._queue[:UNARY_MAX_BATCH], self._queue[UNARY_MAX_BATCH:]
            self._inflight += 1
            task = asyncio.ensure_future(self._run_unary(batch))
            task.add_done_callback(self._unary_done)

    def _unary_done(self, _task: asyncio.Future) -> None:
        self._inflight -= 1
        self._kick()

    async def _run_unary(self, batch: list[tuple[Item, Principal, asyncio.Future]]) -> None:
        groups: dict[Principal, list[tuple[Item, asyncio.Future]]] = {}
        for item, principal, fut in batch:
            groups.setdefault(principal, []).append((item, fut))
        for principal, entries in groups.items():
            try:
                outcomes = await self.write([item for item, _ in entries], principal)
            except BaseException as e:  # noqa: BLE001 - handed to the callers, which map it
                for _, fut in entries:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), outcome in zip(entries, outcomes):
                if not fut.done():
                    fut.set_result(outcome)

    def topic_of(self, event: Event) -> str:
        return self._completions_topic if isinstance(event, Completion) else self._feedback_topic

    async def write(self, items: Sequence[Item], principal: Principal) -> list[Outcome]:
        """One outcome per item, in order; never OK for an event Kafka has not acknowledged."""
        out: list[Outcome | None] = [None] * len(items)
        live: list[int] = []
        for i, it in enumerate(items):
            ev = it.event
            if isinstance(ev, PrefstreamError):
                out[i] = ev
                continue
            where = "completion.project" if isinstance(ev, Completion) else "feedback.project"
            try:
                principal.authorize(ev.project, where)
            except PrefstreamError as e:
                out[i] = e
                continue
            over = self.limiter.take(ev.project, where)
            if over is not None:
                out[i] = over
                metrics.RATE_LIMITED.inc()
                continue
            live.append(i)
        try:
            await self._check_targets(items, live, out)
            live = [i for i in live if out[i] is None]
            await self._write_live(items, live, out)
        except PrefstreamError as e:  # Redis or Kafka down for the whole batch
            for i in live:
                if out[i] is None:
                    out[i] = e
        return [o if o is not None else Unavailable("event was not written") for o in out]

    async def _check_targets(self, items: Sequence[Item], live: list[int], out: list[Outcome | None]) -> None:
        """Feedback naming a completion this gateway logged: the indices must exist in it."""
        refs = [i for i in live if isinstance(items[i].event, Feedback) and items[i].event.completion_id]  # type: ignore[union-attr]
        if not refs:
            return
        try:
            shapes = await self._redis.mget([_SHAPE_KEY.format(items[i].event.completion_id) for i in refs])  # type: ignore[union-attr]
        except (redis.RedisError, OSError) as e:
            raise Unavailable(f"Redis is unreachable: {type(e).__name__}") from e
        for i, shape in zip(refs, shapes):
            if shape is None:
                continue  # not logged here (or expired): the processor checks it when it arrives
            fb: Feedback = items[i].event  # type: ignore[assignment]
            project, _, n = shape.decode().partition("\x00")
            try:
                if project != fb.project:
                    raise InvalidArgument("feedback.completion_id", f"completion {fb.completion_id} belongs to another project")
                check_feedback_indices(fb, int(n))
            except PrefstreamError as e:
                out[i] = e

    async def _write_live(self, items: Sequence[Item], live: list[int], out: list[Outcome | None]) -> None:
        to_claim = [i for i in live if items[i].client_id]
        claims = await self.dedup.claim([dedup_key(items[i].event.project, items[i].event.event_id) for i in to_claim])  # type: ignore[union-attr]
        claim_of: dict[int, Claim] = dict(zip(to_claim, claims))
        waiting: list[int] = []
        writing: list[int] = []
        for i in live:
            c = claim_of.get(i)
            if c is None or c.owned:
                writing.append(i)
            elif c.done is not None:
                out[i] = _duplicate(items[i].event, c.done)  # type: ignore[arg-type]
            else:
                waiting.append(i)
        await self._send(items, writing, claim_of, out)
        for i in waiting:  # another attempt (often an earlier copy in this same batch) holds the id
            await self._retry_claimed(items[i], claim_of[i], out, i)

    async def _retry_claimed(self, item: Item, claim: Claim, out: list[Outcome | None], i: int) -> None:
        c = await self.dedup.wait(claim, timeout_s=self.cfg.kafka_ack_timeout_s + 1.0)
        if c.done is not None:
            out[i] = _duplicate(item.event, c.done)  # type: ignore[arg-type]
            return
        sub: list[Outcome | None] = [None]
        await self._send([item], [0], {0: c}, sub)
        out[i] = sub[0]

    async def _send(self, items: Sequence[Item], idx: list[int], claim_of: dict[int, Claim], out: list[Any]) -> None:
        if not idx:
            return
        handed = wire.timestamp_json(time.time())
        records, kept = [], []
        for i in idx:
            ev = items[i].event
            rec = (self.topic_of(ev), kafka_key(ev), wire.encode(ev, acked_at=handed))  # type: ignore[arg-type]
            if len(rec[1]) + len(rec[2]) > MAX_EVENT_BYTES:  # the client's fault: Kafka would refuse it anyway
                kind = "completion" if isinstance(ev, Completion) else "feedback"
                out[i] = InvalidArgument(kind, f"the encoded event is {len(rec[1]) + len(rec[2])} bytes; the limit is "
                                               f"{MAX_EVENT_BYTES} bytes per event: shorten its messages or outputs")
                continue
            records.append(rec)
            kept.append(i)
        kept_set = set(kept)
        too_large = [claim_of[i] for i in idx if i not in kept_set and i in claim_of]
        if too_large:
            await self._release_quietly(too_large)
        idx = kept
        if not idx:
            return
        events: list[Event] = [items[i].event for i in idx]  # type: ignore[misc]
        try:
            acks = await self.writer.write(records)
        except BaseException:
            await self._release_quietly([claim_of[i] for i in idx if i in claim_of])
            raise
        ok_claims, ok_results, failed_claims = [], [], []
        shapes: list[tuple[str, str]] = []
        now = time.monotonic()
        for i, ev, ack in zip(idx, events, acks):
            c = claim_of.get(i)
            if isinstance(ack, PrefstreamError):
                out[i] = ack
                metrics.KAFKA_FAILURES.inc()
                if c is not None:
                    failed_claims.append(c)
                continue
            completion_id = ev.completion_id if isinstance(ev, Completion) else ""  # responses carry it for completions
            out[i] = Accepted(event_id=ev.event_id, completion_id=completion_id, acked_at=ack)
            metrics.ack_histogram("completion" if isinstance(ev, Completion) else "feedback").observe(now - items[i].received)
            if c is not None:
                ok_claims.append(c)
                ok_results.append({"c": completion_id, "a": ack})
            if isinstance(ev, Completion):
                shapes.append((_SHAPE_KEY.format(ev.completion_id), f"{ev.project}\x00{len(ev.candidates)}"))
        await self._release_quietly(failed_claims)
        try:
            await self.dedup.confirm(ok_claims, ok_results, also_set=shapes, also_set_ms=self._shape_ms)
        except PrefstreamError as e:
            # Kafka has these events: they are answered OK.  Without the confirm a retry after the
            # pending marker expires writes them again (deterministic record ids absorb it).
            log.warning("Kafka acknowledged %d event(s) but Redis bookkeeping failed: %s", len(ok_claims), e)

    async def _release_quietly(self, claims: list[Claim]) -> None:
        try:
            await self.dedup.release(claims)
        except PrefstreamError as e:  # the pending markers expire by themselves
            log.warning("could not release %d dedup claim(s): %s", len(claims), e)


def _duplicate(event: Event, done: dict[str, Any]) -> Accepted:
    return Accepted(event_id=event.event_id, completion_id=str(done.get("c", "")), duplicate=True, acked_at=float(done.get("a", 0.0)))
