"""A small synchronous client for the gateway, for apps, scripts and the demo.

It speaks gRPC with the project's API key and takes plain Python values, so callers never build
generated messages::

    client = GatewayClient("127.0.0.1:50051", api_key=key)
    cid = client.log_completion("my-app", [{"role": "user", "content": "Hi"}], ["Hello!", "Hey."])
    client.log_feedback("my-app", cid, choice=0)
    client.log_feedback("my-app", cid, ranking=[1, 0])
    client.log_feedback("my-app", cid, scores=[{"index": 0, "score": 4.0}, {"index": 1, "attributes": {"helpfulness": 2.0}}])

Bulk producers use :meth:`GatewayClient.stream_events`, which sends events in batches over one
``StreamEvents`` call (one gRPC message per batch each way) and yields one :class:`EventResult` per
event, in order::

    for result in client.stream_events(events):   # gateway.events.Completion / Feedback
        if result.error is not None: ...

Errors are raised as the domain errors of :mod:`services.errors` (InvalidArgument naming the field,
Unauthenticated, PermissionDenied, Unavailable, ...).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import grpc

from gateway.events import Completion, Feedback
from prefstream.events.v1 import events_pb2
from prefstream.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                             PermissionDenied, PrefstreamError, ResourceExhausted, Unauthenticated, Unavailable,
                             from_grpc_error)
from services.grpc_server import channel
from services.tls import ClientTls

#: Events per StreamEvents batch (the gateway accepts up to its max_batch_events, 1000 by default).
DEFAULT_BATCH_EVENTS = 256
#: Batches sent ahead of their answers.
DEFAULT_INFLIGHT_BATCHES = 4
#: A batch is cut before it grows past this many serialized bytes (gRPC messages are capped at 32 MiB).
MAX_BATCH_BYTES = 8 * 1024 * 1024

_ERRORS: dict[int, type[PrefstreamError]] = {
    cls.grpc_code.value[0]: cls
    for cls in (Unauthenticated, PermissionDenied, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
                Unavailable, DeadlineExceeded)
}


@dataclass(frozen=True)
class EventResult:
    """The gateway's answer to one streamed event: accepted (``error`` None) or why not."""

    event_id: str = ""
    #: Set for completions.
    completion_id: str = ""
    #: The event id had been written before (a retry); nothing new was written.
    duplicate: bool = False
    #: When Kafka acknowledged the event (epoch seconds); 0 when it was not accepted.
    acked_at: float = 0.0
    error: PrefstreamError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def error_of_status(status: Any) -> PrefstreamError | None:
    """The domain error of a per-event ``EventStatus`` (None for OK)."""
    if status.code == grpc.StatusCode.OK.value[0]:
        return None
    if status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
        prefix = f"{status.field}: "
        message = status.message[len(prefix):] if status.field and status.message.startswith(prefix) else status.message
        return InvalidArgument(status.field or "event", message)
    cls = _ERRORS.get(status.code)
    return cls(status.message) if cls is not None else PrefstreamError(status.message or f"status {status.code}")


def _result(resp: Any) -> EventResult:
    error = error_of_status(resp.status)
    if error is not None:
        return EventResult(event_id=resp.event_id, error=error)
    return EventResult(event_id=resp.event_id, completion_id=resp.completion_id, duplicate=resp.duplicate,
                       acked_at=resp.acked_at.seconds + resp.acked_at.nanos / 1e9)


def _request(event: Any) -> Any:
    """A single-event StreamEventsRequest of a domain event or its generated message."""
    if isinstance(event, (Completion, Feedback)):
        event = event.to_proto()
    if isinstance(event, events_pb2.Completion):
        return gateway_pb2.StreamEventsRequest(completion=event)
    if isinstance(event, events_pb2.Feedback):
        return gateway_pb2.StreamEventsRequest(feedback=event)
    raise TypeError(f"stream_events takes gateway.events.Completion/Feedback (or their proto messages), not {type(event).__name__}")

