"""The gRPC face of the gateway: ``prefstream.gateway.v1.GatewayService``.

Unary calls authenticate, validate and write one event; domain errors propagate to the shared error
interceptor, which turns them into status codes.  ``StreamEvents`` is the bulk path: a reader task
pulls requests as fast as the client sends them, a batcher hands whatever has arrived to
:meth:`~gateway.ingest.Ingestor.write` as one batch (one Redis round trip, one producer call), several
batches are in flight at once, and responses go back strictly in request order, each with its own
status -- an invalid event is answered with INVALID_ARGUMENT and the stream goes on.

A request carries one event or an ``EventBatch`` of many.  Batches exist because Python gRPC costs
~70-90 µs of CPU per message on each side: one message per event each way held streaming to 0.38x
the raw kafka-python producer, while a batch of 256 pays that cost once.  A batch is answered by one
response whose ``batch`` lists every event's own response in order; its events are validated,
deduplicated and written exactly like single ones (often in the same write as their neighbours).
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from gateway import edge, metrics
from gateway.auth import Authenticator, Principal
from gateway.ingest import Accepted, Ingestor, Item
from gateway.validation import Limits
from prefstream.gateway.v1 import gateway_pb2_grpc
from prefstream.gateway.v1.gateway_pb2 import LogCompletionRequest as LogCompletionRequestProto
from prefstream.gateway.v1.gateway_pb2 import LogCompletionResponse as LogCompletionResponseProto
from prefstream.gateway.v1.gateway_pb2 import LogFeedbackRequest as LogFeedbackRequestProto
from prefstream.gateway.v1.gateway_pb2 import LogFeedbackResponse as LogFeedbackResponseProto
from prefstream.gateway.v1.gateway_pb2 import StreamEventsRequest as StreamEventsRequestProto
from prefstream.gateway.v1.gateway_pb2 import StreamEventsResponse as StreamEventsResponseProto
from services.errors import PrefstreamError

log = logging.getLogger(__name__)

SERVICE_NAME = "prefstream.gateway.v1.GatewayService"

#: Events one write of a stream aims at (bounded so one write's latency stays small); a client batch
#: larger than this is still written whole.
STREAM_MAX_BATCH = 512
#: Batches of one stream in flight at once (pipelining Redis/Kafka round trips).
STREAM_MAX_INFLIGHT = 4
#: Events read ahead of processing before the reader waits (backpressure to the client).
STREAM_READ_AHEAD = 4096


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, ingestor: Ingestor, auth: Authenticator, limits: Limits, *, max_batch_events: int = 1000) -> None:
        self._ingestor = ingestor
        self._auth = auth
        self._limits = limits
        self._max_batch_events = max_batch_events

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return await self._auth.authenticate(dict(context.invocation_metadata() or ()), scope="ingest")

    async def _one(self, kind: str, item: Item, principal: Principal) -> Accepted:
        outcome = await self._ingestor.write_one(item, principal)
        edge.count(kind, "grpc", outcome)
        if isinstance(outcome, PrefstreamError):
            raise outcome
        return outcome

    async def LogCompletion(
        self, request: LogCompletionRequestProto, context: grpc.aio.ServicerContext
    ) -> LogCompletionResponseProto:
        principal = await self._principal(context)
        outcome = await self._one("completion", edge.completion_item(request.completion, self._limits), principal)
        return edge.completion_response(outcome)

    async def LogFeedback(
        self, request: LogFeedbackRequestProto, context: grpc.aio.ServicerContext
    ) -> LogFeedbackResponseProto:
        principal = await self._principal(context)
        outcome = await self._one("feedback", edge.feedback_item(request.feedback, self._limits), principal)
        return edge.feedback_response(outcome)

    async def StreamEvents(
        self, request_iterator: AsyncIterator[StreamEventsRequestProto], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[StreamEventsResponseProto]:
        principal = await self._principal(context)
        metrics.STREAMS.inc()
        incoming = _Inbox(STREAM_READ_AHEAD)
        batches: asyncio.Queue = asyncio.Queue()  # bounded by the batcher's in-flight slots
        reader = asyncio.create_task(self._read(request_iterator, incoming))
        batcher = asyncio.create_task(self._batch(incoming, batches, principal))
        try:
            while True:
                entry = await batches.get()
                if entry is None:
                    break
                parts, kinds, task = entry
                outcomes = await task
                edge.count_all(kinds, "grpc", outcomes)
                for resp in edge.stream_responses(parts, outcomes):
                    yield resp
            await reader  # surfaces a failed read (e.g. a malformed frame)
        finally:
            metrics.STREAMS.dec()
            for t in (reader, batcher):
                t.cancel()
            while not batches.empty():
                entry = batches.get_nowait()
                if entry is not None:
                    entry[2].cancel()

    @staticmethod
    async def _read(request_iterator: AsyncIterator[StreamEventsRequestProto], incoming: "_Inbox") -> None:
        try:
            async for req in request_iterator:
                await incoming.put(req, len(req.batch.events) if req.HasField("batch") else 1)
        finally:
            incoming.close()

    async def _batch(self, incoming: "_Inbox", batches: asyncio.Queue, principal: Principal) -> None:
        """Group whatever requests have arrived into one write; keep order via the batches queue.

        A write is formed only when one of the ``STREAM_MAX_INFLIGHT`` slots is free, so under load
        requests accumulate while earlier writes wait for Kafka and writes grow by themselves
        (fewer round trips per event); a lone event still goes out at once.  Client batches are
        flattened into the same write (their events count towards ``STREAM_MAX_BATCH``).
        """
        slots = asyncio.Semaphore(STREAM_MAX_INFLIGHT)
        while True:
            await slots.acquire()
            reqs = await incoming.take(STREAM_MAX_BATCH)
            if reqs is None:
                break
            parts, kinds, items = edge.stream_parts(reqs, self._limits, self._max_batch_events)
            refused = [p.refused for p in parts if p.refused is not None]
            if refused:
                edge.count_all(["batch"] * len(refused), "grpc", refused)
            task = asyncio.create_task(self._ingestor.write(items, principal))
            task.add_done_callback(lambda _t: slots.release())
            await batches.put((parts, kinds, task))
        await batches.put(None)


class _Inbox:
    """Requests read ahead of processing: a list and two events, cheaper per request than a Queue.

    Each request is put with its weight (the events it carries: 1, or the size of its batch).
    ``put`` waits when ``limit`` events are buffered (backpressure reaches the client through gRPC
    flow control); ``take`` returns buffered requests worth up to ``budget`` events (always at least
    one request, however heavy), waiting for at least one, or None once the stream is closed and
    drained.
    """

    def __init__(self, limit: int) -> None:
        self._items: list[StreamEventsRequestProto] = []
        self._weights: list[int] = []
        self._held = 0
        self._limit = limit
        self._closed = False
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    async def put(self, item: StreamEventsRequestProto, weight: int = 1) -> None:
        self._items.append(item)
        self._weights.append(weight)
        self._held += weight
        self._ready.set()
        if self._held >= self._limit:
            self._space.clear()
            await self._space.wait()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def take(self, budget: int) -> list[StreamEventsRequestProto] | None:
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        n, total = 0, 0
        for w in self._weights:
            if n and total + w > budget:
                break
            n += 1
            total += w
        out = self._items[:n]
        del self._items[:n]
        del self._weights[:n]
        self._held -= total
        if self._held < self._limit:
            self._space.set()
        return out


def add_to_server(servicer: GatewayServicer, server: grpc.aio.Server) -> None:
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
