"""Every case of the hostile corpus (bench/hostile.py) against a live gateway (HTTP + gRPC, real Kafka and
Redis) in front of a live scorer: each is refused with the client error it expects, naming the field;
nothing answers 5xx / INTERNAL / UNKNOWN, nothing reaches Kafka, and every service is healthy after."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterator

import pytest

from bench.hostile import run_corpus
from gateway.testing import GatewayHarness, read_topic
from services import topics

pytestmark = pytest.mark.integration

pytest.importorskip("torch")

from scorer.config import load_scorer_config  # noqa: E402
from scorer.server import Scorer  # noqa: E402


class ScorerThread:
    """A scorer serving the default reward model (and the default policy, listed but not loaded) on a
    background event loop, as the gateway's OpenAI routes expect."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="scorer-loop", daemon=True)
        self.thread.start()
        cfg = load_scorer_config(overrides={"port": 0, "reward_models": ["reward"], "policy_models": ["policy"],
                                            "policy_preload": False, "discover_models": False}, env={})
        self.scorer = Scorer(cfg)
        self._run(self.scorer.start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(300)

    def close(self) -> None:
        self._run(self.scorer.stop(grace_s=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def scorer() -> Iterator[Scorer]:
    s = ScorerThread()
    try:
        yield s.scorer
    finally:
        s.close()


def test_the_whole_corpus_is_refused_by_name_and_every_service_stays_healthy(kafka_bootstrap, redis_url, scorer,
                                                                                key, project) -> None:
    with GatewayHarness(kafka_bootstrap, redis_url, run_processor=False, scorer_address=scorer.address) as gw:
        out = run_corpus(gateway_http=gw.http_url, gateway_grpc=gw.address, scorer_grpc=scorer.address,
                         api_key=key, project=project)
        written = [r for spec in (topics.COMPLETIONS, topics.FEEDBACK) for r in read_topic(kafka_bootstrap, gw.topic(spec))]
    assert out["malformed_cases"] >= 100 and out["skipped"] == 0, out
    assert out["malformed_internal_errors"] == 0, out["failures"]
    assert out["malformed_unexpected"] == 0, out["failures"]
    assert out["unhealthy_after"] == 0, out["failures"]
    assert written == [], "a hostile case was accepted and written to Kafka"
