"""Domain types for what the gateway ingests: completions and the six kinds of feedback.

The generated ``Completion`` / ``Feedback`` messages stop at the servicer and at the processor's
Kafka decode; everything in between (validation results, the ingest path, the derivation rules) works
with these frozen dataclasses.  They are built by :mod:`gateway.validation` (which is the only way
untrusted input becomes one) and turned back into the wire form with :meth:`to_proto`.

Roles and splits are lower-case strings as in :mod:`services.schemas` ("user"; "train"/"test", or "" when
a feedback event leaves the split to its completion); each action's kind is a
:class:`services.kinds.FeedbackKind`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Union

from prefstream.events.v1 import events_pb2
from prefstream.events.v1.events_pb2 import Completion as CompletionProto
from prefstream.events.v1.events_pb2 import Feedback as FeedbackProto
from services.kinds import FeedbackKind, Split
from services.schemas import ChatMessage, float_to_ts


def completion_id_for(project: str, event_id: str) -> str:
    """The completion id the gateway assigns to the completion logged as ``event_id`` in ``project``.

    Deterministic, so a retried LogCompletion returns the same id and an importer can refer to the
    completion it is about to log without waiting for the response.
    """
    digest = hashlib.sha256(f"{project}\x00{event_id}".encode()).hexdigest()
    return "cmp_" + digest[:32]


@dataclass(frozen=True)
class CriteriaScores:
    """How named criteria scored a completion's candidates (candidate order); see events.proto."""

    refs: tuple[str, ...]
    scores: tuple[float, ...]
    tie_break: tuple[float, ...] = ()
    per_criterion: tuple[Mapping[str, float], ...] = ()
    mode: str = "pair"

    def to_proto(self) -> events_pb2.CriteriaScores:
        return events_pb2.CriteriaScores(
            refs=list(self.refs), scores=list(self.scores), tie_break=list(self.tie_break),
            per_criterion=[events_pb2.AttributeScores(values=dict(p)) for p in self.per_criterion], mode=self.mode)


@dataclass(frozen=True)
class Completion:
    """A prompt and the N candidate outputs a production app showed."""

    event_id: str
    project: str
    prompt: tuple[ChatMessage, ...]
    candidates: tuple[str, ...]
    completion_id: str = ""
    model: str = ""
    model_version: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    split: str = "train"
    created_at: float = 0.0
    acked_at: float = 0.0
    criteria: CriteriaScores | None = None  # set when named criteria ranked the candidates

    def to_proto(self) -> CompletionProto:
        msg = CompletionProto(
            event_id=self.event_id,
            completion_id=self.completion_id,
            project=self.project,
            prompt=[m.to_proto() for m in self.prompt],
            candidates=list(self.candidates),
            model=self.model,
            model_version=self.model_version,
            metadata=dict(self.metadata),
            split=Split.parse(self.split, "split").to_proto(),
        )
        if self.created_at:
            msg.created_at.CopyFrom(float_to_ts(self.created_at))
        if self.acked_at:
            msg.acked_at.CopyFrom(float_to_ts(self.acked_at))
        if self.criteria is not None:
            msg.criteria.CopyFrom(self.criteria.to_proto())
        return msg


@dataclass(frozen=True)
class InlineCompletion:
    """Prompt and outputs carried by a feedback event about a completion that was never logged."""

    prompt: tuple[ChatMessage, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Choice:
    chosen_index: int

    kind: ClassVar[FeedbackKind] = FeedbackKind.CHOICE


@dataclass(frozen=True)
class Regeneration:
    rejected_indices: tuple[int, ...]
    accepted_index: int

    kind: ClassVar[FeedbackKind] = FeedbackKind.REGENERATION


@dataclass(frozen=True)
class Edit:
    draft_index: int
    edited_text: str

    kind: ClassVar[FeedbackKind] = FeedbackKind.EDIT


@dataclass(frozen=True)
class Ranking:
    ranked_indices: tuple[int, ...]

    kind: ClassVar[FeedbackKind] = FeedbackKind.RANKING


@dataclass(frozen=True)
class OutputScore:
    index: int
    score: float | None = None
    attributes: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Scores:
    scores: tuple[OutputScore, ...]

    kind: ClassVar[FeedbackKind] = FeedbackKind.SCORES


@dataclass(frozen=True)
class Thumbs:
    index: int
    up: bool

    kind: ClassVar[FeedbackKind] = FeedbackKind.THUMBS


Action = Union[Choice, Regeneration, Edit, Ranking, Scores, Thumbs]


@dataclass(frozen=True)
class Feedback:
    """One piece of user feedback, about a logged completion (by id) or an inline one."""

    event_id: str
    project: str
    action: Action
    completion_id: str = ""
    inline: InlineCompletion | None = None
    split: str = ""  # "" = the completion's split
    user_id: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    acked_at: float = 0.0

    @property
    def kind(self) -> FeedbackKind:
        return self.action.kind

    def to_proto(self) -> FeedbackProto:
        msg = FeedbackProto(
            event_id=self.event_id,
            project=self.project,
            split=Split.parse(self.split, "split").to_proto() if self.split else events_pb2.SPLIT_UNSPECIFIED,
            user_id=self.user_id,
            metadata=dict(self.metadata),
        )
        if self.inline is not None:
            msg.inline.prompt.extend(m.to_proto() for m in self.inline.prompt)
            msg.inline.outputs.extend(self.inline.outputs)
        else:
            msg.completion_id = self.completion_id
        a = self.action
        if isinstance(a, Choice):
            msg.choice.chosen_index = a.chosen_index
        elif isinstance(a, Regeneration):
            msg.regeneration.rejected_indices.extend(a.rejected_indices)
            msg.regeneration.accepted_index = a.accepted_index
        elif isinstance(a, Edit):
            msg.edit.draft_index = a.draft_index
            msg.edit.edited_text = a.edited_text
        elif isinstance(a, Ranking):
            msg.ranking.ranked_indices.extend(a.ranked_indices)
        elif isinstance(a, Scores):
            for s in a.scores:
                out = msg.scores.scores.add(index=s.index)
                if s.score is not None:
                    out.score = s.score
                for k, v in s.attributes.items():
                    out.attributes[k] = v
        elif isinstance(a, Thumbs):
            msg.thumbs.index = a.index
            msg.thumbs.up = a.up
        if self.created_at:
            msg.created_at.CopyFrom(float_to_ts(self.created_at))
        if self.acked_at:
            msg.acked_at.CopyFrom(float_to_ts(self.acked_at))
        return msg


Event = Union[Completion, Feedback]
