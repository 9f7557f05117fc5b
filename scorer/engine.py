"""Model slots and the atomic swap: which loaded model answers each request, and when it may be freed.

Why it exists: checkpoints change while requests are in flight.  Each served model name points at one
:class:`ModelSlot` (a loaded model, its version, its own dynamic batcher).  A request takes a
reference to the live slot when it starts and keeps it until its last batch is done, so the version
that tokenized a request is the version that scores it and the version it reports.  Installing a new
slot replaces one dict entry on the event loop (atomic for every later request); the old slot is
retired: it finishes what it holds, its batcher drains, then its weights are freed.  Nothing fails
during a swap and no request mixes two versions.

The engine also runs requests: Score (tokenize off the loop, batch, forward in the model thread),
best-of-N (optionally sample candidates from a policy slot, score them with every criterion, combine)
and generation (the prompt is tokenized off the loop, then the policy's decoder thread decodes it with
the other requests in flight, scorer/decoding.py, and the loop awaits its future; streamed text deltas
cross back to the event loop through a queue, and a client that goes away stops its rows at the next
step).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, Sequence

from scorer.batcher import BatchLimits, DynamicBatcher
from scorer.bestofn import Criterion, combine, empties_last, rank
from scorer.config import ScorerConfig
from scorer.criteria import NamedCriteria, per_reply
from scorer.decoding import DecodeParams, Decoded, OnDelta
from scorer.domain import (
    BestOfNQuery,
    BestOfNResult,
    ModelRef,
    RankedCandidate,
    ResponseScore,
    SamplingParams,
    ScoreQuery,
    ScoreResult,
    Usage,
)
from scorer.generation import GenerateBatchQuery, GenerateChunk, GenerateQuery, GenerateResult, GenerationChoice
from scorer.metrics import ScorerMetrics
from services.criteria_eval import judge_messages
from services.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.kinds import ModelKind
from services.schemas import ChatMessage

log = logging.getLogger(__name__)

#: Sampling settings when a generation request leaves them unset (OpenAI's defaults are 1 / 1; a small
#: policy rambles less at 0.7).
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 1.0


class RewardRunner(Protocol):
    """A loaded reward model, as the engine uses it (see scorer/runners.py)."""

    attribute_names: tuple[str, ...]
    #: the dtype the model runs in ("float32", "bfloat16", "float16"); rewards are fp32 regardless
    dtype: str

    def encode(self, prompt: Sequence[ChatMessage], responses: Sequence[str]) -> list[Any]:
        """Tokenize (prompt, response) pairs; each result has ``len()`` = its token count."""

    def run_batch(self, encodings: list[Any]) -> list[tuple[float, dict[str, float]]]:
        """(reward, attributes) per encoding; called only from the model thread."""

    def close(self) -> None: ...


class PolicyRunner(Protocol):
    dtype: str

    def prompt_ids(self, prompt: Sequence[ChatMessage]) -> list[int]:
        """The prompt through the policy's chat template, as token ids (called on the tokenize thread)."""

    def submit(self, prompt_ids: Sequence[int], params: DecodeParams, on_delta: OnDelta | None = None,
               cancelled: Callable[[], bool] | None = None) -> concurrent.futures.Future:
        """Queue one request on the policy's decoder (scorer/decoding.py) and return at once; the future
        gives its Decoded (completions with token counts).  ``on_delta`` is called on the decoder thread;
        ``cancelled`` is polled there between steps."""

    def submit_group(self, requests: Sequence[tuple[Sequence[int], DecodeParams]]) -> list[concurrent.futures.Future]:
        """Queue requests that decode as one batch of their own, in order (BatchDecoder.submit_group)."""

    def yes_probability(self, conversations: Sequence[Sequence[ChatMessage]]) -> list[float]:
        """A judge's P(yes) after each conversation (blocking; called on the judge thread)."""

    def close(self) -> None: ...


@dataclass(eq=False)
class ModelSlot:
    """One loaded version of one model name, with the requests currently holding it."""

    name: str
    kind: ModelKind
    version: str
    uri: str
    runner: Any
    batcher: DynamicBatcher | None = None
    loaded_at: float = field(default_factory=time.time)
    refs: int = 0
    retired: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def dtype(self) -> str:
        return str(self.runner.dtype)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version)


