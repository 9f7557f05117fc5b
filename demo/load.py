"""A steady best-of-N load on the scorer, recording latency and the version that answered.

The demo (and the freshness benchmark) need to know when each model version first served, and
whether any request failed while versions were being swapped.  Candidates come from the held-out
set, so the load is realistic text of realistic lengths.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from prefstream.scorer.v1 import scorer_pb2, scorer_pb2_grpc
from services.grpc_server import channel
from services.schemas import PreferenceRecord


@dataclass
class LoadStats:
    # (wall time, latency seconds, version, ok)
    samples: list[tuple[float, float, str, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for s in self.samples if not s[3])

    @property
    def ok(self) -> int:
        return sum(1 for s in self.samples if s[3])

    def served(self) -> list[tuple[float, str]]:
        return [(t, v) for t, _, v, ok in self.samples if ok]


def best_of_n_request(records: Sequence[PreferenceRecord], rng: random.Random, n: int, model: str) -> scorer_pb2.BestOfNRequest:
    """One prompt with n candidates: its own chosen/rejected plus responses from other prompts."""
    base = rng.choice(records)
    candidates = list(base.ranked_responses)
    while len(candidates) < n:
        candidates.append(rng.choice(records).ranked_responses[rng.randrange(2)])
    rng.shuffle(candidates)
    criteria = [scorer_pb2.Criterion(model=model, weight=1.0)] if model else []
    return scorer_pb2.BestOfNRequest(
        prompt=[m.to_proto() for m in base.prompt], candidates=candidates[:n], criteria=criteria
    )


class ScorerLoad:
    """Sends best-of-N requests at ``rate`` per second until stopped."""

    def __init__(
        self,
        scorer_address: str,
        records: Sequence[PreferenceRecord],
        *,
        rate: float = 4.0,
        n: int = 4,
        model: str = "",
        seed: int = 1,
        timeout_s: float = 30.0,
    ) -> None:
        self.address = scorer_address
        self.records = list(records)
        self.rate = rate
        self.n = n
        self.model = model
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.stats = LoadStats()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def _one(self, stub: scorer_pb2_grpc.ScorerServiceStub, req: scorer_pb2.BestOfNRequest) -> None:
        t0 = time.monotonic()
        try:
            resp = await stub.BestOfN(req, timeout=self.timeout_s)
            version = resp.reward_models[0].version if resp.reward_models else ""
            self.stats.samples.append((time.time(), time.monotonic() - t0, version, True))
        except grpc.aio.AioRpcError as e:
            self.stats.samples.append((time.time(), time.monotonic() - t0, "", False))
            self.stats.errors.append(f"{e.code().name}: {e.details()}")

    async def run(self) -> LoadStats:
        interval = 1.0 / self.rate
        async with channel(self.address) as ch:
            stub = scorer_pb2_grpc.ScorerServiceStub(ch)
            pending: set[asyncio.Task] = set()
            while not self._stop.is_set():
                task = asyncio.create_task(self._one(stub, best_of_n_request(self.records, self.rng, self.n, self.model)))
                pending.add(task)
                task.add_done_callback(pending.discard)
                try:
                    await asyncio.wait_for(self._stop.wait(), interval)
                except asyncio.TimeoutError:
                    pass
            if pending:
                await asyncio.gather(*pending)
        return self.stats
