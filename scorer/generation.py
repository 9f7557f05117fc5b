"""Generation requests and results: the domain side of ``Generate`` / ``GenerateStream``.

Why it exists: the policy is served for plain generation too (OpenAI chat completions without
best-of-N, streamed or not).  As with scoring, the servicer converts ``prefstream.scorer.v1``
messages into these frozen dataclasses at the edge, validating every field of untrusted input and
naming it in the error; the engine and the client work with these types only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from prefstream.scorer.v1.scorer_pb2 import FinishReason as FinishReasonProto
from prefstream.scorer.v1.scorer_pb2 import GenerateBatchRequest as GenerateBatchRequestProto
from prefstream.scorer.v1.scorer_pb2 import GenerateBatchResponse as GenerateBatchResponseProto
from prefstream.scorer.v1.scorer_pb2 import GenerateChunk as GenerateChunkProto
from prefstream.scorer.v1.scorer_pb2 import GenerateRequest as GenerateRequestProto
from prefstream.scorer.v1.scorer_pb2 import GenerateResponse as GenerateResponseProto
from prefstream.scorer.v1.scorer_pb2 import Generation as GenerationProto
from scorer.domain import ModelRef, RequestLimits, SamplingParams, Usage, _check_name, _prompt_from_proto, _request_id
from services.errors import InvalidArgument
from services.schemas import ChatMessage

#: Stop sequences per request (OpenAI's limit) and characters per stop sequence.
MAX_STOP = 4
MAX_STOP_CHARS = 64

_FINISH_TO_PROTO = {"stop": FinishReasonProto.FINISH_REASON_STOP, "length": FinishReasonProto.FINISH_REASON_LENGTH}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def finish_to_proto(reason: str | None) -> int:
    return _FINISH_TO_PROTO.get(reason or "", FinishReasonProto.FINISH_REASON_UNSPECIFIED)


def finish_from_proto(value: int) -> str | None:
    return _FINISH_FROM_PROTO.get(value)


def validate_stop(stop: tuple[str, ...], where: str = "stop") -> tuple[str, ...]:
    """At most 4 non-empty stop sequences of at most 64 characters each."""
    if len(stop) > MAX_STOP:
        raise InvalidArgument(where, f"has {len(stop)} entries; give at most {MAX_STOP} stop sequences")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidArgument(f"{where}[{i}]", "is empty; remove it or give a non-empty string")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidArgument(f"{where}[{i}]", f"has {len(s)} characters; the limit is {MAX_STOP_CHARS}")
    return stop


@dataclass(frozen=True)
class GenerateQuery:
    """Sample ``n`` completions of ``messages`` from a policy (``model`` empty: the default policy)."""

    messages: tuple[ChatMessage, ...]
    model: str = ""
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    n: int = 1
    request_id: str = ""

    def to_proto(self) -> GenerateRequestProto:
        return GenerateRequestProto(
            messages=[m.to_proto() for m in self.messages],
            model=self.model,
            sampling=self.sampling.to_proto(),
            stop=list(self.stop),
            n=self.n,
            request_id=self.request_id,
        )

    @classmethod
    def from_proto(cls, msg: GenerateRequestProto, limits: RequestLimits = RequestLimits()) -> "GenerateQuery":
        if not msg.messages:
            raise InvalidArgument("messages", "is empty; give at least one user message")
        n = msg.n or 1
        if n > limits.max_n:
            raise InvalidArgument("n", f"is {n}; the limit is {limits.max_n}")
        return cls(
            messages=_prompt_from_proto(msg.messages, "messages", limits),
            model=_check_name(msg.model, "model"),
            sampling=SamplingParams.from_proto(msg.sampling, limits),
            stop=validate_stop(tuple(msg.stop)),
            n=n,
            request_id=_request_id(msg.request_id),
        )


@dataclass(frozen=True)
class GenerateBatchQuery:
    """Requests decoded as one batch of their own, in order, by one version of one policy (GenerateBatch)."""

    queries: tuple[GenerateQuery, ...]

    @property
    def model(self) -> str:
        return self.queries[0].model

    def to_proto(self) -> GenerateBatchRequestProto:
        return GenerateBatchRequestProto(requests=[q.to_proto() for q in self.queries])

    @classmethod
    def from_proto(cls, msg: GenerateBatchRequestProto,
                   limits: RequestLimits = RequestLimits()) -> "GenerateBatchQuery":
        if not msg.requests:
            raise InvalidArgument("requests", "is empty; give at least one generation request")
        if len(msg.requests) > limits.max_generate_batch:
            raise InvalidArgument("requests", f"has {len(msg.requests)} entries; the limit is "
                                              f"{limits.max_generate_batch} (send the rest as another batch)")
        queries = []
        for i, r in enumerate(msg.requests):
            try:
                queries.append(GenerateQuery.from_proto(r, limits))
            except InvalidArgument as e:
                raise InvalidArgument(f"requests[{i}].{e.field}", e.message) from None
        first = queries[0].model
        for i, q in enumerate(queries):
            if q.model != first:
                raise InvalidArgument(f"requests[{i}].model", f"is {q.model!r} but requests[0] names {first!r}; "
                                                              "one batch decodes on one policy")
        return cls(tuple(queries))


@dataclass(frozen=True)
class GenerationChoice:
    """One completion: its text (cut before any stop sequence), why it ended, the tokens it used."""

    index: int
    text: str
    finish_reason: str
    completion_tokens: int

    def to_proto(self) -> GenerationProto:
        return GenerationProto(index=self.index, text=self.text, finish_reason=finish_to_proto(self.finish_reason),
                               completion_tokens=self.completion_tokens)

    @classmethod
    def from_proto(cls, msg: GenerationProto) -> "GenerationChoice":
        return cls(index=msg.index, text=msg.text, finish_reason=finish_from_proto(msg.finish_reason) or "",
                   completion_tokens=msg.completion_tokens)


@dataclass(frozen=True)
class GenerateResult:
    """Every completion of one request, the policy version that wrote them all, and token counts."""

    choices: tuple[GenerationChoice, ...]
    model: ModelRef
    usage: Usage
    request_id: str = ""

    def to_proto(self) -> GenerateResponseProto:
        return GenerateResponseProto(choices=[c.to_proto() for c in self.choices], model=self.model.to_proto(),
                                     usage=self.usage.to_proto(), request_id=self.request_id)

    @classmethod
    def from_proto(cls, msg: GenerateResponseProto) -> "GenerateResult":
        return cls(choices=tuple(GenerationChoice.from_proto(c) for c in msg.choices),
                   model=ModelRef.from_proto(msg.model), usage=Usage.from_proto(msg.usage),
                   request_id=msg.request_id)


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed step: a text delta of choice ``index``; its last chunk has ``finish_reason``.

    The stream's final chunk carries ``usage`` and no delta.
    """

    index: int
    model: ModelRef
    delta: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    request_id: str = ""

    def to_proto(self) -> GenerateChunkProto:
        msg = GenerateChunkProto(index=self.index, delta=self.delta, finish_reason=finish_to_proto(self.finish_reason),
                                 model=self.model.to_proto(), request_id=self.request_id)
        if self.usage is not None:
            msg.usage.CopyFrom(self.usage.to_proto())
        return msg

    @classmethod
    def from_proto(cls, msg: GenerateChunkProto) -> "GenerateChunk":
        return cls(index=msg.index, model=ModelRef.from_proto(msg.model), delta=msg.delta,
                   finish_reason=finish_from_proto(msg.finish_reason),
                   usage=Usage.from_proto(msg.usage) if msg.HasField("usage") else None,
                   request_id=msg.request_id)


def batch_response_to_proto(results: Sequence[GenerateResult]) -> GenerateBatchResponseProto:
    return GenerateBatchResponseProto(responses=[r.to_proto() for r in results])


def batch_response_from_proto(msg: GenerateBatchResponseProto) -> list[GenerateResult]:
    return [GenerateResult.from_proto(r) for r in msg.responses]


__all__ = ["GenerateBatchQuery", "GenerateChunk", "GenerateQuery", "GenerateResult", "GenerationChoice", "MAX_STOP",
           "MAX_STOP_CHARS", "batch_response_from_proto", "batch_response_to_proto", "finish_from_proto",
           "finish_to_proto", "validate_stop"]
