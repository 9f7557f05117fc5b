"""Hostile inputs against the live services: one named corpus, and a runner that sends it and checks health.

Why it exists: the gateway (HTTP + gRPC) and the scorer (gRPC) face untrusted clients.  Whatever arrives,
the answer must be a client error (HTTP 4xx, gRPC INVALID_ARGUMENT or another client code where that is
the right one) that names the offending field, never a 5xx / INTERNAL / UNKNOWN, and the services must
stay healthy afterwards.  :data:`CASES` is that promise as data -- wrong JSON types for the important
fields, missing fields, unknown enum values, nesting 100,000 deep, strings over the limits of
``gateway/config.py``, invalid UTF-8, lone surrogates, NaN, 2^70 and 400-digit numbers, truncated and
garbage bodies and protobuf frames, oversized headers and messages, out-of-range protobuf fields -- so
the integration tests and ``prefstream bench chaos`` run the very same list through :func:`run_corpus`.

A case's payload may say ``$PROJECT``: it is replaced by the project whose API key the run uses (every
case is refused, so nothing is ever written to Kafka).  Over gRPC a ``dict`` payload is the proto3 JSON
of the method's request (built into the message, so protobuf values JSON cannot express still go out),
``bytes`` go out verbatim through a raw channel.  The chat cases expect the gateway's scorer to serve the
default models (``reward``, and ``policy`` listed as a policy; it need not be loaded) with the default
limits of ``scorer/config.py``.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig
from gateway.http import MAX_BODY_BYTES
from prefstream.gateway.v1 import gateway_pb2
from prefstream.scorer.v1 import scorer_pb2
from scorer.config import DEFAULT_POLICY_MODEL, DEFAULT_REWARD_MODEL, ScorerConfig
from services.errors import http_status_for_grpc

# ---------------------------------------------------------------------------------------------
# What a case is


@dataclass(frozen=True)
class Repeat:
    """``head + unit * count + tail``, built only when sent (a 33 MiB body is not held by the corpus)."""

    head: bytes
    unit: bytes
    count: int
    tail: bytes = b""

    def render(self) -> bytes:
        return self.head + self.unit * self.count + self.tail


@dataclass(frozen=True)
class Appended:
    """gRPC only: the request ``message`` (proto3 JSON, ``$PROJECT`` replaced) serialized, then ``tail``:
    raw bytes protobuf merges into it (a value no generated class would let us set)."""

    message: dict
    tail: bytes


@dataclass(frozen=True)
class Expect:
    """The answer a case must get.

    ``code`` is the gRPC status name; over HTTP the status is the one :mod:`services.errors` maps it to,
    unless ``http`` lists the statuses the HTTP server itself answers (405, 413, oversized headers).
    ``field`` is the field the error must name (HTTP ``error.param``, gRPC ``"<field>: ..."`` details),
    ``words`` a fragment of its message.  ``event`` is set for the batch routes, which answer 200 / OK
    and refuse each event in its own status: the status of result ``event``.
    """

    code: str = "INVALID_ARGUMENT"
    field: str | None = None
    words: str = ""
    http: tuple[int, ...] = ()
    event: int | None = None

    def http_statuses(self) -> tuple[int, ...]:
        if self.event is not None:
            return (200,)
        return self.http or (http_status_for_grpc(grpc.StatusCode[self.code]),)


@dataclass(frozen=True)
class Case:
    """One hostile input: ``target`` is an HTTP path or a full gRPC method (``/pkg.Service/Method``)."""

    name: str
    target: str
    payload: Any
    expect: Expect
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    auth: bool = True
    #: Answered only after the gateway asked the scorer (the OpenAI routes' model lookup): needs scorer_grpc.
    via_scorer: bool = False

    @property
    def service(self) -> str:
        """Which address ``run_corpus`` sends it to: gateway_http, gateway_grpc or scorer_grpc."""
        if self.target.startswith(SCORER):
            return "scorer_grpc"
        return "gateway_grpc" if self.target.startswith(GATEWAY) else "gateway_http"


# ---------------------------------------------------------------------------------------------
# Building blocks

GATEWAY = "/prefstream.gateway.v1.GatewayService/"
SCORER = "/prefstream.scorer.v1.ScorerService/"
LOG_COMPLETION, LOG_FEEDBACK, STREAM_EVENTS = (GATEWAY + m for m in ("LogCompletion", "LogFeedback", "StreamEvents"))
SCORE, BEST_OF_N = SCORER + "Score", SCORER + "BestOfN"
REQUEST_TYPES = {
    LOG_COMPLETION: gateway_pb2.LogCompletionRequest, LOG_FEEDBACK: gateway_pb2.LogFeedbackRequest,
    STREAM_EVENTS: gateway_pb2.StreamEventsRequest, SCORE: scorer_pb2.ScoreRequest, BEST_OF_N: scorer_pb2.BestOfNRequest,
}
COMPLETIONS, FEEDBACK, BATCH, CHAT = "/v1/completions/log", "/v1/feedback", "/v1/events:batch", "/v1/chat/completions"

PROJECT = "$PROJECT"
OTHER = PROJECT + "-other"  # a project the run's key does not belong to
GW = GatewayConfig()  # the limits the gateway enforces by default
SC = ScorerConfig()
DEEP = 100_000
OVER_BODY = MAX_BODY_BYTES + 1024 * 1024
OMIT = object()  # a field left out of a payload

USER = {"role": "ROLE_USER", "content": "q"}  # events and the scorer: the proto enum name
CHAT_USER = {"role": "user", "content": "q"}  # the OpenAI route
REPLY = {"role": "assistant", "content": "a"}
INLINE = {"prompt": [USER], "outputs": ["a", "b", "c"]}


def _merge(base: dict, changes: dict) -> dict:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not OMIT}


def completion(**changes: Any) -> dict:
    """A LogCompletionRequest body with ``changes`` to its completion (OMIT removes a field)."""
    return {"completion": _merge({"project": PROJECT, "prompt": [USER], "candidates": ["a", "b", "c"]}, changes)}


def feedback(**changes: Any) -> dict:
    """A LogFeedbackRequest body about an inline 3-output completion, with ``changes``."""
    return {"feedback": _merge({"project": PROJECT, "inline": INLINE}, changes)}


def chat(**changes: Any) -> dict:
    """A /v1/chat/completions body scoring one reply with the reward model, with ``changes``."""
    return _merge({"model": DEFAULT_REWARD_MODEL, "messages": [CHAT_USER, REPLY]}, changes)


def bon(**changes: Any) -> dict:
    """A best-of-N body for the policy (sent with an ``op-criteria`` header)."""
    return _merge({"model": DEFAULT_POLICY_MODEL, "messages": [CHAT_USER], "n": 2}, changes)


def choice(index: Any) -> dict:
    return feedback(choice={"chosen_index": index})


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _tag(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _embedded(number: int, body: bytes) -> bytes:
    """Field ``number`` holding ``body`` (a message or a string), in protobuf's wire format."""
    return _tag(number, 2) + _varint(len(body)) + body


