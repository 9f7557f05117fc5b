"""``prefstream import``: stream a preference dataset through the gateway, like any other client.

Importing through the gateway (``StreamEvents`` in batches of 256 events, via
:meth:`gateway.client.GatewayClient.stream_events`) instead of writing Kafka directly means imported
data gets the same validation, authentication, dedup and processing as live feedback.  Each example
becomes a completion (the prompt and its outputs) and a feedback event about it: a **choice** of
output 0 for a pair, a **ranking** for a ranked list.  Event ids hash the project and the content, so
importing the same file again is answered "duplicate" and writes nothing new; the feedback carries
``metadata["prefstream.import"] = <format>`` so its records have source kind ``import``.

Formats (one JSON object per line; a file holding one JSON array works too):

* ``openpipe``: ``messages`` ending with the preferred assistant turn, ``rejected_message``, ``split``.
* ``ranked``: ``prompt`` (a string or chat messages) and ``ranked_outputs`` (best first, K >= 2).
* ``trl``: TRL's preference format, ``prompt``/``chosen``/``rejected`` as strings or as conversations
  (or ``chosen``/``rejected`` full conversations with an implicit shared prompt).
* ``hh``: Anthropic HH-RLHF transcripts, ``chosen``/``rejected`` as "\\n\\nHuman: ...\\n\\nAssistant: ...".

Bad lines are reported with their line number and reason and skipped; the run ends with a summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

from gateway.client import DEFAULT_BATCH_EVENTS, DEFAULT_INFLIGHT_BATCHES, GatewayClient
from gateway.derive import IMPORT_METADATA_KEY
from gateway.events import completion_id_for
from prefstream.events.v1 import events_pb2
from services.data import parse_openpipe
from services.errors import InvalidArgument
from services.schemas import ChatMessage, messages_from_dicts

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("openpipe", "ranked", "trl", "hh")
_ROLE = {"system": events_pb2.ROLE_SYSTEM, "user": events_pb2.ROLE_USER, "assistant": events_pb2.ROLE_ASSISTANT, "tool": events_pb2.ROLE_TOOL}
_SPLIT = {"train": events_pb2.SPLIT_TRAIN, "test": events_pb2.SPLIT_TEST}


@dataclass(frozen=True)
class Example:
    """One dataset example: a prompt and its outputs, best first (K = 2 for pairs)."""

    prompt: tuple[ChatMessage, ...]
    outputs: tuple[str, ...]
    split: str = "train"
    ranked: bool = False  # a K-way ranking (feedback "ranking") rather than a pair ("choice")


# ---------------------------------------------------------------------------------------------
# Parsing (pure)


def _prompt_of(value: Any, field: str) -> tuple[ChatMessage, ...]:
    if isinstance(value, str):
        if not value.strip():
            raise InvalidArgument(field, "is empty")
        return (ChatMessage(role="user", content=value),)
    if isinstance(value, list) and value:
        return tuple(messages_from_dicts(value, field))
    raise InvalidArgument(field, "must be a non-empty string or a list of {role, content} messages")


def _reply_of(value: Any, field: str) -> str:
    """A response given as a string or as a conversation whose last turn is the assistant's reply."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        msgs = messages_from_dicts(value, field)
        if msgs[-1].role != "assistant":
            raise InvalidArgument(f"{field}[{len(msgs) - 1}].role", "the response must end with an assistant turn")
        return msgs[-1].content
    raise InvalidArgument(field, "must be a string or a list of messages ending with the assistant's reply")


def _split_of(obj: dict, default: str) -> str:
    raw = obj.get("split")
    if raw is None or raw == "":
        return default
    s = str(raw).lower()
    if s not in _SPLIT:
        raise InvalidArgument("split", f"unknown split {raw!r}; use TRAIN or TEST")
    return s


def _pair(prompt: tuple[ChatMessage, ...], chosen: str, rejected: str, split: str) -> Example:
    if not chosen.strip():
        raise InvalidArgument("chosen", "the preferred response is empty")
    if not rejected.strip():
        raise InvalidArgument("rejected", "the rejected response is empty")
    if chosen == rejected:
        raise InvalidArgument("rejected", "is identical to the chosen response; a pair must differ")
    return Example(prompt=prompt, outputs=(chosen, rejected), split=split)


def parse_openpipe_example(obj: Any, default_split: str = "train") -> Example:
    rec = parse_openpipe(obj)
    split = _split_of(obj, default_split)
    return _pair(rec.prompt, rec.ranked_responses[0], rec.ranked_responses[1], split)


