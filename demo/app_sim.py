"""A simulated production app: logs completions, then its users' choices, through the gateway.

Each preference pair from the dataset becomes what a real chat app would send: the prompt with the
two candidates it showed (in random order) via ``LogCompletion``, then the user's choice via
``LogFeedback``, at a configurable rate.  Every acknowledgement is recorded (event id, time), so
the demo can account for every acked event at the end (the event ledger).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from prefstream.events.v1 import events_pb2
from prefstream.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.grpc_server import channel
from services.schemas import PreferenceRecord, ts_to_float


@dataclass
class AppStats:
    completions_acked: int = 0
    feedback_acked: int = 0
    failed: int = 0
    # feedback event id -> ack time (epoch seconds, from the gateway)
    feedback_acks: dict[str, float] = field(default_factory=dict)
    completion_acks: dict[str, float] = field(default_factory=dict)
    # completion event id -> the completion id the gateway assigned
    completion_ids: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def events_acked(self) -> int:
        return self.completions_acked + self.feedback_acked


def completion_and_choice(
    record: PreferenceRecord, *, project: str, rng: random.Random, run_id: str, index: int
) -> tuple[events_pb2.Completion, int]:
    """The completion an app would log for ``record`` (candidates shuffled) and the chosen index."""
    candidates = list(record.ranked_responses[:2])
    flipped = rng.random() < 0.5
    if flipped:
        candidates.reverse()
    completion = events_pb2.Completion(
        event_id=f"demo-{run_id}-c{index}",
        project=project,
        prompt=[m.to_proto() for m in record.prompt],
        candidates=candidates,
        model="smollm2-135m-instruct",
        model_version="demo",
        metadata={"source": "hh-rlhf", "row": str(index)},
    )
    return completion, (1 if flipped else 0)


class SimulatedApp:
    """Replays preference records as live completions + user choices at ``rate`` pairs per second.

    With several gateway addresses (replicas behind one Service in k8s/), pair ``i`` logs its completion
    through replica ``i % G`` and the user's choice through the next one, so the processors must join
    events that entered through different replicas."""

    def __init__(
        self,
        gateway_address: str | Sequence[str],
        records: Sequence[PreferenceRecord],
        *,
        api_key: str | None,
        project: str = "demo",
        rate: float = 10.0,
        concurrency: int = 8,
        seed: int = 0,
        run_id: str | None = None,
    ) -> None:
        self.addresses = [gateway_address] if isinstance(gateway_address, str) else list(gateway_address)
        self.records = list(records)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.project = project
        self.rate = rate
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.stats = AppStats()
        self.done = asyncio.Event()

    async def _one(self, stubs: Sequence[gateway_pb2_grpc.GatewayServiceStub], index: int, record: PreferenceRecord) -> None:
        stub, feedback_stub = stubs[index % len(stubs)], stubs[(index + 1) % len(stubs)]
        completion, chosen = completion_and_choice(record, project=self.project, rng=self.rng, run_id=self.run_id, index=index)
        for attempt in range(5):  # a real app retries transient failures with the same event ids
            try:
                resp = await stub.LogCompletion(
                    gateway_pb2.LogCompletionRequest(completion=completion), metadata=self.metadata, timeout=30
                )
                self.stats.completions_acked += 0 if completion.event_id in self.stats.completion_acks else 1
                self.stats.completion_acks[completion.event_id] = ts_to_float(resp.acked_at) or time.time()
                self.stats.completion_ids[completion.event_id] = resp.completion_id
                feedback = events_pb2.Feedback(
                    event_id=f"demo-{self.run_id}-f{index}",
                    project=self.project,
                    completion_id=resp.completion_id,
                    choice=events_pb2.Choice(chosen_index=chosen),
                    split=events_pb2.SPLIT_TRAIN,
                )
                fresp = await feedback_stub.LogFeedback(
                    gateway_pb2.LogFeedbackRequest(feedback=feedback), metadata=self.metadata, timeout=30
                )
                if feedback.event_id not in self.stats.feedback_acks:
                    self.stats.feedback_acked += 1
                self.stats.feedback_acks[feedback.event_id] = ts_to_float(fresp.acked_at) or time.time()
                return
            except grpc.aio.AioRpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or attempt == 4:
                    self.stats.failed += 1
                    self.stats.errors.append(f"row {index}: {e.code().name}: {e.details()}")
                    return
                await asyncio.sleep(0.5 * (attempt + 1))

    async def run(self) -> AppStats:
        sem = asyncio.Semaphore(self.concurrency)
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        async with contextlib.AsyncExitStack() as channels:
            stubs = [gateway_pb2_grpc.GatewayServiceStub(await channels.enter_async_context(channel(a)))
                     for a in self.addresses]
            tasks = []
            start = time.monotonic()
            for i, rec in enumerate(self.records):
                due = start + i * interval
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await sem.acquire()
                task = asyncio.create_task(self._one(stubs, i, rec))
                task.add_done_callback(lambda _t: sem.release())
                tasks.append(task)
            await asyncio.gather(*tasks)
        self.done.set()
        return self.stats
