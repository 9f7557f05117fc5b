"""The hostile corpus (bench/hostile.py) is well formed, and its JSON cases for the ingest routes are
refused by the gateway's own parsing and validation naming the expected field (no server needed; the
integration test sends every case to live services)."""

from __future__ import annotations

from collections import Counter

import grpc
from bench import hostile
from bench.hostile import CASES, Repeat, render
from gateway.edge import completion_item, feedback_item
from gateway.validation import Limits, parse_json
from prefstream.gateway.v1.gateway_pb2 import LogCompletionRequest, LogFeedbackRequest
from services.errors import InvalidArgument

LIMITS = Limits()


def test_the_corpus_has_over_100_named_cases_each_with_an_expectation() -> None:
    assert len(CASES) >= 100
    names = Counter(c.name for c in CASES)
    assert not [n for n, k in names.items() if k > 1], "case names must be unique"
    for case in CASES:
        assert isinstance(case.expect, hostile.Expect), case.name
        assert case.expect.code in grpc.StatusCode.__members__, case.name
        assert case.expect.code not in hostile.SERVER_FAULTS, case.name
        if case.service == "gateway_http" and case.expect.event is None:
            assert all(400 <= s < 500 for s in case.expect.http_statuses()), case.name
        if case.expect.code == "INVALID_ARGUMENT" and not case.expect.http:  # not the HTTP server's own answer
            assert case.expect.field, f"{case.name}: a refusal must name the field"


def test_every_route_and_method_is_attacked() -> None:
    per_target = Counter(c.target for c in CASES)
    for target in (hostile.COMPLETIONS, hostile.FEEDBACK, hostile.BATCH, hostile.CHAT, *hostile.REQUEST_TYPES):
        assert per_target[target] >= 5, target
    assert {c.service for c in CASES} == {"gateway_http", "gateway_grpc", "scorer_grpc"}
    assert len(hostile.select(hostile.WAS_500)) == 9


def test_every_payload_renders() -> None:
    for case in CASES:
        if isinstance(case.payload, Repeat):
            continue  # tens of MiB: built only when sent
        for frame in case.payload if isinstance(case.payload, list) else [case.payload]:
            assert isinstance(render(frame, case.target, "proj-1"), bytes), case.name


_INGEST = {hostile.COMPLETIONS: (LogCompletionRequest, lambda r: completion_item(r.completion, LIMITS)),
           hostile.FEEDBACK: (LogFeedbackRequest, lambda r: feedback_item(r.feedback, LIMITS))}


def test_ingest_json_cases_are_refused_by_parsing_and_validation_naming_the_field() -> None:
    cases = [c for c in CASES if c.target in _INGEST and c.expect.code == "INVALID_ARGUMENT" and not c.expect.http
             and c.auth and not c.headers]
    assert len(cases) >= 100
    wrong = []
    for case in cases:
        cls, to_item = _INGEST[case.target]
        try:
            error = to_item(parse_json(render(case.payload, case.target, "proj-1"), cls)).event
        except InvalidArgument as e:
            error = e
        if not (isinstance(error, InvalidArgument) and error.field == case.expect.field
                and case.expect.words in error.message):
            wrong.append(f"{case.name}: {error}")
    assert not wrong, wrong
