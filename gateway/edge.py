"""Conversion at the edge, shared by the gRPC servicer and the HTTP API.

Request messages become :class:`~gateway.ingest.Item` (a validated domain event, or the validation
error that event gets as its answer); :class:`~gateway.ingest.Accepted` outcomes become response
messages.  Generated messages go no further than this module and the two transports.
"""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp as TimestampProto

from gateway import metrics
from gateway.ingest import Accepted, Item, Outcome, new_event_id
from gateway.validation import Limits, completion_from_proto, feedback_from_proto
from prefstream.events.v1.events_pb2 import Completion as CompletionProto
from prefstream.events.v1.events_pb2 import Feedback as FeedbackProto
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
    return "", Item(event=InvalidArgument("event", "set either completion or feedback"))


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
