"""The Kafka wire format and the domain schemas: round trips and precise errors."""

import pytest

from prefstream.events.v1.events_pb2 import Feedback as FeedbackProto
from services.codec import decode_event, encode_event
from services.errors import InvalidArgument
from services.schemas import (
    ChatMessage,
    ModelUpdate,
    PreferenceRecord,
    make_record_id,
    messages_from_dicts,
    prompt_hash,
)


def _record(**kw) -> PreferenceRecord:
    base = dict(
        record_id=make_record_id(["e1"], ["good", "bad"]),
        prompt=(ChatMessage("system", "be nice"), ChatMessage("user", "hi")),
        ranked_responses=("good", "ok", "bad"),
        source_kind="ranking",
        project="p",
        source_event_ids=("e1", "e2"),
        completion_id="c1",
        split="test",
        response_attributes=({"helpfulness": 3.0}, {"helpfulness": 2.0}, {"helpfulness": 1.0}),
        margin=0.5,
        created_at=1700000000.25,
        source_acked_at=1700000001.5,
    )
    base.update(kw)
    return PreferenceRecord(**base)


def test_preference_record_round_trip():
    r = _record()
    assert PreferenceRecord.from_kafka(r.to_kafka()) == r
    assert r.k == 3 and r.chosen == "good" and r.rejected == "bad" and r.is_eval
    assert r.pairs() == [("good", "ok"), ("good", "bad"), ("ok", "bad")]


def test_an_unfinished_reply_travels_with_its_record_and_enters_its_id():
    r = _record(unfinished=(2,))
    back = PreferenceRecord.from_kafka(r.to_kafka())
    assert back == r and back.unfinished == (2,) and back.ends == (True, True, False)
    assert b'"unfinished":[2]' in r.to_kafka()
    assert _record().unfinished == () and PreferenceRecord.from_kafka(_record().to_kafka()).ends == (True,) * 3
    # the same text going on is another response than it ending the turn; no unfinished keeps the old ids
    assert make_record_id(["e1"], ["a", "b"], (1,)) != make_record_id(["e1"], ["a", "b"])
    assert make_record_id(["e1"], ["a", "b"], ()) == make_record_id(["e1"], ["a", "b"])
    for bad in ((3,), (1, 1), (-1,)):
        with pytest.raises(InvalidArgument) as e:
            _record(unfinished=bad)
        assert e.value.field == "unfinished"


def test_wire_is_snake_case_json():
    data = _record().to_kafka()
    assert b'"ranked_responses"' in data and b'"source_acked_at"' in data


def test_model_update_round_trip():
    u = ModelUpdate("rm", "v000003", "published", uri="file:///x", metrics={"accuracy": 0.6}, records_seen=10, at=5.0)
    assert ModelUpdate.from_kafka(u.to_kafka()) == u


def test_record_id_is_deterministic_and_order_sensitive():
    assert make_record_id(["a"], ["x", "y"]) == make_record_id(["a"], ["x", "y"])
    assert make_record_id(["a"], ["x", "y"]) != make_record_id(["a"], ["y", "x"])


def test_prompt_hash_depends_on_project_and_turns():
    p = [ChatMessage("user", "q")]
    assert prompt_hash("a", p) == prompt_hash("a", list(p))
    assert prompt_hash("a", p) != prompt_hash("b", p)
    assert prompt_hash("a", p) != prompt_hash("a", [ChatMessage("assistant", "q")])


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"event_id": "x", "bogus_field": 1}', "schema"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_decode_errors_are_invalid_argument(payload, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        decode_event(payload, FeedbackProto)


def test_decode_accepts_console_producer_json():
    msg = decode_event(b'{"event_id":"e","project":"p","completion_id":"c","choice":{"chosen_index":1}}', FeedbackProto)
    assert msg.WhichOneof("kind") == "choice" and msg.choice.chosen_index == 1
    assert decode_event(encode_event(msg), FeedbackProto) == msg


def test_too_few_responses_rejected():
    with pytest.raises(InvalidArgument, match="ranked_responses"):
        PreferenceRecord.from_proto(_record(ranked_responses=("only",), response_attributes=()).to_proto())


def test_messages_from_dicts_names_index():
    with pytest.raises(InvalidArgument) as e:
        messages_from_dicts([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    assert e.value.field == "messages[1].role"
