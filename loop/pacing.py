"""On-policy pacing of the criteria loop: send best-of-N only as fast as the policy trainer learns.

Why: the scorer and the trainer share the machine.  Unpaced, the loop's best-of-N requests kept both
cores decoding: in the bench run of 2026-12-04 the trainer wrote its first checkpoint (26 records)
11.5 minutes after it started and trained 82 records in all while the loop sent 311 requests, so
nearly every pair it trained on was sampled from the *base* policy, long after the served policy
had moved, and the second phase spent its time on the first phase's queue.  Paced, the loop holds new requests while the trainer has more
than ``max_backlog`` preference records it has not consumed, so the CPU goes to training when the
queue is long and every pair is sampled from a recent served version (online DPO, not offline DPO
on a stale queue).

The backlog is ``produced - consumed``: the preference topic's end offsets (every record the
processor wrote) minus the trainer's ``prefstream_trainer_records_total`` over every use but replay
(trained, held out for the gate, refused, duplicate).  It is read, not estimated: no record count is
assumed per request (ties make none, ``pairs`` mode makes two).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Callable

log = logging.getLogger(__name__)

#: The trainer counter the backlog subtracts, and the use it leaves out (replayed records were consumed before).
CONSUMED_METRIC = "prefstream_trainer_records_total"
NOT_CONSUMED_USES = frozenset({"replay"})


def consumed_from_metrics(text: str) -> float | None:
    """Records the trainer consumed, from its Prometheus exposition text; None when the counter is absent."""
    from prometheus_client.parser import text_string_to_metric_families

    total, seen = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != CONSUMED_METRIC or sample.labels.get("use") in NOT_CONSUMED_USES:
                continue
            total += sample.value
            seen = True
    return total if seen else None


def backlog(produced: int, consumed: float) -> int:
    """Records written to the topic that the trainer has not consumed yet (never negative: a trainer that
    re-read records after a rebalance counts them twice)."""
    return max(0, int(produced - consumed))


class TrainerBacklog:
    """Reads the policy trainer's backlog on the preference topic (blocking; call it from a thread)."""

    def __init__(self, bootstrap: str, topic: str, metrics_url: str, *,
                 fetch: Callable[[str], str] | None = None) -> None:
        self.bootstrap, self.topic, self.metrics_url = bootstrap, topic, metrics_url
        self._fetch = fetch or _http_get
        self._consumer = None

    def produced(self) -> int:
        from kafka import KafkaConsumer

        from services.kafka import end_offsets

        if self._consumer is None:  # no group: reads end offsets without joining or committing anything
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False)
        return sum(end_offsets(self._consumer, self.topic).values())

    def consumed(self) -> float | None:
        return consumed_from_metrics(self._fetch(self.metrics_url))

    def read(self) -> int | None:
        """The backlog now, or None when either side cannot be read (the caller then does not hold requests)."""
        try:
            consumed = self.consumed()
            if consumed is None:  # the trainer has not consumed anything yet: all of the topic is backlog
                consumed = 0.0
            return backlog(self.produced(), consumed)
        except Exception as e:  # noqa: BLE001 - pacing is best effort; the loop's process checks catch a dead trainer
            log.debug("trainer backlog unavailable: %s", e)
            return None

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def _http_get(url: str, timeout_s: float = 5.0) -> str:
    from urllib.request import urlopen

    with urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - a loopback URL the loop built itself
        return resp.read().decode()


class Pacer:
    """Holds senders while the backlog is at ``max_backlog`` or above; shares one reading per ``every_s``.

    ``read`` returns the backlog or None (unknown: not held).  Async callers run ``read`` in a thread;
    this class only keeps the reading and the time spent holding, so it is testable with a fake clock.
    """

    def __init__(self, max_backlog: int, read: Callable[[], int | None], *, every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_backlog, self.read, self.every_s, self.clock = max_backlog, read, every_s, clock
        self.last: int | None = None
        self._read_at = -float("inf")
        self.held_s = 0.0
        self.peak: int | None = None  # the largest backlog read; None until a reading succeeds

    def refresh(self) -> int | None:
        now = self.clock()
        if now - self._read_at >= self.every_s:
            self.last, self._read_at = self.read(), now
            if self.last is not None:
                self.peak = self.last if self.peak is None else max(self.peak, self.last)
        return self.last

    def should_hold(self) -> bool:
        if self.max_backlog <= 0:
            return False
        b = self.refresh()
        return b is not None and b >= self.max_backlog


class Quiet:
    """Lets the loop measure the served policy alone: every best-of-N of the app runs inside
    :meth:`request`, and :meth:`alone` holds new ones, waits for those in flight to end, and keeps
    the scorer to itself until it exits.  Why: the scorer decodes concurrent requests as one batch,
    and sharing a step changes floating-point rounding, so a seeded reply is exact only in the same
    company (docs/scorer.md); an evaluation decoded alone gives the same replies each time it
    measures the same version.  One ``alone`` at a time; the others wait their turn, and the app's
    requests wait for all of them.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self._turn = asyncio.Lock()
        self._wanting = 0
        self.held_s = 0.0  # time the app's requests were held, the wait for those in flight included

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        while not self._open.is_set():  # woken by one alone() ending while the next began: wait again
            await self._open.wait()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        self._wanting += 1  # requests stay held until no evaluation is left waiting for its turn
        self._open.clear()
        started = None
        try:
            async with self._turn:
                started = self.clock()
                await self._idle.wait()
                yield
        finally:
            self._wanting -= 1
            if started is not None:
                self.held_s += self.clock() - started
            if self._wanting == 0:
                self._open.set()


__all__ = ["CONSUMED_METRIC", "Pacer", "Quiet", "TrainerBacklog", "backlog", "consumed_from_metrics"]
