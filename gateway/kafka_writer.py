"""Hands batches of records to kafka-python and tells asyncio when Kafka has acknowledged each one.

kafka-python is pure Python: on a gateway it costs about as much CPU per event as gRPC itself, and in
the gateway's process it would share one interpreter lock with the gRPC event loop.  So by default
the producer lives in a **child process** (``kafka_producer_process``): the event loop hands it a
whole batch through a pipe (one pickle per batch), the child sends every record with acks=all and
answers the batch with one result per record -- the ack time, or why Kafka did not take it.  With
the option off the producer runs on a thread of the gateway process (same protocol, no pipe).

Either way ``send()`` never runs on the event loop (it may block on metadata), a broker that cannot
be reached yields Unavailable for each record after at most ``ack_timeout_s`` (the producer's own
``delivery_timeout_ms`` is the same, so a record answered UNAVAILABLE is not delivered much later
by a background retry), and a child that dies fails its in-flight batches with Unavailable and is
restarted by the next batch.

Two guards keep a broker crash from wedging the front door (kafka-python's idempotent producer can
stop sending for good after its broker is killed and comes back: records are then neither
acknowledged nor expired):

- every batch carries its deadline; a record still queued when its deadline has passed is answered
  without being sent, so a backlog built while Kafka was away never delays the writes after it;
- a watchdog replaces the producer when a record outlives its delivery timeout by
  ``STALL_GRACE_S`` (a healthy producer always settles it by then, one way or the other); the
  records it held are answered Unavailable and the clients retry them on the new producer.

A record larger than the producer's ``max_request_size`` is the client's fault, not Kafka's: it is
answered InvalidArgument naming the size, and it does not count as a Kafka failure for health.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Callable, Sequence

from gateway import metrics
from services.errors import InvalidArgument, PrefstreamError, Unavailable

log = logging.getLogger(__name__)

Record = tuple[str, bytes, bytes]  # (topic, key, value)
#: Per record: the epoch time Kafka acknowledged it, the reason it did not (a string: retry), or
#: ``(TOO_LARGE, reason)`` for a record Kafka can never take.
Result = float | str | tuple[str, str]
TOO_LARGE = "too_large"
#: Seconds past its delivery timeout after which an unsettled record means the producer is stuck.
STALL_GRACE_S = 2.0
#: The producer's per-record limit (kafka-python's and the broker's default, 1 MiB); a record
#: above it is refused before it is sent.
MAX_REQUEST_BYTES = 1024 * 1024


def producer_settings(ack_timeout_s: float, linger_ms: int, compression: str) -> dict[str, Any]:
    timeout_ms = int(ack_timeout_s * 1000)
    return {
        "linger_ms": linger_ms,
        "compression_type": None if compression == "none" else compression,
        "delivery_timeout_ms": timeout_ms,
        "request_timeout_ms": max(1000, timeout_ms - linger_ms - 1),
        "max_block_ms": timeout_ms,
        "bootstrap_timeout_ms": timeout_ms,
        "max_request_size": MAX_REQUEST_BYTES,
    }


class _Sender:
    """The kafka-python side, used by the child process or by a thread: send a batch, report acks."""

    def __init__(self, bootstrap: str, settings: dict[str, Any]) -> None:
        self.bootstrap = bootstrap
        self.settings = settings
        self.producer: Any = None
        self._failed_at = 0.0
        self._error = ""
        self._delivery_s = settings.get("delivery_timeout_ms", 30_000) / 1000.0
        self._lock = threading.RLock()
        #: per batch still in flight on the current producer: (stuck-after, fail-what-is-left)
        self._inflight: dict[int, tuple[float, Callable[[str], None]]] = {}
        self._batches = itertools.count(1)
        self._watchdog: threading.Thread | None = None
        self._closed = threading.Event()
        self.replaced = 0

    def _ensure(self) -> Any:
        if self.producer is not None:
            return self.producer
        if time.monotonic() - self._failed_at < 1.0:
            raise ConnectionError(f"Kafka at {self.bootstrap} is unreachable ({self._error}); retry shortly")
        from services.kafka import make_producer

        try:
            self.producer = make_producer(self.bootstrap, **self.settings)
        except Exception as e:  # noqa: BLE001 - any connect failure means "Kafka is not there"
            self._failed_at = time.monotonic()
            self._error = type(e.__cause__ or e).__name__
            raise ConnectionError(f"Kafka at {self.bootstrap} is unreachable ({self._error})") from e
        log.info("connected to Kafka at %s", self.bootstrap)
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="kafka-watchdog", daemon=True)
            self._watchdog.start()
        return self.producer

    def connect(self) -> str:
        try:
            with self._lock:
                self._ensure()
            return ""
        except ConnectionError as e:
            return str(e)

    def send(self, records: Sequence[Record], done: Callable[[list[Result]], None], deadline: float | None = None) -> None:
        """Send ``records``; call ``done(results)`` once every record is settled (from any thread).

        ``deadline`` (epoch seconds): records not handed to the producer by then are answered
        without being sent (the caller has stopped waiting for them).
        """
        results: list[Result | None] = [None] * len(records)
        remaining = [len(records)]
        lock = threading.Lock()
        batch = next(self._batches)

        def settle(i: int, value: Result) -> None:
            with lock:
                if results[i] is not None:
                    return
                results[i] = value
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                with self._lock:
                    self._inflight.pop(batch, None)
                done(results)  # type: ignore[arg-type]

        def fail_rest(reason: str) -> None:
            for i in range(len(records)):
                settle(i, reason)

        # The lock guards the producer and the in-flight table only, never a send: send() may block
        # on buffer space that the producer's own thread frees after running callbacks (settle).
        with self._lock:
            try:
                producer = self._ensure()
            except ConnectionError as e:
                producer = None
                error = str(e)
            else:
                self._inflight[batch] = (time.monotonic() + self._delivery_s + STALL_GRACE_S, fail_rest)
        if producer is None:
            fail_rest(error)
            return
        for i, (topic, key, value) in enumerate(records):
            if deadline is not None and time.time() > deadline:
                settle(i, "Kafka did not take the write in time (queued behind writes to an unavailable broker)")
                continue
            try:
                fut = producer.send(topic, value=value, key=key)
            except Exception as e:  # noqa: BLE001 - enqueue failures (metadata, buffer, size) per record
                settle(i, _refusal(e, len(key or b"") + len(value)))
                continue
            fut.add_callback(lambda _meta, i=i: settle(i, time.time()))
            fut.add_errback(lambda exc, i=i, n=len(key or b"") + len(value): settle(i, _refusal(exc, n)))

    def _watch(self) -> None:
        while not self._closed.wait(0.5):
            now = time.monotonic()
            with self._lock:
                stuck = [fail for (after, fail) in self._inflight.values() if after < now]
                if not stuck:
                    continue
                old, self.producer = self.producer, None
                waiting = [fail for (_, fail) in self._inflight.values()]
                self._inflight.clear()
                self.replaced += 1
            log.warning("the Kafka producer held records past their delivery timeout (%.0fs) without settling them; "
                        "replacing it (%d batch(es) answered UNAVAILABLE for the clients to retry)",
                        self._delivery_s, len(waiting))
            for fail in waiting:
                fail("Kafka did not acknowledge the write (the producer stalled and was replaced; retry)")
            if old is not None:
                threading.Thread(target=_abandon, args=(old,), name="kafka-abandon", daemon=True).start()

    def close(self, timeout_s: float = 5.0) -> None:
        self._closed.set()
        with self._lock:
            producer, self.producer = self.producer, None
        if producer is not None:
            try:
                producer.close(timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - closing a producer whose broker is gone may time out
                log.warning("closing the Kafka producer: %s", type(e).__name__)


def _abandon(producer: Any) -> None:
    """Close a stalled producer without waiting for what it holds (those records were answered)."""
    try:
        producer.close(timeout=0)
    except Exception:  # noqa: BLE001 - it is stalled; nothing more to do with it
        pass


def _refusal(exc: BaseException, size: int) -> Result:
    """What to answer for a record the producer refused or failed: too large (final) or retry later."""
    from kafka.errors import MessageSizeTooLargeError

    if isinstance(exc, MessageSizeTooLargeError):
        return (TOO_LARGE, f"the encoded event is {size} bytes; Kafka takes at most {MAX_REQUEST_BYTES} bytes per "
                           "event: shorten its messages or outputs")
    return f"Kafka did not acknowledge the write ({type(exc).__name__})"


def _child_main(conn: Connection, bootstrap: str, settings: dict[str, Any]) -> None:
    """The producer process: ("batch", id, records, deadline) in, ("acks", id, results) out, ("close",) ends."""
    logging.getLogger("kafka").setLevel(logging.WARNING)
    sender = _Sender(bootstrap, settings)
    out_lock = threading.Lock()

    def reply(msg: tuple) -> None:
        with out_lock:
            conn.send(msg)

    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg[0] == "close":
                break
            if msg[0] == "connect":
                reply(("connected", msg[1], sender.connect()))
                continue
            _, batch_id, records, deadline = msg
            sender.send(records, lambda results, b=batch_id: reply(("acks", b, results)), deadline)
    finally:
        sender.close()
        conn.close()


class KafkaWriter:
    """Write batches of records to Kafka from asyncio; see the module docstring."""

    def __init__(
        self,
        bootstrap: str,
        *,
        ack_timeout_s: float,
        linger_ms: int = 2,
        compression: str = "none",
        in_process: bool = False,
    ) -> None:
        self.bootstrap = bootstrap
        self.ack_timeout_s = ack_timeout_s
        self._settings = producer_settings(ack_timeout_s, linger_ms, compression)
        self._in_process = in_process
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()
        self._connected = False
        self._last_failure = 0.0
        # One thread hands batches over (pickle + pipe write, or kafka-python sends), in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-handoff")
        self._sender: _Sender | None = _Sender(bootstrap, self._settings) if in_process else None
        self._proc: Any = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._closing = False

    # -- child process management (executor thread only) ------------------------------------

    def _child(self) -> Connection:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            return self._conn
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC threads
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_child_main, args=(child, self.bootstrap, self._settings),
                           name="prefstream-kafka-producer", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        self._reader = threading.Thread(target=self._read_acks, args=(parent,), name="kafka-acks", daemon=True)
        self._reader.start()
        log.info("Kafka producer process started (pid %s)", proc.pid)
        return parent

    def _read_acks(self, conn: Connection) -> None:
        answered = False
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            answered = True
            self._resolve(msg[1], msg[2])
        if not answered and not self._closing:
            # The child died before answering anything: it cannot start here (typically a program
            # that starts the gateway from a script without an `if __name__ == "__main__":` guard,
            # which "spawn" re-imports).  Keep serving with the producer on a thread instead.
            code = self._proc.exitcode if self._proc is not None else None
            log.error("the Kafka producer process could not start (exit code %s); running the producer in-process. "
                      "Guard the script that starts the gateway with `if __name__ == \"__main__\":` to use the process",
                      code)
            self._sender = _Sender(self.bootstrap, self._settings)
            self._in_process = True
        # The child is gone: everything still waiting on it fails.
        with self._lock:
            pending = list(self._pending)
        for batch_id in pending:
            self._resolve(batch_id, "the Kafka producer process exited")

    def _resolve(self, batch_id: int, value: Any) -> None:
        with self._lock:
            entry = self._pending.pop(batch_id, None)
        if entry is not None:
            loop, fut = entry
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(value))

    def _handoff(self, batch_id: int, kind: str, payload: Any) -> None:
        if self._in_process:
            if self._sender is None:
                raise Unavailable("the Kafka writer is closed")
            if kind == "connect":
                self._resolve(batch_id, self._sender.connect())
            else:
                self._sender.send(payload[0], lambda results: self._resolve(batch_id, results), payload[1])
            return
        conn = self._child()
        try:
            conn.send((kind, batch_id, *payload) if kind == "batch" else ("connect", batch_id))
        except (OSError, ValueError) as e:
            self._conn = None
            self._resolve(batch_id, f"the Kafka producer process is not reachable ({type(e).__name__})")

    # -- asyncio side -----------------------------------------------------------------------

    async def _request(self, kind: str, payload: Any, timeout_s: float) -> Any:
        loop = asyncio.get_running_loop()
        batch_id = next(self._ids)
        fut = loop.create_future()
        with self._lock:
            self._pending[batch_id] = (loop, fut)
        try:
            await loop.run_in_executor(self._executor, self._handoff, batch_id, kind, payload)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            with self._lock:
                self._pending.pop(batch_id, None)

    async def connect(self) -> bool:
        """Try to connect now (start-up); False when Kafka is not reachable yet."""
        try:
            error = await self._request("connect", None, self.ack_timeout_s + 30.0)
        except asyncio.TimeoutError:
            error = "timed out"
        self._connected = not error
        if error:
            log.warning("Kafka not reachable at start-up: %s; events are answered UNAVAILABLE until it is", error)
        return self._connected

    def is_connected(self) -> bool:
        """Connected, and no write failed in the last 5 seconds (for health checks)."""
        return self._connected and time.monotonic() - self._last_failure > 5.0

    async def write(self, records: Sequence[Record]) -> list[float | PrefstreamError]:
        """Send (topic, key, value) records; per record the ack time (epoch s) or Unavailable."""
        if not records:
            return []
        metrics.KAFKA_BATCH.observe(len(records))
        wait_s = self.ack_timeout_s + 2.0
        try:
            results = await self._request("batch", (list(records), time.time() + wait_s), wait_s)
        except asyncio.TimeoutError:
            results = f"Kafka did not acknowledge the write within {self.ack_timeout_s:g}s"
        if isinstance(results, str):
            results = [results] * len(records)
        out: list[float | PrefstreamError] = []
        for r in results:
            if isinstance(r, str):
                out.append(Unavailable(r))
                self._last_failure = time.monotonic()
            elif isinstance(r, (tuple, list)):  # (TOO_LARGE, reason): the event's fault, Kafka is fine
                out.append(InvalidArgument("event", r[1]))
            else:
                out.append(r)
                self._connected = True
        return out

    async def close(self, timeout_s: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        self._closing = True

        def shutdown() -> None:
            if self._sender is not None:
                self._sender.close(timeout_s)
                self._sender = None
            if self._conn is not None:
                try:
                    self._conn.send(("close",))
                except (OSError, ValueError):
                    pass
            if self._proc is not None:
                self._proc.join(timeout_s)
                if self._proc.is_alive():
                    self._proc.kill()
                    self._proc.join(2)
            if self._conn is not None:
                self._conn.close()
            self._proc, self._conn = None, None

        await loop.run_in_executor(self._executor, shutdown)
        self._executor.shutdown(wait=False)
