"""Domain types for the events the services exchange through Kafka.

Generated protobuf classes stay at the edges; inside a service, code works with these frozen
dataclasses.  ``to_proto()`` / ``from_proto()`` convert, and ``to_kafka()`` / ``from_kafka()`` give the
wire form (proto3 JSON, see :mod:`services.codec`).  Enums are the ``StrEnum`` types of
:mod:`services.kinds` (or their lower-case strings, for roles and splits), so they read well in code,
logs and JSON files and convert to the proto enums in one place.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from prefstream.events.v1 import events_pb2
from prefstream.events.v1.events_pb2 import ChatMessage as ChatMessageProto
from prefstream.events.v1.events_pb2 import ModelUpdate as ModelUpdateProto
from prefstream.events.v1.events_pb2 import PreferenceRecord as PreferenceRecordProto
from services.codec import decode_event, encode_event
from services.errors import InvalidArgument
from services.kinds import FeedbackKind, ModelAction, ModelKind, Role, Split

def _action_from_proto(value: int) -> ModelAction:
    action = ModelAction.from_proto(value)
    if action is None:
        raise InvalidArgument("action", f"model update action {value} is not one of {', '.join(ModelAction.values())}")
    return action


def ts_to_float(ts: Timestamp) -> float:
    """Epoch seconds of a Timestamp (0.0 when unset)."""
    return ts.seconds + ts.nanos / 1e9


def float_to_ts(t: float) -> Timestamp:
    ts = Timestamp()
    if t:
        ts.seconds = int(t)
        ts.nanos = int(round((t - int(t)) * 1e9)) % 1_000_000_000
    return ts


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def to_proto(self) -> ChatMessageProto:
        return ChatMessageProto(role=Role.parse(self.role, "role").to_proto(), content=self.content)

    @classmethod
    def from_proto(cls, msg: ChatMessageProto) -> "ChatMessage":
        role = Role.from_proto(msg.role)
        return cls(role=role.value if role is not None else "", content=msg.content)

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def messages_from_dicts(items: Iterable[dict], field_name: str = "messages") -> list[ChatMessage]:
    """Parse OpenAI-style ``[{"role": ..., "content": ...}]``, naming the bad index on error."""
    out = []
    for i, item in enumerate(items):
        where = f"{field_name}[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(where, "must be an object with role and content")
        role, content = item.get("role"), item.get("content")
        if role not in Role.values():
            raise InvalidArgument(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(Role.values())}")
        if not isinstance(content, str):
            raise InvalidArgument(f"{where}.content", "must be a string")
        out.append(ChatMessage(role=role, content=content))
    return out


def prompt_hash(project: str, prompt: Sequence[ChatMessage]) -> str:
    """A stable id for (project, prompt): thumbs on the same prompt are joined by it."""
    h = hashlib.sha256(project.encode())
    for m in prompt:
        h.update(b"\x00" + m.role.encode() + b"\x01" + m.content.encode())
    return h.hexdigest()[:32]


def make_record_id(source_event_ids: Sequence[str], ranked_responses: Sequence[str],
                   unfinished: Sequence[int] = ()) -> str:
    """Deterministic record id: reprocessing the same events yields the same ids (dedup downstream).
    ``unfinished`` (:attr:`PreferenceRecord.unfinished`) enters it when not empty: a reply that goes on is
    another response than the same text ending the turn."""
    h = hashlib.sha256()
    for e in source_event_ids:
        h.update(e.encode() + b"\x00")
    h.update(b"\x02")
    for r in ranked_responses:
        h.update(hashlib.sha256(r.encode()).digest())
    if unfinished:
        h.update(b"\x03" + ",".join(str(i) for i in sorted(unfinished)).encode())
    return "pr_" + h.hexdigest()[:32]


@dataclass(frozen=True)
class PreferenceRecord:
    """A pair (K = 2) or K-way ranking of responses to one prompt, best first, with provenance."""

    record_id: str
    prompt: tuple[ChatMessage, ...]
    ranked_responses: tuple[str, ...]
    source_kind: FeedbackKind = FeedbackKind.IMPORT
    project: str = "default"
    source_event_ids: tuple[str, ...] = ()
    completion_id: str = ""
    split: str = "train"
    response_attributes: tuple[dict[str, float], ...] = ()
    margin: float = 0.0
    created_at: float = 0.0
    source_acked_at: float = 0.0
    #: Indexes of the responses that do not end the assistant's turn (a reply cut where it goes on);
    #: every other response ends it.  A policy scores such a reply without the closing end-of-turn token.
    unfinished: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Callers and stored JSON spell the kind as a string; hold the enum member.
        object.__setattr__(self, "source_kind", FeedbackKind.parse(self.source_kind, "source_kind"))
        k = len(self.ranked_responses)
        if any(not 0 <= i < k for i in self.unfinished) or len(set(self.unfinished)) != len(self.unfinished):
            raise InvalidArgument("unfinished", f"{list(self.unfinished)} must name distinct responses, each an "
                                  f"index from 0 to {k - 1} of ranked_responses; list each unfinished reply once")
        object.__setattr__(self, "unfinished", tuple(sorted(int(i) for i in self.unfinished)))

    def ends_turn(self, k: int) -> bool:
        """Whether ``ranked_responses[k]`` ends the assistant's turn (False for an :attr:`unfinished` one)."""
        return k not in self.unfinished

    @property
    def ends(self) -> tuple[bool, ...]:
        """:meth:`ends_turn` of every response, best first."""
        return tuple(self.ends_turn(k) for k in range(self.k))

    @property
    def k(self) -> int:
        return len(self.ranked_responses)

    @property
    def chosen(self) -> str:
        return self.ranked_responses[0]

    @property
    def rejected(self) -> str:
        """The worst response (for K = 2, the rejected one)."""
        return self.ranked_responses[-1]

    @property
    def is_eval(self) -> bool:
        return self.split == "test"

    def to_proto(self) -> PreferenceRecordProto:
        return PreferenceRecordProto(
            record_id=self.record_id,
            project=self.project,
            prompt=[m.to_proto() for m in self.prompt],
            ranked_responses=list(self.ranked_responses),
            source_kind=self.source_kind.to_proto(),
            source_event_ids=list(self.source_event_ids),
            completion_id=self.completion_id,
            split=Split.parse(self.split, "split").to_proto(),
            response_attributes=[events_pb2.AttributeScores(values=a) for a in self.response_attributes],
            margin=self.margin,
            created_at=float_to_ts(self.created_at),
            source_acked_at=float_to_ts(self.source_acked_at),
            unfinished=list(self.unfinished),
        )

    @classmethod
    def from_proto(cls, msg: PreferenceRecordProto) -> "PreferenceRecord":
        if len(msg.ranked_responses) < 2:
            raise InvalidArgument("ranked_responses", f"needs at least 2 responses, got {len(msg.ranked_responses)}")
        return cls(
            record_id=msg.record_id,
            project=msg.project or "default",
            prompt=tuple(ChatMessage.from_proto(m) for m in msg.prompt),
            ranked_responses=tuple(msg.ranked_responses),
            source_kind=FeedbackKind.from_proto(msg.source_kind) or FeedbackKind.IMPORT,
            source_event_ids=tuple(msg.source_event_ids),
            completion_id=msg.completion_id,
            split=(Split.from_proto(msg.split) or Split.TRAIN).value,
            response_attributes=tuple(dict(a.values) for a in msg.response_attributes),
            margin=msg.margin,
            created_at=ts_to_float(msg.created_at),
            source_acked_at=ts_to_float(msg.source_acked_at),
            unfinished=tuple(msg.unfinished),
        )

    def to_kafka(self) -> bytes:
        return encode_event(self.to_proto())

    @classmethod
    def from_kafka(cls, data: bytes) -> "PreferenceRecord":
        return cls.from_proto(decode_event(data, PreferenceRecordProto, what="preference_record"))

    def pairs(self) -> list[tuple[str, str]]:
        """Every (better, worse) pair implied by the ranking: K(K-1)/2 of them."""
        r = self.ranked_responses
        return [(r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]


@dataclass(frozen=True)
class ModelUpdate:
    """A registry change announced on the model-updates topic."""

    model_name: str
    version: str
    action: ModelAction
    kind: ModelKind = ModelKind.REWARD
    uri: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    records_seen: int = 0
    reason: str = ""
    at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", ModelAction.parse(self.action, "action"))
        object.__setattr__(self, "kind", ModelKind.parse(self.kind, "kind"))

    def to_proto(self) -> ModelUpdateProto:
        return ModelUpdateProto(
            model_name=self.model_name,
            version=self.version,
            kind=self.kind.to_proto(),
            action=self.action.to_proto(),
            uri=self.uri,
            metrics=self.metrics,
            records_seen=self.records_seen,
            reason=self.reason,
            at=float_to_ts(self.at),
        )

    @classmethod
    def from_proto(cls, msg: ModelUpdateProto) -> "ModelUpdate":
        return cls(
            model_name=msg.model_name,
            version=msg.version,
            action=_action_from_proto(msg.action),
            kind=ModelKind.from_proto(msg.kind) or ModelKind.REWARD,
            uri=msg.uri,
            metrics=dict(msg.metrics),
            records_seen=msg.records_seen,
            reason=msg.reason,
            at=ts_to_float(msg.at),
        )

    def to_kafka(self) -> bytes:
        return encode_event(self.to_proto())

    @classmethod
    def from_kafka(cls, data: bytes) -> "ModelUpdate":
        return cls.from_proto(decode_event(data, ModelUpdateProto, what="model_update"))


def dumps(obj: object) -> str:
    """Compact JSON for logs and metadata files."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)
