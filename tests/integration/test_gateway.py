"""The gateway against real Kafka and Redis: acks, dedup, per-field errors, auth codes, Kafka down."""

from __future__ import annotations

import json
import time
import uuid
from typing import Iterator

import grpc
import pytest
import requests

from bench import hostile
from gateway.auth import create_key, revoke_key
from gateway.events import completion_id_for
from gateway.testing import GatewayHarness, read_topic
from prefstream.events.v1 import events_pb2 as ev
from prefstream.gateway.v1 import gateway_pb2 as g
from prefstream.gateway.v1 import gateway_pb2_grpc as gg
from services import topics
from services.stack import free_port

pytestmark = pytest.mark.integration

USER = ev.ChatMessage(role=ev.ROLE_USER, content="What is 2+2?")


@pytest.fixture(scope="module")
def gw(kafka_bootstrap: str, redis_url: str) -> Iterator[GatewayHarness]:
    with GatewayHarness(kafka_bootstrap, redis_url, run_processor=False) as h:
        yield h


@pytest.fixture
def stub(gw: GatewayHarness) -> Iterator[gg.GatewayServiceStub]:
    with grpc.insecure_channel(gw.address) as ch:
        yield gg.GatewayServiceStub(ch)


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def completion(project: str, event_id: str = "", **kw) -> ev.Completion:
    return ev.Completion(event_id=event_id, project=project, prompt=[USER], candidates=["4", "5", "22"], **kw)


def event_ids(gw: GatewayHarness, kafka_bootstrap: str, spec) -> list[str]:
    return [json.loads(r.value)["event_id"] for r in read_topic(kafka_bootstrap, gw.topic(spec))]


def test_completion_and_feedback_are_acked_after_kafka_has_them(gw, stub, key, project, kafka_bootstrap) -> None:
    eid = f"c-{uuid.uuid4().hex}"
    resp = stub.LogCompletion(g.LogCompletionRequest(completion=completion(project, eid, model="m", model_version="v1")), metadata=md(key))
    assert resp.event_id == eid and not resp.duplicate
    assert resp.completion_id == completion_id_for(project, eid)
    assert resp.acked_at.seconds > 0
    fb = ev.Feedback(event_id=f"f-{uuid.uuid4().hex}", project=project, completion_id=resp.completion_id, choice=ev.Choice(chosen_index=0))
    fresp = stub.LogFeedback(g.LogFeedbackRequest(feedback=fb), metadata=md(key))
    assert fresp.event_id == fb.event_id and not fresp.duplicate
    records = {json.loads(r.value)["event_id"]: json.loads(r.value) for r in read_topic(kafka_bootstrap, gw.topic(topics.COMPLETIONS))}
    assert records[eid]["completion_id"] == resp.completion_id
    assert records[eid]["prompt"] == [{"role": "ROLE_USER", "content": "What is 2+2?"}]
    assert "acked_at" in records[eid]
    assert fb.event_id in event_ids(gw, kafka_bootstrap, topics.FEEDBACK)
    # No client id: the gateway assigns one.
    anon = stub.LogCompletion(g.LogCompletionRequest(completion=completion(project)), metadata=md(key))
    assert anon.event_id.startswith("gw-") and anon.completion_id == completion_id_for(project, anon.event_id)