class ServingEngine:
    """Holds the served models (one live slot per name) and runs requests on them.

    :meth:`install` swaps a model in atomically.  (Not to be confused with the trainer's engine, which
    owns one model being trained.)
    """

    def __init__(
        self,
        cfg: ScorerConfig,
        metrics: ScorerMetrics,
        *,
        infer_executor: concurrent.futures.Executor,
        tokenize_executor: concurrent.futures.Executor,
        judge_executor: concurrent.futures.Executor,
        infer_workers: int = 1,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._infer = infer_executor
        self._tokenize = tokenize_executor
        self._judge = judge_executor
        self._live: dict[str, ModelSlot] = {}
        self._retiring: set[asyncio.Task] = set()
        #: per reward model name, a retired (drained) runner kept for the next in-place reload
        self._spares: dict[str, Any] = {}
        self._listeners: list[Callable[[ModelSlot], None]] = []
        #: Named criteria for best-of-N; the server gives it the criteria store when it has Redis.
        self.criteria = NamedCriteria(None, holder=f"scorer-{os.getpid()}")
        #: Called to load a model on first use (the policy, by default); set by the model manager.
        self.demand_loader: Callable[[str, ModelKind], Awaitable[None]] | None = None
        self.limits = BatchLimits(
            max_batch_tokens=cfg.max_batch_tokens,
            max_batch_size=cfg.max_batch_size,
            max_wait_ms=cfg.max_wait_ms,
            bucket_width=cfg.bucket_width,
            max_queue=cfg.max_queue,
            max_pad_ratio=cfg.max_pad_ratio,
            max_concurrent_batches=infer_workers,
        )

    # ------------------------------------------------------------------------------ slots & swap

    def serving(self, name: str) -> ModelSlot | None:
        return self._live.get(name)

    def served(self, kind: ModelKind | None = None) -> list[ModelSlot]:
        return [s for s in self._live.values() if kind is None or s.kind == kind]

    def on_install(self, listener: Callable[[ModelSlot], None]) -> None:
        """``listener(slot)`` runs on the event loop after every install (health, logs)."""
        self._listeners.append(listener)

    def new_slot(self, name: str, kind: ModelKind, version: str, uri: str, runner: Any) -> ModelSlot:
        """Wrap a loaded runner (reward models get their own batcher). Call on the event loop."""
        batcher = None
        if kind == ModelKind.REWARD:
            batcher = DynamicBatcher(
                runner.run_batch,
                executor=self._infer,
                limits=self.limits,
                observer=self.metrics.batch_observer(name),
                name=f"{name}@{version}",
            )
        return ModelSlot(name=name, kind=kind, version=version, uri=uri, runner=runner, batcher=batcher)

    def install(self, slot: ModelSlot) -> ModelSlot | None:
        """Make ``slot`` the live one for its name; retire (drain, then free) the previous one.

        Runs on the event loop, so the dict assignment is atomic with respect to every handler:
        requests that started before keep their reference to the old slot, later ones get the new.
        """
        old = self._live.get(slot.name)
        self._live[slot.name] = slot
        self.metrics.set_serving(slot.name, slot.kind, slot.version, slot.dtype)
        log.info("serving %s %s version %s (%s) in %s", slot.kind, slot.name, slot.version, slot.uri or "base", slot.dtype)
        for listener in self._listeners:
            listener(slot)
        if old is not None and old is not slot:
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return old

    async def discard(self, slot: ModelSlot) -> None:
        """Free a slot that was loaded but never installed (e.g. failed warm-up)."""
        await self._retire(slot)

    async def _retire(self, slot: ModelSlot) -> None:
        slot.retired = True
        if slot.refs > 0:
            try:
                await asyncio.wait_for(slot._idle.wait(), timeout=self.cfg.drain_timeout_s)
            except TimeoutError:
                log.warning("%s@%s still had %d requests after %.0fs; freeing anyway",
                            slot.name, slot.version, slot.refs, self.cfg.drain_timeout_s)
        if slot.batcher is not None:
            await slot.batcher.close()
        if self.cfg.swap_in_place and slot.kind == ModelKind.REWARD and getattr(slot.runner, "signature", ""):
            # Drained: nothing uses it any more.  Kept for the next version's weights (scorer/swap.py).
            previous = self._spares.pop(slot.name, None)
            self._spares[slot.name] = slot.runner
            if previous is not None:
                await asyncio.get_running_loop().run_in_executor(self._infer, previous.close)
            log.info("retired %s %s version %s (kept for the next swap)", slot.kind, slot.name, slot.version)
            return
        await asyncio.get_running_loop().run_in_executor(self._infer, slot.runner.close)
        log.info("freed %s %s version %s", slot.kind, slot.name, slot.version)

    def take_spare(self, name: str) -> Any | None:
        """The retired runner kept for ``name`` (now the caller's to reload or close), or None."""
        return self._spares.pop(name, None)

    def _acquire(self, name: str, kind: ModelKind) -> ModelSlot:
        slot = self._live.get(name)
        if slot is None or slot.kind != kind:
            raise self._missing(name, kind)
        slot.refs += 1
        slot._idle.clear()
        return slot

    def _release(self, slot: ModelSlot) -> None:
        slot.refs -= 1
        if slot.refs == 0:
            slot._idle.set()

    def _missing(self, name: str, kind: ModelKind) -> Exception:
        names = sorted(s.name for s in self._live.values() if s.kind == kind)
        if kind == ModelKind.REWARD and name in self.cfg.reward_models:
            return Unavailable(f"reward model {name!r} is still loading; retry shortly")
        if kind == ModelKind.POLICY and name in self.cfg.policy_models:
            return Unavailable(f"policy {name!r} is still loading; retry shortly")
        return NotFound(f"{kind} model {name!r} is not served here; served {kind} models: {', '.join(names) or 'none'}")

    async def close(self) -> None:
        """Retire every slot (drain in-flight work, free weights)."""
        slots = list(self._live.values())
        self._live.clear()
        await asyncio.gather(*(self._retire(s) for s in slots), return_exceptions=True)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        spares, self._spares = list(self._spares.values()), {}
        for spare in spares:
            spare.close()

    # ------------------------------------------------------------------------------ requests

    async def score(self, query: ScoreQuery) -> ScoreResult:
        """Rewards (and attributes) for each response, from one version of the requested model."""
        name = query.model or self.cfg.default_reward_model
        slot = self._acquire(name, ModelKind.REWARD)
        try:
            loop = asyncio.get_running_loop()
            encodings = await loop.run_in_executor(self._tokenize, slot.runner.encode, query.prompt, query.responses)
            outputs = await slot.batcher.submit([(e, max(1, len(e))) for e in encodings])
        finally:
            self._release(slot)
        scores = tuple(ResponseScore(i, float(r), dict(attrs)) for i, (r, attrs) in enumerate(outputs))
        return ScoreResult(scores=scores, model=slot.ref, request_id=query.request_id,
                           input_tokens=sum(len(e) for e in encodings))

    async def _acquire_policy(self, name: str, where: str) -> ModelSlot:
        """The live slot of policy ``name`` (default: the first policy), loaded on first use; acquired."""
        name = name or self.cfg.default_policy_model or ""
        if not name:
            raise FailedPrecondition("this scorer has no policy model (policy_models is empty); pass candidates instead")
        live = self._live.get(name)
        if live is not None and live.kind == ModelKind.REWARD:
            policies = sorted(s.name for s in self._live.values() if s.kind == ModelKind.POLICY)
            raise InvalidArgument(where, f"{name!r} is a reward model and cannot generate; name a policy "
                                         f"({', '.join(policies) or 'none served'})")
        if live is None and name in self.cfg.policy_models and self.demand_loader is not None:
            await self.demand_loader(name, ModelKind.POLICY)
        return self._acquire(name, ModelKind.POLICY)

    def _decode_params(self, params: SamplingParams, n: int, stop: tuple[str, ...] = ()) -> DecodeParams:
        return DecodeParams(
            n=n,
            temperature=DEFAULT_TEMPERATURE if params.temperature is None else params.temperature,
            top_p=DEFAULT_TOP_P if params.top_p is None else params.top_p,
            max_tokens=params.max_tokens or self.cfg.default_new_tokens,
            seed=params.seed,
            stop=stop,
        )

    async def _sample(self, slot: ModelSlot, prompt: Sequence[ChatMessage], params: DecodeParams,
                      on_delta: OnDelta | None = None, cancelled: Callable[[], bool] | None = None) -> Decoded:
        """Decode one request on the policy's decoder thread and await it (the caller holds ``slot``).

        No thread waits for the decoder: the event loop awaits its future.  A request whose caller is
        cancelled (the client went away) leaves the running batch at the decoder's next step."""
        t0 = time.perf_counter()
        abandoned = threading.Event()

        def stopped() -> bool:  # decoder thread
            return abandoned.is_set() or (cancelled is not None and cancelled())

        try:
            ids = await asyncio.get_running_loop().run_in_executor(self._tokenize, slot.runner.prompt_ids, list(prompt))
            future = slot.runner.submit(ids, params, on_delta=on_delta, cancelled=stopped)
            try:
                return await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                abandoned.set()
                raise
        finally:
            self.metrics.generation_seconds.labels(slot.name).observe(time.perf_counter() - t0)

    async def generate(self, prompt: Sequence[ChatMessage], n: int, params: SamplingParams,
                       policy: str = "") -> tuple[list[str], ModelRef, Usage]:
        """Sample ``n`` completions from the policy (best-of-N candidates), with their token counts."""
        slot = await self._acquire_policy(policy, "policy_model")
        try:
            decoded = await self._sample(slot, prompt, self._decode_params(params, n))
        finally:
            self._release(slot)
        return decoded.texts, slot.ref, Usage(decoded.prompt_tokens, decoded.completion_tokens)

    async def generate_text(self, query: GenerateQuery) -> GenerateResult:
        """Plain generation: every completion of the request from one policy version."""
        slot = await self._acquire_policy(query.model, "model")
        try:
            decoded = await self._sample(slot, query.messages, self._decode_params(query.sampling, query.n, query.stop))
        finally:
            self._release(slot)
        return _generate_result(query, decoded, slot.ref)

    async def generate_batch(self, batch: GenerateBatchQuery) -> list[GenerateResult]:
        """Every request of the batch decoded together with no other company, by one policy version.

        The same seeded batch returns the same texts each time it is sent (scorer/decoding.py,
        ``submit_group``); a caller that goes away does not stop it (it holds other generation back
        for as long as it decodes, which ``max_generate_batch`` bounds)."""
        slot = await self._acquire_policy(batch.model, "requests[0].model")
        t0 = time.perf_counter()
        group: asyncio.Future | None = None
        try:
            ids = await asyncio.get_running_loop().run_in_executor(
                self._tokenize, lambda: [slot.runner.prompt_ids(list(q.messages)) for q in batch.queries])
            params = [self._decode_params(q.sampling, q.n, q.stop) for q in batch.queries]
            group = asyncio.gather(*(asyncio.wrap_future(f) for f in slot.runner.submit_group(list(zip(ids, params)))))
            decoded = await asyncio.shield(group)  # a caller that goes away leaves the group decoding
        finally:
            self.metrics.generation_seconds.labels(slot.name).observe(time.perf_counter() - t0)
            if group is None or group.done():
                self._release(slot)
            else:  # the decoder holds the version until the group's last request ends
                group.add_done_callback(lambda g: self._release_after(slot, g))
        return [_generate_result(q, d, slot.ref) for q, d in zip(batch.queries, decoded)]

    async def generate_stream(self, query: GenerateQuery) -> AsyncIterator[GenerateChunk]:
        """Text deltas as they are decoded, then each choice's finish reason, then usage.

        The policy version is fixed when the request starts (every chunk names it).  Closing the
        iterator early (the client went away) stops decoding at the next token; the slot is released
        only once the decoder is done with it.
        """
        slot = await self._acquire_policy(query.model, "model")
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        stop = threading.Event()
        ref, rid = slot.ref, query.request_id

        def on_delta(index: int, text: str) -> None:  # decoder thread
            loop.call_soon_threadsafe(deltas.put_nowait, (index, text))

        params = self._decode_params(query.sampling, query.n, query.stop)
        task = loop.create_task(self._sample(slot, query.messages, params, on_delta, stop.is_set))
        task.add_done_callback(lambda _: deltas.put_nowait(None))
        try:
            while (item := await deltas.get()) is not None:
                yield GenerateChunk(index=item[0], model=ref, delta=item[1], request_id=rid)
            decoded = await task
            for c in decoded.completions:
                yield GenerateChunk(index=c.index, model=ref, finish_reason=c.finish_reason or "length", request_id=rid)
            yield GenerateChunk(index=0, model=ref, usage=Usage(decoded.prompt_tokens, decoded.completion_tokens),
                                request_id=rid)
        finally:
            stop.set()
            if task.done():
                self._release(slot)
            else:
                task.add_done_callback(lambda t: self._release_after(slot, t))

    def _release_after(self, slot: ModelSlot, task: asyncio.Future) -> None:
        """Release a slot held by a generation nobody waits for any more (its error was answered as cancelled)."""
        self._release(slot)
        if not task.cancelled() and task.exception() is not None:
            log.warning("abandoned generation on %s@%s failed: %r", slot.name, slot.version, task.exception())

    async def best_of_n(self, query: BestOfNQuery) -> BestOfNResult:
        """Rank the given (or sampled) candidates by the weighted sum of standardized rewards, or by
        named criteria (``query.criteria_refs``, :mod:`scorer.criteria`)."""
        named = None
        if query.criteria_refs:
            named = self.criteria.resolve(query.project, query.criteria_refs, self._is_reward_model)
            if named is None:  # only reward model names: the reward weighting, weights 1
                query = dataclasses.replace(query, criteria=tuple(Criterion(r, 1.0) for r in query.criteria_refs),
                                            criteria_refs=())
        if named is not None:
            for m in sorted({c.reward.model for c in named if c.reward is not None}):
                self._check_reward_model(m)
            for c in named:  # a judge policy must exist before seconds are spent on sampling
                if c.judge is not None and c.judge.model not in self.cfg.policy_models and c.judge.model not in self._live:
                    raise self._missing(c.judge.model, ModelKind.POLICY)
            return await self._best_of_n_named(query, named)
        criteria = list(query.criteria) or [Criterion(self.cfg.default_reward_model, 1.0)]
        for c in criteria:  # fail fast, before spending seconds on sampling
            self._check_reward_model(c.model)
        texts, policy_ref, usage = await self._candidates(query)
        results = await asyncio.gather(
            *(self.score(ScoreQuery(prompt=query.prompt, responses=tuple(texts), model=c.model)) for c in criteria)
        )
        rewards = {c.model: r.rewards for c, r in zip(criteria, results)}
        combined = combine(rewards, criteria)
        ranked = []
        for i in empties_last(rank(combined), texts):
            if len(criteria) == 1:
                attributes = dict(results[0].scores[i].attributes)
            else:
                attributes = {f"{c.model}.{k}": v for c, r in zip(criteria, results) for k, v in r.scores[i].attributes.items()}
            ranked.append(RankedCandidate(
                index=i,
                text=texts[i],
                score=combined[i],
                per_criterion={c.model: rewards[c.model][i] for c in criteria},
                attributes=attributes,
            ))
        return BestOfNResult(
            ranked=tuple(ranked),
            reward_models=tuple(r.model for r in results),
            policy=policy_ref,
            request_id=query.request_id,
            usage=usage,
        )

    def _is_reward_model(self, name: str) -> bool:
        slot = self._live.get(name)
        return slot is not None and slot.kind == ModelKind.REWARD

    def _check_reward_model(self, name: str) -> None:
        if not self._is_reward_model(name):
            raise self._missing(name, ModelKind.REWARD)

    async def _candidates(self, query: BestOfNQuery) -> tuple[list[str], ModelRef | None, Usage]:
        if query.samples:
            return await self.generate(query.prompt, query.n, query.sampling, query.policy_model)
        return list(query.candidates), None, Usage()

    async def _best_of_n_named(self, query: BestOfNQuery, named: list[Any]) -> BestOfNResult:
        texts, policy_ref, usage = await self._candidates(query)
        used: dict[str, ModelRef] = {}

        async def score(model: str, prompt: Sequence[ChatMessage], replies: Sequence[str]) -> list[tuple[float, dict[str, float]]]:
            res = await self.score(ScoreQuery(prompt=tuple(prompt), responses=tuple(replies), model=model))
            used[model] = res.model
            return [(s.reward, dict(s.attributes)) for s in res.scores]

        async def judge(spec: Any, prompt: Sequence[ChatMessage], replies: Sequence[str]) -> list[float]:
            slot = await self._acquire_policy(spec.model, "criteria_refs")
            try:
                convs = [list(judge_messages(spec, prompt, r)) for r in replies]
                return await asyncio.get_running_loop().run_in_executor(self._judge, slot.runner.yes_probability, convs)
            finally:
                self._release(slot)

        outcome = await self.criteria.rank(named, query.prompt, texts, score, judge)
        ranked = tuple(RankedCandidate(
            index=i, text=texts[i], score=outcome.combined[i],
            per_criterion={name: rs[i].score for name, rs in outcome.results.items()},
            criteria_results=per_reply(outcome.results, i),
            tie_break=outcome.tie_break[i] if outcome.tie_break is not None else None,
        ) for i in empties_last(outcome.order, texts))
        return BestOfNResult(ranked=ranked, reward_models=tuple(used[m] for m in sorted(used)), policy=policy_ref,
                             request_id=query.request_id, usage=usage, criteria=outcome.refs)


def _generate_result(query: GenerateQuery, decoded: Decoded, ref: ModelRef) -> GenerateResult:
    """A request's completions as the Generate answer, every choice from version ``ref``."""
    choices = tuple(GenerationChoice(c.index, c.text, c.finish_reason or "length", c.completion_tokens)
                    for c in decoded.completions)
    return GenerateResult(choices=choices, model=ref, usage=Usage(decoded.prompt_tokens, decoded.completion_tokens),
                          request_id=query.request_id)


__all__ = ["ModelSlot", "PolicyRunner", "RewardRunner", "ServingEngine"]
