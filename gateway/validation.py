"""Every rule an ingested event must satisfy, in one place, for the gateway and the processor alike.

Untrusted input becomes a domain event only through :func:`completion_from_proto` and
:func:`feedback_from_proto`; a violation raises :class:`~services.errors.InvalidArgument` naming the
field (``feedback.ranking.ranked_indices[2]``), the limit and the fix.  The gateway runs these on
RPC/HTTP input; the processor runs the very same functions on records that producers wrote to Kafka
directly, so nothing malformed reaches the preference topic whichever way it came in.

Checks that need the completion a feedback event refers to (is index 3 one of its outputs? does the
edit change the draft?) are in :func:`check_feedback_against`: the gateway applies them when it knows
the completion, the processor always does before deriving records.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from google.protobuf.message import Message

from gateway.config import DEFAULT_ATTRIBUTES, GatewayConfig
from gateway.events import (
    Action,
    Choice,
    Completion,
    CriteriaScores,
    Edit,
    Feedback,
    InlineCompletion,
    OutputScore,
    Ranking,
    Regeneration,
    Scores,
    Thumbs,
    completion_id_for,
)
from prefstream.events.v1 import events_pb2
from prefstream.events.v1.events_pb2 import ChatMessage as ChatMessageProto
from prefstream.events.v1.events_pb2 import Completion as CompletionProto
from prefstream.events.v1.events_pb2 import Feedback as FeedbackProto
from services.codec import decode_event
from services.criteria_eval import FEEDBACK_MODES
from services.errors import InvalidArgument
from services.kinds import Role, Split
from services.schemas import ChatMessage, ts_to_float

#: Projects name Redis keys and Kafka keys: letters, digits, '.', '_', '-'; starting with a letter or digit.
PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Ids are printable ASCII without whitespace (UUIDs, hashes, "import:hh:abc", ...).
ID_RE = re.compile(r"^[!-~]+$")


@dataclass(frozen=True)
class Limits:
    """The sizes validation enforces (a view of :class:`GatewayConfig`, so unit tests need no config file)."""

    max_prompt_messages: int = 256
    max_message_chars: int = 100_000
    max_candidates: int = 16
    max_output_chars: int = 100_000
    max_metadata_entries: int = 64
    max_metadata_chars: int = 2048
    max_id_chars: int = 128
    score_attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
    attribute_weights: Mapping[str, float] | None = None

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> "Limits":
        return cls(
            max_prompt_messages=cfg.max_prompt_messages,
            max_message_chars=cfg.max_message_chars,
            max_candidates=cfg.max_candidates,
            max_output_chars=cfg.max_output_chars,
            max_metadata_entries=cfg.max_metadata_entries,
            max_metadata_chars=cfg.max_metadata_chars,
            max_id_chars=cfg.max_id_chars,
            score_attributes=tuple(cfg.score_attributes),
            attribute_weights=dict(cfg.attribute_weights),
        )

    @property
    def weights(self) -> Mapping[str, float]:
        return self.attribute_weights if self.attribute_weights is not None else {"helpfulness": 1.0}


# ---------------------------------------------------------------------------------------------
# Wire parsing

_FAILED_FIELD = re.compile(r"Failed to parse (\w+) field")
_AT_PATH = re.compile(r" at \"?([A-Za-z_][\w.\[\]\"]*)")


def parse_json(data: bytes | str, cls: type[Message], *, root: str = "") -> Message:
    """Proto3 JSON -> ``cls``; errors become InvalidArgument naming the field path when protobuf tells it.

    protobuf reports paths from the message name (``Completion.prompt[0].role``); the name is replaced
    by ``root`` so a Kafka record error reads ``completion.prompt[0].role`` and an HTTP body error
    (``root=""``) reads ``completion.prompt[0].role`` from ``LogCompletionRequest.completion...``.
    """
    try:
        return decode_event(data, cls, what=root or "body")
    except InvalidArgument as e:
        if " schema: " not in e.message:
            raise
        m = _AT_PATH.search(e.message)
        names = _FAILED_FIELD.findall(e.message)  # outermost first: completion, candidates
        if m is not None:
            path = m.group(1).rstrip(".").replace('"', "")
            head, _, rest = path.partition(".")
            path = rest if head == cls.DESCRIPTOR.name else path
            # protobuf names the message that holds a mistyped field, and the field only in its text
            if names and names[-1] != path.rpartition(".")[2].partition("[")[0]:
                path = ".".join(p for p in (path, names[-1]) if p)
        elif names:
            path = ".".join(names)
        else:
            raise
        field_path = ".".join(p for p in (root, path) if p) or "body"
        raise InvalidArgument(field_path, e.message) from None


# ---------------------------------------------------------------------------------------------
# Field helpers


def _check_id(value: str, field: str, limits: Limits, *, required: bool) -> None:
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return
    if len(value) > limits.max_id_chars:
        raise InvalidArgument(field, f"is {len(value)} characters; the limit is {limits.max_id_chars}")
    if not ID_RE.match(value):
        raise InvalidArgument(field, "must be printable ASCII without spaces")


def check_project(value: str, field: str, limits: Limits) -> None:
    if not value:
        raise InvalidArgument(field, "is required: name the project the event belongs to")
    if len(value) > limits.max_id_chars:
        raise InvalidArgument(field, f"is {len(value)} characters; the limit is {limits.max_id_chars}")
    if not PROJECT_RE.match(value):
        raise InvalidArgument(field, f"{value!r} is not a project name; use letters, digits, '.', '_' and '-'")


def _check_text(value: str, field: str, limit: int, what: str) -> None:
    if not value.strip():
        raise InvalidArgument(field, f"{what} is empty")
    if len(value) > limit:
        raise InvalidArgument(field, f"{what} is {len(value)} characters; the limit is {limit}")


def _prompt(messages: Sequence[ChatMessageProto], field: str, limits: Limits) -> tuple[ChatMessage, ...]:
    if not messages:
        raise InvalidArgument(field, "needs at least one message (the conversation the outputs answer)")
    if len(messages) > limits.max_prompt_messages:
        raise InvalidArgument(field, f"has {len(messages)} messages; the limit is {limits.max_prompt_messages}")
    out = []
    for i, m in enumerate(messages):
        role = Role.from_proto(m.role)
        if role is None:
            raise InvalidArgument(
                f"{field}[{i}].role",
                f"unknown role {m.role}; use ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL",
            )
        _check_text(m.content, f"{field}[{i}].content", limits.max_message_chars, "message content")
        out.append(ChatMessage(role=role.value, content=m.content))
    return tuple(out)


def _outputs(values: Sequence[str], field: str, limits: Limits, what: str) -> tuple[str, ...]:
    if not values:
        raise InvalidArgument(field, f"needs at least one {what}")
    if len(values) > limits.max_candidates:
        raise InvalidArgument(field, f"has {len(values)} {what}s; the limit is {limits.max_candidates}")
    for i, v in enumerate(values):
        _check_text(v, f"{field}[{i}]", limits.max_output_chars, what)
    return tuple(values)


def _metadata(values: Mapping[str, str], field: str, limits: Limits) -> dict[str, str]:
    if len(values) > limits.max_metadata_entries:
        raise InvalidArgument(field, f"has {len(values)} entries; the limit is {limits.max_metadata_entries}")
    for k, v in values.items():
        if not k:
            raise InvalidArgument(field, "has an empty key")
        if len(k) > limits.max_metadata_chars:
            raise InvalidArgument(f"{field}[{k[:32]!r}]", f"key is {len(k)} characters; the limit is {limits.max_metadata_chars}")
        if len(v) > limits.max_metadata_chars:
            raise InvalidArgument(f"{field}[{k!r}]", f"value is {len(v)} characters; the limit is {limits.max_metadata_chars}")
    return dict(values)


def _split(value: int, field: str) -> str:
    """The split's string, "" for UNSPECIFIED (a feedback event then takes its completion's split)."""
    if value == events_pb2.SPLIT_UNSPECIFIED:
        return ""
    split = Split.from_proto(value)
    if split is None:
        raise InvalidArgument(field, f"unknown split {value}; use SPLIT_TRAIN or SPLIT_TEST")
    return split.value


def _ts(msg: Message, name: str) -> float:
    return ts_to_float(getattr(msg, name)) if msg.HasField(name) else 0.0


# ---------------------------------------------------------------------------------------------
# Completions


def _criteria_scores(msg: Any, n: int, field: str) -> CriteriaScores:
    """The criteria scores of a completion with ``n`` candidates: one score per candidate, in [0, 1]."""
    from services.criteria import split_ref

    if not msg.refs:
        raise InvalidArgument(f"{field}.refs", "is empty; name the criteria (name@version) that produced the scores")
    for i, ref in enumerate(msg.refs):
        split_ref(ref, f"{field}.refs[{i}]")
    for name, values, lo, hi in (("scores", msg.scores, 0.0, 1.0), ("tie_break", msg.tie_break, -math.inf, math.inf)):
        if name == "tie_break" and not values:
            continue
        if len(values) != n:
            raise InvalidArgument(f"{field}.{name}", f"has {len(values)} entries for {n} candidates; give one per candidate")
        for i, v in enumerate(values):
            if not math.isfinite(v) or not lo <= v <= hi:
                raise InvalidArgument(f"{field}.{name}[{i}]", f"must be a finite number{' in [0, 1]' if hi == 1.0 else ''}, got {v}")
    if msg.per_criterion and len(msg.per_criterion) != n:
        raise InvalidArgument(f"{field}.per_criterion", f"has {len(msg.per_criterion)} entries for {n} candidates")
    if msg.mode and msg.mode not in FEEDBACK_MODES:
        raise InvalidArgument(f"{field}.mode", f"must be one of {', '.join(FEEDBACK_MODES)}, got {msg.mode!r}")
    return CriteriaScores(refs=tuple(msg.refs), scores=tuple(msg.scores), tie_break=tuple(msg.tie_break),
                          per_criterion=tuple(dict(p.values) for p in msg.per_criterion), mode=msg.mode or "pair")


def completion_from_proto(
    msg: CompletionProto,
    limits: Limits,
    *,
    field: str = "completion",
    assigned_event_id: str = "",
) -> Completion:
    """Validate a Completion and return its domain form.

    ``assigned_event_id`` is used when the message has none (the gateway assigns a UUID; the processor
    uses the record's Kafka coordinates).  ``completion_id`` may be empty (then it is derived) or the
    derived value itself; anything else is rejected, because feedback refers to completions by the id
    the gateway derives.
    """
    check_project(msg.project, f"{field}.project", limits)
    _check_id(msg.event_id, f"{field}.event_id", limits, required=False)
    event_id = msg.event_id or assigned_event_id
    if not event_id:
        raise InvalidArgument(f"{field}.event_id", "is required")
    expected = completion_id_for(msg.project, event_id)
    if msg.completion_id and msg.completion_id != expected:
        raise InvalidArgument(
            f"{field}.completion_id",
            "is assigned by the gateway from project and event_id; leave it empty",
        )
    prompt = _prompt(msg.prompt, f"{field}.prompt", limits)
    candidates = _outputs(msg.candidates, f"{field}.candidates", limits, "candidate output")
    _check_id(msg.model, f"{field}.model", limits, required=False)
    _check_id(msg.model_version, f"{field}.model_version", limits, required=False)
    metadata = _metadata(msg.metadata, f"{field}.metadata", limits)
    split = _split(msg.split, f"{field}.split") or "train"
    criteria = _criteria_scores(msg.criteria, len(candidates), f"{field}.criteria") if msg.HasField("criteria") else None
    return Completion(
        event_id=event_id,
        completion_id=expected,
        project=msg.project,
        prompt=prompt,
        candidates=candidates,
        model=msg.model,
        model_version=msg.model_version,
        metadata=metadata,
        split=split,
        created_at=_ts(msg, "created_at"),
        acked_at=_ts(msg, "acked_at"),
        criteria=criteria,
    )


# ---------------------------------------------------------------------------------------------
# Feedback


def _indices_unique(values: Iterable[int], field: str) -> None:
    seen: dict[int, int] = {}
    for i, v in enumerate(values):
        if v in seen:
            raise InvalidArgument(f"{field}[{i}]", f"index {v} appears twice (also at position {seen[v]}); list each output once")
        seen[v] = i


def _finite(value: float, field: str) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be a finite number, got {value}")


def _action(msg: FeedbackProto, field: str, limits: Limits) -> Action:
    which = msg.WhichOneof("kind")
    if which is None:
        raise InvalidArgument(
            f"{field}.kind", "is required: set one of choice, regeneration, edit, ranking, scores, thumbs"
        )
    if which == "choice":
        return Choice(chosen_index=msg.choice.chosen_index)
    if which == "regeneration":
        r = msg.regeneration
        f = f"{field}.regeneration"
        if not r.rejected_indices:
            raise InvalidArgument(f"{f}.rejected_indices", "needs at least one rejected (earlier) output")
        _indices_unique(r.rejected_indices, f"{f}.rejected_indices")
        if r.accepted_index in r.rejected_indices:
            raise InvalidArgument(f"{f}.accepted_index", f"output {r.accepted_index} is also listed as rejected")
        return Regeneration(rejected_indices=tuple(r.rejected_indices), accepted_index=r.accepted_index)
    if which == "edit":
        e = msg.edit
        _check_text(e.edited_text, f"{field}.edit.edited_text", limits.max_output_chars, "edited text")
        return Edit(draft_index=e.draft_index, edited_text=e.edited_text)
    if which == "ranking":
        ranked = msg.ranking.ranked_indices
        f = f"{field}.ranking.ranked_indices"
        if len(ranked) < 2:
            raise InvalidArgument(f, f"ranks {len(ranked)} output(s); a ranking needs K >= 2")
        if len(ranked) > limits.max_candidates:
            raise InvalidArgument(f, f"ranks {len(ranked)} outputs; the limit is {limits.max_candidates}")
        _indices_unique(ranked, f)
        return Ranking(ranked_indices=tuple(ranked))
    if which == "scores":
        return _scores(msg.scores.scores, f"{field}.scores.scores", limits)
    return Thumbs(index=msg.thumbs.index, up=msg.thumbs.up)


def _scores(items: Sequence[events_pb2.OutputScore], field: str, limits: Limits) -> Scores:
    if len(items) < 2:
        raise InvalidArgument(field, f"scores {len(items)} output(s); scores need at least 2 outputs to compare")
    if len(items) > limits.max_candidates:
        raise InvalidArgument(field, f"scores {len(items)} outputs; the limit is {limits.max_candidates}")
    _indices_unique([s.index for s in items], field + "[].index")
    allowed = set(limits.score_attributes)
    out = []
    with_scalar = [s.HasField("score") for s in items]
    for i, s in enumerate(items):
        f = f"{field}[{i}]"
        score = s.score if s.HasField("score") else None
        if score is not None:
            _finite(score, f"{f}.score")
        for name, value in s.attributes.items():
            if name not in allowed:
                raise InvalidArgument(
                    f"{f}.attributes[{name!r}]", f"unknown attribute {name!r}; use one of {', '.join(limits.score_attributes)}"
                )
            _finite(value, f"{f}.attributes[{name!r}]")
        if score is None and not s.attributes:
            raise InvalidArgument(f, "has neither a score nor attributes; give a scalar score or attribute scores")
        if any(with_scalar) and score is None:
            raise InvalidArgument(f"{f}.score", "is missing while other outputs have a scalar score; score every output the same way")
        if score is None and not any(k in limits.weights for k in s.attributes):
            raise InvalidArgument(
                f"{f}.attributes",
                f"none of the ranking attributes ({', '.join(limits.weights)}) is scored; add one or give a scalar score",
            )
        out.append(OutputScore(index=s.index, score=score, attributes=dict(s.attributes)))
    return Scores(scores=tuple(out))


def feedback_from_proto(
    msg: FeedbackProto,
    limits: Limits,
    *,
    field: str = "feedback",
    assigned_event_id: str = "",
) -> Feedback:
    """Validate a Feedback event on its own (see :func:`check_feedback_against` for index checks)."""
    check_project(msg.project, f"{field}.project", limits)
    _check_id(msg.event_id, f"{field}.event_id", limits, required=False)
    event_id = msg.event_id or assigned_event_id
    if not event_id:
        raise InvalidArgument(f"{field}.event_id", "is required")
    target = msg.WhichOneof("target")
    inline = None
    completion_id = ""
    if target is None:
        raise InvalidArgument(
            f"{field}.target", "is required: refer to a logged completion by completion_id or carry it inline"
        )
    if target == "completion_id":
        _check_id(msg.completion_id, f"{field}.completion_id", limits, required=True)
        completion_id = msg.completion_id
    else:
        inline = InlineCompletion(
            prompt=_prompt(msg.inline.prompt, f"{field}.inline.prompt", limits),
            outputs=_outputs(msg.inline.outputs, f"{field}.inline.outputs", limits, "output"),
        )
    action = _action(msg, field, limits)
    _check_id(msg.user_id, f"{field}.user_id", limits, required=False)
    fb = Feedback(
        event_id=event_id,
        project=msg.project,
        action=action,
        completion_id=completion_id,
        inline=inline,
        split=_split(msg.split, f"{field}.split"),
        user_id=msg.user_id,
        metadata=_metadata(msg.metadata, f"{field}.metadata", limits),
        created_at=_ts(msg, "created_at"),
        acked_at=_ts(msg, "acked_at"),
    )
    if inline is not None:
        check_feedback_against(fb, inline.outputs, field=field)
    return fb


def _index(value: int, n: int, field: str) -> None:
    if value >= n:
        raise InvalidArgument(field, f"index {value} is out of range: the completion has {n} output(s) (0..{n - 1})")


def check_feedback_indices(fb: Feedback, n: int, *, field: str = "feedback") -> None:
    """Check that every output index ``fb`` uses exists in a completion with ``n`` outputs."""
    a = fb.action
    if isinstance(a, Choice):
        if n < 2:
            raise InvalidArgument(f"{field}.choice", f"the completion shows {n} output; a choice needs at least 2")
        _index(a.chosen_index, n, f"{field}.choice.chosen_index")
    elif isinstance(a, Regeneration):
        for i, v in enumerate(a.rejected_indices):
            _index(v, n, f"{field}.regeneration.rejected_indices[{i}]")
        _index(a.accepted_index, n, f"{field}.regeneration.accepted_index")
    elif isinstance(a, Edit):
        _index(a.draft_index, n, f"{field}.edit.draft_index")
    elif isinstance(a, Ranking):
        for i, v in enumerate(a.ranked_indices):
            _index(v, n, f"{field}.ranking.ranked_indices[{i}]")
    elif isinstance(a, Scores):
        for i, s in enumerate(a.scores):
            _index(s.index, n, f"{field}.scores.scores[{i}].index")
    elif isinstance(a, Thumbs):
        _index(a.index, n, f"{field}.thumbs.index")


def check_feedback_against(fb: Feedback, outputs: Sequence[str], *, field: str = "feedback") -> None:
    """Check ``fb`` against the outputs of the completion it is about: indices exist, an edit edits."""
    check_feedback_indices(fb, len(outputs), field=field)
    a = fb.action
    if isinstance(a, Edit) and a.edited_text == outputs[a.draft_index]:
        raise InvalidArgument(f"{field}.edit.edited_text", "is identical to the draft; an edit must change the text")
