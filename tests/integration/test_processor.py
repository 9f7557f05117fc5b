"""The feedback processor against real Kafka and Redis: exactly the expected records per feedback kind,
feedback that waits for its completion, dead letters for bad direct-to-Kafka records and timeouts."""

from __future__ import annotations

import json
import time
import uuid
from typing import Iterator

import grpc
import pytest
from kafka import KafkaProducer

from gateway.auth import create_key
from gateway.events import completion_id_for
from gateway.testing import GatewayHarness, wait_for_records
from prefstream.events.v1 import events_pb2 as ev
from prefstream.gateway.v1 import gateway_pb2 as g
from prefstream.gateway.v1 import gateway_pb2_grpc as gg
from services import topics
from services.criteria_eval import record_criteria

pytestmark = pytest.mark.integration

PENDING_TIMEOUT_S = 10.0
USER = ev.ChatMessage(role=ev.ROLE_USER, content="Suggest a name for a cat.")
OUTS = ["Tom", "Felix", "Mittens", "Garfield"]


@pytest.fixture(scope="module")
def gw(kafka_bootstrap: str, redis_url: str) -> Iterator[GatewayHarness]:
    with GatewayHarness(kafka_bootstrap, redis_url, pending_timeout_s=PENDING_TIMEOUT_S, pending_retry_s=0.5,
                        max_pairs_per_prompt=16) as h:
        yield h


@pytest.fixture
def client(gw: GatewayHarness, redis_client, project: str) -> Iterator[tuple[gg.GatewayServiceStub, tuple]]:
    key, _ = create_key(redis_client, project, pepper="")
    with grpc.insecure_channel(gw.address) as ch:
        yield gg.GatewayServiceStub(ch), (("authorization", f"Bearer {key}"),)


@pytest.fixture
def raw_producer(kafka_bootstrap: str) -> Iterator[KafkaProducer]:
    p = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    yield p
    p.close()


def preferences(gw: GatewayHarness, kafka_bootstrap: str, project: str, count: int, timeout_s: float = 60.0) -> list[dict]:
    return wait_for_records(kafka_bootstrap, gw.topic(topics.PREFERENCES), lambda v: v.get("project") == project,
                            count=count, timeout_s=timeout_s, settle_s=2.0)


def log_completion(stub, md, project: str, candidates=OUTS, prompt=(USER,), **kw) -> str:
    c = ev.Completion(event_id=f"c-{uuid.uuid4().hex}", project=project, prompt=list(prompt), candidates=list(candidates), **kw)
    return stub.LogCompletion(g.LogCompletionRequest(completion=c), metadata=md).completion_id


def send_feedback(stub, md, project: str, **kw) -> str:
    fb = ev.Feedback(event_id=f"f-{uuid.uuid4().hex}", project=project, **kw)
    stub.LogFeedback(g.LogFeedbackRequest(feedback=fb), metadata=md)
    return fb.event_id


def summary(records: list[dict]) -> list[tuple]:
    return sorted((r["source_kind"], tuple(r["ranked_responses"]), r.get("split", "SPLIT_UNSPECIFIED")) for r in records)


