"""The scorer's request and result types, and their conversion at the gRPC edge.

Servicers turn ``prefstream.scorer.v1`` messages into these frozen dataclasses (validating every
field of untrusted input and naming it in the error) and results back into messages; the engine and
best-of-N code never see generated classes.  The client uses the same types in the other direction,
so callers (the gateway's OpenAI routes, the demo, the benchmark) work with plain Python values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from prefstream.scorer.v1.scorer_pb2 import BestOfNRequest as BestOfNRequestProto
from prefstream.scorer.v1.scorer_pb2 import BestOfNResponse as BestOfNResponseProto
from prefstream.scorer.v1.scorer_pb2 import Criterion as CriterionProto
from prefstream.scorer.v1.scorer_pb2 import CriterionResult as CriterionResultProto
from prefstream.scorer.v1.scorer_pb2 import ModelRef as ModelRefProto
from prefstream.scorer.v1.scorer_pb2 import RankedCandidate as RankedCandidateProto
from prefstream.scorer.v1.scorer_pb2 import ResponseScore as ResponseScoreProto
from prefstream.scorer.v1.scorer_pb2 import SamplingParams as SamplingParamsProto
from prefstream.scorer.v1.scorer_pb2 import ScoreRequest as ScoreRequestProto
from prefstream.scorer.v1.scorer_pb2 import ScoreResponse as ScoreResponseProto
from prefstream.scorer.v1.scorer_pb2 import Usage as UsageProto
from scorer.bestofn import Criterion, validate_criteria
from services.criteria_eval import CriterionResult
from services.errors import InvalidArgument
from services.schemas import ChatMessage

_MAX_ID_CHARS = 256


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on untrusted input (from ScorerConfig)."""

    max_responses: int = 64
    max_text_chars: int = 32768
    max_prompt_messages: int = 256
    max_n: int = 16
    max_new_tokens: int = 256
    max_generate_batch: int = 64


def _check_name(value: str, where: str) -> str:
    if value and (len(value) > 128 or not all(c.isalnum() or c in "._-" for c in value)):
        raise InvalidArgument(where, f"{value[:40]!r} is not a model name (letters, digits, . _ -; at most 128)")
    return value


def _check_text(value: str, where: str, limits: RequestLimits) -> str:
    if len(value) > limits.max_text_chars:
        raise InvalidArgument(where, f"has {len(value)} characters; the limit is {limits.max_text_chars}")
    return value


def _prompt_from_proto(msgs: Sequence, where: str, limits: RequestLimits) -> tuple[ChatMessage, ...]:
    if len(msgs) > limits.max_prompt_messages:
        raise InvalidArgument(where, f"has {len(msgs)} messages; the limit is {limits.max_prompt_messages}")
    out = []
    for i, m in enumerate(msgs):
        cm = ChatMessage.from_proto(m)
        if not cm.role:
            raise InvalidArgument(f"{where}[{i}].role", "is unset; use ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL")
        _check_text(cm.content, f"{where}[{i}].content", limits)
        out.append(cm)
    return tuple(out)


def _request_id(value: str) -> str:
    if len(value) > _MAX_ID_CHARS:
        raise InvalidArgument("request_id", f"is {len(value)} characters; the limit is {_MAX_ID_CHARS}")
    return value


@dataclass(frozen=True)
class ModelRef:
    """A model and the exact version that served a request."""

    name: str
    version: str

    def to_proto(self) -> ModelRefProto:
        return ModelRefProto(name=self.name, version=self.version)

    @classmethod
    def from_proto(cls, msg: ModelRefProto) -> "ModelRef":
        return cls(name=msg.name, version=msg.version)


