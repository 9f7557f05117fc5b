"""Batched StreamEvents without a server: per-event statuses inside a batch, whole-batch refusals,
the servicer's ordering over mixed single/batch requests, and the client's packing and unpacking."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterator, Sequence

import grpc
import pytest

from gateway import edge
from gateway.auth import Authenticator, Principal
from gateway.client import EventResult, GatewayClient, error_of_status
from gateway.events import Completion
from gateway.ingest import Accepted, Item, Outcome
from gateway.server import STREAM_MAX_BATCH, GatewayServicer, _Inbox
from gateway.validation import Limits
from prefstream.events.v1 import events_pb2 as ev
from prefstream.gateway.v1 import gateway_pb2 as g
from services.errors import InvalidArgument, PermissionDenied, PrefstreamError, Unavailable
from services.schemas import ChatMessage

OK, INVALID, DENIED = 0, grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.PERMISSION_DENIED.value[0]
USER = ev.ChatMessage(role=ev.ROLE_USER, content="What is 2+2?")
LIMITS = Limits()


def good(seq: int, event_id: str = "", project: str = "p") -> g.StreamEventsRequest:
    return g.StreamEventsRequest(seq=seq, completion=ev.Completion(event_id=event_id or f"e{seq}", project=project,
                                                                     prompt=[USER], candidates=["4", "5"]))


def no_prompt(seq: int) -> g.StreamEventsRequest:
    return g.StreamEventsRequest(seq=seq, completion=ev.Completion(event_id=f"e{seq}", project="p", candidates=["4"]))


def feedback_without_kind(seq: int) -> g.StreamEventsRequest:
    return g.StreamEventsRequest(seq=seq, feedback=ev.Feedback(event_id=f"f{seq}", project="p", completion_id="cmp_x"))


def batch(seq: int, *events: g.StreamEventsRequest) -> g.StreamEventsRequest:
    return g.StreamEventsRequest(seq=seq, batch=g.EventBatch(events=list(events)))


def outcomes_of(items: Sequence[Item], principal: Principal = Principal(project="p")) -> list[Outcome]:
    """What Ingestor.write answers when Kafka takes everything: the item's error, or Accepted."""
    out: list[Outcome] = []
    for it in items:
        if isinstance(it.event, PrefstreamError):
            out.append(it.event)
            continue
        try:
            principal.authorize(it.event.project, "completion.project")
        except PrefstreamError as e:
            out.append(e)
            continue
        out.append(Accepted(event_id=it.event.event_id, completion_id=getattr(it.event, "completion_id", ""), acked_at=1700000000.25))
    return out


# ---------------------------------------------------------------------------------------------
# edge: flattening and answering


def test_a_bad_event_in_a_batch_gets_its_own_status_and_the_others_proceed() -> None:
    reqs = [
        good(0),
        batch(1, good(10), no_prompt(11), feedback_without_kind(12), g.StreamEventsRequest(seq=13), batch(14, good(15)), good(16)),
        no_prompt(2),
    ]
    parts, kinds, items = edge.stream_parts(reqs, LIMITS, max_batch_events=1000)
    assert [(p.seq, p.inner_seqs) for p in parts] == [(0, None), (1, [10, 11, 12, 13, 14, 16]), (2, None)]
    assert kinds == ["completion", "completion", "completion", "feedback", "", "", "completion", "completion"]
    assert len(items) == 8
    responses = edge.stream_responses(parts, outcomes_of(items))
    assert [r.seq for r in responses] == [0, 1, 2]
    single, answer, bad_single = responses
    assert single.status.code == OK and single.event_id == "e0" and not single.batch
    assert answer.status.code == OK and not answer.event_id
    inner = [(r.seq, r.status.code, r.status.field) for r in answer.batch]
    assert inner == [
        (10, OK, ""),
        (11, INVALID, "completion.prompt"),
        (12, INVALID, "feedback.kind"),
        (13, INVALID, "event"),
        (14, INVALID, "batch"),
        (16, OK, ""),
    ]
    assert answer.batch[0].event_id == "e10" and answer.batch[0].completion_id.startswith("cmp_")
    assert answer.batch[0].acked_at.seconds == 1700000000 and answer.batch[0].acked_at.nanos == 250_000_000
    assert "batches do not nest" in answer.batch[4].status.message
    assert answer.batch[1].status.message.startswith("completion.prompt: ")
    assert bad_single.status.code == INVALID and bad_single.status.field == "completion.prompt"


