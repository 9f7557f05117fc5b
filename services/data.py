"""Reading preference datasets from disk (the OpenPipe JSONL format) into PreferenceRecords.

The trainer's offline entry points, the evaluation gate and the benchmarks read files directly with
this module; the gateway's importer streams the same formats through the API instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterator, TypeVar

from services.errors import InvalidArgument
from services.kinds import FeedbackKind, Split
from services.schemas import ChatMessage, PreferenceRecord, make_record_id, messages_from_dicts

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
TRAIN_FILE = "hh_helpful_train_2k.jsonl"
TEST_FILE = "hh_helpful_test_500.jsonl"


def shared_data_dir() -> Path:
    """Where the shipped HH-RLHF preference files live: $PREFSTREAM_DATA_DIR, else ../shared/data."""
    env = os.environ.get("PREFSTREAM_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"]
    for c in candidates:
        if (c / TRAIN_FILE).exists():
            return c
    raise FileNotFoundError(
        f"preference data not found (looked in {', '.join(map(str, candidates))}); "
        "set PREFSTREAM_DATA_DIR to the folder holding hh_helpful_train_2k.jsonl"
    )


@dataclass(frozen=True)
class LineError:
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.reason}"


def load_distinct_lines(path: str | os.PathLike, field_name: str, parse: Callable[[str, str], T],
                        key: Callable[[T], Hashable], *, items: str, file_hint: str) -> list[T]:
    """``parse(line, where)`` of every non-blank line of a file, in file order, the first of each ``key``
    kept (``where`` names the field, the file and the line, for errors); ``items`` and ``file_hint`` name
    what the file holds and what to give instead, for the errors of a missing or empty file."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(field_name, f"{p} is not a file; give a {file_hint}")
    out: list[T] = []
    seen: set[Hashable] = set()
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = parse(line, f"{field_name} ({p.name} line {n})")
            if key(item) not in seen:
                seen.add(key(item))
                out.append(item)
    if not out:
        raise InvalidArgument(field_name, f"{p} holds no {items}")
    return out


def parse_openpipe(obj: object, *, line: int = 0) -> PreferenceRecord:
    """One OpenPipe preference example -> a K=2 PreferenceRecord.

    The format: ``messages`` ends with the preferred assistant turn, ``rejected_message`` is the
    rejected assistant turn, ``split`` is TRAIN or TEST (default TRAIN).
    """
    if not isinstance(obj, dict):
        raise InvalidArgument("line", "must be a JSON object")
    raw_messages = obj.get("messages")
    if not isinstance(raw_messages, list) or len(raw_messages) < 2:
        raise InvalidArgument("messages", "needs the prompt turns followed by the preferred assistant turn")
    messages = messages_from_dicts(raw_messages)
    if messages[-1].role != "assistant":
        raise InvalidArgument(f"messages[{len(messages) - 1}].role", "the last message must be the preferred assistant turn")
    rejected = obj.get("rejected_message")
    if not isinstance(rejected, dict) or not isinstance(rejected.get("content"), str):
        raise InvalidArgument("rejected_message", "must be an object with the rejected assistant content")
    chosen, rej = messages[-1].content, rejected["content"]
    if not chosen.strip() or not rej.strip():
        raise InvalidArgument("messages" if not chosen.strip() else "rejected_message.content", "response is empty")
    split = str(obj.get("split") or "TRAIN").lower()
    if split not in Split.values():
        raise InvalidArgument("split", f"unknown split {obj.get('split')!r}; use TRAIN or TEST")
    prompt = tuple(messages[:-1])
    source = f"line:{line}"
    return PreferenceRecord(
        record_id=make_record_id([source, *(m.content for m in prompt)], [chosen, rej]),
        prompt=prompt,
        ranked_responses=(chosen, rej),
        source_kind=FeedbackKind.IMPORT,
        source_event_ids=(source,),
        split=split,
    )


def iter_openpipe_jsonl(path: str | os.PathLike) -> Iterator[PreferenceRecord | LineError]:
    """Yield a record per good line and a LineError per bad line (line numbers from 1)."""
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield parse_openpipe(json.loads(text), line=n)
            except json.JSONDecodeError as e:
                yield LineError(n, "line", f"not valid JSON ({e.msg})")
            except InvalidArgument as e:
                yield LineError(n, e.field or "line", e.message)


def load_openpipe_jsonl(path: str | os.PathLike, *, strict: bool = True) -> list[PreferenceRecord]:
    """All records of a file; with ``strict`` the first bad line raises naming its line number."""
    records: list[PreferenceRecord] = []
    for item in iter_openpipe_jsonl(path):
        if isinstance(item, LineError):
            if strict:
                raise InvalidArgument(f"{path}:{item.line}:{item.field}", item.reason)
            continue
        records.append(item)
    return records


def chat(prompt: list[dict]) -> list[ChatMessage]:
    """Convenience for tests and examples: OpenAI-style dicts -> ChatMessages."""
    return messages_from_dicts(prompt)
