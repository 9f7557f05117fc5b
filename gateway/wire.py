"""The Kafka wire form of gateway events, written straight from the domain objects.

On Kafka an event is the proto3 JSON of its message (:func:`services.codec.encode_event`).  Going
domain -> generated message -> ``json_format`` costs more CPU per event than anything else the
gateway does besides gRPC itself, so the hot path builds the same JSON object directly.  The output
must stay identical to ``encode_event(event.to_proto())`` (same keys, enum names, timestamps, omitted
defaults); ``tests/unit/test_gateway_wire.py`` checks that for every event shape.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.events import Choice, Completion, Edit, Event, Feedback, Ranking, Regeneration, Scores, Thumbs
from services.schemas import float_to_ts

_ROLE = {"system": "ROLE_SYSTEM", "user": "ROLE_USER", "assistant": "ROLE_ASSISTANT", "tool": "ROLE_TOOL"}
_SPLIT = {"train": "SPLIT_TRAIN", "test": "SPLIT_TEST"}


def _ts(t: float) -> str:
    return float_to_ts(t).ToJsonString()


def _messages(messages: Any) -> list[dict[str, str]]:
    out = []
    for m in messages:
        d = {"role": _ROLE[m.role]}
        if m.content:
            d["content"] = m.content
        out.append(d)
    return out


def _put(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` unless ``value`` is a proto3 default (omitted in proto3 JSON)."""
    if value:
        d[key] = value


def completion_dict(c: Completion) -> dict[str, Any]:
    d: dict[str, Any] = {}
    _put(d, "event_id", c.event_id)
    _put(d, "completion_id", c.completion_id)
    _put(d, "project", c.project)
    _put(d, "prompt", _messages(c.prompt))
    _put(d, "candidates", list(c.candidates))
    _put(d, "model", c.model)
    _put(d, "model_version", c.model_version)
    _put(d, "metadata", dict(c.metadata))
    _put(d, "split", _SPLIT.get(c.split))
    if c.created_at:
        d["created_at"] = _ts(c.created_at)
    if c.acked_at:
        d["acked_at"] = _ts(c.acked_at)
    if c.criteria is not None:  # best-of-N with criteria only: not the hot path, so the generic encoder
        from google.protobuf import json_format

        d["criteria"] = json_format.MessageToDict(c.criteria.to_proto(), preserving_proto_field_name=True)
    return d


def _action(a: Any) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {}
    if isinstance(a, Choice):
        _put(body, "chosen_index", a.chosen_index)
        return "choice", body
    if isinstance(a, Regeneration):
        _put(body, "rejected_indices", list(a.rejected_indices))
        _put(body, "accepted_index", a.accepted_index)
        return "regeneration", body
    if isinstance(a, Edit):
        _put(body, "draft_index", a.draft_index)
        _put(body, "edited_text", a.edited_text)
        return "edit", body
    if isinstance(a, Ranking):
        _put(body, "ranked_indices", list(a.ranked_indices))
        return "ranking", body
    if isinstance(a, Scores):
        scores = []
        for s in a.scores:
            item: dict[str, Any] = {}
            _put(item, "index", s.index)
            if s.score is not None:  # optional field: present even when 0
                item["score"] = float(s.score)
            _put(item, "attributes", {k: float(v) for k, v in s.attributes.items()})
            scores.append(item)
        _put(body, "scores", scores)
        return "scores", body
    if isinstance(a, Thumbs):
        _put(body, "index", a.index)
        _put(body, "up", a.up)
        return "thumbs", body
    raise TypeError(f"unknown feedback action {type(a).__name__}")


def feedback_dict(fb: Feedback) -> dict[str, Any]:
    d: dict[str, Any] = {}
    _put(d, "event_id", fb.event_id)
    _put(d, "project", fb.project)
    if fb.inline is not None:
        inline: dict[str, Any] = {}
        _put(inline, "prompt", _messages(fb.inline.prompt))
        _put(inline, "outputs", list(fb.inline.outputs))
        d["inline"] = inline
    else:
        d["completion_id"] = fb.completion_id  # a set oneof member is present even when empty
    _put(d, "split", _SPLIT.get(fb.split))
    _put(d, "user_id", fb.user_id)
    _put(d, "metadata", dict(fb.metadata))
    if fb.created_at:
        d["created_at"] = _ts(fb.created_at)
    if fb.acked_at:
        d["acked_at"] = _ts(fb.acked_at)
    name, body = _action(fb.action)
    d[name] = body
    return d


def timestamp_json(t: float) -> str:
    """A Timestamp's proto3 JSON form (RFC 3339, UTC), e.g. for :func:`encode`'s ``acked_at``."""
    return _ts(t)


def encode(event: Event, *, acked_at: float | str | None = None) -> bytes:
    """The proto3 JSON bytes of ``event``, as ``encode_event(event.to_proto())`` writes them.

    ``acked_at`` (epoch seconds, or already :func:`timestamp_json`) replaces the event's own: the
    gateway stamps the hand-off time, the same for a whole batch.
    """
    d = completion_dict(event) if isinstance(event, Completion) else feedback_dict(event)
    if acked_at:
        d["acked_at"] = acked_at if isinstance(acked_at, str) else _ts(acked_at)
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
