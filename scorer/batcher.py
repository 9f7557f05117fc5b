"""An asyncio dynamic batcher: many small scoring requests become few well-shaped model batches.

Why it exists: a transformer forward over 32 sequences costs far less than 32 forwards over one, but
requests arrive one at a time on the gRPC event loop.  The batcher queues every sequence with its
token count, and a single scheduler task forms batches that

* respect a padded-token budget (``batch size x longest sequence <= max_batch_tokens``) and a size cap,
* mix only similar lengths (length buckets; a batch's longest sequence is at most ``max_pad_ratio``
  times its shortest bucket), so little compute goes to padding,
* always contain the oldest queued sequence (no starvation) and leave once it has waited
  ``max_wait_ms`` or a full batch is ready.

The model function runs in an executor (a dedicated thread), never on the event loop; while it runs,
the queue keeps filling, so batches grow with load on their own.  A failing batch fails exactly the
futures of the sequences in it; ``run_batch`` may also return an ``Exception`` for one item to fail
only that item.  Nothing here knows about torch, which keeps it unit-testable with plain functions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Protocol, Sequence, TypeVar

from services.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchObserver(Protocol):
    """Receives batch statistics (the scorer's metrics implement it)."""

    def on_batch(self, size: int, real_tokens: int, padded_tokens: int, duration_s: float, ok: bool) -> None: ...

    def on_queue_depth(self, depth: int) -> None: ...


@dataclass
class _Pending(Generic[T, R]):
    item: T
    tokens: int
    bucket_len: int
    seq: int
    enqueued: float
    future: asyncio.Future = field(repr=False)


@dataclass(frozen=True)
class BatchLimits:
    """How batches are formed; see the module docstring."""

    max_batch_tokens: int = 16384
    max_batch_size: int = 64
    max_wait_ms: float = 4.0
    bucket_width: int = 32
    max_queue: int = 4096
    max_pad_ratio: float = 2.0
    max_concurrent_batches: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_size < 1 or self.bucket_width < 1:
            raise ValueError("max_batch_tokens, max_batch_size and bucket_width must be >= 1")
        if self.max_wait_ms < 0 or self.max_pad_ratio < 1 or self.max_concurrent_batches < 1:
            raise ValueError("max_wait_ms must be >= 0, max_pad_ratio >= 1, max_concurrent_batches >= 1")

    def bucket_len(self, tokens: int) -> int:
        """Sequence length rounded up to the bucket grid: the padded length it costs in a batch."""
        w = self.bucket_width
        return max(w, -(-tokens // w) * w)


class DynamicBatcher(Generic[T, R]):
    """Queue items with a token count; ``run_batch(items) -> results`` runs on ``executor``.

    Create it inside a running event loop; ``close()`` drains what is queued, then stops.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        executor: concurrent.futures.Executor,
        limits: BatchLimits = BatchLimits(),
        observer: BatchObserver | None = None,
        name: str = "batcher",
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self.limits = limits
        self._observer = observer
        self.name = name
        self._pending: list[_Pending[T, R]] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(limits.max_concurrent_batches)
        self._inflight: set[asyncio.Task] = set()
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._schedule(), name=f"{name}-scheduler")

    # ----------------------------------------------------------------------------------- submit

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closing

    def submit_nowait(self, item: T, tokens: int) -> asyncio.Future:
        """Queue one item; the returned future resolves to its result (or its exception)."""
        return self.submit_group([(item, tokens)])[0]

    def submit_group(self, items: Sequence[tuple[T, int]]) -> list[asyncio.Future]:
        """Queue the sequences of one request at once (all admitted, or none).

        Raises Unavailable once closing (the caller retries on the model that replaced this one) and
        ResourceExhausted when the queue is full.
        """
        if self._closing:
            raise Unavailable(f"{self.name} is shutting down; retry")
        if len(self._pending) + len(items) > self.limits.max_queue:
            raise ResourceExhausted(
                f"scoring queue is full ({len(self._pending)} sequences queued, limit {self.limits.max_queue}); retry later"
            )
        now = time.monotonic()
        futures = []
        for item, tokens in items:
            if tokens < 1:
                raise ValueError(f"token count must be >= 1, got {tokens}")
            fut = self._loop.create_future()
            self._pending.append(
                _Pending(item, tokens, self.limits.bucket_len(tokens), next(self._seq), now, fut)
            )
            futures.append(fut)
        self._wakeup.set()
        self._report_depth()
        return futures

    async def submit(self, items: Sequence[tuple[T, int]]) -> list[R]:
        """Queue one request's sequences and wait for all results, in the order given.

        If any item fails, the first failure is raised after every item has finished, so no result
        or exception is left unobserved.
        """
        futures = self.submit_group(items)
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            raise
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return list(results)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Stop accepting, run everything queued, wait for in-flight batches, stop the scheduler."""
        self._closing = True
        self._wakeup.set()
        await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    # ----------------------------------------------------------------------------------- schedule

    def _ready(self, now: float) -> bool:
        if not self._pending:
            return False
        if self._closing or len(self._pending) >= self.limits.max_batch_size:
            return True
        if now - self._pending[0].enqueued >= self.limits.max_wait_ms / 1000.0:
            return True
        return sum(p.bucket_len for p in self._pending) >= self.limits.max_batch_tokens

    async def _schedule(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            # Wait until a batch is worth running: full, or the oldest item is due.
            while True:
                now = time.monotonic()
                if self._ready(now) or not self._pending:
                    break
                due = self._pending[0].enqueued + self.limits.max_wait_ms / 1000.0
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.0, due - now))
                except TimeoutError:
                    pass
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            task = self._loop.create_task(self._execute(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _take_batch(self) -> list[_Pending[T, R]]:
        """Pick the oldest live item plus the closest-length items that fit the budget."""
        # Requests cancelled by their client are dropped before they cost compute.
        live = [p for p in self._pending if not p.future.done()]
        if not live:
            self._pending.clear()
            self._report_depth()
            return []
        lim = self.limits
        oldest = live[0]
        chosen = [oldest]
        max_len = min_len = oldest.bucket_len
        # Same bucket first, then nearer buckets (shorter before longer), FIFO within a bucket.
        others = sorted(
            live[1:],
            key=lambda p: (abs(p.bucket_len - oldest.bucket_len), p.bucket_len > oldest.bucket_len, p.seq),
        )
        for p in others:
            if len(chosen) >= lim.max_batch_size:
                break
            new_max = max(max_len, p.bucket_len)
            new_min = min(min_len, p.bucket_len)
            if new_max * (len(chosen) + 1) > lim.max_batch_tokens or new_max > lim.max_pad_ratio * new_min:
                continue
            chosen.append(p)
            max_len, min_len = new_max, new_min
        taken = {id(p) for p in chosen}
        self._pending = [p for p in live if id(p) not in taken]
        self._report_depth()
        return chosen

    async def _execute(self, batch: list[_Pending[T, R]]) -> None:
        items = [p.item for p in batch]
        t0 = time.perf_counter()
        ok = True
        try:
            results = await self._loop.run_in_executor(self._executor, self._run_batch, items)
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: run_batch returned {len(results)} results for {len(batch)} items")
            for p, r in zip(batch, results):
                if p.future.done():
                    continue
                if isinstance(r, BaseException):
                    p.future.set_exception(r)
                else:
                    p.future.set_result(r)
        except BaseException as e:  # noqa: BLE001 - delivered to exactly this batch's futures
            ok = False
            if not isinstance(e, Exception):
                e = RuntimeError(f"{self.name}: batch interrupted ({type(e).__name__})")
            log.warning("%s: batch of %d failed: %s", self.name, len(batch), type(e).__name__)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
        finally:
            self._slots.release()
            if self._observer is not None:
                real = sum(p.tokens for p in batch)
                padded = len(batch) * max(p.tokens for p in batch)  # the model pads to the longest
                self._observer.on_batch(len(batch), real, padded, time.perf_counter() - t0, ok)

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.on_queue_depth(len(self._pending))


__all__ = ["BatchLimits", "BatchObserver", "DynamicBatcher"]