def test_each_feedback_kind_yields_exactly_the_expected_records(gw, client, project, kafka_bootstrap) -> None:
    stub, md = client
    cid = log_completion(stub, md, project)
    test_cid = log_completion(stub, md, project, split=ev.SPLIT_TEST)
    send_feedback(stub, md, project, completion_id=cid, choice=ev.Choice(chosen_index=2))
    send_feedback(stub, md, project, completion_id=cid, regeneration=ev.Regeneration(rejected_indices=[0, 1], accepted_index=3))
    send_feedback(stub, md, project, completion_id=cid, edit=ev.Edit(draft_index=1, edited_text="Sir Felix"))
    send_feedback(stub, md, project, completion_id=cid, ranking=ev.Ranking(ranked_indices=[3, 0, 2, 1]))
    send_feedback(stub, md, project, completion_id=cid, scores=ev.Scores(scores=[
        ev.OutputScore(index=0, score=3.0), ev.OutputScore(index=1, score=1.0), ev.OutputScore(index=2, score=3.0)]))
    attrs = [{"helpfulness": 4.0, "verbosity": 1.0}, {"helpfulness": 2.0, "verbosity": 3.0}]
    send_feedback(stub, md, project, completion_id=cid, scores=ev.Scores(scores=[
        ev.OutputScore(index=0, attributes=attrs[0]), ev.OutputScore(index=3, attributes=attrs[1])]))
    # Thumbs across two completions of the same prompt: up on one, down on the other -> one pair.
    other = log_completion(stub, md, project, candidates=["Whiskers", "Tom"])
    up_id = send_feedback(stub, md, project, completion_id=cid, thumbs=ev.Thumbs(index=1, up=True))
    down_id = send_feedback(stub, md, project, completion_id=other, thumbs=ev.Thumbs(index=0, up=False))
    # Inline feedback (no logged completion), and a TEST completion.
    send_feedback(stub, md, project, inline=ev.InlineCompletion(prompt=[USER], outputs=["Luna", "Cat"]), choice=ev.Choice(chosen_index=0))
    send_feedback(stub, md, project, completion_id=test_cid, choice=ev.Choice(chosen_index=0))

    T, E = "SPLIT_TRAIN", "SPLIT_TEST"
    expected = sorted([
        ("FEEDBACK_KIND_CHOICE", ("Mittens", "Tom"), T), ("FEEDBACK_KIND_CHOICE", ("Mittens", "Felix"), T),
        ("FEEDBACK_KIND_CHOICE", ("Mittens", "Garfield"), T),
        ("FEEDBACK_KIND_REGENERATION", ("Garfield", "Tom"), T), ("FEEDBACK_KIND_REGENERATION", ("Garfield", "Felix"), T),
        ("FEEDBACK_KIND_EDIT", ("Sir Felix", "Felix"), T),
        ("FEEDBACK_KIND_RANKING", ("Garfield", "Tom", "Mittens", "Felix"), T),
        ("FEEDBACK_KIND_SCORES", ("Tom", "Felix"), T), ("FEEDBACK_KIND_SCORES", ("Mittens", "Felix"), T),
        ("FEEDBACK_KIND_SCORES", ("Tom", "Garfield"), T),
        ("FEEDBACK_KIND_THUMBS", ("Felix", "Whiskers"), T),
        ("FEEDBACK_KIND_CHOICE", ("Luna", "Cat"), T),
        ("FEEDBACK_KIND_CHOICE", ("Tom", "Felix"), E), ("FEEDBACK_KIND_CHOICE", ("Tom", "Mittens"), E),
        ("FEEDBACK_KIND_CHOICE", ("Tom", "Garfield"), E),
    ])
    records = preferences(gw, kafka_bootstrap, project, len(expected))
    assert summary(records) == expected
    assert len({r["record_id"] for r in records}) == len(records)
    by_kind = {}
    for r in records:
        by_kind.setdefault(r["source_kind"], []).append(r)
    for r in records:
        assert r["prompt"] == [{"role": "ROLE_USER", "content": USER.content}]
        assert "source_acked_at" in r and "created_at" in r
        assert r.get("completion_id") or r["ranked_responses"] == ["Luna", "Cat"]
    scalar = [r for r in by_kind["FEEDBACK_KIND_SCORES"] if not r.get("response_attributes")]
    assert sorted(r["margin"] for r in scalar) == [2.0, 2.0]
    (attr,) = [r for r in by_kind["FEEDBACK_KIND_SCORES"] if r.get("response_attributes")]
    assert [a["values"] for a in attr["response_attributes"]] == attrs and attr["margin"] == 2.0
    (thumbs,) = by_kind["FEEDBACK_KIND_THUMBS"]
    assert {up_id, down_id} <= set(thumbs["source_event_ids"])


