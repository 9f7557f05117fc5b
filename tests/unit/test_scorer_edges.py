"""Input validation at the scorer's edges: gRPC requests and OpenAI-compatible bodies."""

from __future__ import annotations

import pytest

from gateway.openai_compat import format_scores, parse_chat_request
from prefstream.events.v1 import events_pb2
from prefstream.scorer.v1 import scorer_pb2
from scorer.domain import BestOfNQuery, RequestLimits, ScoreQuery
from services.errors import InvalidArgument

USER = events_pb2.ChatMessage(role=events_pb2.ROLE_USER, content="hi")


def field_of(fn, *args):
    with pytest.raises(InvalidArgument) as e:
        fn(*args)
    return e.value.field


def test_score_request_validation_names_fields():
    lim = RequestLimits(max_responses=2, max_text_chars=10)
    assert field_of(ScoreQuery.from_proto, scorer_pb2.ScoreRequest(prompt=[USER]), lim) == "responses"
    assert field_of(ScoreQuery.from_proto, scorer_pb2.ScoreRequest(responses=["a", "b", "c"]), lim) == "responses"
    assert field_of(ScoreQuery.from_proto, scorer_pb2.ScoreRequest(responses=["a", "x" * 11]), lim) == "responses[1]"
    no_role = events_pb2.ChatMessage(content="hi")
    assert field_of(ScoreQuery.from_proto, scorer_pb2.ScoreRequest(prompt=[USER, no_role], responses=["a"]), lim) == "prompt[1].role"
    assert field_of(ScoreQuery.from_proto, scorer_pb2.ScoreRequest(responses=["a"], model="no spaces"), lim) == "model"
    q = ScoreQuery.from_proto(scorer_pb2.ScoreRequest(prompt=[USER], responses=["a"], model="reward", request_id="r1"), lim)
    assert (q.prompt[0].role, q.responses, q.model, q.request_id) == ("user", ("a",), "reward", "r1")


def test_best_of_n_request_validation():
    lim = RequestLimits(max_n=4, max_new_tokens=32)
    req = scorer_pb2.BestOfNRequest
    assert field_of(BestOfNQuery.from_proto, req(prompt=[USER]), lim) == "n"
    assert field_of(BestOfNQuery.from_proto, req(prompt=[USER], n=5), lim) == "n"
    assert field_of(BestOfNQuery.from_proto, req(n=2), lim) == "prompt"
    assert field_of(BestOfNQuery.from_proto, req(prompt=[USER], candidates=["a", "b"], n=3), lim) == "n"
    bad_t = req(prompt=[USER], n=2, sampling=scorer_pb2.SamplingParams(temperature=9))
    assert field_of(BestOfNQuery.from_proto, bad_t, lim) == "sampling.temperature"
    bad_m = req(prompt=[USER], n=2, sampling=scorer_pb2.SamplingParams(max_tokens=33))
    assert field_of(BestOfNQuery.from_proto, bad_m, lim) == "sampling.max_tokens"
    dup = req(prompt=[USER], candidates=["a"], criteria=[scorer_pb2.Criterion(model="r"), scorer_pb2.Criterion(model="r")])
    assert field_of(BestOfNQuery.from_proto, dup, lim) == "criteria[1].model"
    # Bare criterion names (weights left at 0) mean equal weights; greedy (temperature 0) is kept.
    ok = BestOfNQuery.from_proto(req(prompt=[USER], n=2, criteria=[scorer_pb2.Criterion(model="a")],
                                     sampling=scorer_pb2.SamplingParams(temperature=0.0)), lim)
    assert ok.criteria[0].weight == 1.0 and ok.sampling.temperature == 0.0 and ok.sampling.top_p is None