def parse_ranked(obj: Any, default_split: str = "train") -> Example:
    if not isinstance(obj, dict):
        raise InvalidArgument("line", "must be a JSON object with prompt and ranked_outputs")
    prompt = _prompt_of(obj.get("prompt"), "prompt")
    outs = obj.get("ranked_outputs")
    if not isinstance(outs, list) or len(outs) < 2:
        raise InvalidArgument("ranked_outputs", "must list at least 2 outputs, best first")
    for i, o in enumerate(outs):
        if not isinstance(o, str) or not o.strip():
            raise InvalidArgument(f"ranked_outputs[{i}]", "must be a non-empty string")
    if len(set(outs)) != len(outs):
        raise InvalidArgument("ranked_outputs", "lists the same output twice")
    return Example(prompt=prompt, outputs=tuple(outs), split=_split_of(obj, default_split), ranked=True)


def _common_prefix_split(chosen: list[ChatMessage], rejected: list[ChatMessage]) -> tuple[tuple[ChatMessage, ...], str, str]:
    if len(chosen) < 2 or len(rejected) < 2 or chosen[:-1] != rejected[:-1]:
        raise InvalidArgument("rejected", "chosen and rejected conversations must share every turn but the final reply")
    if chosen[-1].role != "assistant" or rejected[-1].role != "assistant":
        raise InvalidArgument("chosen", "both conversations must end with the assistant's reply")
    return tuple(chosen[:-1]), chosen[-1].content, rejected[-1].content