@dataclass(frozen=True)
class Usage:
    """Tokens one request read (the rendered prompt, once) and generated (all completions)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_proto(self) -> UsageProto:
        return UsageProto(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)

    @classmethod
    def from_proto(cls, msg: UsageProto) -> "Usage":
        return cls(prompt_tokens=msg.prompt_tokens, completion_tokens=msg.completion_tokens)


@dataclass(frozen=True)
class ScoreQuery:
    """Score each response to the prompt; ``model`` empty means the default reward model."""

    prompt: tuple[ChatMessage, ...]
    responses: tuple[str, ...]
    model: str = ""
    request_id: str = ""

    def to_proto(self) -> ScoreRequestProto:
        return ScoreRequestProto(
            model=self.model,
            prompt=[m.to_proto() for m in self.prompt],
            responses=list(self.responses),
            request_id=self.request_id,
        )

    @classmethod
    def from_proto(cls, msg: ScoreRequestProto, limits: RequestLimits = RequestLimits()) -> "ScoreQuery":
        if not msg.responses:
            raise InvalidArgument("responses", "is empty; give at least one response to score")
        if len(msg.responses) > limits.max_responses:
            raise InvalidArgument("responses", f"has {len(msg.responses)} entries; the limit is {limits.max_responses}")
        responses = tuple(_check_text(r, f"responses[{i}]", limits) for i, r in enumerate(msg.responses))
        return cls(
            prompt=_prompt_from_proto(msg.prompt, "prompt", limits),
            responses=responses,
            model=_check_name(msg.model, "model"),
            request_id=_request_id(msg.request_id),
        )


@dataclass(frozen=True)
class ResponseScore:
    index: int
    reward: float
    attributes: dict[str, float] = field(default_factory=dict)

    def to_proto(self) -> ResponseScoreProto:
        return ResponseScoreProto(index=self.index, reward=self.reward, attributes=self.attributes)

    @classmethod
    def from_proto(cls, msg: ResponseScoreProto) -> "ResponseScore":
        return cls(index=msg.index, reward=msg.reward, attributes=dict(msg.attributes))


@dataclass(frozen=True)
class ScoreResult:
    """One reward per response, in request order, and the model version that produced them."""

    scores: tuple[ResponseScore, ...]
    model: ModelRef
    request_id: str = ""
    input_tokens: int = 0  # tokens the model read, every scored sequence summed

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.scores]

    def to_proto(self) -> ScoreResponseProto:
        return ScoreResponseProto(
            scores=[s.to_proto() for s in self.scores], model=self.model.to_proto(), request_id=self.request_id,
            input_tokens=self.input_tokens,
        )

    @classmethod
    def from_proto(cls, msg: ScoreResponseProto) -> "ScoreResult":
        return cls(
            scores=tuple(ResponseScore.from_proto(s) for s in msg.scores),
            model=ModelRef.from_proto(msg.model),
            request_id=msg.request_id,
            input_tokens=msg.input_tokens,
        )


@dataclass(frozen=True)
class SamplingParams:
    """Policy sampling parameters; None means the scorer's default.  temperature 0 is greedy."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None

    def to_proto(self) -> SamplingParamsProto:
        msg = SamplingParamsProto()
        if self.temperature is not None:
            msg.temperature = self.temperature
        if self.top_p is not None:
            msg.top_p = self.top_p
        if self.max_tokens is not None:
            msg.max_tokens = self.max_tokens
        if self.seed is not None:
            msg.seed = self.seed
        return msg

    @classmethod
    def from_proto(cls, msg: SamplingParamsProto, limits: RequestLimits = RequestLimits()) -> "SamplingParams":
        p = cls(
            temperature=msg.temperature if msg.HasField("temperature") else None,
            top_p=msg.top_p if msg.HasField("top_p") else None,
            max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
            seed=msg.seed if msg.HasField("seed") else None,
        )
        p.validate(limits, "sampling")
        return p

    def validate(self, limits: RequestLimits, where: str) -> None:
        if self.temperature is not None and not (math.isfinite(self.temperature) and 0 <= self.temperature <= 5):
            raise InvalidArgument(f"{where}.temperature", f"must be within 0..5 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidArgument(f"{where}.top_p", f"must be within (0, 1], got {self.top_p}")
        if self.max_tokens is not None and not (1 <= self.max_tokens <= limits.max_new_tokens):
            raise InvalidArgument(f"{where}.max_tokens", f"must be within 1..{limits.max_new_tokens}, got {self.max_tokens}")
        if self.seed is not None and self.seed < 0:
            raise InvalidArgument(f"{where}.seed", f"must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class BestOfNQuery:
    """Rank ``candidates``, or sample ``n`` from the policy and rank them."""

    prompt: tuple[ChatMessage, ...]
    candidates: tuple[str, ...] = ()
    n: int = 0
    sampling: SamplingParams = SamplingParams()
    criteria: tuple[Criterion, ...] = ()
    policy_model: str = ""
    request_id: str = ""
    criteria_refs: tuple[str, ...] = ()  # named criteria (or reward model names), see the proto
    project: str = ""

    @property
    def samples(self) -> bool:
        return not self.candidates

    def to_proto(self) -> BestOfNRequestProto:
        return BestOfNRequestProto(
            prompt=[m.to_proto() for m in self.prompt],
            candidates=list(self.candidates),
            n=self.n,
            sampling=self.sampling.to_proto(),
            criteria=[CriterionProto(model=c.model, weight=c.weight) for c in self.criteria],
            policy_model=self.policy_model,
            request_id=self.request_id,
            criteria_refs=list(self.criteria_refs),
            project=self.project,
        )

    @classmethod
    def from_proto(cls, msg: BestOfNRequestProto, limits: RequestLimits = RequestLimits()) -> "BestOfNQuery":
        if msg.candidates:
            if msg.n and msg.n != len(msg.candidates):
                raise InvalidArgument("n", f"is {msg.n} but {len(msg.candidates)} candidates were given; "
                                           "leave n at 0 when passing candidates")
            if len(msg.candidates) > limits.max_responses:
                raise InvalidArgument("candidates", f"has {len(msg.candidates)} entries; the limit is {limits.max_responses}")
        else:
            if msg.n < 1:
                raise InvalidArgument("n", "give candidates to rank, or n >= 1 to sample that many from the policy")
            if msg.n > limits.max_n:
                raise InvalidArgument("n", f"is {msg.n}; the limit is {limits.max_n}")
            if not msg.prompt:
                raise InvalidArgument("prompt", "is empty; sampling needs a prompt")
        candidates = tuple(_check_text(c, f"candidates[{i}]", limits) for i, c in enumerate(msg.candidates))
        criteria = [Criterion(c.model, c.weight) for c in msg.criteria]
        # An omitted weight arrives as 0.0 from proto3: a criteria list of bare names means equal weights.
        if criteria and all(c.weight == 0 for c in criteria):
            criteria = [Criterion(c.model, 1.0) for c in criteria]
        if criteria and msg.criteria_refs:
            raise InvalidArgument("criteria_refs", "give named criteria (criteria_refs) or weighted reward models "
                                                   "(criteria), not both")
        refs = tuple(_criterion_ref(r, f"criteria_refs[{i}]") for i, r in enumerate(msg.criteria_refs))
        if len(set(refs)) != len(refs):
            raise InvalidArgument("criteria_refs", "names a criterion twice")
        return cls(
            prompt=_prompt_from_proto(msg.prompt, "prompt", limits),
            candidates=candidates,
            n=msg.n if not candidates else len(candidates),
            sampling=SamplingParams.from_proto(msg.sampling, limits),
            criteria=tuple(validate_criteria(criteria, "criteria")),
            policy_model=_check_name(msg.policy_model, "policy_model"),
            request_id=_request_id(msg.request_id),
            criteria_refs=refs,
            project=_check_name(msg.project, "project") if msg.project else "",
        )


def _criterion_ref(ref: str, where: str) -> str:
    from services.criteria import split_ref

    split_ref(ref, where)  # names the entry and the fix when it is not name or name@version
    return ref.strip()


def _criterion_result_to_proto(r: CriterionResult) -> CriterionResultProto:
    msg = CriterionResultProto(status=r.status, score=r.score, explanation=r.explanation, version=r.version)
    if r.passed is not None:
        msg.passed = r.passed
    if r.raw_score is not None:
        msg.raw_score = r.raw_score
    return msg


def _criterion_result_from_proto(name: str, msg: CriterionResultProto) -> CriterionResult:
    return CriterionResult(criterion=name, version=msg.version, status=msg.status, score=msg.score,
                           explanation=msg.explanation, passed=msg.passed if msg.HasField("passed") else None,
                           raw_score=msg.raw_score if msg.HasField("raw_score") else None)


@dataclass(frozen=True)
class RankedCandidate:
    index: int
    text: str
    score: float
    per_criterion: dict[str, float] = field(default_factory=dict)
    attributes: dict[str, float] = field(default_factory=dict)
    criteria_results: dict[str, CriterionResult] = field(default_factory=dict)  # criterion name -> verdict
    tie_break: float | None = None

    def to_proto(self) -> RankedCandidateProto:
        msg = RankedCandidateProto(
            index=self.index, text=self.text, score=self.score,
            per_criterion=self.per_criterion, attributes=self.attributes,
        )
        for name, r in self.criteria_results.items():
            msg.criteria_results[name].CopyFrom(_criterion_result_to_proto(r))
        if self.tie_break is not None:
            msg.tie_break = self.tie_break
        return msg

    @classmethod
    def from_proto(cls, msg: RankedCandidateProto) -> "RankedCandidate":
        return cls(
            index=msg.index, text=msg.text, score=msg.score,
            per_criterion=dict(msg.per_criterion), attributes=dict(msg.attributes),
            criteria_results={k: _criterion_result_from_proto(k, v) for k, v in msg.criteria_results.items()},
            tie_break=msg.tie_break if msg.HasField("tie_break") else None,
        )


@dataclass(frozen=True)
class BestOfNResult:
    """Candidates best first, the reward model versions used, and the policy version if sampled."""

    ranked: tuple[RankedCandidate, ...]
    reward_models: tuple[ModelRef, ...]
    policy: ModelRef | None = None
    request_id: str = ""
    usage: Usage = Usage()
    criteria: tuple[str, ...] = ()  # name@version of the named criteria that ranked them

    @property
    def best(self) -> RankedCandidate:
        return self.ranked[0]

    def to_proto(self) -> BestOfNResponseProto:
        msg = BestOfNResponseProto(
            ranked=[c.to_proto() for c in self.ranked],
            reward_models=[m.to_proto() for m in self.reward_models],
            request_id=self.request_id,
            usage=self.usage.to_proto(),
            criteria=list(self.criteria),
        )
        if self.policy is not None:
            msg.policy.CopyFrom(self.policy.to_proto())
        return msg

    @classmethod
    def from_proto(cls, msg: BestOfNResponseProto) -> "BestOfNResult":
        return cls(
            ranked=tuple(RankedCandidate.from_proto(c) for c in msg.ranked),
            reward_models=tuple(ModelRef.from_proto(m) for m in msg.reward_models),
            policy=ModelRef.from_proto(msg.policy) if msg.HasField("policy") else None,
            request_id=msg.request_id,
            usage=Usage.from_proto(msg.usage),
            criteria=tuple(msg.criteria),
        )


__all__ = [
    "BestOfNQuery", "BestOfNResult", "ModelRef", "RankedCandidate", "RequestLimits", "ResponseScore",
    "SamplingParams", "ScoreQuery", "ScoreResult", "Usage",
]