def _huge_string_request(outer: int, inner: int, size: int) -> Repeat:
    """A request whose field ``outer`` holds a message whose string field ``inner`` is ``size`` bytes."""
    inner_head = _tag(inner, 2) + _varint(size)
    return Repeat(_tag(outer, 2) + _varint(len(inner_head) + size) + inner_head, b"x", size)


# Protobuf nested DEEP levels: unknown groups (field 15) inside each other; any message type parses them.
DEEP_GROUPS = Repeat(b"", _tag(15, 3), DEEP, _tag(15, 4) * DEEP)
GARBAGE = bytes(range(256))
OVERLONG_VARINT = _tag(1, 2) + b"\xff" * 11
NOT_UTF8_PROJECT = _embedded(1, _embedded(3, b"\xff\xfe"))  # LogCompletionRequest.completion.project
# Feedback (request field 1) whose choice (10) has chosen_index (1) as a 10-byte varint, 2^64 - 1: a
# uint32 keeps the low 32 bits.  Appended to a valid request, protobuf merges it in.
CHOICE_10_BYTE_VARINT = _embedded(1, _embedded(10, _tag(1, 0) + b"\xff" * 9 + b"\x01"))


def _expect(fld: str | None = None, words: str = "", code: str = "INVALID_ARGUMENT", **kw: Any) -> Expect:
    return Expect(code=code, field=fld, words=words, **kw)


def _family(prefix: str, target: str, rows: Iterable[tuple], **case_kw: Any) -> list[Case]:
    """Cases from ``(name, payload, field[, words])`` rows."""
    return [Case(f"{prefix}/{row[0]}", target, row[1], _expect(*row[2:]), **case_kw) for row in rows]


# ---------------------------------------------------------------------------------------------
# The corpus. Rows are (name, payload, field the refusal names[, words in its message]).

# Completions that protobuf can carry: refused by validation, the same over HTTP and gRPC.
COMPLETION_RULES = [
    ("empty", {}, "completion.project", "required"),
    ("missing-project", completion(project=OMIT), "completion.project"),
    ("missing-prompt", completion(prompt=OMIT), "completion.prompt"),
    ("missing-candidates", completion(candidates=OMIT), "completion.candidates"),
    ("role-unspecified", completion(prompt=[{"role": "ROLE_UNSPECIFIED", "content": "q"}]), "completion.prompt[0].role"),
    ("role-99", completion(prompt=[{"role": 99, "content": "q"}]), "completion.prompt[0].role"),
    ("split-7", completion(split=7), "completion.split"),
    ("split-negative", completion(split=-1), "completion.split"),
    ("content-blank", completion(prompt=[{"role": "ROLE_USER", "content": "   "}]), "completion.prompt[0].content"),
    ("content-over-limit", completion(prompt=[{"role": "ROLE_USER", "content": "q" * (GW.max_message_chars + 1)}]),
     "completion.prompt[0].content", "limit"),
    ("candidate-over-limit", completion(candidates=["a" * (GW.max_output_chars + 1)]), "completion.candidates[0]", "limit"),
    ("candidate-blank", completion(candidates=["a", ""]), "completion.candidates[1]"),
    ("too-many-turns", completion(prompt=[USER] * (GW.max_prompt_messages + 1)), "completion.prompt", "limit"),
    ("too-many-candidates", completion(candidates=["a"] * (GW.max_candidates + 1)), "completion.candidates", "limit"),
    ("too-many-metadata", completion(metadata={f"k{i}": "v" for i in range(GW.max_metadata_entries + 1)}),
     "completion.metadata", "limit"),
    ("metadata-value-over-limit", completion(metadata={"k": "v" * (GW.max_metadata_chars + 1)}), "completion.metadata['k']"),
    ("metadata-empty-key", completion(metadata={"": "v"}), "completion.metadata"),
    ("event-id-over-limit", completion(event_id="e" * (GW.max_id_chars + 1)), "completion.event_id"),
    ("event-id-with-space", completion(event_id="a b"), "completion.event_id"),
    ("forged-completion-id", completion(completion_id="cmp_forged"), "completion.completion_id"),
    ("project-not-a-name", completion(project="no such project!"), "completion.project"),
    ("model-with-newline", completion(model="m\n1"), "completion.model"),
    ("criteria-score-nan", completion(criteria={"refs": ["c@v1"], "scores": ["NaN", 0.1, 0.2]}), "completion.criteria.scores[0]"),
    ("criteria-score-above-1", completion(criteria={"refs": ["c@v1"], "scores": [2, 0.1, 0.2]}), "completion.criteria.scores[0]"),
    ("criteria-no-refs", completion(criteria={"scores": [0.5, 0.1, 0.2]}), "completion.criteria.refs"),
    ("criteria-count-mismatch", completion(criteria={"refs": ["c@v1"], "scores": [0.5]}), "completion.criteria.scores"),
    ("criteria-bad-mode", completion(criteria={"refs": ["c@v1"], "scores": [0.5, 0.1, 0.2], "mode": "x"}),
     "completion.criteria.mode"),
]