def test_empty_and_oversized_batches_are_refused_whole_and_own_no_events() -> None:
    reqs = [batch(0), batch(1, good(10), good(11), good(12)), batch(2, good(20), good(21)), good(3)]
    parts, kinds, items = edge.stream_parts(reqs, LIMITS, max_batch_events=2)
    assert [p.refused is not None for p in parts] == [True, True, False, False]
    assert len(items) == 3 and kinds == ["completion"] * 3
    responses = edge.stream_responses(parts, outcomes_of(items))
    assert [(r.seq, r.status.code, r.status.field, len(r.batch)) for r in responses] == [
        (0, INVALID, "batch.events", 0), (1, INVALID, "batch.events", 0), (2, OK, "", 2), (3, OK, "", 0)]
    assert "is empty" in responses[0].status.message
    assert "has 3 events; the limit is 2 per batch" in responses[1].status.message
    with pytest.raises(ValueError):  # outcomes must match the events the requests own
        edge.stream_responses(parts, outcomes_of(items)[:2])


def test_another_projects_event_in_a_batch_is_denied_alone() -> None:
    parts, _, items = edge.stream_parts([batch(7, good(1), good(2, project="q"), good(3))], LIMITS, 1000)
    (resp,) = edge.stream_responses(parts, outcomes_of(items, Principal(project="p")))
    assert [(r.seq, r.status.code, r.status.field) for r in resp.batch] == [(1, OK, ""), (2, DENIED, "completion.project"), (3, OK, "")]


def test_http_batch_entries_may_not_be_batches() -> None:
    kind, item = edge.stream_item(batch(1, good(2)), LIMITS)
    assert kind == "" and isinstance(item.event, InvalidArgument) and item.event.field == "batch"


# ---------------------------------------------------------------------------------------------
# the servicer over a fake ingestor (no server, no Kafka)


class _RecordingIngestor:
    def __init__(self) -> None:
        self.writes: list[int] = []

    async def write(self, items: Sequence[Item], principal: Principal) -> list[Outcome]:
        self.writes.append(len(items))
        await asyncio.sleep(0.001 * (len(self.writes) % 3))  # writes finish out of order
        return outcomes_of(items, principal)


class _Context:
    def invocation_metadata(self) -> tuple:
        return ()


def _run_stream(reqs: list[g.StreamEventsRequest], ingestor: _RecordingIngestor, max_batch_events: int = 1000) -> list[g.StreamEventsResponse]:
    servicer = GatewayServicer(ingestor, Authenticator(None, pepper="", enabled=False), LIMITS,  # type: ignore[arg-type]
                               max_batch_events=max_batch_events)

    async def requests() -> Any:
        for r in reqs:
            yield r
            await asyncio.sleep(0)

    async def collect() -> list[g.StreamEventsResponse]:
        return [r async for r in servicer.StreamEvents(requests(), _Context())]  # type: ignore[arg-type]

    return asyncio.run(collect())


def test_servicer_answers_mixed_singles_and_batches_in_request_order() -> None:
    big = batch(3, *[good(1000 + i) for i in range(STREAM_MAX_BATCH + 88)])  # larger than one write's budget
    reqs = [good(0), batch(1, good(100), no_prompt(101)), batch(2), big, good(4), batch(5, *[good(500 + i) for i in range(300)])]
    ingestor = _RecordingIngestor()
    out = _run_stream(reqs, ingestor)
    assert [r.seq for r in out] == [0, 1, 2, 3, 4, 5]
    assert [len(r.batch) for r in out] == [0, 2, 0, STREAM_MAX_BATCH + 88, 0, 300]
    assert [r.status.code for r in out[1].batch] == [OK, INVALID]
    assert out[2].status.field == "batch.events"
    assert [r.seq for r in out[3].batch] == [1000 + i for i in range(STREAM_MAX_BATCH + 88)]
    assert all(r.status.code == OK for r in [*out[3].batch, *out[5].batch])
    # Every event went through a write exactly once; the oversized batch was written whole.
    assert sum(ingestor.writes) == 1 + 2 + STREAM_MAX_BATCH + 88 + 1 + 300
    assert max(ingestor.writes) >= STREAM_MAX_BATCH + 88


def test_inbox_takes_requests_by_event_budget() -> None:
    async def scenario() -> list:
        inbox = _Inbox(limit=10_000)
        for name, weight in (("a", 1), ("b", 300), ("c", 300), ("d", 1), ("e", 900)):
            await inbox.put(name, weight)  # type: ignore[arg-type]
        inbox.close()
        return [await inbox.take(512) for _ in range(5)]

    assert asyncio.run(scenario()) == [["a", "b"], ["c", "d"], ["e"], None, None]


# ---------------------------------------------------------------------------------------------
# the client: packing events into batches, statuses back into results