def test_duplicate_event_ids_are_written_once(gw, stub, key, project, kafka_bootstrap) -> None:
    eid = f"dup-{uuid.uuid4().hex}"
    first = stub.LogCompletion(g.LogCompletionRequest(completion=completion(project, eid)), metadata=md(key))
    again = stub.LogCompletion(g.LogCompletionRequest(completion=completion(project, eid)), metadata=md(key))
    assert not first.duplicate and again.duplicate
    assert again.completion_id == first.completion_id and again.acked_at == first.acked_at
    # The same id twice inside one stream (and once more already written), plus a fresh one.
    sid = f"dup-{uuid.uuid4().hex}"
    reqs = [g.StreamEventsRequest(seq=i, completion=completion(project, e)) for i, e in enumerate([sid, sid, eid, sid])]
    out = list(stub.StreamEvents(iter(reqs), metadata=md(key)))
    assert [r.seq for r in out] == [0, 1, 2, 3]
    assert [r.status.code for r in out] == [0, 0, 0, 0]
    assert [r.duplicate for r in out] == [False, True, True, True]
    # Over HTTP as well.
    body = {"completion": json.loads(json.dumps({"event_id": eid, "project": project,
                                                  "prompt": [{"role": "ROLE_USER", "content": "x"}], "candidates": ["a"]}))}
    r = requests.post(f"{gw.http_url}/v1/completions/log", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200 and r.json()["duplicate"] is True
    ids = event_ids(gw, kafka_bootstrap, topics.COMPLETIONS)
    assert ids.count(eid) == 1 and ids.count(sid) == 1


def test_batch_answers_each_event_and_writes_the_good_ones_exactly_once(gw, stub, key, project, kafka_bootstrap) -> None:
    earlier = f"b-{uuid.uuid4().hex}"
    stub.LogCompletion(g.LogCompletionRequest(completion=completion(project, earlier)), metadata=md(key))
    c1, c2 = f"b-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    fb = f"bf-{uuid.uuid4().hex}"
    events = [
        g.StreamEventsRequest(seq=10, completion=completion(project, c1)),
        g.StreamEventsRequest(seq=11, completion=ev.Completion(event_id=f"bad-{uuid.uuid4().hex}", project=project,
                                                               candidates=["x"])),  # no prompt
        g.StreamEventsRequest(seq=12, completion=completion(project, c2)),
        g.StreamEventsRequest(seq=13, completion=completion(project, c1)),  # the same id again in the batch
        # About the completion logged before the batch (3 candidates): index 7 is out of range; the
        # corrected event with the same id is then written.
        g.StreamEventsRequest(seq=14, feedback=ev.Feedback(event_id=fb, project=project, completion_id=completion_id_for(project, earlier),
                                                           choice=ev.Choice(chosen_index=7))),
        g.StreamEventsRequest(seq=15, feedback=ev.Feedback(event_id=fb, project=project, completion_id=completion_id_for(project, earlier),
                                                           choice=ev.Choice(chosen_index=2))),
        g.StreamEventsRequest(seq=16, completion=completion(project, earlier)),  # written before this batch
    ]
    reqs = [g.StreamEventsRequest(seq=0, completion=completion(project)),  # single events and batches mix
            g.StreamEventsRequest(seq=1, batch=g.EventBatch(events=events)),
            g.StreamEventsRequest(seq=2, batch=g.EventBatch()),
            g.StreamEventsRequest(seq=3, batch=g.EventBatch(events=events))]  # the whole batch retried
    out = list(stub.StreamEvents(iter(reqs), metadata=md(key)))
    assert [r.seq for r in out] == [0, 1, 2, 3]
    assert out[0].status.code == 0 and not out[0].batch
    first, refused, retried = out[1], out[2], out[3]
    assert first.status.code == 0 and [r.seq for r in first.batch] == [10, 11, 12, 13, 14, 15, 16]
    inv = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [(r.status.code, r.status.field) for r in first.batch] == [
        (0, ""), (inv, "completion.prompt"), (0, ""), (0, ""), (inv, "feedback.choice.chosen_index"), (0, ""), (0, "")]
    assert refused.status.code == inv and refused.status.field == "batch.events" and not refused.batch
    assert [r.status.code for r in retried.batch] == [r.status.code for r in first.batch]
    # Batches of one stream are pipelined, so the retried batch may claim an id before the first one
    # does: which copy writes is not fixed, only that every accepted event is written by exactly one.
    copies = {i: [first.batch[i], retried.batch[i]] for i in range(7) if first.batch[i].status.code == 0}
    c1_copies = copies.pop(0) + copies.pop(3)  # c1, twice in each batch
    assert sum(not r.duplicate for r in c1_copies) == 1
    assert len({(r.completion_id, r.acked_at.ToNanoseconds()) for r in c1_copies}) == 1  # duplicates answer the write
    assert c1_copies[0].completion_id == completion_id_for(project, c1)
    assert all(r.duplicate for r in copies.pop(6))  # written before this batch
    assert all(sum(not r.duplicate for r in pair) == 1 for pair in copies.values())
    completions = event_ids(gw, kafka_bootstrap, topics.COMPLETIONS)
    assert [completions.count(e) for e in (c1, c2, earlier)] == [1, 1, 1]
    assert not [e for e in completions if e.startswith("bad-")]
    assert event_ids(gw, kafka_bootstrap, topics.FEEDBACK).count(fb) == 1


def test_client_stream_events_in_batches(gw, key, project, kafka_bootstrap) -> None:
    from gateway.client import GatewayClient

    ids = [f"cs-{uuid.uuid4().hex[:8]}-{i}" for i in range(700)]
    events = [completion(project, e) for e in ids]
    events[350] = ev.Completion(event_id=ids[350], project=project, prompt=[USER], candidates=["a", ""])
    with GatewayClient(gw.address, api_key=key) as client:
        results = list(client.stream_events(iter(events), batch_size=128, inflight_batches=2))
        assert [r.event_id for i, r in enumerate(results) if i != 350] == [e for i, e in enumerate(ids) if i != 350]
        assert results[350].error is not None and results[350].error.field == "completion.candidates[1]"
        assert sum(r.ok and not r.duplicate for r in results) == 699
        again = list(client.stream_events(events[:10], batch_size=4))
        assert all(r.duplicate for r in again)
    written = event_ids(gw, kafka_bootstrap, topics.COMPLETIONS)
    assert sum(written.count(e) for e in ids) == 699 and ids[350] not in written


def _bad_completions(project: str) -> list[tuple[str, ev.Completion, str, str]]:
    ok = dict(project=project, prompt=[USER], candidates=["a", "b"])
    return [
        ("missing project", ev.Completion(prompt=[USER], candidates=["a"]), "completion.project", "is required"),
        ("no prompt", ev.Completion(project=project, candidates=["a"]), "completion.prompt", "at least one message"),
        ("unknown role", ev.Completion(**{**ok, "prompt": [ev.ChatMessage(role=7, content="x")]}), "completion.prompt[0].role", "unknown role 7"),
        ("empty output", ev.Completion(**{**ok, "candidates": ["a", ""]}), "completion.candidates[1]", "empty"),
        ("too many candidates", ev.Completion(**{**ok, "candidates": ["a"] * 17}), "completion.candidates", "limit is 16"),
        ("too many messages", ev.Completion(**{**ok, "prompt": [USER] * 257}), "completion.prompt", "limit is 256"),
        ("message too long", ev.Completion(**{**ok, "prompt": [ev.ChatMessage(role=2, content="x" * 100_001)]}),
         "completion.prompt[0].content", "limit is 100000"),
    ]


def _bad_feedback(project: str, cid: str) -> list[tuple[str, ev.Feedback, str, str]]:
    base = dict(project=project, completion_id=cid)
    return [
        ("no kind", ev.Feedback(**base), "feedback.kind", "is required"),
        ("unknown candidate index", ev.Feedback(**base, choice=ev.Choice(chosen_index=3)), "feedback.choice.chosen_index", "out of range"),
        ("ranking with duplicates", ev.Feedback(**base, ranking=ev.Ranking(ranked_indices=[0, 1, 0])),
         "feedback.ranking.ranked_indices[2]", "appears twice"),
        ("K < 2", ev.Feedback(**base, ranking=ev.Ranking(ranked_indices=[1])), "feedback.ranking.ranked_indices", "K >= 2"),
        ("non-finite score", ev.Feedback(**base, scores=ev.Scores(scores=[ev.OutputScore(index=0, score=float("nan")),
                                                                          ev.OutputScore(index=1, score=1.0)])),
         "feedback.scores.scores[0].score", "finite"),
        ("unknown attribute", ev.Feedback(**base, scores=ev.Scores(scores=[ev.OutputScore(index=0, attributes={"humor": 1.0}),
                                                                           ev.OutputScore(index=1, score=1.0)])),
         "feedback.scores.scores[0].attributes['humor']", "unknown attribute"),
        ("no target", ev.Feedback(project=project, thumbs=ev.Thumbs(index=0, up=True)), "feedback.target", "is required"),
    ]


def test_malformed_inputs_get_their_precise_error_everywhere(gw, stub, key, project) -> None:
    logged = stub.LogCompletion(g.LogCompletionRequest(completion=completion(project, f"c-{uuid.uuid4().hex}")), metadata=md(key))
    cases = [("completion", n, m, f, t) for n, m, f, t in _bad_completions(project)]
    cases += [("feedback", n, m, f, t) for n, m, f, t in _bad_feedback(project, logged.completion_id)]
    for kind, name, msg, field, text in cases:
        # Unary gRPC: INVALID_ARGUMENT, details "field: message".
        with pytest.raises(grpc.RpcError) as err:
            if kind == "completion":
                stub.LogCompletion(g.LogCompletionRequest(completion=msg), metadata=md(key))
            else:
                stub.LogFeedback(g.LogFeedbackRequest(feedback=msg), metadata=md(key))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert err.value.details().startswith(field + ": "), (name, err.value.details())
        assert text in err.value.details(), name
        # HTTP: 400 with the field as `param`.
        from google.protobuf import json_format

        body = {kind: json_format.MessageToDict(msg, preserving_proto_field_name=True)}
        path = "/v1/completions/log" if kind == "completion" else "/v1/feedback"
        r = requests.post(gw.http_url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        if name == "non-finite score":  # JSON carries NaN as the string "NaN": same rule, same field
            assert r.status_code == 400
        else:
            assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["param"] == field, (name, r.text)
    # One stream carrying every bad event between good ones: each answered, the stream goes on.
    reqs, expected = [], []
    for i, (kind, name, msg, field, _) in enumerate(cases):
        reqs.append(g.StreamEventsRequest(seq=2 * i, completion=completion(project)))
        expected.append((0, ""))
        req = g.StreamEventsRequest(seq=2 * i + 1)
        getattr(req, kind).CopyFrom(msg)
        reqs.append(req)
        expected.append((grpc.StatusCode.INVALID_ARGUMENT.value[0], field))
    out = list(stub.StreamEvents(iter(reqs), metadata=md(key)))
    assert [(r.status.code, r.status.field) for r in out] == expected
    assert [r.seq for r in out] == list(range(len(reqs)))


def test_http_batch_and_body_errors(gw, key, project) -> None:
    h = {"Authorization": f"Bearer {key}"}
    events = [
        {"seq": 1, "completion": {"project": project, "prompt": [{"role": "ROLE_USER", "content": "q"}], "candidates": ["a", "b"]}},
        {"seq": 2, "completion": {"project": project, "prompt": [{"role": "usr", "content": "q"}], "candidates": ["a"]}},
        {"seq": 3, "feedback": {"project": project, "inline": {"prompt": [{"role": "ROLE_USER", "content": "q"}],
                                                                 "outputs": ["a", "b"]}, "ranking": {"ranked_indices": [1, 0]}}},
        {"seq": 4},
    ]
    r = requests.post(f"{gw.http_url}/v1/events:batch", json={"events": events}, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["seq"] for x in results] == ["1", "2", "3", "4"] or [int(x["seq"]) for x in results] == [1, 2, 3, 4]
    assert [x["status"].get("code", 0) for x in results] == [0, 3, 0, 3]
    assert results[1]["status"]["field"] == "events[1].completion.prompt[0].role"
    assert results[3]["status"]["field"] == "event"
    r = requests.post(f"{gw.http_url}/v1/feedback", data=b"{not json", headers=h, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = requests.post(f"{gw.http_url}/v1/completions/log", json={"completion": {"promt": []}}, headers=h, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "completion"
    assert requests.get(f"{gw.http_url}/healthz", timeout=10).json()["kafka"] is True
    assert "prefstream_gateway_events_total" in requests.get(f"{gw.http_url}/metrics", timeout=10).text


def test_auth_codes(gw, stub, redis_client, key, project) -> None:
    c = g.LogCompletionRequest(completion=completion(project))
    cases = [
        ((), grpc.StatusCode.UNAUTHENTICATED, 401),
        ((("authorization", "Bearer psk_00ff00ff00ff_nope"),), grpc.StatusCode.UNAUTHENTICATED, 401),
        ((("authorization", "Token abc"),), grpc.StatusCode.UNAUTHENTICATED, 401),
        ((("x-api-key", "garbage"),), grpc.StatusCode.UNAUTHENTICATED, 401),
    ]
    other_key, _ = create_key(redis_client, project + "-other", pepper="")
    cases.append(((("authorization", f"Bearer {other_key}"),), grpc.StatusCode.PERMISSION_DENIED, 403))
    for metadata, code, http_status in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.LogCompletion(c, metadata=metadata)
        assert err.value.code() == code, metadata
        body = {"completion": {"project": project, "prompt": [{"role": "ROLE_USER", "content": "q"}], "candidates": ["a"]}}
        r = requests.post(f"{gw.http_url}/v1/completions/log", json=body, headers=dict(metadata), timeout=30)
        assert r.status_code == http_status, (metadata, r.text)
    # x-api-key works as well as Bearer.
    assert stub.LogCompletion(c, metadata=(("x-api-key", key),)).completion_id
    # A stream with another project's key: each event PERMISSION_DENIED, the stream goes on.
    out = list(stub.StreamEvents(iter([g.StreamEventsRequest(seq=1, completion=completion(project))]),
                                 metadata=(("authorization", f"Bearer {other_key}"),)))
    assert out[0].status.code == grpc.StatusCode.PERMISSION_DENIED.value[0] and out[0].status.field == "completion.project"
    with pytest.raises(grpc.RpcError) as err:
        list(stub.StreamEvents(iter([g.StreamEventsRequest(seq=1, completion=completion(project))])))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Revoked keys stop working (the harness caches nothing).
    revoke_key(redis_client, key)
    with pytest.raises(grpc.RpcError) as err:
        stub.LogCompletion(c, metadata=md(key))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.value.details()


def test_kafka_unreachable_is_unavailable_never_ok(redis_url: str, redis_client) -> None:
    closed = f"127.0.0.1:{free_port()}"
    project = f"proj-{uuid.uuid4().hex[:8]}"
    key, _ = create_key(redis_client, project, pepper="")
    h = GatewayHarness(closed, redis_url, create_topics=False, run_processor=False, kafka_ack_timeout_s=2.0, dedup_pending_ttl_s=5.0)
    with h:
        with grpc.insecure_channel(h.address) as ch:
            stub = gg.GatewayServiceStub(ch)
            eid = f"c-{uuid.uuid4().hex}"
            with pytest.raises(grpc.RpcError) as err:
                stub.LogCompletion(g.LogCompletionRequest(completion=completion(project, eid)), metadata=md(key), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # The failed write left no "done" marker: a retry is attempted again (and fails again).
            with pytest.raises(grpc.RpcError) as err:
                stub.LogCompletion(g.LogCompletionRequest(completion=completion(project, eid)), metadata=md(key), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            out = list(stub.StreamEvents(iter([g.StreamEventsRequest(seq=i, completion=completion(project)) for i in range(3)]),
                                         metadata=md(key), timeout=60))
            assert [r.status.code for r in out] == [grpc.StatusCode.UNAVAILABLE.value[0]] * 3
            r = requests.post(f"{h.http_url}/v1/completions/log", json={"completion": {
                "project": project, "prompt": [{"role": "ROLE_USER", "content": "q"}], "candidates": ["a"]}},
                headers={"Authorization": f"Bearer {key}"}, timeout=60)
            assert r.status_code == 503
            assert requests.get(f"{h.http_url}/healthz", timeout=10).status_code == 503
    assert redis_client.get(f"prefstream:dedup:{project}:{eid}") is None


def test_python_client(gw, key, project) -> None:
    from gateway.client import GatewayClient
    from services.errors import InvalidArgument, Unauthenticated

    with GatewayClient(gw.address, api_key=key) as client:
        cid = client.log_completion(project, "Name a colour", ["red", "blue", "green"], model="m", split="test")
        assert cid.startswith("cmp_")
        assert client.log_feedback(project, cid, choice=1)
        assert client.log_feedback(project, cid, regeneration=([0], 2))
        assert client.log_feedback(project, cid, edit=(0, "crimson"))
        assert client.log_feedback(project, cid, ranking=[2, 0, 1])
        assert client.log_feedback(project, cid, scores=[{"index": 0, "score": 1.0}, {"index": 1, "score": 2.0}])
        assert client.log_feedback(project, cid, thumbs=(1, True))
        assert client.log_feedback(project, inline=("Pick", ["a", "b"]), choice=0)
        with pytest.raises(InvalidArgument) as err:
            client.log_feedback(project, cid, choice=5)
        assert err.value.field == "feedback.choice.chosen_index"
        with pytest.raises(InvalidArgument):
            client.log_feedback(project, cid, choice=0, thumbs=(0, True))
    with GatewayClient(gw.address) as anonymous, pytest.raises(Unauthenticated):
        anonymous.log_completion(project, "x", ["y"])


def test_hostile_bodies_get_a_400_naming_the_field_and_the_gateway_stays_healthy(kafka_bootstrap, redis_url, key,
                                                                                 project) -> None:
    """Inputs that used to answer 500 (and log a traceback each): every one is a 400 naming where.  The cases
    are bench/hostile.py's WAS_500; tests/integration/test_hostile_corpus.py sends the whole corpus."""
    cases = hostile.select(hostile.WAS_500)
    # The OpenAI routes are mounted (their cases fail while parsing, before any scorer is asked).
    with GatewayHarness(kafka_bootstrap, redis_url, run_processor=False, scorer_address=f"127.0.0.1:{free_port()}") as gw:
        out = hostile.run_corpus(gateway_http=gw.http_url, gateway_grpc=None, scorer_grpc=None, api_key=key,
                                 project=project, timeout_s=60, cases=cases)
    assert out["malformed_cases"] == len(cases) == 9, out
    assert out["malformed_internal_errors"] == 0 and out["malformed_unexpected"] == 0, out["failures"]
    assert out["unhealthy_after"] == 0, out["failures"]


def test_a_project_over_its_ingest_limit_gets_429_per_event_and_others_flow(kafka_bootstrap, redis_url, redis_client,
                                                                            key, project) -> None:
    other = f"{project}-b"
    other_key, _ = create_key(redis_client, other, pepper="")
    with GatewayHarness(kafka_bootstrap, redis_url, run_processor=False, rate_limit_events_per_s=2.0,
                        rate_limit_burst=5) as gw:
        def batch(p: str, k: str, n: int) -> list[int]:
            events = [{"seq": i, "completion": {"project": p, "prompt": [{"role": "user", "content": f"q{i}"}],
                                                "candidates": ["a"]}} for i in range(n)]
            r = requests.post(f"{gw.http_url}/v1/events:batch", json={"events": events},
                              headers={"Authorization": f"Bearer {k}"}, timeout=30)
            assert r.status_code == 200, r.text
            return [x["status"].get("code", 0) for x in r.json()["results"]]

        codes = batch(project, key, 8)
        assert codes == [0] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]] * 3  # the burst, in order
        assert batch(other, other_key, 5) == [0] * 5  # another project has its own bucket
        r = requests.post(f"{gw.http_url}/v1/completions/log", json={"completion": {
            "project": project, "prompt": [{"role": "user", "content": "q"}], "candidates": ["a"]}},
            headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["param"] == "completion.project"
        assert "retry in" in r.json()["error"]["message"]
        time.sleep(1.1)  # two tokens back
        assert batch(project, key, 2) == [0, 0]


def test_slow_clients_are_cut_off_and_normal_requests_still_flow(kafka_bootstrap, redis_url, key, project) -> None:
    import socket
    from urllib.parse import urlparse

    with GatewayHarness(kafka_bootstrap, redis_url, run_processor=False, http_idle_timeout_s=2.0) as gw:
        port = urlparse(gw.http_url).port
        slow = []
        for _ in range(20):  # trickle a request one byte at a time, never finishing its headers
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/events:batch HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        closed = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and closed < len(slow):
            for s in slow:
                if s.fileno() == -1:
                    continue
                try:
                    s.sendall(b"X")
                    s.settimeout(0.05)
                    if s.recv(1) == b"":
                        raise ConnectionResetError
                except socket.timeout:
                    pass
                except OSError:
                    s.close()
                    closed += 1
            time.sleep(0.5)
        for s in slow:
            s.close()
        assert closed == len(slow), f"{len(slow) - closed} slow connections still open after 8 s"
        r = requests.post(f"{gw.http_url}/v1/completions/log", json={"completion": {
            "project": project, "prompt": [{"role": "user", "content": "q"}], "candidates": ["a"]}},
            headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text


def test_key_scopes_limit_what_a_key_may_do(kafka_bootstrap: str, redis_url: str, redis_client, project: str) -> None:
    """An ingest-only key logs events but may not call the scoring routes; a score-only key may not log;
    a key made before scopes existed keeps doing both."""
    from gateway.auth import _REDIS_KEY, parse_key

    ingest_only, _ = create_key(redis_client, project, pepper="", scopes=["ingest"])
    score_only, _ = create_key(redis_client, project, pepper="", scopes=["score"])
    legacy, _ = create_key(redis_client, project, pepper="")
    redis_client.hdel(_REDIS_KEY.format(parse_key(legacy)[0]), "scopes")
    # A scorer address makes the gateway mount the OpenAI-compatible routes (nothing listens there:
    # a refused key never gets that far).
    with GatewayHarness(kafka_bootstrap, redis_url, run_processor=False, scorer_address="127.0.0.1:9") as h:
        url = h.http_url
        with grpc.insecure_channel(h.address) as ch:
            stub = gg.GatewayServiceStub(ch)
            stub.LogCompletion(g.LogCompletionRequest(completion=completion(project)), metadata=md(ingest_only))
            stub.LogCompletion(g.LogCompletionRequest(completion=completion(project)), metadata=md(legacy))
            with pytest.raises(grpc.RpcError) as e:
                stub.LogCompletion(g.LogCompletionRequest(completion=completion(project)), metadata=md(score_only))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "may not ingest" in e.value.details()
        body = {"completion": {"project": project, "prompt": [{"role": "user", "content": "hi"}], "candidates": ["a"]}}
        r = requests.post(f"{url}/v1/completions/log", json=body, headers={"Authorization": f"Bearer {score_only}"}, timeout=10)
        assert r.status_code == 403 and "--scope ingest" in r.text
        for path in ("/v1/models",):
            r = requests.get(f"{url}{path}", headers={"Authorization": f"Bearer {ingest_only}"}, timeout=10)
            assert r.status_code == 403 and "may not score" in r.text, r.text
            r = requests.get(f"{url}{path}", headers={"Authorization": f"Bearer {legacy}"}, timeout=30)
            assert r.status_code != 403  # allowed (the scorer behind it is not there: 503)


def test_no_key_password_or_payload_in_any_log_line(kafka_bootstrap: str, redis_url: str, redis_client, project: str,
                                                     caplog) -> None:
    """INFO and above, the gateway and its processor log what happened, never a key, a password or a user's text."""
    import logging

    from gateway.client import GatewayClient

    caplog.set_level(logging.INFO)
    key, _ = create_key(redis_client, project, pepper="")
    marker = f"private-user-text-{uuid.uuid4().hex}"
    with GatewayHarness(kafka_bootstrap, redis_url) as h:
        client = GatewayClient(h.address, api_key=key)
        try:
            cid = client.log_completion(project, f"my secret question {marker}?", [f"answer A {marker}", f"answer B {marker}"])
            client.log_feedback(project, cid, choice=1)
            bad = GatewayClient(h.address, api_key=key[:-4] + "AAAA")  # a wrong key is refused, and not logged either
            with pytest.raises(Exception):
                bad.log_completion(project, marker, ["x"])
            bad.close()
        finally:
            client.close()
        deadline = time.monotonic() + 60
        derived = []
        while not derived and time.monotonic() < deadline:
            derived = [r for r in read_topic(kafka_bootstrap, h.topic(topics.PREFERENCES)) if marker.encode() in r.value]
            time.sleep(0.5)
        assert derived, "the pair was not derived: nothing was processed, so the check below would be empty"
    secret = key.rsplit("_", 1)[1]
    password = redis_url.split("@")[0].rsplit(":", 1)[-1] if "@" in redis_url else None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) > 5
    for line in lines:
        assert marker not in line and secret not in line, line
        assert password is None or password not in line, line