# Feedback that protobuf can carry: refused by validation, the same over HTTP and gRPC.
FEEDBACK_RULES = [
    ("chosen-index-out-of-range", choice(5), "feedback.choice.chosen_index", "out of range"),
    ("chosen-index-max-uint32", choice(2**32 - 1), "feedback.choice.chosen_index", "out of range"),
    ("choice-of-one-output", feedback(inline={"prompt": [USER], "outputs": ["a"]}, choice={"chosen_index": 0}), "feedback.choice"),
    ("ranking-duplicate", feedback(ranking={"ranked_indices": [0, 0]}), "feedback.ranking.ranked_indices[1]", "twice"),
    ("ranking-single", feedback(ranking={"ranked_indices": [0]}), "feedback.ranking.ranked_indices"),
    ("ranking-out-of-range", feedback(ranking={"ranked_indices": [0, 7]}), "feedback.ranking.ranked_indices[1]"),
    ("ranking-over-limit", feedback(ranking={"ranked_indices": list(range(GW.max_candidates + 1))}),
     "feedback.ranking.ranked_indices", "limit"),
    ("scores-duplicate-index", feedback(scores={"scores": [{"index": 0, "score": 1}, {"index": 0, "score": 2}]}),
     "feedback.scores.scores[].index[1]", "twice"),  # the notation tests/unit/test_validation.py pins
    ("scores-nan", feedback(scores={"scores": [{"index": 0, "score": "NaN"}, {"index": 1, "score": 2}]}),
     "feedback.scores.scores[0].score"),
    ("scores-infinity", feedback(scores={"scores": [{"index": 0, "score": "Infinity"}, {"index": 1, "score": 2}]}),
     "feedback.scores.scores[0].score"),
    ("scores-unknown-attribute", feedback(scores={"scores": [{"index": 0, "attributes": {"evil": 1}},
                                                             {"index": 1, "attributes": {"helpfulness": 2}}]}),
     "feedback.scores.scores[0].attributes['evil']"),
    ("scores-single", feedback(scores={"scores": [{"index": 0, "score": 1}]}), "feedback.scores.scores"),
    ("scores-empty-entry", feedback(scores={"scores": [{"index": 0, "score": 1}, {"index": 1}]}), "feedback.scores.scores[1]"),
    ("regeneration-accepted-rejected", feedback(regeneration={"rejected_indices": [1], "accepted_index": 1}),
     "feedback.regeneration.accepted_index"),
    ("regeneration-none-rejected", feedback(regeneration={"accepted_index": 1}), "feedback.regeneration.rejected_indices"),
    ("regeneration-duplicates", feedback(regeneration={"rejected_indices": [0, 0], "accepted_index": 1}),
     "feedback.regeneration.rejected_indices[1]"),
    ("edit-unchanged", feedback(edit={"draft_index": 0, "edited_text": "a"}), "feedback.edit.edited_text"),
    ("edit-over-limit", feedback(edit={"draft_index": 0, "edited_text": "x" * (GW.max_output_chars + 1)}),
     "feedback.edit.edited_text", "limit"),
    ("thumbs-out-of-range", feedback(thumbs={"index": 9, "up": True}), "feedback.thumbs.index"),
    ("no-target", feedback(inline=OMIT, choice={"chosen_index": 0}), "feedback.target"),
    ("no-kind", feedback(), "feedback.kind"),
    ("completion-id-with-space", feedback(inline=OMIT, completion_id="a b", choice={"chosen_index": 0}), "feedback.completion_id"),
    ("completion-id-over-limit", feedback(inline=OMIT, completion_id="c" * (GW.max_id_chars + 1), choice={"chosen_index": 0}),
     "feedback.completion_id"),
    ("split-7", feedback(choice={"chosen_index": 0}, split=7), "feedback.split"),
    ("user-id-over-limit", feedback(choice={"chosen_index": 0}, user_id="u" * (GW.max_id_chars + 1)), "feedback.user_id"),
    ("inline-empty-prompt", feedback(inline={"prompt": [], "outputs": ["a", "b"]}, choice={"chosen_index": 0}),
     "feedback.inline.prompt"),
    ("inline-too-many-outputs", feedback(inline={"prompt": [USER], "outputs": ["a"] * (GW.max_candidates + 1)},
                                         choice={"chosen_index": 0}), "feedback.inline.outputs", "limit"),
]

# Completions only JSON can get wrong: types, literals, encodings.
COMPLETION_JSON = [
    ("nested-100k", b'{"completion":' * DEEP, "body", "deeper"),
    ("not-utf8", b'{"completion": {"project": "\xff\xfe"}}', "body", "UTF-8"),
    ("lone-surrogate", b'{"completion": {"project": "p", "prompt": [{"role": "ROLE_USER", "content": "\\ud800"}]}}',
     "completion.prompt[0].content", "surrogate"),
    ("nan-literal", b'{"completion": {"project": "p", "temperature": NaN}}', "body", "NaN"),
    ("infinity-literal", b'{"completion": {"project": "$PROJECT", "created_at": Infinity}}', "body", "Infinity"),
    ("split-2-pow-70", json.dumps(completion(split=2**70)).encode(), "completion.split", "2^64"),
    ("split-400-digits", json.dumps(completion(split=10**399)).encode(), "completion.split", "2^64"),
    ("split-5000-digits", b'{"completion": {"split": ' + b"9" * 5000 + b"}}", "body"),
    ("truncated", b'{"completion": {"project": "$PROJECT", "prompt": [', "body", "not valid JSON"),
    ("empty-body", b"", "body"),
    ("not-json", b"hello", "body", "not valid JSON"),
    ("array-body", b"[]", "body", "object"),
    ("string-body", b'"completion"', "body", "object"),
    ("null-body", b"null", "body"),
    ("duplicate-key-last-wins", b'{"completion": {"project": "$PROJECT", "project": 5}}', "completion.project"),
    ("candidates-string", b'{"completion": {"project": "p", "candidates": "abc"}}', "completion.candidates"),
    ("completion-list", {"completion": [1]}, "completion"),
    ("completion-number", {"completion": 5}, "completion"),
    ("project-number", completion(project=5), "completion.project"),
    ("project-bool", completion(project=True), "completion.project"),
    ("project-list", completion(project=["p"]), "completion.project"),
    ("project-object", completion(project={"name": "p"}), "completion.project"),
    ("prompt-object", completion(prompt=USER), "completion.prompt"),
    ("prompt-strings", completion(prompt=["q"]), "completion.prompt[0]"),
    ("prompt-null-turn", completion(prompt=[USER, None]), "completion.prompt[1]"),
    ("content-list", completion(prompt=[{"role": "user", "content": ["q"]}]), "completion.prompt[0].content"),
    ("content-number", completion(prompt=[{"role": "user", "content": 42}]), "completion.prompt[0].content"),
    ("role-unknown-name", completion(prompt=[{"role": "ROLE_WIZARD", "content": "q"}]), "completion.prompt[0].role"),
    ("role-bool", completion(prompt=[{"role": True, "content": "q"}]), "completion.prompt[0].role"),
    ("role-fraction", completion(prompt=[{"role": 1.5, "content": "q"}]), "completion.prompt[0].role"),
    ("role-object", completion(prompt=[{"role": {"name": "user"}, "content": "q"}]), "completion.prompt[0].role"),
    ("candidate-number", completion(candidates=["a", 1]), "completion.candidates[1]"),
    ("candidate-list", completion(candidates=[["a"]]), "completion.candidates[0]"),
    ("metadata-list", completion(metadata=["k", "v"]), "completion.metadata"),
    ("metadata-number-value", completion(metadata={"k": 1}), "completion.metadata['k']"),
    ("split-fraction", completion(split=1.5), "completion.split"),
    ("split-bool", completion(split=True), "completion.split"),
    ("split-unknown-name", completion(split="SPLIT_BOGUS"), "completion.split"),
    ("created-at-not-a-time", completion(created_at="yesterday"), "completion.created_at"),
    ("created-at-number", completion(created_at=5), "completion.created_at"),
    ("unknown-field", completion(bogus=1), "completion", "bogus"),
    ("event-id-number", completion(event_id=7), "completion.event_id"),
]

