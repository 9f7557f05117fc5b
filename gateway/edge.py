"""Conversion at the edge, shared by the gRPC servicer and the HTTP API.

Request messages become :class:`~gateway.ingest.Item` (a validated domain event, or the validation
error that event gets as its answer); :class:`~gateway.ingest.Accepted` outcomes become response
messages.  Generated messages go no further than this module and the two transports.

``StreamEvents`` requests carry one event or an ``EventBatch`` of many; :func:`stream_parts` flattens
a run of requests into one list of items (what :meth:`~gateway.ingest.Ingestor.write` takes) plus the
shape needed to answer each request with one response (:func:`stream_responses`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp as TimestampProto

from gateway import metrics
from gateway.ingest import Accepted, Item, Outcome, new_event_id
from gateway.validation import Limits, completion_from_proto, feedback_from_proto
from prefstream.events.v1.events_pb2 import Completion as CompletionProto
from prefstream.events.v1.events_pb2 import Feedback as FeedbackProto
from prefstream.gateway.v1.gateway_pb2 import EventBatch as EventBatchProto
from prefstream.gateway.v1.gateway_pb2 import EventStatus as EventStatusProto
from prefstream.gateway.v1.gateway_pb2 import LogCompletionResponse as LogCompletionResponseProto
from prefstream.gateway.v1.gateway_pb2 import LogFeedbackResponse as LogFeedbackResponseProto
from prefstream.gateway.v1.gateway_pb2 import StreamEventsRequest as StreamEventsRequestProto
from prefstream.gateway.v1.gateway_pb2 import StreamEventsResponse as StreamEventsResponseProto
from services.errors import InvalidArgument, PrefstreamError, status_of
from services.schemas import float_to_ts


def completion_item(msg: CompletionProto, limits: Limits, *, field: str = "completion") -> Item:
    assigned = "" if msg.event_id else new_event_id()
    try:
        event = completion_from_proto(msg, limits, field=field, assigned_event_id=assigned)
    except PrefstreamError as e:
        return Item(event=e)
    return Item(event=event, client_id=not assigned)


def feedback_item(msg: FeedbackProto, limits: Limits, *, field: str = "feedback") -> Item:
    assigned = "" if msg.event_id else new_event_id()
    try:
        event = feedback_from_proto(msg, limits, field=field, assigned_event_id=assigned)
    except PrefstreamError as e:
        return Item(event=e)
    return Item(event=event, client_id=not assigned)


def stream_item(req: StreamEventsRequestProto, limits: Limits) -> tuple[str, Item]:
    """(kind, item) of one StreamEvents request; kind is "completion", "feedback" or "" when unset."""
    which = req.WhichOneof("event")
    if which == "completion":
        return "completion", completion_item(req.completion, limits)
    if which == "feedback":
        return "feedback", feedback_item(req.feedback, limits)
    if which == "batch":
        return "", Item(event=InvalidArgument("batch", "batches do not nest; list these events in the enclosing batch instead"))
    return "", Item(event=InvalidArgument("event", "set either completion or feedback"))


def batch_items(batch: EventBatchProto, limits: Limits, max_events: int) -> tuple[list[int], list[str], list[Item]]:
    """(seqs, kinds, items) of the events of one ``EventBatch``, in order.

    Raises InvalidArgument (field ``batch.events``) when the batch as a whole is refused: empty, or
    more than ``max_events`` events.  A bad event inside an accepted batch is not raised: its item
    carries its own error, so the other events proceed.
    """
    n = len(batch.events)
    if n == 0:
        raise InvalidArgument("batch.events", "is empty; send at least one event per batch")
    if n > max_events:
        raise InvalidArgument("batch.events", f"has {n} events; the limit is {max_events} per batch (the gateway's max_batch_events)")
    seqs, kinds, items = [], [], []
    for req in batch.events:
        kind, item = stream_item(req, limits)
        seqs.append(req.seq)
        kinds.append(kind)
        items.append(item)
    return seqs, kinds, items


@dataclass(frozen=True)
class StreamPart:
    """How one StreamEvents request maps onto the flattened items of its write.

    ``inner_seqs`` is None for a single-event request (it owns one item) and the events' seqs for a
    batch (it owns ``len(inner_seqs)`` consecutive items); ``refused`` is set for a batch refused as a
    whole, which owns no item.
    """

    seq: int
    inner_seqs: list[int] | None = None
    refused: PrefstreamError | None = None


def stream_parts(
    reqs: Sequence[StreamEventsRequestProto], limits: Limits, max_batch_events: int
) -> tuple[list[StreamPart], list[str], list[Item]]:
    """Flatten requests (single events and batches) into (parts, kinds, items) for one write."""
    parts: list[StreamPart] = []
    kinds: list[str] = []
    items: list[Item] = []
    for req in reqs:
        if req.WhichOneof("event") == "batch":
            try:
                seqs, batch_kinds, batch_items_ = batch_items(req.batch, limits, max_batch_events)
            except InvalidArgument as e:
                parts.append(StreamPart(seq=req.seq, refused=e))
                continue
            parts.append(StreamPart(seq=req.seq, inner_seqs=seqs))
            kinds.extend(batch_kinds)
            items.extend(batch_items_)
        else:
            kind, item = stream_item(req, limits)
            parts.append(StreamPart(seq=req.seq))
            kinds.append(kind)
            items.append(item)
    return parts, kinds, items


def stream_responses(parts: Sequence[StreamPart], outcomes: Sequence[Outcome]) -> list[StreamEventsResponseProto]:
    """One response per request of ``parts``, in order; ``outcomes`` are those of the flattened items."""
    owned = sum(1 if p.inner_seqs is None else len(p.inner_seqs) for p in parts if p.refused is None)
    if owned != len(outcomes):
        raise ValueError(f"{len(outcomes)} outcomes for requests owning {owned} events")
    out: list[StreamEventsResponseProto] = []
    at = 0
    for part in parts:
        if part.refused is not None:
            out.append(StreamEventsResponseProto(seq=part.seq, status=event_status(part.refused)))
        elif part.inner_seqs is None:
            out.append(stream_response(part.seq, outcomes[at]))
            at += 1
        else:
            n = len(part.inner_seqs)
            out.append(batch_response(part.seq, part.inner_seqs, outcomes[at:at + n]))
            at += n
    return out


def batch_response(seq: int, seqs: Sequence[int], outcomes: Sequence[Outcome]) -> StreamEventsResponseProto:
    """The answer to one EventBatch: status OK and one response per event, in order."""
    return StreamEventsResponseProto(seq=seq, status=_OK, batch=[stream_response(s, o) for s, o in zip(seqs, outcomes)])


def outcome_label(outcome: Outcome) -> str:
    if isinstance(outcome, Accepted):
        return "duplicate" if outcome.duplicate else "ok"
    return outcome.grpc_code.name.lower()


def count(kind: str, transport: str, outcome: Outcome) -> None:
    metrics.events_counter(kind or "unknown", transport, outcome_label(outcome)).inc()


def event_status(outcome: Outcome | BaseException) -> EventStatusProto:
    """The per-event status of a stream/batch answer (OK, or the error's code, message and field)."""
    if isinstance(outcome, Accepted):
        return EventStatusProto(code=grpc.StatusCode.OK.value[0], message="")
    code, message = status_of(outcome)
    field = outcome.field if isinstance(outcome, PrefstreamError) and outcome.field else ""
    return EventStatusProto(code=code.value[0], message=message, field=field)


_OK = EventStatusProto(code=grpc.StatusCode.OK.value[0])


def stream_response(seq: int, outcome: Outcome) -> StreamEventsResponseProto:
    if isinstance(outcome, Accepted):  # the hot path: built in one constructor call
        seconds = int(outcome.acked_at)
        return StreamEventsResponseProto(
            seq=seq,
            event_id=outcome.event_id,
            completion_id=outcome.completion_id,
            duplicate=outcome.duplicate,
            status=_OK,
            acked_at=TimestampProto(seconds=seconds, nanos=int((outcome.acked_at - seconds) * 1e9)),
        )
    return StreamEventsResponseProto(seq=seq, status=event_status(outcome))


def count_all(kinds: list[str], transport: str, outcomes: list[Outcome]) -> None:
    """:func:`count` for a whole batch (one increment per distinct label set)."""
    tally: dict[tuple[str, str], int] = {}
    for kind, outcome in zip(kinds, outcomes):
        key = (kind or "unknown", outcome_label(outcome))
        tally[key] = tally.get(key, 0) + 1
    for (kind, label), n in tally.items():
        metrics.events_counter(kind, transport, label).inc(n)


def completion_response(outcome: Accepted) -> LogCompletionResponseProto:
    return LogCompletionResponseProto(
        completion_id=outcome.completion_id,
        event_id=outcome.event_id,
        duplicate=outcome.duplicate,
        acked_at=float_to_ts(outcome.acked_at),
    )


def feedback_response(outcome: Accepted) -> LogFeedbackResponseProto:
    return LogFeedbackResponseProto(
        event_id=outcome.event_id,
        duplicate=outcome.duplicate,
        acked_at=float_to_ts(outcome.acked_at),
    )