def test_feedback_before_its_completion_waits_for_it(gw, client, project, kafka_bootstrap, raw_producer) -> None:
    stub, md = client
    event_id = f"c-{uuid.uuid4().hex}"
    cid = completion_id_for(project, event_id)
    fb = {"event_id": f"f-{uuid.uuid4().hex}", "project": project, "completion_id": cid, "choice": {"chosen_index": 1}}
    raw_producer.send(gw.topic(topics.FEEDBACK), json.dumps(fb).encode(), key=cid.encode()).get(30)
    time.sleep(2.0)  # parked now: nothing can be derived yet
    assert preferences(gw, kafka_bootstrap, project, 1, timeout_s=1.0) == []
    c = ev.Completion(event_id=event_id, project=project, prompt=[USER], candidates=["Tom", "Felix"])
    assert stub.LogCompletion(g.LogCompletionRequest(completion=c), metadata=md).completion_id == cid
    records = preferences(gw, kafka_bootstrap, project, 1)
    assert summary(records) == [("FEEDBACK_KIND_CHOICE", ("Felix", "Tom"), "SPLIT_TRAIN")]
    assert records[0]["source_event_ids"] == [fb["event_id"], event_id]


def dead_letters(gw: GatewayHarness, kafka_bootstrap: str, marker: str, count: int, timeout_s: float = 60.0) -> list[dict]:
    return wait_for_records(kafka_bootstrap, gw.topic(topics.DEAD_LETTER), lambda v: marker in v.get("payload", ""),
                            count=count, timeout_s=timeout_s, settle_s=1.0)


def test_feedback_whose_completion_never_arrives_is_dead_lettered(gw, client, project, kafka_bootstrap) -> None:
    stub, md = client
    missing = completion_id_for(project, "never-logged")
    fid = send_feedback(stub, md, project, completion_id=missing, thumbs=ev.Thumbs(index=0, up=True))
    (letter,) = dead_letters(gw, kafka_bootstrap, fid, 1, timeout_s=PENDING_TIMEOUT_S + 30)
    assert letter["field"] == "feedback.completion_id"
    assert f"completion {missing} was not seen within" in letter["reason"]
    assert letter["event_id"] == fid and letter["source_topic"] == gw.topic(topics.FEEDBACK)


def test_direct_to_kafka_records_are_validated_like_gateway_input(gw, project, kafka_bootstrap, raw_producer) -> None:
    marker = uuid.uuid4().hex
    ctopic, ftopic = gw.topic(topics.COMPLETIONS), gw.topic(topics.FEEDBACK)
    bad = [
        (ctopic, f"not json {marker}", "completion", "not valid JSON"),
        (ctopic, json.dumps({"project": project, "promt": [], "event_id": marker}), "completion", "promt"),
        (ctopic, json.dumps({"project": project, "event_id": marker + "-role",
                             "prompt": [{"role": "usr", "content": "x"}], "candidates": ["a"]}), "completion.prompt[0].role",
         "Invalid enum value usr"),
        (ctopic, json.dumps({"project": project, "event_id": marker + "-empty",
                             "prompt": [{"role": "ROLE_USER", "content": "x"}], "candidates": ["a", ""]}),
         "completion.candidates[1]", "empty"),
        (ftopic, json.dumps({"project": project, "event_id": marker + "-rank", "completion_id": "cmp_x",
                             "ranking": {"ranked_indices": [1, 1]}}), "feedback.ranking.ranked_indices[1]", "appears twice"),
        (ftopic, json.dumps({"project": project, "event_id": marker + "-nokind", "completion_id": "cmp_x"}),
         "feedback.kind", "is required"),
    ]
    for topic, payload, _, _ in bad:
        raw_producer.send(topic, payload.encode()).get(30)
    # A good pair written directly: the processor derives its record like any other.
    eid = f"direct-{marker}"
    cid = completion_id_for(project, eid)
    good_c = {"event_id": eid, "project": project, "prompt": [{"role": "ROLE_USER", "content": "Best pet?"}], "candidates": ["cat", "rock"]}
    good_f = {"event_id": eid + "-fb", "project": project, "completion_id": cid, "choice": {"chosen_index": 0}}
    raw_producer.send(ctopic, json.dumps(good_c).encode(), key=cid.encode()).get(30)
    raw_producer.send(ftopic, json.dumps(good_f).encode(), key=cid.encode()).get(30)
    letters = dead_letters(gw, kafka_bootstrap, marker, len(bad))
    assert len(letters) == len(bad)
    by_payload = {ltr["payload"]: ltr for ltr in letters}
    for topic, payload, field, text in bad:
        letter = by_payload[payload]
        assert letter["source_topic"] == topic
        assert letter["field"] == field, payload
        assert text in letter["reason"], (payload, letter["reason"])
    assert "offset" in by_payload[bad[1][1]] or by_payload[bad[1][1]].get("offset", 0) >= 0
    records = preferences(gw, kafka_bootstrap, project, 1)
    assert summary(records) == [("FEEDBACK_KIND_CHOICE", ("cat", "rock"), "SPLIT_TRAIN")]