FEEDBACK_JSON = [
    ("nested-100k", b'{"feedback":' * DEEP, "body", "deeper"),
    ("not-utf8", b'{"feedback": {"user_id": "\xc3\x28"}}', "body", "UTF-8"),
    ("lone-surrogate", b'{"feedback": {"edit": {"edited_text": "x\\udfff"}}}', "feedback.edit.edited_text", "surrogate"),
    ("infinity-score", b'{"feedback": {"scores": {"scores": [{"index": 0, "score": Infinity}]}}}', "body", "Infinity"),
    ("chosen-index-negative", choice(-1), "feedback.choice.chosen_index"),
    ("chosen-index-2-pow-32", choice(2**32), "feedback.choice.chosen_index"),
    ("chosen-index-2-pow-70", choice(2**70), "feedback.choice.chosen_index", "2^64"),
    ("chosen-index-400-digits", choice(10**399), "feedback.choice.chosen_index", "2^64"),
    ("chosen-index-fraction", choice(1.5), "feedback.choice.chosen_index"),
    ("chosen-index-bool", choice(True), "feedback.choice.chosen_index"),
    ("chosen-index-word", choice("one"), "feedback.choice.chosen_index"),
    ("chosen-index-list", choice([1]), "feedback.choice.chosen_index"),
    ("chosen-index-object", choice({"i": 1}), "feedback.choice.chosen_index"),
    ("choice-number", feedback(choice=5), "feedback.choice"),
    ("ranking-string", feedback(ranking={"ranked_indices": "0,1"}), "feedback.ranking.ranked_indices"),
    ("ranking-negative", feedback(ranking={"ranked_indices": [0, -1]}), "feedback.ranking.ranked_indices[1]"),
    ("attribute-word", feedback(scores={"scores": [{"index": 0, "attributes": {"helpfulness": "high"}},
                                                   {"index": 1, "attributes": {"helpfulness": 1}}]}),
     "feedback.scores.scores[0].attributes['helpfulness']"),
    ("thumbs-up-string", feedback(thumbs={"index": 0, "up": "yes"}), "feedback.thumbs.up"),
    ("two-kinds", feedback(choice={"chosen_index": 0}, thumbs={"index": 0, "up": True}), "feedback.kind"),
    ("two-targets", feedback(completion_id="cmp_x", choice={"chosen_index": 0}), "feedback.target"),
    ("inline-list", feedback(inline=[INLINE], choice={"chosen_index": 0}), "feedback.inline"),
    ("outputs-string", feedback(inline={"prompt": [USER], "outputs": "ab"}, choice={"chosen_index": 0}),
     "feedback.inline.outputs"),
    ("completion-id-number", feedback(inline=OMIT, completion_id=12, choice={"chosen_index": 0}), "feedback.completion_id"),
    ("split-bool", feedback(choice={"chosen_index": 0}, split=True), "feedback.split"),
    ("split-unknown-name", feedback(choice={"chosen_index": 0}, split="SPLIT_BOGUS"), "feedback.split"),
]

_OK_EVENT = {"seq": 1, "completion": completion()["completion"]}
BATCH_BODY = [
    ("nested-100k", b'{"events":' * DEEP, "body", "deeper"),
    ("not-utf8", b'{"events": [{"seq": 1, "completion": {"project": "\xff\xfe"}}]}', "body", "UTF-8"),
    ("seq-2-pow-70", ('{"events": [%s, {"seq": %d}]}' % (json.dumps(_OK_EVENT), 2**70)).encode(), "events[1].seq", "2^64"),
    ("events-empty", {"events": []}, "events", "empty"),
    ("events-object", {"events": {"seq": 1}}, "events"),
    ("events-string", {"events": "[]"}, "events"),
    ("events-over-limit", {"events": [{"seq": i} for i in range(GW.max_batch_events + 1)]}, "events", "limit"),
    ("body-array", [_OK_EVENT], "events"),
    ("body-empty", b"", "events"),
    ("no-events-key", {"evnts": [_OK_EVENT]}, "events"),
]
# Refused one by one: HTTP 200, the event's own status names the field.
BATCH_EVENTS = [
    ("event-number", {"events": [1]}, "events[0]"),
    ("event-null", {"events": [None]}, "events[0]"),
    ("seq-negative", {"events": [{"seq": -1}]}, "events[0].seq"),
    ("seq-word", {"events": [{"seq": "one"}]}, "events[0].seq"),
    ("seq-fraction", {"events": [{"seq": 0.5}]}, "events[0].seq"),
    ("nested-batch", {"events": [{"seq": 1, "batch": {"events": [_OK_EVENT]}}]}, "batch"),
    ("no-event", {"events": [{"seq": 1}]}, "event"),
    ("two-events-in-one", {"events": [dict(_OK_EVENT, feedback=choice(0)["feedback"])]}, "events[0].event"),
    ("invalid-completion", {"events": [{"seq": 1, "completion": completion(prompt=[])["completion"]}]}, "completion.prompt"),
]

