"""The rules that turn one piece of feedback into preference records: pure functions, no I/O.

The processor (:mod:`gateway.processor`) fetches state and writes records; everything it decides
lives here, so the rules are tested exhaustively without Kafka or Redis.

Rules (``a > b`` means a record with ``ranked_responses == (a, b)``):

* choice        -> chosen > each other output shown (one pair per other distinct output).
* regeneration  -> accepted > each earlier, rejected output.
* edit          -> edited text > the draft.
* ranking       -> one K-way record, kept whole (later duplicates of an identical text are dropped).
* scores        -> the outputs ordered by score; every pair with different scores (ties dropped),
                   largest margins first, at most ``max_pairs`` per prompt; ``margin`` is the score
                   difference and ``response_attributes`` carries multi-attribute scores.
* thumbs        -> up > down for the same project + prompt, across completions, when both exist
                   (see :func:`derive_thumbs`).
* criteria      -> a completion whose candidates named criteria ranked (best-of-N with ``store``):
                   best > worst, or the whole ranking, by the combined score with ties broken by
                   the tie breaker and never paired (``pairs``: also best > the worst of its own
                   criteria class) (see :func:`derive_criteria`); no feedback event
                   is needed, and human feedback on the same completion derives its own records.

Every record carries the source kind (``import`` when the feedback came from a dataset import),
the event ids it came from, the completion id, the split (feedback's, else the completion's, else
train; a thumbs pair is test when either vote is) and ``source_acked_at`` (the feedback's
acknowledgement time, from which freshness is measured).  Record ids hash the sources and the
responses, so reprocessing the same events yields the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from gateway.events import Choice, Completion, Edit, Feedback, OutputScore, Ranking, Regeneration, Scores, Thumbs
from services.kinds import FeedbackKind
from services.schemas import ChatMessage, PreferenceRecord, make_record_id

#: Feedback metadata key the importer sets; records derived from such feedback have kind "import".
IMPORT_METADATA_KEY = "prefstream.import"


@dataclass(frozen=True)
class Target:
    """What a feedback event is about: a logged completion, or the inline one it carries."""

    completion_id: str
    prompt: tuple[ChatMessage, ...]
    outputs: tuple[str, ...]
    split: str = "train"
    #: The completion's own event id ("" for inline completions).
    event_id: str = ""


def target_of(fb: Feedback, completion: Completion | None) -> Target:
    """The Target of ``fb``: its inline completion, or ``completion`` (which must be the one it names)."""
    if fb.inline is not None:
        return Target(completion_id="", prompt=fb.inline.prompt, outputs=fb.inline.outputs, split="train")
    if completion is None or completion.completion_id != fb.completion_id:
        raise ValueError(f"feedback {fb.event_id} refers to completion {fb.completion_id}, which was not given")
    return Target(
        completion_id=completion.completion_id,
        prompt=completion.prompt,
        outputs=completion.candidates,
        split=completion.split,
        event_id=completion.event_id,
    )


def source_kind(fb: Feedback) -> FeedbackKind:
    return FeedbackKind.IMPORT if IMPORT_METADATA_KEY in fb.metadata else fb.kind


def record_split(fb: Feedback, target: Target) -> str:
    return fb.split or target.split or "train"


def ranking_score(s: OutputScore, weights: Mapping[str, float]) -> float:
    """The scalar an output is ranked by: its score, else the weighted sum of its attributes."""
    if s.score is not None:
        return float(s.score)
    return float(sum(w * s.attributes[name] for name, w in weights.items() if name in s.attributes))


def _record(
    fb: Feedback,
    target: Target,
    ranked: Sequence[str],
    *,
    now: float,
    margin: float = 0.0,
    attributes: Sequence[Mapping[str, float]] = (),
) -> PreferenceRecord:
    sources = tuple(e for e in (fb.event_id, target.event_id) if e)
    return PreferenceRecord(
        record_id=make_record_id(sources, ranked),
        project=fb.project,
        prompt=target.prompt,
        ranked_responses=tuple(ranked),
        source_kind=source_kind(fb),
        source_event_ids=sources,
        completion_id=target.completion_id,
        split=record_split(fb, target),
        response_attributes=tuple(dict(a) for a in attributes),
        margin=margin,
        created_at=now,
        source_acked_at=fb.acked_at,
    )


def _one_over_each(fb: Feedback, target: Target, best: int, others: Sequence[int], now: float) -> list[PreferenceRecord]:
    """``best`` over each of ``others``: identical texts are skipped, each distinct loser once."""
    out = []
    winner = target.outputs[best]
    seen: set[str] = set()
    for i in others:
        loser = target.outputs[i]
        if i == best or loser == winner or loser in seen:
            continue
        seen.add(loser)
        out.append(_record(fb, target, (winner, loser), now=now))
    return out


def derive(
    fb: Feedback,
    target: Target,
    *,
    now: float,
    max_pairs: int = 16,
    weights: Mapping[str, float] | None = None,
) -> list[PreferenceRecord]:
    """Preference records implied by ``fb`` about ``target`` (thumbs: see :func:`derive_thumbs`).

    ``fb`` must already have passed :func:`gateway.validation.check_feedback_against` for ``target``.
    An empty list means the feedback states no preference (e.g. every score ties).
    """
    a = fb.action
    n = len(target.outputs)
    if isinstance(a, Choice):
        return _one_over_each(fb, target, a.chosen_index, range(n), now)
    if isinstance(a, Regeneration):
        return _one_over_each(fb, target, a.accepted_index, a.rejected_indices, now)
    if isinstance(a, Edit):
        draft = target.outputs[a.draft_index]
        if a.edited_text == draft:
            return []
        return [_record(fb, target, (a.edited_text, draft), now=now)]
    if isinstance(a, Ranking):
        ranked: list[str] = []
        for i in a.ranked_indices:
            text = target.outputs[i]
            if text not in ranked:
                ranked.append(text)
        return [_record(fb, target, ranked, now=now)] if len(ranked) >= 2 else []
    if isinstance(a, Scores):
        return _from_scores(fb, target, a, now=now, max_pairs=max_pairs, weights=weights or {"helpfulness": 1.0})
    if isinstance(a, Thumbs):
        raise ValueError("thumbs need the prompt's other votes; use derive_thumbs")
    raise TypeError(f"unknown feedback action {type(a).__name__}")


def _from_scores(
    fb: Feedback,
    target: Target,
    scores: Scores,
    *,
    now: float,
    max_pairs: int,
    weights: Mapping[str, float],
) -> list[PreferenceRecord]:
    scored = [(ranking_score(s, weights), s) for s in scores.scores]
    # Candidate pairs (better, worse) with their margins; ties and identical texts state nothing.
    pairs: list[tuple[float, int, int, OutputScore, OutputScore]] = []
    for x_score, x in scored:
        for y_score, y in scored:
            if x_score > y_score and target.outputs[x.index] != target.outputs[y.index]:
                pairs.append((x_score - y_score, x.index, y.index, x, y))
    # Largest margin first (the most reliable preferences); indices break ties deterministically.
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    out: list[PreferenceRecord] = []
    seen: set[tuple[str, str]] = set()
    for margin, xi, yi, x, y in pairs:
        texts = (target.outputs[xi], target.outputs[yi])
        if texts in seen:
            continue
        seen.add(texts)
        attrs = (dict(x.attributes), dict(y.attributes)) if (x.attributes or y.attributes) else ()
        out.append(_record(fb, target, texts, now=now, margin=margin, attributes=attrs))
        if len(out) >= max_pairs:
            break
    return out


# ---------------------------------------------------------------------------------------------
# Thumbs: pairs across votes on the same prompt


@dataclass(frozen=True)
class ThumbVote:
    """One thumbs vote as kept per prompt: which response, which way, and where it came from."""

    event_id: str
    response: str
    up: bool
    completion_id: str = ""
    completion_event_id: str = ""
    split: str = "train"
    acked_at: float = 0.0
    kind: FeedbackKind = FeedbackKind.THUMBS

    def to_dict(self) -> dict:
        return {
            "event_id": self.event_id,
            "response": self.response,
            "up": self.up,
            "completion_id": self.completion_id,
            "completion_event_id": self.completion_event_id,
            "split": self.split,
            "acked_at": self.acked_at,
            "kind": self.kind.value,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "ThumbVote":
        return cls(
            event_id=str(d["event_id"]),
            response=str(d["response"]),
            up=bool(d["up"]),
            completion_id=str(d.get("completion_id", "")),
            completion_event_id=str(d.get("completion_event_id", "")),
            split=str(d.get("split", "train")),
            acked_at=float(d.get("acked_at", 0.0)),
            kind=FeedbackKind.parse(d.get("kind", FeedbackKind.THUMBS), "kind"),
        )


def thumb_vote(fb: Feedback, target: Target) -> ThumbVote:
    """The vote ``fb`` (a thumbs feedback about ``target``) casts."""
    if not isinstance(fb.action, Thumbs):
        raise TypeError("not a thumbs feedback")
    return ThumbVote(
        event_id=fb.event_id,
        response=target.outputs[fb.action.index],
        up=fb.action.up,
        completion_id=target.completion_id,
        completion_event_id=target.event_id,
        split=record_split(fb, target),
        acked_at=fb.acked_at,
        kind=source_kind(fb),
    )


def derive_thumbs(
    new: ThumbVote,
    others: Sequence[ThumbVote],
    *,
    project: str,
    prompt: tuple[ChatMessage, ...],
    now: float,
    max_pairs: int = 16,
) -> list[PreferenceRecord]:
    """Pairs that ``new`` completes with the prompt's earlier votes ``others``: each up > each down.

    Only opposite votes on different texts pair up (a text voted up by one user and down by another
    never forms a pair with itself), and a replayed vote never pairs with its own earlier copy.  The oldest counterparts pair first (ordered by ack time,
    then event id), at most ``max_pairs`` for one new vote, so a hot prompt cannot explode.  The
    record's ``source_acked_at`` is the new vote's: the record became derivable when it arrived.
    """
    opposite = sorted(
        (o for o in others if o.up != new.up and o.event_id != new.event_id and o.response != new.response),
        key=lambda o: (o.acked_at, o.event_id),
    )
    out: list[PreferenceRecord] = []
    seen: set[str] = set()
    for o in opposite:
        if o.response in seen:
            continue
        seen.add(o.response)
        up, down = (new, o) if new.up else (o, new)
        ranked = (up.response, down.response)
        sources = tuple(dict.fromkeys(e for e in (up.event_id, down.event_id, up.completion_event_id, down.completion_event_id) if e))
        out.append(
            PreferenceRecord(
                record_id=make_record_id(sources, ranked),
                project=project,
                prompt=prompt,
                ranked_responses=ranked,
                source_kind=(FeedbackKind.IMPORT if FeedbackKind.IMPORT in (up.kind, down.kind)
                             else FeedbackKind.THUMBS),
                source_event_ids=sources,
                completion_id=up.completion_id,
                split="test" if "test" in (up.split, down.split) else "train",
                created_at=now,
                source_acked_at=new.acked_at,
            )
        )
        if len(out) >= max_pairs:
            break
    return out


def derive_criteria(c: Completion, mode: str, *, now: float,
                    trim: Callable[[str], list[str]] | None = None) -> list[PreferenceRecord]:
    """The criteria preferences of a completion ranked by named criteria (none when all replies tie;
    two with ``pairs``: see :func:`services.criteria_eval.preferences_from_scores`, which also says
    what ``trim`` is for mode ``trim``).

    Its sources are the completion's event id and ``criterion:name@version`` of every criterion, so the
    record id is deterministic (a replayed completion gives the same record) and differs from any record
    human feedback on the same completion derives."""
    from services.criteria_eval import preferences_from_scores

    cs = c.criteria
    if cs is None:
        return []
    return preferences_from_scores(
        c.prompt, c.candidates, cs.scores, cs.tie_break or None, mode=mode, criteria=cs.refs, project=c.project,
        completion_id=c.completion_id, source_event_ids=(c.event_id,), split=c.split,
        attributes=cs.per_criterion or None, now=now, acked_at=c.acked_at, trim=trim)
