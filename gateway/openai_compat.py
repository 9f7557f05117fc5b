"""OpenAI-compatible HTTP routes in front of the scorer: reward scoring, generation and best-of-N.

Why it exists: applications already speak the OpenAI chat API.  With these routes an unchanged
``openai`` client can

* score a conversation with a **reward model**: ``POST /v1/chat/completions`` with ``model`` set to a
  reward model; the last message (the assistant turn) is scored and ``choices[0].message.content``
  holds ``attribute:score`` pairs separated by commas, as NVIDIA NIM reward models answer:
  ``"reward:0.53"``, or for a model with attribute heads ``"helpfulness:1.2,correctness:0.8,..."``;
* get plain **generations** from a **policy**: ``model`` set to a policy and no ``op-criteria``
  header; the scorer's served version of that policy (the newest published unless pinned) answers,
  ``stop``, ``max_tokens``, ``seed``, ``n`` as in OpenAI, ``usage`` with real token counts, and
  ``stream: true`` answers with server-sent ``chat.completion.chunk`` events (a role delta first,
  content deltas, a chunk with ``finish_reason`` per choice, a usage chunk when
  ``stream_options.include_usage`` is set, then ``data: [DONE]``);
* get **best-of-N** completions from a **policy**: ``model`` set to a policy, ``n`` candidates are
  sampled and ranked by the reward models named in the ``op-criteria`` header (OpenPipe style: a JSON
  list or comma-separated names, optional weights).  Choices come back best first; each carries
  ``score`` (combined) and ``criteria_scores`` (raw reward per criterion), and the response carries
  ``criteria_scores`` (per criterion, one value per choice, in choice order) and ``usage`` the
  tokens of the sampling;
* ``store: true`` logs the prompt, the ranked candidates and ``metadata`` through ``log_completion``
  (the gateway's ingest path), so feedback can refer to the returned ``id`` (also in the
  ``op-completion-id`` header); choice ``index`` i is candidate i of the logged completion.
  A sampled reply can be empty (the policy ended it at its first token).  An empty reply is no
  answer: choices with text come first (best-of-N ranks empties last, plain generations list them
  last), and only those are logged, so choice ``index`` i is still candidate i; the metadata key
  ``prefstream.empty_candidates`` counts the rest.  When every choice is empty nothing is logged and
  the ``op-not-stored`` header says why.

``GET /v1/models`` lists the served models.  Errors use OpenAI's JSON error shape with the HTTP status
from :mod:`services.errors`.  The gateway mounts the routes with :func:`add_routes`; handlers only
await the scorer over gRPC, so the gateway's event loop never blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from aiohttp import web

from scorer.bestofn import is_empty_reply, parse_criteria_header
from scorer.client import ModelStatus, ScorerClient
from scorer.domain import SamplingParams, Usage
from scorer.generation import validate_stop
from services.codec import load_json
from services.errors import InvalidArgument, NotFound, PermissionDenied, PrefstreamError, error_body
from services.kinds import ModelKind, Split
from services.schemas import ChatMessage, messages_from_dicts

log = logging.getLogger(__name__)

CRITERIA_HEADER = "op-criteria"
#: ``metadata`` key that sets a stored completion's split ("train" or "test"): feedback on a "test"
#: completion, criteria feedback included, is held out for the trainer's gate and never trained on.
SPLIT_METADATA_KEY = "prefstream.split"
COMPLETION_ID_HEADER = "op-completion-id"
#: Header of a ``store: true`` response whose completion was not logged, with the reason.
NOT_STORED_HEADER = "op-not-stored"
#: Metadata key of a stored completion: how many empty choices were left out of its candidates.
EMPTY_CANDIDATES_METADATA_KEY = "prefstream.empty_candidates"
#: aiohttp request key under which the gateway's auth middleware may store the caller's project.
PROJECT_KEY = "prefstream.project"
#: Whether the caller's key has the ``ingest`` scope (``store: true`` needs it); absent: no auth.
MAY_INGEST_KEY = "prefstream.may_ingest"

_MAX_N = 16
_MAX_TOKENS = 4096
_MAX_METADATA = 16
_MAX_METADATA_CHARS = 512
#: Request fields an OpenAI client may send that these routes cannot honour: refused, not ignored.
_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "audio", "modalities", "prediction")

LogCompletion = Callable[[Any], Awaitable[str]]


@dataclass(frozen=True)
class ChatRequest:
    """A validated ``/v1/chat/completions`` body."""

    model: str
    messages: tuple[ChatMessage, ...]
    n: int
    sampling: SamplingParams
    store: bool
    metadata: dict[str, str]
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float, *, integer: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise InvalidArgument(key, f"must be {kind} within {lo:g}..{hi:g}, got {v!r}")
    return v


def _content(value: Any, where: str) -> str:
    """OpenAI content: a string, or a list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument(f"{where}[{i}]", "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidArgument(where, "must be a string or a list of text parts")


def criteria_scores(result: Any, kept: int | None = None) -> Any:
    """The stored form of a best-of-N ranked by named criteria (its first ``kept`` candidates in ranked
    order, all by default), else None: the processor turns it into criteria feedback
    (gateway/processor.py)."""
    if not result.criteria:
        return None
    from gateway.events import CriteriaScores

    ranked = result.ranked[:kept]
    return CriteriaScores(
        refs=tuple(result.criteria), scores=tuple(c.score for c in ranked),
        tie_break=tuple(c.tie_break for c in ranked) if all(c.tie_break is not None for c in ranked) else (),
        per_criterion=tuple(dict(c.per_criterion) for c in ranked))


def with_text(texts: list[str]) -> int:
    """How many of ``texts`` have text; they must come before the empty ones (the order choices are
    answered in), so that a stored completion's candidate i is choice i."""
    kept = sum(not is_empty_reply(t) for t in texts)
    if any(is_empty_reply(t) for t in texts[:kept]):
        raise ValueError("empty choices must come after the choices with text")
    return kept


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a chat completions body, naming the offending field."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model", "is required: a reward model (to score) or a policy (best-of-N); see GET /v1/models")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument("messages", "is required: a non-empty list of {role, content}")
    normalized = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}]", "must be an object with role and content")
        role = "system" if m.get("role") == "developer" else m.get("role")
        normalized.append({"role": role, "content": _content(m.get("content"), f"messages[{i}].content")})
    messages = tuple(messages_from_dicts(normalized, "messages"))
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, [], {}):
            raise InvalidArgument(key, "is not supported by prefstream's chat completions; remove it")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidArgument("stream", f"must be true or false, got {stream!r}")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidArgument("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise InvalidArgument("stream_options", "must be an object with only include_usage")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise InvalidArgument("stream_options.include_usage", f"must be true or false, got {include_usage!r}")
    raw_stop = body.get("stop")
    if raw_stop is None:
        stop: tuple[str, ...] = ()
    elif isinstance(raw_stop, str):
        stop = (raw_stop,)
    elif isinstance(raw_stop, list) and all(isinstance(x, str) for x in raw_stop):
        stop = tuple(raw_stop)
    else:
        raise InvalidArgument("stop", "must be a string or a list of at most 4 strings")
    validate_stop(stop)
    if body.get("logprobs"):
        raise InvalidArgument("logprobs", "log probabilities are not available; omit it or set it to false")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise InvalidArgument("response_format", "only {\"type\": \"text\"} is supported")
    n = _number(body, "n", 1, _MAX_N, integer=True) or 1
    max_tokens = _number(body, "max_completion_tokens", 1, _MAX_TOKENS, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, _MAX_TOKENS, integer=True)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        raise InvalidArgument("top_p", "must be > 0")
    seed = _number(body, "seed", 0, 2**63 - 1, integer=True)
    store = body.get("store", False)
    if not isinstance(store, bool):
        raise InvalidArgument("store", f"must be true or false, got {store!r}")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or len(metadata) > _MAX_METADATA:
        raise InvalidArgument("metadata", f"must be an object of at most {_MAX_METADATA} string pairs")
    if SPLIT_METADATA_KEY in metadata:
        Split.parse(metadata[SPLIT_METADATA_KEY], f"metadata.{SPLIT_METADATA_KEY}")
    for k, v in metadata.items():
        if not isinstance(v, str) or len(k) > _MAX_METADATA_CHARS or len(v) > _MAX_METADATA_CHARS:
            raise InvalidArgument(f"metadata.{k}", f"values must be strings; keys and values at most {_MAX_METADATA_CHARS} characters")
    return ChatRequest(
        model=model,
        messages=messages,
        n=int(n),
        sampling=SamplingParams(
            temperature=None if temperature is None else float(temperature),
            top_p=None if top_p is None else float(top_p),
            max_tokens=None if max_tokens is None else int(max_tokens),
            seed=None if seed is None else int(seed),
        ),
        store=store,
        metadata={str(k): v for k, v in metadata.items()},
        stop=stop,
        stream=stream,
        include_usage=include_usage,
    )


def format_scores(reward: float, attributes: Mapping[str, float]) -> str:
    """NIM reward-model content: ``"reward:0.53"``, or the attributes when the model has them."""
    pairs = attributes.items() if attributes else [("reward", reward)]
    return ",".join(f"{k}:{round(float(v), 6)!r}" for k, v in pairs)


def _named_as_sent(exc: BaseException, last: int) -> BaseException:
    """The scorer names the messages of its own request (``prompt[0].content``, ``responses[0]``); name
    what this request sent instead: ``messages`` (the scorer's prompt is all of them, or all but the
    ``last``, the reply a reward model scores)."""
    if not isinstance(exc, InvalidArgument) or not exc.field:
        return exc
    name = exc.field
    if name == "responses[0]":
        name = f"messages[{last}].content"
    elif name == "prompt" or name.startswith("prompt["):
        name = "messages" + name[len("prompt"):]
    return exc if name == exc.field else InvalidArgument(name, exc.message)


def _error_response(exc: BaseException) -> web.Response:
    status, body = error_body(exc)
    return web.json_response(body, status=status)


def usage_body(usage: Usage) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def _sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class OpenAICompat:
    """The route handlers; ``add_routes`` mounts them."""

    def __init__(self, scorer: ScorerClient, log_completion: LogCompletion | None = None, *,
                 models_ttl_s: float = 5.0) -> None:
        self.scorer = scorer
        self.log_completion = log_completion
        self.models_ttl_s = models_ttl_s
        self._models: tuple[float, dict[str, ModelStatus]] = (0.0, {})

    async def _catalog(self) -> dict[str, ModelStatus]:
        at, models = self._models
        if time.monotonic() - at > self.models_ttl_s or not models:
            models = {m.name: m for m in await self.scorer.list_models()}
            self._models = (time.monotonic(), models)
        return models

    async def _model(self, name: str) -> ModelStatus:
        models = await self._catalog()
        if name not in models:
            self._models = (0.0, {})  # a model published a moment ago: look again next time
            raise NotFound(f"model {name!r} does not exist; served models: {', '.join(sorted(models)) or 'none'} "
                           "(GET /v1/models)")
        return models[name]

    async def models(self, request: web.Request) -> web.Response:
        try:
            models = await self._catalog()
            data = [
                {
                    "id": m.name, "object": "model", "created": 0, "owned_by": "prefstream",
                    "kind": m.kind.value, "version": m.serving_version or m.target_version,
                }
                for m in sorted(models.values(), key=lambda m: m.name)
            ]
            return web.json_response({"object": "list", "data": data})
        except Exception as e:  # noqa: BLE001 - mapped by the shared error mapping
            return _error_response(e)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        last = 0
        try:
            body = load_json(await request.read(), "body")
            req = parse_chat_request(body)
            last = len(req.messages) - 1
            info = await self._model(req.model)
            if info.kind == ModelKind.POLICY:
                if request.headers.get(CRITERIA_HEADER) is None:
                    if req.stream:
                        return await self._generate_stream(request, req)
                    return await self._generate(request, req)
                return await self._best_of_n(request, req, info)
            return await self._score(request, req)
        except web.HTTPException:
            raise  # the HTTP server's own answers, e.g. 413 for a body over client_max_size
        except Exception as e:  # noqa: BLE001 - mapped by the shared error mapping
            if not isinstance(e, PrefstreamError):
                log.exception("chat completion failed")
            return _error_response(_named_as_sent(e, last))

    async def _score(self, request: web.Request, req: ChatRequest) -> web.Response:
        if req.messages[-1].role != "assistant":
            raise InvalidArgument(f"messages[{len(req.messages) - 1}].role",
                                  "must be 'assistant' for a reward model: the last message is the response it scores")
        if req.n != 1:
            raise InvalidArgument("n", "must be 1 for a reward model (it scores the one assistant message)")
        if req.store:
            raise InvalidArgument("store", "scoring requests are not stored; only policy completions can be")
        if req.stream:
            raise InvalidArgument("stream", "a reward model answers at once; omit stream or set it to false")
        if req.stop:
            raise InvalidArgument("stop", "a reward model generates nothing to stop; remove stop")
        result = await self.scorer.score(req.messages[:-1], [req.messages[-1].content], model=req.model)
        s = result.scores[0]
        content = format_scores(s.reward, s.attributes)
        return web.json_response({
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": f"{result.model.name}@{result.model.version}",
            "model_version": result.model.version,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                # NIM reward models answer with the scores as logprobs: clients written for NIM read them there
                "logprobs": {"content": [{"token": name, "logprob": value, "bytes": None, "top_logprobs": []}
                                         for name, value in {"reward": s.reward, **s.attributes}.items()]},
                "scores": {"reward": s.reward, **s.attributes},
            }],
            # The reward model reads the whole conversation and writes nothing.
            "usage": {"prompt_tokens": result.input_tokens, "completion_tokens": 0, "total_tokens": result.input_tokens},
        })

    async def _best_of_n(self, request: web.Request, req: ChatRequest, info: ModelStatus) -> web.Response:
        header = request.headers.get(CRITERIA_HEADER)
        criteria, refs = parse_criteria_header(header, CRITERIA_HEADER) if header is not None else ([], [])
        if req.stream:
            raise InvalidArgument("stream", f"best-of-N ({CRITERIA_HEADER}) ranks finished candidates and cannot "
                                            f"stream; omit stream, or drop the {CRITERIA_HEADER} header")
        if req.stop:
            raise InvalidArgument("stop", f"is not supported with best-of-N ({CRITERIA_HEADER}); remove stop")
        self._check_store(request, req)
        project = str(request.get(PROJECT_KEY) or "default")
        result = await self.scorer.best_of_n(
            req.messages, n=req.n, criteria=criteria, sampling=req.sampling, policy_model=req.model,
            criteria_refs=refs, project=project,
        )
        choices = [
            {
                "index": rank,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": "stop",
                "logprobs": None,
                "score": c.score,
                "criteria_scores": dict(c.per_criterion),
                "attributes": dict(c.attributes),
                **({"criteria_results": {k: r.to_dict() for k, r in c.criteria_results.items()}}
                   if result.criteria else {}),
            }
            for rank, c in enumerate(result.ranked)
        ]
        policy_version = result.policy.version if result.policy else ""
        texts = [c.text for c in result.ranked]
        completion_id, headers = await self._store(
            request, req, texts, policy_version,
            {"prefstream.criteria": ",".join(result.criteria or [f"{m.name}@{m.version}" for m in result.reward_models])},
            criteria=criteria_scores(result, with_text(texts)),
        )
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": req.model,
                "system_fingerprint": f"{req.model}@{policy_version}",
                "model_version": policy_version,
                "choices": choices,
                "criteria_scores": {m.name: [c.per_criterion.get(m.name) for c in result.ranked]
                                    for m in result.reward_models},
                "reward_models": [{"name": m.name, "version": m.version} for m in result.reward_models],
                "usage": usage_body(result.usage),
            },
            headers=headers,
        )


    def _check_store(self, request: web.Request, req: ChatRequest) -> None:
        """Before any work: can this request's ``store`` be honoured, and may its key ingest?"""
        if not req.store:
            return
        if self.log_completion is None:
            raise InvalidArgument("store", "this endpoint cannot store completions (no completion log configured)")
        if request.get(MAY_INGEST_KEY) is False:
            raise PermissionDenied("store: this API key may not ingest (scopes); drop store or use a key created "
                                   "with `--scope ingest`", field="store")

    async def _store(self, request: web.Request, req: ChatRequest, texts: list[str], version: str,
                     extra: Mapping[str, str], criteria: Any = None) -> tuple[str, dict[str, str]]:
        """(completion id, headers): logged through ``log_completion`` when the request says ``store``.

        ``texts`` are the choices in response order, empty ones last; only those with text are logged
        (``criteria``, when given, already scores just those)."""
        if not req.store:
            return f"chatcmpl-{uuid.uuid4().hex}", {}
        from gateway.events import Completion

        kept = with_text(texts)
        if kept == 0:
            return f"chatcmpl-{uuid.uuid4().hex}", {NOT_STORED_HEADER: f"all {len(texts)} choices are empty"}
        dropped = {EMPTY_CANDIDATES_METADATA_KEY: str(len(texts) - kept)} if kept < len(texts) else {}
        completion = Completion(
            event_id=str(uuid.uuid4()),
            project=str(request.get(PROJECT_KEY) or "default"),
            prompt=req.messages,
            candidates=tuple(texts[:kept]),
            model=req.model,
            model_version=version,
            metadata={**req.metadata, **extra, **dropped},
            split=req.metadata.get(SPLIT_METADATA_KEY, Split.TRAIN.value),
            criteria=criteria,
            created_at=time.time(),
        )
        completion_id = await self.log_completion(completion)  # type: ignore[misc]
        return completion_id, {COMPLETION_ID_HEADER: completion_id}

    async def _generate(self, request: web.Request, req: ChatRequest) -> web.Response:
        self._check_store(request, req)
        result = await self.scorer.generate(req.messages, model=req.model, n=req.n, sampling=req.sampling,
                                            stop=req.stop)
        version = result.model.version
        choices = sorted(result.choices, key=lambda c: is_empty_reply(c.text))  # empties last, see _store
        completion_id, headers = await self._store(request, req, [c.text for c in choices], version, {})
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": req.model,
                "system_fingerprint": f"{req.model}@{version}",
                "model_version": version,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c.text},
                        "finish_reason": c.finish_reason,
                        "logprobs": None,
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": usage_body(result.usage),
            },
            headers=headers,
        )

    async def _generate_stream(self, request: web.Request, req: ChatRequest) -> web.StreamResponse:
        """Server-sent ``chat.completion.chunk`` events in OpenAI's order, then ``data: [DONE]``.

        Errors before the first chunk are plain JSON errors; after it (the status is sent) they
        arrive as one ``data: {"error": ...}`` event and the stream ends without ``[DONE]``.
        """
        if req.store:
            raise InvalidArgument("store", "streamed completions are not stored; omit store or stream")
        chunks = self.scorer.generate_stream(req.messages, model=req.model, n=req.n, sampling=req.sampling,
                                             stop=req.stop)
        first = await anext(chunks)  # errors (unknown model, loading) still get a JSON error response
        version = first.model.version
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": req.model, "system_fingerprint": f"{req.model}@{version}", "model_version": version}
        if req.include_usage:
            base["usage"] = None

        def event(index: int, delta: dict[str, str], finish: str | None = None) -> bytes:
            return _sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}]})

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            for i in range(req.n):
                await response.write(event(i, {"role": "assistant", "content": ""}))
            chunk: Any = first
            while chunk is not None:
                if chunk.usage is not None:
                    if req.include_usage:
                        await response.write(_sse({**base, "choices": [], "usage": usage_body(chunk.usage)}))
                elif chunk.finish_reason:
                    await response.write(event(chunk.index, {}, chunk.finish_reason))
                elif chunk.delta:
                    await response.write(event(chunk.index, {"content": chunk.delta}))
                chunk = await anext(chunks, None)
            await response.write(_sse("[DONE]"))
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - mapped by the shared error mapping, as an event
            _, body = error_body(e)
            await response.write(_sse(body))
        finally:
            await chunks.aclose()
        await response.write_eof()
        return response


def add_routes(app: web.Application, scorer: ScorerClient, log_completion: LogCompletion | None = None) -> OpenAICompat:
    """Mount ``POST /v1/chat/completions`` and ``GET /v1/models`` on ``app``.

    ``log_completion(completion)`` receives a :class:`gateway.events.Completion` (project from the
    request key ``PROJECT_KEY`` that the gateway's auth sets, else ``"default"``) and returns the
    completion id once the completion is durable.
    """
    api = OpenAICompat(scorer, log_completion)
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_get("/v1/models", api.models)
    return api


__all__ = ["COMPLETION_ID_HEADER", "CRITERIA_HEADER", "EMPTY_CANDIDATES_METADATA_KEY", "NOT_STORED_HEADER", "ChatRequest",
           "OpenAICompat", "PROJECT_KEY", "add_routes", "format_scores", "parse_chat_request"]