_CHAT_DEEP_CRITERIA = "[" * 3000 + "]" * 3000
# Refused while the gateway parses the body.
CHAT_BODY = [
    ("nested-100k", b'{"messages":' * DEEP, "body", "deeper"),
    ("temperature-400-digits", b'{"model": "reward", "messages": [{"role": "user", "content": "q"}], "temperature": '
     + b"9" * 400 + b"}", "temperature", "2^64"),
    ("not-utf8", b'{"model": "reward", "messages": [{"role": "user", "content": "\xe2\x82"}]}', "body", "UTF-8"),
    ("lone-surrogate", b'{"model": "reward", "messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0].content",
     "surrogate"),
    ("minus-infinity-literal", b'{"model": "reward", "messages": [], "seed": -Infinity}', "body", "Infinity"),
    ("seed-overflows-to-infinity", b'{"model": "reward", "messages": [{"role": "user", "content": "q"}], "seed": 1e999}', "seed"),
    ("array-body", b"[]", "body"),
    ("string-body", b'"chat"', "body"),
    ("empty-body", b"", "body"),
    ("duplicate-key-last-wins", b'{"model": "reward", "model": 5, "messages": [{"role": "user", "content": "q"}]}', "model"),
    ("missing-model", chat(model=OMIT), "model"),
    ("model-number", chat(model=5), "model"),
    ("model-list", chat(model=[DEFAULT_REWARD_MODEL]), "model"),
    ("messages-string", chat(messages="hi"), "messages"),
    ("messages-empty", chat(messages=[]), "messages"),
    ("message-number", chat(messages=[5]), "messages[0]"),
    ("message-without-content", chat(messages=[{"role": "user"}]), "messages[0].content"),
    ("content-number", chat(messages=[{"role": "user", "content": 5}, REPLY]), "messages[0].content"),
    ("content-image-part", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0]"),
    ("role-unknown", chat(messages=[{"role": "wizard", "content": "q"}, REPLY]), "messages[0].role"),
    ("role-list", chat(messages=[{"role": ["user"], "content": "q"}, REPLY]), "messages[0].role"),
    ("n-string", chat(n="2"), "n"),
    ("n-zero", chat(n=0), "n"),
    ("n-negative", chat(n=-1), "n"),
    ("n-fraction", chat(n=2.5), "n"),
    ("n-bool", chat(n=True), "n"),
    ("n-2-pow-70", chat(n=2**70), "n", "2^64"),
    ("n-object", chat(n={"n": 2}), "n"),
    ("temperature-word", chat(temperature="hot"), "temperature"),
    ("temperature-negative", chat(temperature=-1), "temperature"),
    ("temperature-huge", chat(temperature=1e308), "temperature"),
    ("top-p-zero", chat(top_p=0), "top_p"),
    ("top-p-above-1", chat(top_p=2), "top_p"),
    ("max-tokens-zero", chat(max_tokens=0), "max_tokens"),
    ("max-tokens-huge", chat(max_tokens=10**6), "max_tokens"),
    ("max-tokens-fraction", chat(max_tokens=1.5), "max_tokens"),
    ("seed-negative", chat(seed=-5), "seed"),
    ("stream-string", chat(stream="yes"), "stream"),
    ("stream-options-without-stream", chat(stream_options={"include_usage": True}), "stream_options"),
    ("stream-options-unknown-key", chat(stream=True, stream_options={"include_usage": True, "x": 1}), "stream_options"),
    ("stop-number", chat(stop=5), "stop"),
    ("stop-too-many", chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("store-string", chat(store="true"), "store"),
    ("metadata-list", chat(metadata=["k"]), "metadata"),
    ("metadata-number-value", chat(metadata={"k": 5}), "metadata.k"),
    ("metadata-bad-split", chat(metadata={"prefstream.split": "validation"}), "metadata.prefstream.split"),
    ("tools", chat(tools=[{"type": "function"}]), "tools"),
    ("logprobs", chat(logprobs=True), "logprobs"),
    ("response-format-json", chat(response_format={"type": "json_object"}), "response_format"),
]
# Past parsing: the gateway looks the model up in the scorer, which refuses what it cannot serve.
CHAT_REWARD = [
    ("reward-n-2", chat(n=2), "n"),
    ("reward-last-turn-user", chat(messages=[CHAT_USER]), "messages[0].role"),
    ("reward-store", chat(store=True), "store"),
    ("reward-turn-over-scorer-limit", chat(messages=[{"role": "user", "content": "q" * (SC.max_text_chars + 1)}, REPLY]),
     "messages[0].content", "limit"),
    ("reward-reply-over-scorer-limit", chat(messages=[CHAT_USER, {"role": "assistant", "content": "a" * (SC.max_text_chars + 1)}]),
     "messages[1].content", "limit"),
    ("reward-too-many-turns", chat(messages=[CHAT_USER] * 300 + [REPLY]), "messages", "limit"),
]
# Best-of-N, ranked by the reward models an op-criteria header names.
CHAT_CRITERIA = [
    ("nested-3000", _CHAT_DEEP_CRITERIA, "op-criteria", "deeper"),
    ("weight-word", "reward:abc", "op-criteria[0].weight"),
    ("weight-nan", "reward:NaN", "op-criteria[0].weight"),
    ("empty", "", "op-criteria"),
    ("duplicate", "reward,reward", "op-criteria"),
    ("object-weight-word", '{"reward": "x"}', "op-criteria.reward"),
]

SCORE_RULES = [
    ("no-responses", {"prompt": [USER]}, "responses"),
    ("too-many-responses", {"prompt": [USER], "responses": ["a"] * (SC.max_responses + 1)}, "responses", "limit"),
    ("response-over-limit", {"prompt": [USER], "responses": ["a" * (SC.max_text_chars + 1)]}, "responses[0]", "limit"),
    ("turn-over-limit", {"prompt": [{"role": "ROLE_USER", "content": "q" * (SC.max_text_chars + 1)}], "responses": ["a"]},
     "prompt[0].content", "limit"),
    ("role-unspecified", {"prompt": [{"content": "q"}], "responses": ["a"]}, "prompt[0].role"),
    ("role-99", {"prompt": [{"role": 99, "content": "q"}], "responses": ["a"]}, "prompt[0].role"),
    ("too-many-turns", {"prompt": [USER] * 300, "responses": ["a"]}, "prompt", "limit"),
    ("model-not-a-name", {"prompt": [USER], "responses": ["a"], "model": "no such model"}, "model"),
    ("request-id-over-limit", {"prompt": [USER], "responses": ["a"], "request_id": "r" * 300}, "request_id"),
]

_BON = {"prompt": [USER], "candidates": ["a", "b"]}
BEST_OF_N_RULES = [
    ("nothing-to-rank", {"prompt": [USER]}, "n"),
    ("n-max-uint32", {"prompt": [USER], "n": 2**32 - 1}, "n", "limit"),
    ("n-disagrees", dict(_BON, n=5), "n"),
    ("too-many-candidates", {"prompt": [USER], "candidates": ["a"] * (SC.max_responses + 1)}, "candidates", "limit"),
    ("candidate-over-limit", {"prompt": [USER], "candidates": ["a", "b" * (SC.max_text_chars + 1)]}, "candidates[1]"),
    ("sampling-without-prompt", {"n": 2}, "prompt"),
    ("weight-nan", dict(_BON, criteria=[{"model": "reward", "weight": "NaN"}]), "criteria[0].weight"),
    ("weight-infinity", dict(_BON, criteria=[{"model": "reward", "weight": "-Infinity"}]), "criteria[0].weight"),
    ("criterion-twice", dict(_BON, criteria=[{"model": "reward", "weight": 1}, {"model": "reward", "weight": 2}]),
     "criteria[1].model"),
    ("criterion-not-a-name", dict(_BON, criteria=[{"model": "a b", "weight": 1}]), "criteria[0].model"),
    ("criteria-and-refs", dict(_BON, criteria=[{"model": "reward", "weight": 1}], criteria_refs=["x"]), "criteria_refs"),
    ("ref-bad-version", dict(_BON, criteria_refs=["x@@"]), "criteria_refs[0]"),
    ("ref-twice", dict(_BON, criteria_refs=["x", "x"]), "criteria_refs"),
    ("project-not-a-name", dict(_BON, project="a project"), "project"),
    ("temperature-infinity", {"prompt": [USER], "n": 2, "sampling": {"temperature": "Infinity"}}, "sampling.temperature"),
    ("temperature-nan", {"prompt": [USER], "n": 2, "sampling": {"temperature": "NaN"}}, "sampling.temperature"),
    ("top-p-zero", {"prompt": [USER], "n": 2, "sampling": {"top_p": 0}}, "sampling.top_p"),
    ("max-tokens-max-uint32", {"prompt": [USER], "n": 2, "sampling": {"max_tokens": 2**32 - 1}}, "sampling.max_tokens"),
    ("max-tokens-zero", {"prompt": [USER], "n": 2, "sampling": {"max_tokens": 0}}, "sampling.max_tokens"),
    ("seed-negative", {"prompt": [USER], "n": 2, "sampling": {"seed": -1}}, "sampling.seed"),
    ("policy-not-a-name", {"prompt": [USER], "n": 2, "policy_model": "a/b"}, "policy_model"),
    ("policy-is-a-reward-model", {"prompt": [USER], "n": 2, "policy_model": DEFAULT_REWARD_MODEL}, "policy_model"),
]

# Frames protobuf cannot parse: INVALID_ARGUMENT naming the request, on every method.
BAD_FRAMES = [
    ("garbage", GARBAGE, "request"),
    ("nested-100k", DEEP_GROUPS, "request"),
    ("overlong-varint", OVERLONG_VARINT, "request"),
    ("truncated", b"\x0a\x10\x1a\x05ab", "request"),
]
NOT_FOUND = _expect(code="NOT_FOUND")
UNAUTHENTICATED = _expect(code="UNAUTHENTICATED")
HUGE_HEADER = (("X-Padding", "p" * 20_000),)


def _build() -> list[Case]:
    cases: list[Case] = []
    for prefix, path, rows in (("completions", COMPLETIONS, COMPLETION_RULES + COMPLETION_JSON),
                               ("feedback", FEEDBACK, FEEDBACK_RULES + FEEDBACK_JSON),
                               ("batch", BATCH, BATCH_BODY), ("chat", CHAT, CHAT_BODY)):
        cases += _family(f"http:{prefix}", path, rows)
    cases += [Case(f"http:batch/{n}", BATCH, body, _expect(f, event=0)) for n, body, f in BATCH_EVENTS]
    cases += [Case(f"http:batch/other-project-{kind}", BATCH, {"events": [{"seq": 1, kind: body[kind]}]},
                   _expect(f"{kind}.project", code="PERMISSION_DENIED", event=0))
              for kind, body in (("completion", completion(project=OTHER)),
                                 ("feedback", feedback(project=OTHER, choice={"chosen_index": 0})))]
    cases += _family("http:chat", CHAT, CHAT_REWARD, via_scorer=True)
    cases += [Case(f"http:chat/criteria-{n}", CHAT, bon(), _expect(*rest), headers=(("op-criteria", header),), via_scorer=True)
              for n, header, *rest in CHAT_CRITERIA]
    cases += [
        Case("http:chat/criteria-with-stream", CHAT, bon(stream=True), _expect("stream"), headers=(("op-criteria", "reward"),),
             via_scorer=True),
        Case("http:chat/unknown-model", CHAT, chat(model="no-such-model"), NOT_FOUND, via_scorer=True),
        Case("http:chat/no-key", CHAT, chat(), UNAUTHENTICATED, auth=False),
        Case("http:chat/body-over-32mib", CHAT, Repeat(b'{"model": "', b"m", OVER_BODY, b'"}'), _expect(http=(413,))),
        Case("http:models/no-key", "/v1/models", b"", UNAUTHENTICATED, method="GET", auth=False),
        Case("http:completions/other-project", COMPLETIONS, completion(project=OTHER),
             _expect("completion.project", code="PERMISSION_DENIED")),
        Case("http:feedback/other-project", FEEDBACK, feedback(project=OTHER, choice={"chosen_index": 0}),
             _expect("feedback.project", code="PERMISSION_DENIED")),
        Case("http:completions/no-key", COMPLETIONS, completion(), UNAUTHENTICATED, auth=False),
        Case("http:completions/basic-auth", COMPLETIONS, completion(), UNAUTHENTICATED,
             headers=(("Authorization", "Basic dXNlcjpwYXNz"),)),
        Case("http:completions/malformed-key", COMPLETIONS, completion(), UNAUTHENTICATED,
             headers=(("Authorization", "Bearer not-a-key"),)),
        Case("http:feedback/unknown-key", FEEDBACK, choice(0), UNAUTHENTICATED,
             headers=(("Authorization", "Bearer psk_0123456789ab_no-such-secret"),)),
        Case("http:feedback/empty-x-api-key", FEEDBACK, choice(0), UNAUTHENTICATED, auth=False, headers=(("X-API-Key", " "),)),
        Case("http:completions/text-plain", COMPLETIONS, b"completion=1", _expect("body"), headers=(("Content-Type", "text/plain"),)),
        Case("http:completions/form-encoded", COMPLETIONS, b"completion%5Bproject%5D=p", _expect("body"),
             headers=(("Content-Type", "application/x-www-form-urlencoded"),)),
        Case("http:feedback/utf-16", FEEDBACK, json.dumps(choice(0)).encode("utf-16"), _expect("body", "UTF-8"),
             headers=(("Content-Type", "application/json; charset=utf-16"),)),
        Case("http:completions/header-over-8k", COMPLETIONS, completion(), _expect(http=(400, 431)), headers=HUGE_HEADER),
        Case("http:completions/url-over-8k", COMPLETIONS + "?pad=" + "p" * 10_000, completion(), _expect(http=(400, 414))),
        Case("http:completions/body-over-32mib", COMPLETIONS, Repeat(b'{"completion": {"project": "', b"p", OVER_BODY, b'"}}'),
             _expect(http=(413,))),
        Case("http:batch/body-over-32mib", BATCH, Repeat(b'{"events": "', b"e", OVER_BODY, b'"}'), _expect(http=(413,))),
        Case("http:completions/get", COMPLETIONS, b"", _expect(http=(405,)), method="GET"),
        Case("http:feedback/put", FEEDBACK, choice(0), _expect(http=(405,)), method="PUT"),
        Case("http:healthz/post", "/healthz", b"{}", _expect(http=(405,))),
        Case("http:unknown-route", "/v1/completions/delete", completion(), _expect(code="NOT_FOUND")),
    ]
    # gRPC, gateway: the protobuf-expressible rules as messages, then frames, auth and sizes.
    cases += _family("grpc:LogCompletion", LOG_COMPLETION, COMPLETION_RULES)
    cases += _family("grpc:LogFeedback", LOG_FEEDBACK, FEEDBACK_RULES)
    for method in (LOG_COMPLETION, LOG_FEEDBACK, STREAM_EVENTS, SCORE, BEST_OF_N):
        short = method.rsplit("/", 1)[1]
        cases += [Case(f"grpc:{short}/frame-{n}", method, [frame] if method == STREAM_EVENTS else frame, _expect(f))
                  for n, frame, f in BAD_FRAMES]
    cases += [
        Case("grpc:LogCompletion/not-utf8-string", LOG_COMPLETION, NOT_UTF8_PROJECT, _expect("request", "UTF-8")),
        Case("grpc:LogFeedback/chosen-index-10-byte-varint", LOG_FEEDBACK, Appended(choice(0), CHOICE_10_BYTE_VARINT),
             _expect("feedback.choice.chosen_index", "out of range")),
        Case("grpc:LogCompletion/no-key", LOG_COMPLETION, completion(), UNAUTHENTICATED, auth=False),
        Case("grpc:LogFeedback/malformed-key", LOG_FEEDBACK, choice(0), UNAUTHENTICATED, auth=False,
             headers=(("authorization", "Bearer psk_zz"),)),
        Case("grpc:LogCompletion/other-project", LOG_COMPLETION, completion(project=OTHER),
             _expect("completion.project", code="PERMISSION_DENIED")),
        Case("grpc:LogCompletion/metadata-over-16k", LOG_COMPLETION, completion(), _expect(code="RESOURCE_EXHAUSTED"),
             headers=(("x-padding", "p" * 20_000),)),
        Case("grpc:LogCompletion/message-over-32mib", LOG_COMPLETION, _huge_string_request(1, 3, OVER_BODY),
             _expect(code="RESOURCE_EXHAUSTED")),
        Case("grpc:GatewayService/unknown-method", GATEWAY + "DeleteEverything", b"", _expect(code="UNIMPLEMENTED")),
        Case("grpc:StreamEvents/no-key", STREAM_EVENTS, [{"seq": 1}], UNAUTHENTICATED, auth=False),
        Case("grpc:StreamEvents/no-event", STREAM_EVENTS, [{"seq": 1}], _expect("event", event=0)),
        Case("grpc:StreamEvents/nested-batch", STREAM_EVENTS,
             [{"seq": 1, "batch": {"events": [{"seq": 2, "batch": {"events": [_OK_EVENT]}}]}}], _expect("batch", event=0)),
        Case("grpc:StreamEvents/empty-batch", STREAM_EVENTS, [{"seq": 1, "batch": {}}], _expect("batch.events", event=0)),
        Case("grpc:StreamEvents/batch-over-limit", STREAM_EVENTS,
             [{"seq": 1, "batch": {"events": [{"seq": i} for i in range(GW.max_batch_events + 1)]}}],
             _expect("batch.events", "limit", event=0)),
        Case("grpc:StreamEvents/invalid-completion", STREAM_EVENTS, [{"seq": 1, "completion": completion(candidates=[])["completion"]}],
             _expect("completion.candidates", event=0)),
        Case("grpc:StreamEvents/split-99-in-batch", STREAM_EVENTS,
             [{"seq": 1, "batch": {"events": [{"seq": 2, "completion": completion(split=99)["completion"]}]}}],
             _expect("completion.split", event=0)),
    ]
    # gRPC, scorer.
    cases += _family("grpc:Score", SCORE, SCORE_RULES)
    cases += _family("grpc:BestOfN", BEST_OF_N, BEST_OF_N_RULES)
    cases += [
        Case("grpc:Score/not-utf8-response", SCORE, _tag(3, 2) + _varint(1) + b"\xff", _expect("request", "UTF-8")),
        Case("grpc:Score/encoded-surrogate", SCORE, _tag(3, 2) + _varint(3) + b"\xed\xa0\x80", _expect("request", "UTF-8")),
        Case("grpc:Score/unknown-model", SCORE, {"prompt": [USER], "responses": ["a"], "model": "no-such-model"}, NOT_FOUND),
        Case("grpc:BestOfN/unknown-criterion-model", BEST_OF_N, dict(_BON, criteria=[{"model": "no-such-model", "weight": 1}]),
             NOT_FOUND),
        Case("grpc:Score/message-over-32mib", SCORE, _huge_string_request(2, 2, OVER_BODY), _expect(code="RESOURCE_EXHAUSTED")),
        Case("grpc:ScorerService/unknown-method", SCORER + "Train", b"", _expect(code="UNIMPLEMENTED")),
    ]
    return cases


CASES: tuple[Case, ...] = tuple(_build())

#: Inputs that once answered 500 (and logged a traceback each); tests/integration/test_gateway.py runs them
#: against a gateway alone.
WAS_500 = (
    "http:completions/nested-100k", "http:batch/nested-100k", "http:chat/nested-100k", "http:batch/not-utf8",
    "http:batch/seq-2-pow-70", "http:chat/temperature-400-digits", "http:completions/lone-surrogate",
    "http:completions/candidates-string", "http:completions/nan-literal",
)


def select(names: Iterable[str]) -> tuple[Case, ...]:
    """The cases called ``names``, in that order (KeyError for a name the corpus lacks)."""
    by_name = {c.name: c for c in CASES}
    return tuple(by_name[n] for n in names)


# ---------------------------------------------------------------------------------------------
# The runner

#: Answers that mean the service failed rather than refused (counted as internal errors).
SERVER_FAULTS = frozenset({"INTERNAL", "UNKNOWN"})
_MAX_FRAME = 64 * 1024 * 1024  # the runner may send more than the services accept, to see them refuse it


def _identity(data: bytes) -> bytes:
    return data


def _substitute(value: Any, project: str) -> Any:
    if isinstance(value, str):
        return value.replace(PROJECT, project)
    if isinstance(value, list):
        return [_substitute(v, project) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, project) for k, v in value.items()}
    return value


