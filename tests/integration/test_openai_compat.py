"""The OpenAI-compatible routes, driven by the real ``openai`` client against a real scorer over gRPC."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import threading
from typing import Any, Iterator

import pytest
from aiohttp import web

from gateway.openai_compat import COMPLETION_ID_HEADER, add_routes
from scorer.client import ScorerClient
from scorer.config import load_scorer_config
from scorer.server import Scorer
from services.schemas import ChatMessage

pytestmark = pytest.mark.integration

PROMPT = [{"role": "user", "content": "How do I keep basil alive indoors?"}]
ANSWER = "Give it a sunny windowsill, water when the top soil is dry, and pinch off flower buds."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Harness:
    """A scorer and an aiohttp app with the routes mounted, on a background event loop."""

    def __init__(self, policy: bool) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.logged: list[Any] = []
        self.http_port = _free_port()
        overrides = {"port": 0, "reward_models": ["reward"], "policy_models": ["policy"] if policy else [],
                     "max_new_tokens": 32, "default_new_tokens": 12}
        self.scorer = Scorer(load_scorer_config(overrides=overrides, env={}))
        self.run(self._start())

    def run(self, coro: Any, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _log(self, completion: Any) -> str:
        self.logged.append(completion)
        return f"cmp_test{len(self.logged)}"

    async def _start(self) -> None:
        await self.scorer.start()
        self.client = ScorerClient(self.scorer.address)
        app = web.Application()
        add_routes(app, self.client, self._log)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.http_port).start()

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.client.close()
        await self.scorer.stop(grace_s=1)

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    has_policy = importlib.util.find_spec("services.policy_model") is not None
    h = Harness(policy=has_policy)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def openai_client(harness: Harness):
    import openai

    return openai.OpenAI(base_url=harness.base_url, api_key="psk_test", max_retries=0, timeout=300)


def test_reward_model_scoring_answers_like_nim(harness: Harness, openai_client: Any) -> None:
    resp = openai_client.chat.completions.create(
        model="reward", messages=[*PROMPT, {"role": "assistant", "content": ANSWER}],
    )
    content = resp.choices[0].message.content
    assert content.startswith("reward:")
    direct = harness.run(harness.client.score(PROMPT, [ANSWER]))
    assert float(content.split(":", 1)[1]) == pytest.approx(direct.rewards[0], abs=1e-5)
    assert resp.model == "reward"
    assert resp.model_extra["model_version"] == "base"
    # as NIM clients read it: the scores as logprobs, one entry per score
    scored = {e.token: e.logprob for e in resp.choices[0].logprobs.content}
    assert scored["reward"] == pytest.approx(direct.rewards[0], abs=1e-5)
    # usage counts the tokens the reward model read (the conversation as one sequence), as the scorer does
    tokens = len(harness.scorer.engine.serving("reward").runner.encode(tuple(ChatMessage(**m) for m in PROMPT), [ANSWER])[0])
    assert direct.input_tokens == tokens > 10
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (tokens, 0, tokens)


def test_models_lists_served_models(openai_client: Any) -> None:
    ids = {m.id: m for m in openai_client.models.list().data}
    assert "reward" in ids
    assert ids["reward"].model_extra["kind"] == "reward"


def test_errors_use_openai_shape_and_status(openai_client: Any) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        openai_client.chat.completions.create(model="no-such-model", messages=PROMPT)
    assert "no-such-model" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="reward", messages=PROMPT)  # no assistant turn to score
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="reward", messages=PROMPT, temperature=7)
    assert e.value.body["param"] == "temperature"


def test_best_of_n_from_the_policy_ranked_and_stored(harness: Harness, openai_client: Any) -> None:
    if importlib.util.find_spec("services.policy_model") is None:
        pytest.skip("services.policy_model is not in this checkout yet")
    raw = openai_client.chat.completions.with_raw_response.create(
        model="policy", messages=PROMPT, n=3, temperature=0.9, max_tokens=12, seed=7, store=True,
        metadata={"app": "test"}, extra_headers={"op-criteria": '["reward"]'},
    )
    resp = raw.parse()
    assert len(resp.choices) == 3
    scores = [c.model_extra["score"] for c in resp.choices]
    assert scores == sorted(scores, reverse=True)  # best first
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.model_extra["criteria_scores"]["reward"] == [c.model_extra["criteria_scores"]["reward"] for c in resp.choices]
    # Stored: the logged candidates are the choices in the order shown, and the id refers to it.
    assert resp.id == raw.headers[COMPLETION_ID_HEADER] == f"cmp_test{len(harness.logged)}"
    logged = harness.logged[-1]
    assert list(logged.candidates) == [c.message.content for c in resp.choices]
    assert logged.metadata["app"] == "test" and logged.model == "policy"
    # The rewards reported are what the reward model gives those texts.
    direct = harness.run(harness.client.score(PROMPT, list(logged.candidates)))
    assert direct.rewards == pytest.approx(resp.model_extra["criteria_scores"]["reward"], abs=1e-5)
    # Real token counts of the sampling: 3 candidates of at most 12 tokens each.
    assert resp.usage.prompt_tokens > 0 and 3 <= resp.usage.completion_tokens <= 36
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def _policy_or_skip() -> None:
    if importlib.util.find_spec("services.policy_model") is None:
        pytest.skip("services.policy_model is not in this checkout yet")


def test_plain_generation_is_seeded_and_counts_tokens(openai_client: Any) -> None:
    _policy_or_skip()
    kw = dict(model="policy", messages=PROMPT, max_tokens=12, temperature=0.9, seed=5)
    a = openai_client.chat.completions.create(**kw)
    b = openai_client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same version
    assert a.choices[0].message.content
    assert a.choices[0].finish_reason in ("stop", "length")
    assert a.model_extra["model_version"] == "base" and a.system_fingerprint == "policy@base"
    assert a.usage.prompt_tokens > 5 and 1 <= a.usage.completion_tokens <= 12
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.usage == b.usage
    short = openai_client.chat.completions.create(model="policy", messages=PROMPT, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_stop_cuts_the_generation(openai_client: Any) -> None:
    _policy_or_skip()
    full = openai_client.chat.completions.create(model="policy", messages=PROMPT, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    words = text.split()
    assert len(words) > 3
    stop = words[2]
    cut = openai_client.chat.completions.create(model="policy", messages=PROMPT, max_tokens=24, temperature=0,
                                                stop=[stop, "@@@"])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens


def test_streaming_matches_the_unary_answer(openai_client: Any) -> None:
    _policy_or_skip()
    kw = dict(model="policy", messages=PROMPT, max_tokens=12, temperature=0.9, seed=9)
    unary = openai_client.chat.completions.create(**kw)
    chunks = list(openai_client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1  # arrived in pieces
    assert "".join(content) == unary.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [unary.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == unary.usage
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage: no usage chunk; n choices each get their role, content and finish.
    plain = list(openai_client.chat.completions.create(**kw, n=2, stream=True))
    assert all(c.usage is None and c.choices for c in plain)
    for i in (0, 1):
        mine = [c.choices[0] for c in plain if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason in ("stop", "length")


def test_generation_errors_name_the_field(openai_client: Any) -> None:
    _policy_or_skip()
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="policy", messages=PROMPT, stop=["a", "b", "c", "d", "e"])
    assert e.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="policy", messages=PROMPT, max_tokens=33)
    assert e.value.body["param"] == "sampling.max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="policy", messages=PROMPT, stream=True,
                                              extra_headers={"op-criteria": "reward"})
    assert e.value.body["param"] == "stream"