def test_replaying_the_topics_creates_no_new_records(gw, client, project, kafka_bootstrap, redis_url) -> None:
    """A processor that re-reads everything (a new group: the worst case of a crash before commit)
    derives the same record ids and re-sends none of them."""
    import dataclasses
    import threading

    from gateway.processor import Processor

    stub, md = client
    cid = log_completion(stub, md, project)
    send_feedback(stub, md, project, completion_id=cid, ranking=ev.Ranking(ranked_indices=[1, 0]))
    send_feedback(stub, md, project, completion_id=cid, thumbs=ev.Thumbs(index=0, up=True))
    send_feedback(stub, md, project, completion_id=cid, thumbs=ev.Thumbs(index=2, up=False))
    before = preferences(gw, kafka_bootstrap, project, 2)
    assert sorted(r["source_kind"] for r in before) == ["FEEDBACK_KIND_RANKING", "FEEDBACK_KIND_THUMBS"]

    replay = Processor(dataclasses.replace(gw.cfg, processor_group=gw.prefix + "replay"), kafka_bootstrap, redis_url)
    stop = threading.Event()
    t = threading.Thread(target=replay.run, args=(stop,), daemon=True)
    t.start()
    try:
        assert replay.assigned.wait(60)
        deadline = time.monotonic() + 60
        # Wait until the replaying group has consumed both topics to their end.
        from kafka import KafkaConsumer, TopicPartition

        probe = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=gw.prefix + "replay", enable_auto_commit=False)
        try:
            tps = [TopicPartition(tp, p) for tp in (gw.topic(topics.COMPLETIONS), gw.topic(topics.FEEDBACK))
                   for p in probe.partitions_for_topic(tp) or []]
            end = probe.end_offsets(tps)
            while time.monotonic() < deadline and any((probe.committed(tp) or 0) < end[tp] for tp in tps):
                time.sleep(0.5)
        finally:
            probe.close()
    finally:
        stop.set()
        t.join(30)
    after = preferences(gw, kafka_bootstrap, project, 2, timeout_s=5)
    assert sorted(r["record_id"] for r in after) == sorted(r["record_id"] for r in before)


def test_a_completion_ranked_by_criteria_is_feedback_unless_switched_off(gw, client, project, kafka_bootstrap,
                                                                         redis_client) -> None:
    from services.criteria_store import CriteriaStore

    stub, md = client
    scores = ev.CriteriaScores(refs=["concise@v3"], scores=[1.0, 0.0, 1.0, 0.0], tie_break=[0.1, 0.4, 0.6, -0.2],
                               per_criterion=[ev.AttributeScores(values={"concise": s}) for s in (1.0, 0.0, 1.0, 0.0)])
    cid = log_completion(stub, md, project, criteria=scores)
    # human feedback on the same completion still derives its own record
    send_feedback(stub, md, project, completion_id=cid, choice=ev.Choice(chosen_index=1))
    CriteriaStore(redis_client).set_feedback(project, "concise", enabled=False)
    log_completion(stub, md, project, criteria=scores)  # switched off: no criteria record from this one
    records = preferences(gw, kafka_bootstrap, project, 4)
    crit = [r for r in records if r["source_kind"] == "FEEDBACK_KIND_CRITERIA"]
    assert [tuple(r["ranked_responses"]) for r in crit] == [("Mittens", "Garfield")]  # by score, then tie break
    assert crit[0]["completion_id"] == cid and "criterion:concise@v3" in crit[0]["source_event_ids"]
    assert sorted(r["source_kind"] for r in records) == ["FEEDBACK_KIND_CHOICE"] * 3 + ["FEEDBACK_KIND_CRITERIA"]
    time.sleep(2.0)
    assert len(preferences(gw, kafka_bootstrap, project, 5, timeout_s=2.0)) == 4  # nothing more came