def render(payload: Any, target: str, project: str) -> bytes:
    """The bytes a payload goes out as (one frame; a StreamEvents case sends one per list item)."""
    if isinstance(payload, Repeat):
        return payload.render()
    if isinstance(payload, Appended):
        return render(payload.message, target, project) + payload.tail
    if isinstance(payload, bytes):
        return payload.replace(PROJECT.encode(), project.encode())
    value = _substitute(payload, project)
    if target in REQUEST_TYPES:
        return json_format.ParseDict(value, REQUEST_TYPES[target]()).SerializeToString()
    return json.dumps(value).encode()


@dataclass
class _Verdict:
    internal: bool = False
    problem: str | None = None  # why the answer is not the expected one


def _check_named(expect: Expect, code: str, got_field: str | None, message: str) -> _Verdict:
    if code in SERVER_FAULTS:
        return _Verdict(True, f"{code}: {message[:160]}")
    if code != expect.code:
        return _Verdict(problem=f"{code} ({message[:160]}), expected {expect.code}")
    if expect.field is not None and got_field != expect.field:
        return _Verdict(problem=f"names {got_field!r}, expected {expect.field!r} ({message[:160]})")
    if expect.words not in message:
        return _Verdict(problem=f"message lacks {expect.words!r}: {message[:160]}")
    return _Verdict()


