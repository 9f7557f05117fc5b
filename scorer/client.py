"""A small typed asyncio client for the scorer (scoring, best-of-N, generation, model admin, readiness).

Why it exists: the gateway's OpenAI-compatible routes, the demo and the benchmark all call the
scorer; they should pass Python values and get dataclasses back, with gRPC failures turned into the
same domain errors (:mod:`services.errors`) the rest of the code raises, so an HTTP edge maps a
scorer's NOT_FOUND to 404 without knowing gRPC.

    async with ScorerClient("127.0.0.1:50052") as scorer:
        await scorer.wait_ready()
        result = await scorer.score([{"role": "user", "content": "Hi"}], ["Hello!", "Go away."])
        result.rewards, result.model.version
        best = await scorer.best_of_n(prompt, n=4, criteria=[Criterion("reward", 1.0)])
        best.best.text
        out = await scorer.generate(prompt, max_tokens=32, seed=1)
        out.choices[0].text, out.model.version, out.usage.completion_tokens
        async for chunk in scorer.generate_stream(prompt):
            print(chunk.delta, end="")
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prefstream.admin.v1 import admin_pb2, admin_pb2_grpc
from prefstream.scorer.v1 import scorer_pb2_grpc
from scorer.bestofn import Criterion
from scorer.domain import BestOfNQuery, BestOfNResult, SamplingParams, ScoreQuery, ScoreResult
from scorer.generation import (GenerateBatchQuery, GenerateChunk, GenerateQuery, GenerateResult,
                               batch_response_from_proto)
from services.errors import DeadlineExceeded, PrefstreamError, Unavailable, from_grpc_error
from services.grpc_server import channel as make_channel
from services.registry import ModelStatus, ModelVersion
from services.schemas import ChatMessage
from services.tls import ClientTls


PromptLike = Sequence[ChatMessage | Mapping[str, str]]


def to_messages(prompt: PromptLike, field: str = "prompt") -> tuple[ChatMessage, ...]:
    """ChatMessages from ChatMessage objects or OpenAI-style ``{"role", "content"}`` dicts."""
    from services.schemas import messages_from_dicts

    if all(isinstance(m, ChatMessage) for m in prompt):
        return tuple(prompt)  # type: ignore[arg-type]
    return tuple(m if isinstance(m, ChatMessage) else messages_from_dicts([m], field)[0] for m in prompt)


class ScorerClient:
    """Async client; one HTTP/2 channel, safe to share across tasks."""

    def __init__(self, address: str, *, timeout_s: float = 60.0, admin_token: str | None = None,
                 tls: ClientTls | None = None, timeout_setting: str = "timeout_s") -> None:
        """``timeout_s`` is each call's deadline unless the call names its own; ``timeout_setting`` is
        what the error of a call that outlived it tells the caller to raise (the gateway names its
        config field). ``admin_token`` (default ``$PREFSTREAM_SCORER_ADMIN_TOKEN``) is sent with every
        admin call; ``tls`` (a :class:`services.tls.ClientTls`) when the scorer speaks TLS."""
        self.address = address
        self.timeout_s = timeout_s
        self.timeout_setting = timeout_setting
        token = os.environ.get("PREFSTREAM_SCORER_ADMIN_TOKEN", "") if admin_token is None else admin_token
        self._admin_metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channel: grpc.aio.Channel = make_channel(address, aio=True, tls=tls)  # type: ignore[assignment]
        self._scorer = scorer_pb2_grpc.ScorerServiceStub(self._channel)
        self._admin = admin_pb2_grpc.ModelAdminServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> "ScorerClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call_admin(self, method: Any, request: Any) -> Any:
        return await self._call(method, request, metadata=self._admin_metadata)

    async def _call(self, method: Any, request: Any, timeout_s: float | None = None,
                    metadata: Any = None) -> Any:
        timeout = timeout_s or self.timeout_s
        try:
            return await method(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            raise self._error(e, timeout) from None

    def _error(self, e: grpc.aio.AioRpcError, timeout: float) -> PrefstreamError:
        """The domain error of a failed call; a call that outlived its deadline says which deadline and
        what to change (gRPC's own text is a bare "Deadline Exceeded")."""
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(
                f"the scorer at {self.address} did not answer within {timeout:g}s: it queues generations while "
                f"it is busy (best-of-N decodes n replies); raise {self.timeout_setting} or ask for fewer candidates")
        return from_grpc_error(e)

    # ------------------------------------------------------------------------------ scoring

    async def score(self, prompt: PromptLike, responses: Sequence[str], *, model: str = "",
                    request_id: str = "") -> ScoreResult:
        """Reward (and attributes) for each response; ``model`` empty = the scorer's default."""
        query = ScoreQuery(prompt=to_messages(prompt), responses=tuple(responses), model=model, request_id=request_id)
        return ScoreResult.from_proto(await self._call(self._scorer.Score, query.to_proto()))

    async def best_of_n(
        self,
        prompt: PromptLike,
        *,
        candidates: Sequence[str] = (),
        n: int = 0,
        criteria: Iterable[Criterion] = (),
        sampling: SamplingParams | None = None,
        policy_model: str = "",
        request_id: str = "",
        criteria_refs: Sequence[str] = (),
        project: str = "",
    ) -> BestOfNResult:
        """Rank ``candidates``, or sample ``n`` from the policy and rank them, best first: by weighted
        reward models (``criteria``) or by named criteria (``criteria_refs``, ``name`` or ``name@version``
        of ``project``; each candidate then carries ``criteria_results``)."""
        query = BestOfNQuery(
            prompt=to_messages(prompt), candidates=tuple(candidates), n=n, sampling=sampling or SamplingParams(),
            criteria=tuple(criteria), policy_model=policy_model, request_id=request_id,
            criteria_refs=tuple(criteria_refs), project=project,
        )
        return BestOfNResult.from_proto(await self._call(self._scorer.BestOfN, query.to_proto()))

    async def score_stream(self, queries: AsyncIterable[ScoreQuery] | Iterable[ScoreQuery]) -> AsyncIterator[ScoreResult]:
        """Stream many queries; results come back in the order sent."""

        async def requests() -> AsyncIterator[Any]:
            if hasattr(queries, "__aiter__"):
                async for q in queries:  # type: ignore[union-attr]
                    yield q.to_proto()
            else:
                for q in queries:  # type: ignore[union-attr]
                    yield q.to_proto()

        call = self._scorer.ScoreStream(requests())
        try:
            async for msg in call:
                yield ScoreResult.from_proto(msg)
        except grpc.aio.AioRpcError as e:
            raise from_grpc_error(e) from None

    # ------------------------------------------------------------------------------ generation

    async def generate(self, messages: PromptLike, *, model: str = "", n: int = 1,
                       sampling: SamplingParams | None = None, stop: Sequence[str] = (),
                       request_id: str = "", timeout_s: float | None = None) -> GenerateResult:
        """``n`` completions of ``messages`` from a policy (``model`` empty = the default policy)."""
        query = GenerateQuery(messages=to_messages(messages, "messages"), model=model,
                              sampling=sampling or SamplingParams(), stop=tuple(stop), n=n, request_id=request_id)
        return GenerateResult.from_proto(await self._call(self._scorer.Generate, query.to_proto(), timeout_s))

    async def generate_batch(self, queries: Sequence[GenerateQuery], *,
                             timeout_s: float | None = None) -> list[GenerateResult]:
        """Every query decoded as one batch of its own, in order, by one policy version (``GenerateBatch``):
        the same seeded batch returns the same texts each time, as a request decoded alone does."""
        batch = GenerateBatchQuery(tuple(queries))
        msg = await self._call(self._scorer.GenerateBatch, batch.to_proto(), timeout_s)
        return batch_response_from_proto(msg)

    async def generate_stream(self, messages: PromptLike, *, model: str = "", n: int = 1,
                              sampling: SamplingParams | None = None, stop: Sequence[str] = (),
                              request_id: str = "",
                              timeout_s: float | None = None) -> AsyncIterator[GenerateChunk]:
        """Chunks as the policy decodes: text deltas, each choice's finish reason, then usage.

        Leaving the loop early cancels the call; the scorer stops decoding at its next token.
        """
        query = GenerateQuery(messages=to_messages(messages, "messages"), model=model,
                              sampling=sampling or SamplingParams(), stop=tuple(stop), n=n, request_id=request_id)
        timeout = timeout_s or self.timeout_s
        call = self._scorer.GenerateStream(query.to_proto(), timeout=timeout)
        try:
            async for msg in call:
                yield GenerateChunk.from_proto(msg)
        except grpc.aio.AioRpcError as e:
            raise self._error(e, timeout) from None
        finally:
            call.cancel()

    # ------------------------------------------------------------------------------ admin

    async def list_models(self) -> list[ModelStatus]:
        """Every model the scorer serves or the registry knows, with its serving version."""
        resp = await self._call_admin(self._admin.ListModels, admin_pb2.ListModelsRequest())
        return [ModelStatus.from_proto(m) for m in resp.models]

    async def list_versions(self, name: str, *, include_rejected: bool = False) -> list[ModelVersion]:
        resp = await self._call_admin(self._admin.ListVersions,
                                admin_pb2.ListVersionsRequest(name=name, include_rejected=include_rejected))
        return [ModelVersion.from_proto(v, name) for v in resp.versions]

    async def pin(self, name: str, version: str) -> ModelStatus:
        """Serve exactly ``version`` until unpinned; returns the status once this scorer swapped."""
        return ModelStatus.from_proto(await self._call_admin(self._admin.PinVersion,
                                                       admin_pb2.PinVersionRequest(name=name, version=version)))

    async def unpin(self, name: str) -> ModelStatus:
        return ModelStatus.from_proto(await self._call_admin(self._admin.Unpin, admin_pb2.UnpinRequest(name=name)))

    async def rollback(self, name: str, reason: str = "rolled back by an operator") -> ModelStatus:
        """Mark the served version rolled back and pin the previous published one."""
        return ModelStatus.from_proto(await self._call_admin(self._admin.Rollback,
                                                       admin_pb2.RollbackRequest(name=name, reason=reason)))

    async def create_criterion(self, definition: Mapping[str, Any], *, project: str = "",
                               skip_model_check: bool = False) -> dict[str, Any]:
        """Record a criterion definition (docs/criteria.md); returns it with its version and ``created``."""
        resp = await self._call_admin(self._admin.CreateCriterion, admin_pb2.CreateCriterionRequest(
            project=project, definition_json=json.dumps(dict(definition)), skip_model_check=skip_model_check))
        return _criterion_info(resp)

    async def list_criteria(self, project: str = "") -> list[dict[str, Any]]:
        resp = await self._call_admin(self._admin.ListCriteria, admin_pb2.ListCriteriaRequest(project=project))
        return [_criterion_info(c) for c in resp.criteria]

    async def get_criterion(self, criterion: str, *, project: str = "") -> dict[str, Any]:
        return _criterion_info(await self._call_admin(self._admin.GetCriterion,
                                                admin_pb2.GetCriterionRequest(project=project, criterion=criterion)))

    async def delete_criterion(self, name: str, *, project: str = "", force: bool = False, reason: str = "") -> list[str]:
        resp = await self._call_admin(self._admin.DeleteCriterion, admin_pb2.DeleteCriterionRequest(
            project=project, name=name, force=force, reason=reason))
        return list(resp.deleted_versions)

    async def set_criteria_feedback(self, enabled: bool, *, name: str = "", project: str = "",
                                    mode: str = "pair") -> dict[str, dict[str, Any]]:
        """Switch criteria feedback for one criterion (``name``) or the whole project; returns the settings."""
        resp = await self._call_admin(self._admin.SetCriteriaFeedback, admin_pb2.SetCriteriaFeedbackRequest(
            project=project, name=name, enabled=enabled, mode=mode))
        return {k: {"enabled": v.enabled, "mode": v.mode} for k, v in resp.settings.items()}

    # ------------------------------------------------------------------------------ health

    async def serving(self, service: str = "") -> bool:
        """True when the scorer's gRPC health reports SERVING (a model is loaded)."""
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5.0)
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def wait_ready(self, timeout_s: float = 120.0, service: str = "") -> None:
        """Wait until SERVING; raise DeadlineExceeded after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.serving(service):
                return
            await asyncio.sleep(0.2)
        raise DeadlineExceeded(f"scorer at {self.address} not SERVING after {timeout_s:.0f}s")


__all__ = ["ModelStatus", "ModelVersion", "PrefstreamError", "ScorerClient", "Unavailable", "to_messages"]


def _criterion_info(msg: Any) -> dict[str, Any]:
    return {**json.loads(msg.definition_json), "created": msg.created, "in_use_by": list(msg.in_use_by)}