def test_chat_request_parsing_and_errors():
    base = {"model": "reward", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    r = parse_chat_request({**base, "n": 2, "temperature": 0.7, "max_completion_tokens": 20, "seed": 3,
                            "store": True, "metadata": {"app": "x"}})
    assert (r.n, r.sampling.temperature, r.sampling.max_tokens, r.sampling.seed, r.store) == (2, 0.7, 20, 3, True)
    assert parse_chat_request({**base, "metadata": {"prefstream.split": "test"}}).metadata == {"prefstream.split": "test"}
    parts = parse_chat_request({**base, "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                                        {"type": "text", "text": "b"}]}]})
    assert parts.messages[0].role == "system" and parts.messages[0].content == "ab"
    streamed = parse_chat_request({**base, "stream": True, "stream_options": {"include_usage": True}, "stop": "\n"})
    assert (streamed.stream, streamed.include_usage, streamed.stop) == (True, True, ("\n",))
    cases = [
        ({"messages": base["messages"]}, "model"),
        ({**base, "messages": []}, "messages"),
        ({**base, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({**base, "n": 0}, "n"),
        ({**base, "n": True}, "n"),
        ({**base, "temperature": "hot"}, "temperature"),
        ({**base, "top_p": 0}, "top_p"),
        ({**base, "stream": "yes"}, "stream"),
        ({**base, "stream_options": {"include_usage": True}}, "stream_options"),
        ({**base, "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({**base, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**base, "stop": 3}, "stop"),
        ({**base, "stop": ["a", ""]}, "stop[1]"),
        ({**base, "tools": [{"type": "function"}]}, "tools"),
        ({**base, "store": "yes"}, "store"),
        ({**base, "metadata": {"a": 1}}, "metadata.a"),
        ({**base, "metadata": {"prefstream.split": "holdout"}}, "metadata.prefstream.split"),
        ({**base, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ]
    for body, field in cases:
        assert field_of(parse_chat_request, body) == field, body


def test_nim_style_content():
    assert format_scores(0.53, {}) == "reward:0.53"
    assert format_scores(0.1, {"helpfulness": 1.2, "correctness": -0.25}) == "helpfulness:1.2,correctness:-0.25"


def test_requests_in_flight_is_the_scaling_signal_and_falls_back_on_errors() -> None:
    """The scorer HPA scales on prefstream_scorer_requests_in_flight: up while an RPC runs, down after,
    whether it succeeded or failed."""
    from scorer.metrics import ScorerMetrics
    from scorer.server import ScorerServicer
    from services.errors import InvalidArgument

    metrics = ScorerMetrics()
    servicer = ScorerServicer(engine=None, metrics=metrics, limits=None, stream_window=1)  # type: ignore[arg-type]
    gauge = lambda: metrics.registry.get_sample_value("prefstream_scorer_requests_in_flight")  # noqa: E731
    with servicer._observe("Score"):
        with servicer._observe("BestOfN"):
            assert gauge() == 2
    assert gauge() == 0
    with pytest.raises(InvalidArgument):
        with servicer._observe("Score"):
            assert gauge() == 1
            raise InvalidArgument("texts", "empty")
    assert gauge() == 0
    assert metrics.registry.get_sample_value("prefstream_scorer_requests_total",
                                             {"method": "Score", "code": "INVALID_ARGUMENT"}) == 1


class _Request(dict):
    headers: dict = {}


class _Scorer:
    """Answers best-of-N and generation with one empty reply, as a policy may sample one."""

    async def best_of_n(self, messages, **kwargs):
        from scorer.domain import BestOfNResult, ModelRef, RankedCandidate

        ranked = tuple(RankedCandidate(index=i, text=t, score=s, per_criterion={"short": s}, tie_break=-s)
                       for i, (t, s) in enumerate((("ok", 1.0), ("a longer reply", 0.0), ("", 1.0))))
        return BestOfNResult(ranked=ranked, reward_models=(ModelRef("reward", "v1"),), policy=ModelRef("policy", "v2"),
                             criteria=("short@v1",))

    async def generate(self, messages, **kwargs):
        from scorer.domain import ModelRef, Usage
        from scorer.generation import GenerateResult, GenerationChoice

        choices = tuple(GenerationChoice(index=i, text=t, finish_reason="stop", completion_tokens=1)
                        for i, t in enumerate(kwargs.get("texts_", ("", "first", " ", "second"))))
        return GenerateResult(choices=choices, model=ModelRef("policy", "v2"), usage=Usage())


def _api(logged: list):
    from gateway.openai_compat import OpenAICompat

    async def log_completion(completion):
        logged.append(completion)
        return "cmpl-1"

    return OpenAICompat(_Scorer(), log_completion)  # type: ignore[arg-type]


def test_a_stored_best_of_n_logs_only_its_replies_with_text_and_keeps_choice_i_as_candidate_i():
    import asyncio
    import json

    from gateway.openai_compat import COMPLETION_ID_HEADER, EMPTY_CANDIDATES_METADATA_KEY

    logged: list = []
    req = parse_chat_request({"model": "policy", "n": 3, "store": True, "messages": [{"role": "user", "content": "hi"}]})
    resp = asyncio.run(_api(logged)._best_of_n(_Request(), req, None))  # type: ignore[arg-type]
    body = json.loads(resp.body)
    assert [c["message"]["content"] for c in body["choices"]] == ["ok", "a longer reply", ""]
    (c,) = logged
    assert c.candidates == ("ok", "a longer reply")
    assert c.metadata[EMPTY_CANDIDATES_METADATA_KEY] == "1"
    assert (c.criteria.scores, c.criteria.tie_break) == ((1.0, 0.0), (-1.0, -0.0))  # scores of the kept ones
    assert resp.headers[COMPLETION_ID_HEADER] == "cmpl-1"


def test_stored_generations_list_empty_choices_last_and_all_empty_is_not_stored():
    import asyncio
    import json

    from gateway.openai_compat import NOT_STORED_HEADER

    logged: list = []
    api = _api(logged)
    req = parse_chat_request({"model": "policy", "n": 4, "store": True, "messages": [{"role": "user", "content": "hi"}]})
    body = json.loads(asyncio.run(api._generate(_Request(), req)).body)  # type: ignore[arg-type]
    assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [(0, "first"), (1, "second"), (2, ""), (3, " ")]
    assert logged[0].candidates == ("first", "second")

    async def empty(messages, **kwargs):
        return await _Scorer().generate(messages, texts_=("", "  "))

    api.scorer.generate = empty  # type: ignore[method-assign]
    resp = asyncio.run(api._generate(_Request(), req))  # type: ignore[arg-type]
    assert len(logged) == 1 and "empty" in resp.headers[NOT_STORED_HEADER]
    assert len(json.loads(resp.body)["choices"]) == 2