def parse_trl(obj: Any, default_split: str = "train") -> Example:
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        raise InvalidArgument("line", "must be a JSON object with chosen and rejected (and usually prompt)")
    split = _split_of(obj, default_split)
    if "prompt" in obj:
        prompt = _prompt_of(obj["prompt"], "prompt")
        return _pair(prompt, _reply_of(obj["chosen"], "chosen"), _reply_of(obj["rejected"], "rejected"), split)
    chosen, rejected = obj["chosen"], obj["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise InvalidArgument("prompt", "is missing; plain-string chosen/rejected need a prompt")
    prompt, c, r = _common_prefix_split(messages_from_dicts(chosen, "chosen"), messages_from_dicts(rejected, "rejected"))
    return _pair(prompt, c, r, split)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_transcript(text: str, field: str) -> list[ChatMessage]:
    """"\\n\\nHuman: ...\\n\\nAssistant: ..." -> chat messages (user/assistant)."""
    if not isinstance(text, str):
        raise InvalidArgument(field, "must be a transcript string")
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise InvalidArgument(field, "must start with '\\n\\nHuman:'")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append(ChatMessage(role="user" if speaker == "Human" else "assistant", content=content.strip()))
    if not msgs:
        raise InvalidArgument(field, "has no 'Human:'/'Assistant:' turns")
    return msgs


def parse_hh(obj: Any, default_split: str = "train") -> Example:
    if not isinstance(obj, dict):
        raise InvalidArgument("line", "must be a JSON object with chosen and rejected transcripts")
    chosen = parse_hh_transcript(obj.get("chosen"), "chosen")
    rejected = parse_hh_transcript(obj.get("rejected"), "rejected")
    prompt, c, r = _common_prefix_split(chosen, rejected)
    return _pair(prompt, c, r, _split_of(obj, default_split))


PARSERS = {"openpipe": parse_openpipe_example, "ranked": parse_ranked, "trl": parse_trl, "hh": parse_hh}


def detect_format(obj: Any) -> str:
    """Guess the format from one example's keys."""
    if isinstance(obj, dict):
        if "rejected_message" in obj and "messages" in obj:
            return "openpipe"
        if "ranked_outputs" in obj:
            return "ranked"
        if "chosen" in obj and "rejected" in obj:
            c = obj["chosen"]
            if "prompt" not in obj and isinstance(c, str) and "\n\nAssistant:" in c:
                return "hh"
            return "trl"
    raise InvalidArgument("format", "cannot tell the format from the first example; pass --format openpipe|ranked|trl|hh")


def read_items(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or the JSONDecodeError) for each non-empty line; a JSON array file by item."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for i, obj in enumerate(data, start=1):
            yield i, obj
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, e


def example_events(ex: Example, *, project: str, fmt: str) -> tuple[events_pb2.Completion, events_pb2.Feedback]:
    """The completion and feedback events of one example, with content-derived ids (re-import dedups)."""
    h = hashlib.sha256(project.encode())
    for m in ex.prompt:
        h.update(b"\x00" + m.role.encode() + b"\x01" + m.content.encode())
    for o in ex.outputs:
        h.update(b"\x02" + o.encode())
    h.update(b"\x03" + (b"rank" if ex.ranked else b"pair"))
    event_id = f"import-{h.hexdigest()[:32]}"
    split = _SPLIT[ex.split]
    completion = events_pb2.Completion(
        event_id=event_id,
        project=project,
        prompt=[events_pb2.ChatMessage(role=_ROLE[m.role], content=m.content) for m in ex.prompt],
        candidates=list(ex.outputs),
        split=split,
        metadata={IMPORT_METADATA_KEY: fmt},
    )
    feedback = events_pb2.Feedback(
        event_id=event_id + ".fb",
        project=project,
        completion_id=completion_id_for(project, event_id),
        split=split,
        metadata={IMPORT_METADATA_KEY: fmt},
    )
    if ex.ranked:
        feedback.ranking.ranked_indices.extend(range(len(ex.outputs)))
    else:
        feedback.choice.chosen_index = 0
    return completion, feedback


# ---------------------------------------------------------------------------------------------
# Streaming through the gateway


@dataclass
class ImportSummary:
    lines: int = 0
    examples: int = 0
    events_ok: int = 0
    duplicates: int = 0
    bad_lines: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad_lines and not self.rejected

    def describe(self) -> str:
        return (
            f"{self.lines} line(s): {self.examples} example(s) sent, {self.events_ok} event(s) written, "
            f"{self.duplicates} duplicate(s) already there, {len(self.bad_lines)} bad line(s), "
            f"{len(self.rejected)} event(s) rejected by the gateway"
        )


def import_file(
    path: str | Path,
    *,
    gateway: str,
    project: str,
    api_key: str | None = None,
    fmt: str | None = None,
    split: str | None = None,
    batch_size: int = DEFAULT_BATCH_EVENTS,
    inflight_batches: int = DEFAULT_INFLIGHT_BATCHES,
    progress: bool = True,
    out: TextIO = sys.stderr,
) -> ImportSummary:
    """Stream ``path`` through the gateway at ``gateway`` (host:port); see the module docstring.

    ``split`` forces every example's split ("train"/"test"); None keeps the file's (default train).
    Events go out in batches of ``batch_size`` (:meth:`GatewayClient.stream_events`), at most
    ``inflight_batches`` of them unanswered.  A failure of the call itself (bad key, gateway gone)
    raises the domain error; what was answered before it is written, and re-running resumes.
    """
    from tqdm import tqdm

    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise InvalidArgument("format", f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if split is not None and split not in _SPLIT:
        raise InvalidArgument("split", f"unknown split {split!r}; use train or test")
    summary = ImportSummary()
    # (line, "completion"/"feedback") of each event sent; answers come back in the same order.
    origin: deque[tuple[int, str]] = deque()
    total = sum(1 for _ in open(path, "rb"))
    bar = tqdm(total=total, unit="line", desc=f"import {path.name}", disable=not progress, file=out)
    lock = threading.Lock()  # bad lines are reported from gRPC's request thread, rejections from this one

    def report(where: list[str], text: str) -> None:
        with lock:
            where.append(text)
            if len(where) <= 20:
                bar.write(text, file=out)
            elif len(where) == 21:
                bar.write("... (further problems are counted in the summary)", file=out)

    def events() -> Iterator[Any]:
        nonlocal fmt
        for line, obj in read_items(path):
            summary.lines += 1
            bar.update(1)
            try:
                if isinstance(obj, json.JSONDecodeError):
                    raise InvalidArgument("line", f"not valid JSON ({obj.msg} at column {obj.colno})")
                fmt = fmt or detect_format(obj)
                ex = PARSERS[fmt](obj, split or "train")
                if split is not None:
                    ex = Example(prompt=ex.prompt, outputs=ex.outputs, split=split, ranked=ex.ranked)
                completion, feedback = example_events(ex, project=project, fmt=fmt)
            except InvalidArgument as e:
                report(summary.bad_lines, f"line {line}: {e}")
                continue
            summary.examples += 1
            origin.append((line, "completion"))
            yield completion
            origin.append((line, "feedback"))
            yield feedback

    try:
        with GatewayClient(gateway, api_key=api_key) as client:
            for result in client.stream_events(events(), batch_size=batch_size, inflight_batches=inflight_batches):
                line, kind = origin.popleft()
                if result.error is None:
                    summary.events_ok += 0 if result.duplicate else 1
                    summary.duplicates += 1 if result.duplicate else 0
                else:
                    err = result.error
                    report(summary.rejected, f"line {line}: {kind}: {err.grpc_code.name}: {err}")
    finally:
        bar.close()
    return summary
