"""Property-based checks of the gateway's edge (hypothesis): whatever arrives, the answer is an accepted
event that round-trips unchanged or a refusal that names a field, never an unexpected exception (an
INTERNAL / HTTP 500).  The hand-written hostile corpus lives in test_gateway.py and test_codec-style
tests; these generate thousands more."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.edge import completion_item, feedback_item
from gateway.validation import Limits, completion_from_proto, feedback_from_proto, parse_json
from prefstream.events.v1 import events_pb2
from prefstream.gateway.v1.gateway_pb2 import LogCompletionRequest, LogFeedbackRequest
from services.errors import InvalidArgument, PrefstreamError

LIMITS = Limits()
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text a person, a buggy client or an attacker sends: any code point (surrogates and NUL included).
text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
scalars = st.none() | st.booleans() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80) | \
    st.floats(allow_nan=True, allow_infinity=True) | text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=20)
# Completion-shaped documents: the right keys with values of any type, so the validators' branches run.
completion_docs = st.fixed_dictionaries({}, optional={
    "event_id": json_values | text, "project": json_values | st.sampled_from(["p", "proj-1", "", "a" * 200]),
    "prompt": st.lists(st.fixed_dictionaries({}, optional={"role": json_values | st.sampled_from(
        ["user", "assistant", "system", "ROLE_USER", "nobody"]), "content": json_values | text}), max_size=3) | json_values,
    "candidates": st.lists(text | json_values, max_size=4) | json_values,
    "model": json_values | text, "metadata": st.dictionaries(text, text | json_values, max_size=3) | json_values,
    "split": json_values | st.sampled_from(["SPLIT_TRAIN", "SPLIT_TEST", "test", 1, 7]),
})
# ... and well-formed ones (any Unicode text in the right places), so acceptance and the round trip run too.
words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30).filter(str.strip)
valid_completion_docs = st.fixed_dictionaries({
    "project": st.sampled_from(["p", "proj-1", "a.b_c"]),
    "prompt": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                              "content": words}), min_size=1, max_size=3),
    "candidates": st.lists(words, min_size=1, max_size=4),
}, optional={"metadata": st.dictionaries(st.text("abcxyz_", min_size=1, max_size=8), words, max_size=3),
             "split": st.sampled_from(["SPLIT_TRAIN", "SPLIT_TEST"]),
             "model": st.text("abcdefghijklmnopqrstuvwxyz0123456789-._:/", min_size=1, max_size=40)})
feedback_docs = st.fixed_dictionaries({}, optional={
    "event_id": json_values | text, "project": st.sampled_from(["p", ""]) | json_values,
    "completion_id": json_values | text,
    "choice": st.fixed_dictionaries({}, optional={"chosen_index": json_values | st.integers(-3, 20)}) | json_values,
    "ranking": st.fixed_dictionaries({}, optional={"order": st.lists(st.integers(-2, 6), max_size=6) | json_values}),
    "thumbs": st.fixed_dictionaries({}, optional={"index": json_values | st.integers(-2, 6), "up": json_values}),
    "inline": st.fixed_dictionaries({}, optional={"prompt": json_values, "outputs": st.lists(text, max_size=3) | json_values}),
})


valid_feedback_docs = st.fixed_dictionaries({
    "project": st.sampled_from(["p", "proj-1"]),
    "inline": st.fixed_dictionaries({
        "prompt": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": words}), min_size=1, max_size=2),
        "outputs": st.lists(words, min_size=2, max_size=4, unique=True)}),
    "choice": st.fixed_dictionaries({"chosen_index": st.integers(0, 1)}),
})


def _refusal_names_a_field(err: BaseException) -> None:
    assert isinstance(err, PrefstreamError), f"{type(err).__name__}: {err}"
    assert err.field, f"a refusal without a field: {err}"
    assert err.grpc_code.name in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "PERMISSION_DENIED"), err.grpc_code


def _body(doc: object, key: str) -> bytes:
    # NaN, infinities and lone surrogates in JSON text, as a client library would happily send them
    return json.dumps({key: doc}, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


@SETTINGS
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()))
def test_any_body_parses_or_is_refused_by_name(data: bytes) -> None:
    try:
        parse_json(data, LogCompletionRequest)
    except InvalidArgument as e:
        _refusal_names_a_field(e)


def _accepted_and_round_trips_or_refused_by_name(body: bytes, request_cls, item_of, validate) -> None:
    try:
        req = parse_json(body, request_cls)
    except InvalidArgument as e:
        _refusal_names_a_field(e)
        return
    item = item_of(req)
    if isinstance(item.event, PrefstreamError):
        _refusal_names_a_field(item.event)
        return
    # accepted: its wire form validates again to the very same event
    assert validate(item.event.to_proto(), LIMITS) == item.event


@SETTINGS
@given(completion_docs | valid_completion_docs)
def test_a_completion_is_accepted_and_round_trips_or_is_refused_by_name(doc: dict) -> None:
    _accepted_and_round_trips_or_refused_by_name(_body(doc, "completion"), LogCompletionRequest,
                                                 lambda r: completion_item(r.completion, LIMITS), completion_from_proto)


@SETTINGS
@given(feedback_docs | valid_feedback_docs)
def test_feedback_is_accepted_and_round_trips_or_is_refused_by_name(doc: dict) -> None:
    _accepted_and_round_trips_or_refused_by_name(_body(doc, "feedback"), LogFeedbackRequest,
                                                 lambda r: feedback_item(r.feedback, LIMITS), feedback_from_proto)


@settings(max_examples=100, deadline=None)
@given(valid_completion_docs, valid_feedback_docs)
def test_well_formed_events_are_accepted(completion: dict, feedback: dict) -> None:
    """The round trips above are not vacuous: well-formed documents get through (whatever their text)."""
    c = completion_item(parse_json(_body(completion, "completion"), LogCompletionRequest).completion, LIMITS)
    f = feedback_item(parse_json(_body(feedback, "feedback"), LogFeedbackRequest).feedback, LIMITS)
    assert not isinstance(c.event, PrefstreamError), c.event
    assert not isinstance(f.event, PrefstreamError), f.event


def test_the_properties_reach_both_outcomes() -> None:
    """The generators are not vacuous: a plain completion is accepted, a wrong type is refused."""
    ok = parse_json(_body({"project": "p", "prompt": [{"role": "user", "content": "hi"}], "candidates": ["a", "b"]},
                          "completion"), LogCompletionRequest)
    assert not isinstance(completion_item(ok.completion, LIMITS).event, PrefstreamError)
    bad = completion_item(events_pb2.Completion(project="p"), LIMITS).event
    assert isinstance(bad, PrefstreamError) and bad.field
