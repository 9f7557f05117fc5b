"""A steady best-of-N load on the scorer, recording latency and the version that answered.

The demo (and the freshness benchmark) need to know when each model version first served, and
whether any request failed while versions were being swapped.  Candidates come from the held-out
set, so the load is realistic text of realistic lengths.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    # replica index -> version -> answers it gave with that version (several scorer addresses)
    per_replica: dict[int, dict[str, int]] = field(default_factory=dict)

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
    """Sends best-of-N requests at ``rate`` per second until stopped, round-robin over the scorer
    addresses given (replicas), counting per replica which versions answered."""

    def __init__(
        self,
        scorer_address: str | Sequence[str],
        records: Sequence[PreferenceRecord],
        *,
        rate: float = 4.0,
        n: int = 4,
        model: str = "",
        seed: int = 1,
        timeout_s: float = 30.0,
    ) -> None:
        self.addresses = [scorer_address] if isinstance(scorer_address, str) else list(scorer_address)
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

    async def _one(self, stub: scorer_pb2_grpc.ScorerServiceStub, req: scorer_pb2.BestOfNRequest, replica: int) -> None:
        t0 = time.monotonic()
        try:
            resp = await stub.BestOfN(req, timeout=self.timeout_s)
            version = resp.reward_models[0].version if resp.reward_models else ""
            self.stats.samples.append((time.time(), time.monotonic() - t0, version, True))
            served = self.stats.per_replica.setdefault(replica, {})
            served[version] = served.get(version, 0) + 1
        except grpc.aio.AioRpcError as e:
            self.stats.samples.append((time.time(), time.monotonic() - t0, "", False))
            self.stats.errors.append(f"{e.code().name}: {e.details()}")

    async def run(self) -> LoadStats:
        interval = 1.0 / self.rate
        async with contextlib.AsyncExitStack() as channels:
            stubs = [scorer_pb2_grpc.ScorerServiceStub(await channels.enter_async_context(channel(a)))
                     for a in self.addresses]
            pending: set[asyncio.Task] = set()
            sent = 0
            while not self._stop.is_set():
                replica = sent % len(stubs)
                sent += 1
                req = best_of_n_request(self.records, self.rng, self.n, self.model)
                task = asyncio.create_task(self._one(stubs[replica], req, replica))
                pending.add(task)
                task.add_done_callback(pending.discard)
                try:
                    await asyncio.wait_for(self._stop.wait(), interval)
                except asyncio.TimeoutError:
                    pass
            if pending:
                await asyncio.gather(*pending)
        return self.stats


class ReplicaWatch:
    """Polls every scorer replica's admin ListModels and records when each first served each version
    of ``model`` (publish -> every replica serving it: the convergence of a scaled-out scorer)."""

    def __init__(self, addresses: Sequence[str], model: str, *, every_s: float = 0.2) -> None:
        self.addresses = list(addresses)
        self.model = model
        self.every_s = every_s
        self.first_seen: dict[int, dict[str, float]] = {i: {} for i in range(len(self.addresses))}
        self.errors = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def _poll(self, replica: int, client) -> None:
        try:
            models = await client.list_models()
        except Exception:  # noqa: BLE001 - a replica busy swapping may time out; the next poll tells
            self.errors += 1
            return
        for m in models:
            if m.name == self.model and m.serving_version:
                self.first_seen[replica].setdefault(m.serving_version, time.time())

    async def run(self) -> dict[int, dict[str, float]]:
        from scorer.client import ScorerClient

        clients = [ScorerClient(a, timeout_s=5.0) for a in self.addresses]
        try:
            while not self._stop.is_set():
                await asyncio.gather(*(self._poll(i, c) for i, c in enumerate(clients)))
                try:
                    await asyncio.wait_for(self._stop.wait(), self.every_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            for c in clients:
                await c.close()
        return self.first_seen