def _judge_http(expect: Expect, status: int, data: bytes) -> _Verdict:
    if status >= 500:
        return _Verdict(True, f"HTTP {status}: {data[:160]!r}")
    if status not in expect.http_statuses():
        return _Verdict(problem=f"HTTP {status}, expected {expect.http_statuses()}: {data[:160]!r}")
    if expect.http or (expect.field is None and not expect.words and expect.event is None):
        return _Verdict()  # answered by the HTTP server itself, or nothing more to check
    try:
        body = json.loads(data)
        if expect.event is not None:
            status_obj = body["results"][expect.event].get("status", {})
            return _check_named(expect, _code_name(int(status_obj.get("code", 0))), status_obj.get("field"),
                                str(status_obj.get("message", "")))
        error = body["error"]
        return _check_named(expect, str(error.get("code")), error.get("param"), str(error.get("message", "")))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        return _Verdict(problem=f"HTTP {status} with an unreadable body ({type(e).__name__}): {data[:160]!r}")


def _connection(base: str, timeout_s: float) -> http.client.HTTPConnection:
    url = urlsplit(base)
    conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    return conn_cls(url.hostname or "127.0.0.1", url.port, timeout=timeout_s)


def _send_http(base: str, case: Case, api_key: str, project: str, timeout_s: float) -> _Verdict:
    conn = _connection(base, timeout_s)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if case.auth else {})}
    headers.update(case.headers)
    try:
        try:
            conn.request(case.method, case.target, body=render(case.payload, case.target, project), headers=headers)
        except OSError:
            pass  # a server that refuses an oversized body may close before reading all of it: read its answer
        resp = conn.getresponse()
        return _judge_http(case.expect, resp.status, resp.read())
    except (OSError, http.client.HTTPException) as e:
        return _Verdict(problem=f"no HTTP answer: {type(e).__name__}: {e}")
    finally:
        conn.close()


