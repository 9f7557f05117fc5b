"""The prompts the policy gate's guards reply to, and the gate's own guard set (``guard_set``).

Without a guard set the guards reply to the prompts of the held-out (TEST-split) records as they arrive
from the stream: a fresh stream judges its first versions on the handful that came before them (the
criteria loop's first versions on 6-8 prompts, while its evaluation needs 48 to see the changes that
decided its runs, docs/loop.md).  A guard set is a JSONL file of prompts fixed before training starts,
one object per line::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "criteria": ["concise@v1"], "project": "default"}

``criteria`` (optional) are the ``name@version`` rule criteria the criteria guard judges the replies to that
prompt by, as a criteria-feedback record names them; ``project`` (default ``default``) is where they are stored.
The file is read at every evaluation, so a writer may replace it (atomically, as :func:`write_guard_set` does)
to judge new criteria on the same prompts: the criteria loop names each phase's criteria there as it starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from services.criteria import split_ref
from services.criteria_eval import record_criteria
from services.data import load_distinct_lines
from services.errors import InvalidArgument
from services.schemas import ChatMessage, PreferenceRecord, messages_from_dicts, prompt_hash


@dataclass(frozen=True)
class GuardPrompt:
    """One prompt the guards reply to, with the rule criteria its replies are judged by."""

    key: str  # stable across reads: the reference policy's replies are kept per set of keys
    prompt: tuple[ChatMessage, ...]
    project: str = "default"
    criteria: tuple[str, ...] = ()  # name@version refs
    #: a held-out record's best response, the KL's second set of tokens; "" for a guard-set prompt, whose
    #: reference reply takes its place
    chosen: str = ""

    @classmethod
    def make(cls, prompt: tuple[ChatMessage, ...], project: str = "default", criteria: tuple[str, ...] = ()) -> GuardPrompt:
        """A guard-set prompt, keyed as :func:`load_guard_set` keys it."""
        return cls("guard:" + prompt_hash(project, prompt), prompt, project, criteria)

    @classmethod
    def of_record(cls, record: PreferenceRecord) -> GuardPrompt:
        return cls(record.record_id, record.prompt, record.project, tuple(record_criteria(record.source_event_ids)),
                   record.chosen)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": [m.to_dict() for m in self.prompt]}
        if self.criteria:
            out["criteria"] = list(self.criteria)
        if self.project != "default":
            out["project"] = self.project
        return out


def parse_guard_prompt(obj: Any, where: str) -> GuardPrompt:
    """One line of a guard set, parsed; errors name the line and the field."""
    if not isinstance(obj, dict):
        raise InvalidArgument(where, "must be a JSON object with a 'messages' list")
    unknown = set(obj) - {"messages", "criteria", "project"}
    if unknown:
        raise InvalidArgument(f"{where}.{sorted(unknown)[0]}", "is not a guard-set field; use messages, criteria, project")
    if not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise InvalidArgument(f"{where}.messages", "must be a non-empty list of {role, content} messages")
    prompt = tuple(messages_from_dicts(obj["messages"], f"{where}.messages"))
    criteria = obj.get("criteria", [])
    if not isinstance(criteria, list) or not all(isinstance(c, str) for c in criteria):
        raise InvalidArgument(f"{where}.criteria", "must be a list of name@version strings")
    for i, ref in enumerate(criteria):
        _, version = split_ref(ref, f"{where}.criteria[{i}]")
        if not version:
            raise InvalidArgument(f"{where}.criteria[{i}]", f"{ref!r} names no version; write name@version, as a "
                                                            "criteria-feedback record does (a stored version never changes)")
    project = obj.get("project", "default")
    if not isinstance(project, str) or not project:
        raise InvalidArgument(f"{where}.project", "must be a non-empty project name")
    return GuardPrompt.make(prompt, project, tuple(criteria))


def load_guard_set(path: str | os.PathLike, field_name: str = "guard_set") -> list[GuardPrompt]:
    """The distinct prompts of a guard-set file, in file order (a repeated prompt keeps its first line)."""
    return load_distinct_lines(path, field_name, _parse_line, lambda g: g.key, items="guard prompts",
                               file_hint="JSONL file of guard prompts (trainer/guard_set.py)")


def _parse_line(line: str, where: str) -> GuardPrompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgument(where, f"is not JSON ({e.msg}); write one JSON object per line") from None
    return parse_guard_prompt(obj, where)


def write_guard_set(path: str | os.PathLike, prompts: Iterable[GuardPrompt]) -> None:
    """Write (or replace) a guard set atomically: a reader sees the old file or the new one, never half."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for g in prompts:
            f.write(json.dumps(g.to_dict(), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


__all__ = ["GuardPrompt", "load_guard_set", "parse_guard_prompt", "write_guard_set"]