_ROLES = {"system": events_pb2.ROLE_SYSTEM, "user": events_pb2.ROLE_USER, "assistant": events_pb2.ROLE_ASSISTANT,
          "tool": events_pb2.ROLE_TOOL}
_SPLITS = {None: events_pb2.SPLIT_UNSPECIFIED, "train": events_pb2.SPLIT_TRAIN, "test": events_pb2.SPLIT_TEST}


def _messages(prompt: Sequence[Mapping[str, str]] | str) -> list[events_pb2.ChatMessage]:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    out = []
    for i, m in enumerate(prompt):
        role = _ROLES.get(str(m.get("role", "")).lower())
        if role is None:
            raise InvalidArgument(f"prompt[{i}].role", f"unknown role {m.get('role')!r}; use system, user, assistant or tool")
        out.append(events_pb2.ChatMessage(role=role, content=str(m.get("content", ""))))
    return out


class GatewayClient:
    """Blocking calls to one gateway with one API key (see the module docstring)."""

    def __init__(self, address: str, *, api_key: str | None = None, timeout_s: float = 30.0,
                 tls: ClientTls | None = None) -> None:
        self._channel = channel(address, aio=False, tls=tls)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as e:
            raise from_grpc_error(e) from None

    def log_completion(
        self,
        project: str,
        prompt: Sequence[Mapping[str, str]] | str,
        candidates: Sequence[str],
        *,
        event_id: str = "",
        model: str = "",
        model_version: str = "",
        metadata: Mapping[str, str] | None = None,
        split: str | None = None,
    ) -> str:
        """Log the prompt and the candidates shown; returns the completion id once Kafka has it."""
        c = events_pb2.Completion(event_id=event_id, project=project, prompt=_messages(prompt), candidates=list(candidates),
                                  model=model, model_version=model_version, metadata=dict(metadata or {}),
                                  split=_SPLITS[split])
        return self._call(self._stub.LogCompletion, gateway_pb2.LogCompletionRequest(completion=c)).completion_id

    def log_feedback(
        self,
        project: str,
        completion_id: str | None = None,
        *,
        inline: tuple[Sequence[Mapping[str, str]] | str, Sequence[str]] | None = None,
        choice: int | None = None,
        regeneration: tuple[Sequence[int], int] | None = None,
        edit: tuple[int, str] | None = None,
        ranking: Sequence[int] | None = None,
        scores: Iterable[Mapping[str, Any]] | None = None,
        thumbs: tuple[int, bool] | None = None,
        event_id: str = "",
        split: str | None = None,
        user_id: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Log one piece of feedback (exactly one kind) about ``completion_id`` or an ``inline`` (prompt, outputs).

        ``regeneration`` is (rejected indices, accepted index), ``edit`` (draft index, edited text),
        ``thumbs`` (index, up), ``scores`` dicts with ``index`` and ``score`` and/or ``attributes``.
        Returns the event id.
        """
        given = [k for k, v in (("choice", choice), ("regeneration", regeneration), ("edit", edit), ("ranking", ranking),
                                ("scores", scores), ("thumbs", thumbs)) if v is not None]
        if len(given) != 1:
            raise InvalidArgument("feedback.kind", f"give exactly one of choice, regeneration, edit, ranking, scores, thumbs (got {given or 'none'})")
        fb = events_pb2.Feedback(event_id=event_id, project=project, split=_SPLITS[split], user_id=user_id,
                                 metadata=dict(metadata or {}))
        if inline is not None:
            fb.inline.prompt.extend(_messages(inline[0]))
            fb.inline.outputs.extend(inline[1])
        elif completion_id:
            fb.completion_id = completion_id
        if choice is not None:
            fb.choice.chosen_index = choice
        if regeneration is not None:
            fb.regeneration.rejected_indices.extend(regeneration[0])
            fb.regeneration.accepted_index = regeneration[1]
        if edit is not None:
            fb.edit.draft_index, fb.edit.edited_text = edit
        if ranking is not None:
            fb.ranking.ranked_indices.extend(ranking)
        if scores is not None:
            for s in scores:
                out = fb.scores.scores.add(index=int(s["index"]))
                if s.get("score") is not None:
                    out.score = float(s["score"])
                for k, v in (s.get("attributes") or {}).items():
                    out.attributes[k] = float(v)
        if thumbs is not None:
            fb.thumbs.index, fb.thumbs.up = thumbs
        return self._call(self._stub.LogFeedback, gateway_pb2.LogFeedbackRequest(feedback=fb)).event_id

    def stream_events(
        self,
        events: Iterable[Any],
        *,
        batch_size: int = DEFAULT_BATCH_EVENTS,
        inflight_batches: int = DEFAULT_INFLIGHT_BATCHES,
    ) -> Iterator[EventResult]:
        """Stream ``events`` in batches; yield one :class:`EventResult` per event, in input order.

        ``events`` are :class:`gateway.events.Completion` / :class:`~gateway.events.Feedback` (or their
        ``events_pb2`` messages) and may be a lazy iterator: it is consumed on gRPC's request thread,
        at most ``inflight_batches`` batches of ``batch_size`` events ahead of the answers.  A result
        with ``error`` set (InvalidArgument naming the field, PermissionDenied, Unavailable) concerns
        that event only.  If the call itself fails (bad key, gateway gone), the domain error is raised;
        events not yet answered may or may not have been written, so resend them with the same
        ``event_id`` (the gateway answers "duplicate" for those it has).  An exception raised by
        ``events`` ends the stream and is re-raised here after the events sent before it are answered.
        """
        if not 1 <= batch_size:
            raise InvalidArgument("batch_size", f"must be >= 1 (got {batch_size}); the gateway accepts up to its max_batch_events per batch")
        if not 1 <= inflight_batches:
            raise InvalidArgument("inflight_batches", f"must be >= 1 (got {inflight_batches})")
        slots = threading.Semaphore(inflight_batches)
        stop = threading.Event()  # set when the caller stops early: the request thread must not wait on
        failure: list[BaseException] = []
        sizes: deque[int] = deque()  # events per batch sent, for the sanity check of each answer

        def batches() -> Iterator[Any]:
            seq = 0
            batch = gateway_pb2.EventBatch()
            nbytes = 0
            try:
                for event in events:
                    req = _request(event)
                    req.seq = seq
                    seq += 1
                    size = req.ByteSize()
                    if batch.events and (len(batch.events) >= batch_size or nbytes + size > MAX_BATCH_BYTES):
                        slots.acquire()
                        if stop.is_set():
                            return
                        sizes.append(len(batch.events))
                        yield gateway_pb2.StreamEventsRequest(seq=len(sizes) - 1, batch=batch)
                        batch = gateway_pb2.EventBatch()
                        nbytes = 0
                    batch.events.append(req)
                    nbytes += size
            except Exception as e:  # noqa: BLE001 - re-raised on the caller's thread below
                failure.append(e)
            if batch.events:  # the events taken before an exception are sent too
                slots.acquire()
                if stop.is_set():
                    return
                sizes.append(len(batch.events))
                yield gateway_pb2.StreamEventsRequest(seq=len(sizes) - 1, batch=batch)

        call = self._stub.StreamEvents(batches(), metadata=self._metadata)
        try:
            for resp in call:
                slots.release()
                expected = sizes.popleft() if sizes else 0
                error = error_of_status(resp.status)
                if error is not None:  # the batch as a whole was refused (e.g. over the gateway's limit)
                    raise error
                if len(resp.batch) != expected:
                    raise Unavailable(f"the gateway answered {len(resp.batch)} events of a batch of {expected}")
                for inner in resp.batch:
                    yield _result(inner)
        except grpc.RpcError as e:
            raise from_grpc_error(e) from None
        finally:
            stop.set()
            slots.release(inflight_batches)
            call.cancel()
        if failure:
            raise failure[0]
