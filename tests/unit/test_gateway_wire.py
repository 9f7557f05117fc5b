"""The gateway's direct JSON encoding must equal services.codec.encode_event of the same message."""

from __future__ import annotations

import json

import pytest

from gateway import wire
from gateway.events import (
    Choice,
    CriteriaScores,
    Completion,
    Edit,
    Feedback,
    InlineCompletion,
    OutputScore,
    Ranking,
    Regeneration,
    Scores,
    Thumbs,
)
from services.codec import decode_event, encode_event
from services.schemas import ChatMessage

PROMPT = (ChatMessage("system", "Be brief."), ChatMessage("user", "Wie spät ist es? ✓"))


def _same(event) -> None:
    ours = json.loads(wire.encode(event))
    reference = json.loads(encode_event(event.to_proto()))
    assert ours == reference


@pytest.mark.parametrize(
    "completion",
    [
        Completion(event_id="e1", project="p", prompt=PROMPT, candidates=("a", "b"), completion_id="cmp_1"),
        Completion(event_id="e3", project="p", prompt=PROMPT, candidates=("a", "b"), completion_id="cmp_3",
                   criteria=CriteriaScores(refs=("concise@v2",), scores=(1.0, 0.25), tie_break=(0.5, -1.5),
                                           per_criterion=({"concise": 1.0}, {"concise": 0.0}), mode="ranking")),
        Completion(
            event_id="e2", project="p", prompt=PROMPT, candidates=("x",), completion_id="cmp_2", model="m",
            model_version="v3", metadata={"k": "v", "ü": "ß"}, split="test", created_at=1700000000.5,
            acked_at=1700000001.123456,
        ),
    ],
)
def test_completion_encoding_matches_json_format(completion: Completion) -> None:
    _same(completion)


ACTIONS = [
    Choice(0),
    Choice(3),
    Regeneration(rejected_indices=(0, 2), accepted_index=1),
    Regeneration(rejected_indices=(1,), accepted_index=0),
    Edit(draft_index=0, edited_text="better"),
    Ranking(ranked_indices=(2, 0, 1)),
    Scores(scores=(OutputScore(0, score=0.0), OutputScore(1, score=-1.5))),
    Scores(scores=(OutputScore(0, attributes={"helpfulness": 3.0, "verbosity": 0.0}), OutputScore(2, attributes={"helpfulness": 1.0}))),
    Thumbs(index=0, up=False),
    Thumbs(index=2, up=True),
]


@pytest.mark.parametrize("action", ACTIONS, ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("inline", [False, True])
def test_feedback_encoding_matches_json_format(action, inline: bool) -> None:
    fb = Feedback(
        event_id="f1",
        project="p",
        action=action,
        completion_id="" if inline else "cmp_1",
        inline=InlineCompletion(prompt=PROMPT, outputs=("a", "b", "c", "d")) if inline else None,
        split="test" if inline else "",
        user_id="u" if inline else "",
        metadata={"src": "app"} if inline else {},
        acked_at=1700000002.0,
    )
    _same(fb)


def test_acked_at_override_is_what_decodes_back() -> None:
    from prefstream.events.v1.events_pb2 import Completion as CompletionProto

    c = Completion(event_id="e1", project="p", prompt=PROMPT, candidates=("a", "b"), completion_id="cmp_1")
    msg = decode_event(wire.encode(c, acked_at=1700000003.25), CompletionProto)
    assert msg.acked_at.seconds == 1700000003 and msg.acked_at.nanos == 250_000_000