def _flatten(responses: Iterable[gateway_pb2.StreamEventsResponse]) -> list[gateway_pb2.StreamEventsResponse]:
    """Each event's own response: a batch's entries in order, a single event's response itself."""
    out: list[gateway_pb2.StreamEventsResponse] = []
    for r in responses:
        out.extend(r.batch or [r])
    return out


def _send_grpc(channel: grpc.Channel, case: Case, api_key: str, project: str, timeout_s: float) -> _Verdict:
    metadata = [("authorization", f"Bearer {api_key}")] if case.auth and case.service == "gateway_grpc" else []
    metadata += [(k.lower(), v) for k, v in case.headers]
    expect = case.expect
    try:
        if isinstance(case.payload, list):
            frames = [render(p, case.target, project) for p in case.payload]
            call = channel.stream_stream(case.target, request_serializer=_identity, response_deserializer=_identity)
            answers = _flatten(gateway_pb2.StreamEventsResponse.FromString(r)
                               for r in call(iter(frames), metadata=metadata, timeout=timeout_s))
        else:
            call = channel.unary_unary(case.target, request_serializer=_identity, response_deserializer=_identity)
            call(render(case.payload, case.target, project), metadata=metadata, timeout=timeout_s)
            return _Verdict(problem=f"OK, expected {expect.code}")
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
        name = code.name if code is not None else "UNKNOWN"
        if expect.event is not None and name not in SERVER_FAULTS:
            return _Verdict(problem=f"stream ended {name} ({details[:160]}), expected each event answered")
        field_name, sep, _ = details.partition(": ")
        return _check_named(expect, name, field_name if sep else None, details)
    if expect.event is None:
        return _Verdict(problem=f"stream OK, expected {expect.code}")
    if len(answers) <= expect.event:
        return _Verdict(problem=f"{len(answers)} answer(s), expected one for event {expect.event}")
    status = answers[expect.event].status
    return _check_named(expect, _code_name(status.code), status.field, status.message)


def _code_name(number: int) -> str:
    """The name of a gRPC status code number (per-event statuses carry numbers)."""
    return next((c.name for c in grpc.StatusCode if c.value[0] == number), str(number))


def _grpc_healthy(channel: grpc.Channel, timeout_s: float) -> bool:
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def _http_healthy(base: str, timeout_s: float) -> bool:
    conn = _connection(base, timeout_s)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def run_corpus(
    *,
    gateway_http: str,
    gateway_grpc: str | None,
    scorer_grpc: str | None,
    api_key: str,
    project: str,
    timeout_s: float = 30,
    cases: Sequence[Case] | None = None,
) -> dict[str, Any]:
    """Send every case (``cases``, default :data:`CASES`) to the live services, then check their health.

    ``gateway_http`` is the gateway's base URL (``http://host:port``) and must mount the OpenAI routes (a
    gateway with a ``scorer_address``); ``gateway_grpc`` and ``scorer_grpc`` are ``host:port`` or None: the
    cases for a None target are skipped, and so are the chat cases that reach the scorer when
    ``scorer_grpc`` is None.  gRPC is plaintext.  ``api_key`` (with both scopes) must belong to ``project``.

    Returns ``malformed_cases`` (sent), ``malformed_internal_errors`` (answered 5xx, INTERNAL or UNKNOWN),
    ``malformed_unexpected`` (any other answer than the case expects: a 200, another code, another field;
    no answer at all), ``unhealthy_after`` (services whose health check fails after the run: ``/healthz``,
    and gRPC health SERVING for each gRPC address), ``skipped`` and ``failures`` (the first 10 problems).
    """
    addresses = {"gateway_http": gateway_http, "gateway_grpc": gateway_grpc, "scorer_grpc": scorer_grpc}
    options = [("grpc.max_send_message_length", _MAX_FRAME), ("grpc.max_receive_message_length", _MAX_FRAME)]
    channels = {name: grpc.insecure_channel(addr, options=options)
                for name, addr in addresses.items() if addr and name != "gateway_http"}
    sent = internal = unexpected = skipped = 0
    failures: list[str] = []
    try:
        for case in CASES if cases is None else cases:
            if not addresses[case.service] or (case.via_scorer and not scorer_grpc):
                skipped += 1
                continue
            started = time.monotonic()
            if case.service == "gateway_http":
                verdict = _send_http(gateway_http, case, api_key, project, timeout_s)
            else:
                verdict = _send_grpc(channels[case.service], case, api_key, project, timeout_s)
            sent += 1
            internal += verdict.internal
            unexpected += verdict.problem is not None and not verdict.internal
            if verdict.problem is not None and len(failures) < 10:
                failures.append(f"{case.name} ({case.target[:60]}, {time.monotonic() - started:.1f}s): {verdict.problem}")
        health = {"gateway_http": _http_healthy(gateway_http, timeout_s)}
        health.update({name: _grpc_healthy(ch, timeout_s) for name, ch in channels.items()})
    finally:
        for ch in channels.values():
            ch.close()
    unhealthy = sorted(name for name, ok in health.items() if not ok)
    failures += [f"{name} is not healthy after the corpus" for name in unhealthy][: max(0, 10 - len(failures))]
    return {
        "malformed_cases": sent,
        "malformed_internal_errors": internal,
        "malformed_unexpected": unexpected,
        "unhealthy_after": len(unhealthy),
        "skipped": skipped,
        "failures": failures,
    }


__all__ = ["CASES", "WAS_500", "Appended", "Case", "Expect", "Repeat", "render", "run_corpus", "select"]
