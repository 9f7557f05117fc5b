"""Prompts for the criteria loop, and the measures it takes of the served policy: pure functions.

Prompt files come in three shapes, told apart line by line: OpenPipe JSONL (the first user turn of
``messages`` is the prompt), JSONL with a ``prompt`` string or a ``messages`` list, and plain text
(one prompt per line).  Duplicates are dropped (first kept), so the counts the loop reports are
distinct prompts.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

from services.criteria_eval import CriterionResult, count_words, mean_words
from services.data import load_distinct_lines
from services.errors import InvalidArgument
from services.schemas import ChatMessage


def _first_user_turn(messages: Any, where: str) -> str:
    if not isinstance(messages, list):
        raise InvalidArgument(where, "must be a list of {role, content} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InvalidArgument(f"{where}[{i}]", "must be an object with a string 'content'")
        if str(m.get("role", "")).lower() in ("user", "role_user"):
            return m["content"]
    raise InvalidArgument(where, "has no user message to use as the prompt")


def parse_prompt_line(line: str, where: str) -> str:
    """The prompt on one line of a prompt file (see the module doc); errors name the line."""
    text = line.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidArgument(where, f"looks like JSON but does not parse ({e.msg}); write one JSON object "
                                         "or one plain-text prompt per line") from None
        if isinstance(obj.get("prompt"), str):
            prompt = obj["prompt"]
        elif "messages" in obj:
            prompt = _first_user_turn(obj["messages"], f"{where}.messages")
        else:
            raise InvalidArgument(where, "a JSON line needs a 'prompt' string or a 'messages' list")
    else:
        prompt = text
    prompt = prompt.strip()
    if not prompt:
        raise InvalidArgument(where, "is an empty prompt")
    return prompt


def load_prompts(path: str | os.PathLike, *, field_name: str = "prompts") -> list[str]:
    """Distinct prompts of a prompt file, in file order (blank lines skipped)."""
    return load_distinct_lines(path, field_name, parse_prompt_line, lambda p: p, items="prompts",
                               file_hint="JSONL or text file with one prompt per line")


@dataclass(frozen=True)
class PromptPlan:
    """The prompts of one loop run: evaluation prompts, and per phase the training prompts."""

    eval_prompts: tuple[str, ...]
    phases: tuple[tuple[str, ...], ...]
    dropped_overlap: int  # training prompts dropped because they are evaluation prompts
    #: the gate's own guard prompts: from the training file, set aside before the phases take theirs
    guard_prompts: tuple[str, ...] = ()

    @property
    def train_prompts(self) -> int:
        return sum(len(p) for p in self.phases)


def plan_prompts(train: Sequence[str], evaluation: Sequence[str], *, eval_count: int, per_phase: int,
                 phases: int, seed: int, guard_count: int = 0) -> PromptPlan:
    """Held-out evaluation prompts, ``guard_count`` guard prompts for the gate, and disjoint, shuffled
    training prompts for each phase.

    No evaluation prompt is ever trained on: training prompts equal to one are dropped first.  The guard
    prompts come from the training file, are never trained on and are not evaluation prompts: the gate
    selects versions on them, and the evaluation measures what was selected on prompts selection never
    saw.  Phases get different prompts while there are enough, so a later phase is not measured on what
    an earlier one trained on.
    """
    if eval_count > len(evaluation):
        raise InvalidArgument("eval_count", f"asks for {eval_count} evaluation prompts but the file has "
                                            f"{len(evaluation)}; lower eval_count or give more eval_prompts")
    held = tuple(evaluation[:eval_count])
    held_set = set(held)
    pool = [p for p in train if p not in held_set]
    dropped = len(train) - len(pool)
    if not pool:
        raise InvalidArgument("prompts", "every training prompt is also an evaluation prompt; give disjoint files")
    rng = random.Random(seed)
    rng.shuffle(pool)
    if guard_count and guard_count >= len(pool):
        raise InvalidArgument("guard_prompts", f"sets {guard_count} training prompts aside for the gate but the "
                                               f"training file has {len(pool)} besides the evaluation prompts; lower "
                                               "guard_prompts, turn guard_set off or give more prompts")
    guard, pool = tuple(pool[:guard_count]), pool[guard_count:]
    chunks = []
    for k in range(phases):
        start = (k * per_phase) % len(pool)
        chunk = [pool[(start + j) % len(pool)] for j in range(min(per_phase, len(pool)))]
        chunks.append(tuple(chunk))
    return PromptPlan(eval_prompts=held, phases=tuple(chunks), dropped_overlap=dropped, guard_prompts=guard)


def conversation(prompt: str, system_prompt: str) -> tuple[ChatMessage, ...]:
    msgs = [ChatMessage("system", system_prompt)] if system_prompt else []
    return tuple(msgs + [ChatMessage("user", prompt)])


def violated(result: CriterionResult) -> bool:
    """A reply breaks a criterion when it fails it (pass/fail criteria) or scores under one half
    (graded ones); a criterion that could not score the reply counts as broken (never as kept)."""
    if result.status != "success":
        return True
    if result.passed is not None:
        return not result.passed
    return result.score < 0.5


def violation_rate(results: Sequence[CriterionResult]) -> float:
    return sum(violated(r) for r in results) / len(results) if results else math.nan


def win_rate(new: Sequence[float], old: Sequence[float]) -> float:
    """Share of prompts where the new reply's reward beats the old one's; ties count half."""
    if len(new) != len(old) or not new:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(new, old)) / len(new)


def retention(base: float, after_own_phase: float, after_later_phase: float) -> float:
    """How much of a criterion's violation-rate cut survives a later phase: the cut after the later
    phase as a share of the cut right after its own phase (1 = all kept, 0 = all lost; nan when its
    own phase cut nothing)."""
    cut = base - after_own_phase
    if cut <= 0:
        return math.nan
    return (base - after_later_phase) / cut


def word_spread(texts: Sequence[str]) -> dict[str, float]:
    """The 10th, 50th and 90th percentile of the replies' word counts (nearest rank): whether a policy
    narrowed its lengths under a limit or moved all of them down shows here, not in the mean."""
    counts = sorted(count_words(t) for t in texts)
    if not counts:
        return {}
    return {f"p{q}": float(counts[min(len(counts) - 1, max(0, math.ceil(q / 100 * len(counts)) - 1))])
            for q in (10, 50, 90)}


__all__ = [
    "PromptPlan", "conversation", "load_prompts", "mean_words", "parse_prompt_line", "plan_prompts", "retention",
    "violated", "violation_rate", "win_rate", "word_spread",
]