def test_trim_feedback_pairs_a_failing_reply_with_its_passing_prefix_by_the_stored_definition(
        gw, client, project, kafka_bootstrap, redis_client) -> None:
    from services.criteria import parse_criterion
    from services.criteria_store import CriteriaStore

    stub, md = client
    store = CriteriaStore(redis_client)
    stored, _ = store.create(parse_criterion({"name": "brief", "rules": [{"max_words": 8}]}, project=project))
    store.set_feedback(project, enabled=True, mode="trim")
    runaway = "Cats purr a lot. They nap all day. They chase mice at night."
    cands = ["Cats purr.", runaway, "Cats are small, soft and sleep a lot, mostly."]
    scores = ev.CriteriaScores(refs=[stored.ref], scores=[1.0, 0.0, 0.0], tie_break=[0.1, 0.9, 0.2])
    log_completion(stub, md, project, candidates=cands, criteria=scores)
    # A definition the store does not hold any more (or never did): the length-matched pair instead.
    gone = ev.CriteriaScores(refs=["deleted@v7"], scores=[1.0, 0.0, 0.0], tie_break=[0.1, 0.9, 0.2])
    log_completion(stub, md, project, candidates=cands, criteria=gone)
    records = preferences(gw, kafka_bootstrap, project, 3)
    by_ref: dict[str, list] = {}
    for r in records:
        (ref,) = record_criteria(r["source_event_ids"])
        by_ref.setdefault(ref, []).append(tuple(r["ranked_responses"]))
    longest = "Cats purr a lot. They nap all day."
    assert sorted(by_ref[stored.ref]) == [(longest, "Cats purr a lot."), (longest, runaway)]
    assert by_ref["deleted@v7"] == [("Cats purr.", cands[2])]


def test_a_record_too_large_to_derive_is_dead_lettered_and_the_partition_flows_on(gw, project, kafka_bootstrap) -> None:
    """A compressed 2 MB feedback event passes the broker; its derived record would exceed the producer's
    limit on every retry.  It goes to the dead letters with its reason; the pair behind it is derived."""
    marker = uuid.uuid4().hex
    ftopic = gw.topic(topics.FEEDBACK)
    big = {"event_id": f"big-{marker}", "project": project,
           "inline": {"prompt": [{"role": "ROLE_USER", "content": "q " * 45_000}] * 24, "outputs": ["yes", "no"]},
           "choice": {"chosen_index": 0}}
    good = {"event_id": f"after-{marker}", "project": project,
            "inline": {"prompt": [{"role": "ROLE_USER", "content": f"Best pet? {marker}"}], "outputs": ["cat", "rock"]},
            "choice": {"chosen_index": 0}}
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", compression_type="gzip",
                             max_request_size=16 * 1024 * 1024)
    try:
        key = b"one-partition"
        producer.send(ftopic, json.dumps(big).encode(), key=key).get(30)
        producer.send(ftopic, json.dumps(good).encode(), key=key).get(30)
    finally:
        producer.close()
    (letter,) = dead_letters(gw, kafka_bootstrap, f"big-{marker}", 1)
    assert letter["field"] == "preference" and "bytes" in letter["reason"] and "shorten" in letter["reason"], letter
    assert "truncated" in letter["payload"] and letter["event_id"] == f"big-{marker}"
    records = preferences(gw, kafka_bootstrap, project, 1)
    assert summary(records) == [("FEEDBACK_KIND_CHOICE", ("cat", "rock"), "SPLIT_TRAIN")]