class _FakeCall:
    """A StreamEvents call: answers each batch request as the gateway would (every event OK, except
    completions without candidates, which get INVALID_ARGUMENT)."""

    def __init__(self, requests: Iterator[g.StreamEventsRequest], refuse_over: int = 1000) -> None:
        self._requests = requests
        self.refuse_over = refuse_over
        self.batch_sizes: list[int] = []
        self.cancelled = False

    def __iter__(self) -> Iterator[g.StreamEventsResponse]:
        for req in self._requests:
            self.batch_sizes.append(len(req.batch.events))
            if len(req.batch.events) > self.refuse_over:
                yield g.StreamEventsResponse(seq=req.seq, status=g.EventStatus(code=INVALID, field="batch.events",
                                                                             message="batch.events: too many"))
                return
            resp = g.StreamEventsResponse(seq=req.seq)
            for e in req.batch.events:
                if e.completion.candidates:
                    resp.batch.add(seq=e.seq, event_id=e.completion.event_id, completion_id="cmp_" + e.completion.event_id,
                                   acked_at={"seconds": 5, "nanos": 500_000_000})
                else:
                    resp.batch.add(seq=e.seq, status=g.EventStatus(code=INVALID, field="completion.candidates",
                                                                   message="completion.candidates: at least one"))
            yield resp

    def cancel(self) -> None:
        self.cancelled = True


class _FakeStub:
    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self.call: _FakeCall | None = None

    def StreamEvents(self, requests: Iterator[g.StreamEventsRequest], metadata: Any = ()) -> _FakeCall:
        self.call = _FakeCall(requests, **self.kw)
        return self.call


def _client(stub: _FakeStub) -> GatewayClient:
    client = GatewayClient.__new__(GatewayClient)
    client._stub = stub  # type: ignore[assignment]
    client._metadata = ()
    return client


def _domain(i: int, candidates: tuple[str, ...] = ("a", "b")) -> Completion:
    return Completion(event_id=f"e{i}", project="p", prompt=(ChatMessage(role="user", content="q"),), candidates=candidates)


def test_client_packs_batches_and_yields_one_result_per_event_in_order() -> None:
    stub = _FakeStub()
    events = [_domain(i) for i in range(7)] + [_domain(7, candidates=())]
    results = list(_client(stub).stream_events(iter(events), batch_size=3, inflight_batches=2))
    assert stub.call is not None and stub.call.batch_sizes == [3, 3, 2]
    assert [r.event_id for r in results[:7]] == [f"e{i}" for i in range(7)]
    assert results[0] == EventResult(event_id="e0", completion_id="cmp_e0", acked_at=5.5)
    assert isinstance(results[7].error, InvalidArgument) and results[7].error.field == "completion.candidates"
    assert results[7].error.message == "at least one" and not results[7].ok


def test_client_reraises_the_iterators_exception_after_answering_what_came_before() -> None:
    def events() -> Iterator[Completion]:
        yield from (_domain(i) for i in range(4))
        raise RuntimeError("dataset broke")

    got: list[EventResult] = []
    with pytest.raises(RuntimeError, match="dataset broke"):
        for r in _client(_FakeStub()).stream_events(events(), batch_size=3):
            got.append(r)
    assert [r.event_id for r in got] == ["e0", "e1", "e2", "e3"]


def test_client_raises_when_the_gateway_refuses_a_batch_and_checks_its_arguments() -> None:
    with pytest.raises(InvalidArgument) as err:
        list(_client(_FakeStub(refuse_over=2)).stream_events([_domain(i) for i in range(5)], batch_size=3))
    assert err.value.field == "batch.events"
    with pytest.raises(InvalidArgument) as err:
        list(_client(_FakeStub()).stream_events([_domain(0)], batch_size=0))
    assert err.value.field == "batch_size"
    with pytest.raises(TypeError, match="not dict"):
        list(_client(_FakeStub()).stream_events([{"event_id": "x"}]))


def test_error_of_status_maps_codes_to_domain_errors() -> None:
    assert error_of_status(g.EventStatus(code=OK)) is None
    e = error_of_status(g.EventStatus(code=INVALID, field="feedback.kind", message="feedback.kind: is required"))
    assert isinstance(e, InvalidArgument) and (e.field, e.message) == ("feedback.kind", "is required")
    assert isinstance(error_of_status(g.EventStatus(code=DENIED, message="no")), PermissionDenied)
    assert isinstance(error_of_status(g.EventStatus(code=14, message="Kafka down")), Unavailable)
    assert type(error_of_status(g.EventStatus(code=13, message="boom"))) is PrefstreamError
