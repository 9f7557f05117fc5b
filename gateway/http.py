"""The HTTP/JSON face of the gateway: the same operations as gRPC, for clients without gRPC.

Bodies are the proto3 JSON of the gRPC request messages (parsed with ``json_format``, so there is one
schema), and answers are the proto3 JSON of the responses (snake_case field names):

* ``POST /v1/completions/log``  LogCompletionRequest  -> LogCompletionResponse
* ``POST /v1/feedback``         LogFeedbackRequest    -> LogFeedbackResponse
* ``POST /v1/events:batch``     ``{"events": [StreamEventsRequest, ...]}`` -> ``{"results": [StreamEventsResponse, ...]}``
  (each event answered individually, like StreamEvents; the HTTP status is 200 unless the call itself
  failed, e.g. 401)
* ``GET /healthz`` and ``GET /metrics`` (Prometheus text).

Authentication is the same as gRPC (``Authorization: Bearer <key>`` or ``X-API-Key``); errors use the
shared middleware, so a bad field is a 400 naming it, a missing key 401, another project's key 403,
Kafka unreachable 503.  When ``gateway.openai_compat`` is present its routes are mounted too.
"""

from __future__ import annotations

import importlib
import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import edge
from gateway.auth import Authenticator, Principal
from gateway.events import Completion
from gateway.ingest import Ingestor, Item
from gateway.validation import Limits, parse_json
from prefstream.gateway.v1.gateway_pb2 import LogCompletionRequest as LogCompletionRequestProto
from prefstream.gateway.v1.gateway_pb2 import LogFeedbackRequest as LogFeedbackRequestProto
from prefstream.gateway.v1.gateway_pb2 import StreamEventsRequest as StreamEventsRequestProto
from services.codec import load_json
from services.errors import InvalidArgument, PrefstreamError, http_error_middleware

log = logging.getLogger(__name__)

#: Largest accepted request body (the gRPC limit too).
MAX_BODY_BYTES = 32 * 1024 * 1024

LogCompletionFn = Callable[[Completion], Awaitable[str]]
#: Where the auth middleware leaves the caller's project for the OpenAI-compatible routes
#: (the key gateway.openai_compat reads).
PROJECT_KEY = "prefstream.project"
MAY_INGEST_KEY = "prefstream.may_ingest"


def _json(msg: Message, status: int = 200) -> web.Response:
    body = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return web.json_response(body, status=status)


class HttpApi:
    """aiohttp handlers over the shared :class:`~gateway.ingest.Ingestor`."""

    def __init__(
        self,
        ingestor: Ingestor,
        auth: Authenticator,
        limits: Limits,
        *,
        max_batch_events: int = 1000,
        kafka_ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self._ingestor = ingestor
        self._auth = auth
        self._limits = limits
        self._max_batch = max_batch_events
        self._kafka_ready = kafka_ready

    async def log_completion(self, request: web.Request) -> web.Response:
        principal = await self._auth.authenticate(request.headers, scope="ingest")
        req = parse_json(await request.read(), LogCompletionRequestProto)
        outcome = await self._ingestor.write_one(edge.completion_item(req.completion, self._limits), principal)
        edge.count("completion", "http", outcome)
        if isinstance(outcome, PrefstreamError):
            raise outcome
        return _json(edge.completion_response(outcome))

    async def log_feedback(self, request: web.Request) -> web.Response:
        principal = await self._auth.authenticate(request.headers, scope="ingest")
        req = parse_json(await request.read(), LogFeedbackRequestProto)
        outcome = await self._ingestor.write_one(edge.feedback_item(req.feedback, self._limits), principal)
        edge.count("feedback", "http", outcome)
        if isinstance(outcome, PrefstreamError):
            raise outcome
        return _json(edge.feedback_response(outcome))

    async def events_batch(self, request: web.Request) -> web.Response:
        principal = await self._auth.authenticate(request.headers, scope="ingest")
        body = load_json(await request.read() or b"null", "body")
        if not isinstance(body, dict) or not isinstance(body.get("events"), list):
            raise InvalidArgument("events", 'the body must be {"events": [StreamEventsRequest, ...]}')
        events = body["events"]
        if not events:
            raise InvalidArgument("events", "is empty; send at least one event")
        if len(events) > self._max_batch:
            raise InvalidArgument("events", f"has {len(events)} events; the limit is {self._max_batch} per call")
        seqs, kinds, items = [], [], []
        for i, raw in enumerate(events):
            try:
                req = parse_json(json.dumps(raw), StreamEventsRequestProto, root=f"events[{i}]")
            except InvalidArgument as e:
                # Echo the client's seq when it is readable, else the event's position.
                seq = raw.get("seq") if isinstance(raw, dict) else None
                seqs.append(seq if isinstance(seq, int) and seq >= 0 else i)
                kinds.append("")
                items.append(Item(event=e))
                continue
            kind, item = edge.stream_item(req, self._limits)
            seqs.append(req.seq)
            kinds.append(kind)
            items.append(item)
        outcomes = await self._ingestor.write(items, principal)
        results = []
        for seq, kind, outcome in zip(seqs, kinds, outcomes):
            edge.count(kind, "http", outcome)
            results.append(json_format.MessageToDict(edge.stream_response(seq, outcome), preserving_proto_field_name=True))
        return web.json_response({"results": results})

    async def healthz(self, request: web.Request) -> web.Response:
        ready = self._kafka_ready()
        return web.json_response({"status": "ok" if ready else "degraded", "kafka": ready}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def completion_logger(self) -> LogCompletionFn:
        """``log_completion(completion) -> completion_id`` for the OpenAI-compatible routes.

        ``completion`` is a :class:`gateway.events.Completion` built by those routes for the project
        the auth middleware put on the request; it is validated and written exactly like
        ``LogCompletion`` (answered only once Kafka has it).  Raises PrefstreamError.
        """

        async def log_completion(completion: Completion) -> str:
            item = edge.completion_item(completion.to_proto(), self._limits)
            outcome = await self._ingestor.write_one(item, Principal(project=completion.project))
            edge.count("completion", "http", outcome)
            if isinstance(outcome, PrefstreamError):
                raise outcome
            return outcome.completion_id

        return log_completion

    def auth_middleware(self, paths: tuple[str, ...]) -> Callable:
        """Authenticate requests to ``paths`` (routes mounted from elsewhere) and record the project."""

        @web.middleware
        async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
            if request.path in paths:
                principal = await self._auth.authenticate(request.headers, scope="score")
                request[PROJECT_KEY] = principal.project
                request[MAY_INGEST_KEY] = "ingest" in principal.scopes
            return await handler(request)

        return middleware


def build_app(api: HttpApi, *, scorer_client: Any = None) -> web.Application:
    """The aiohttp application (routes + the shared error middleware)."""
    compat_paths = ("/v1/chat/completions", "/v1/models")
    app = web.Application(
        middlewares=[http_error_middleware(), api.auth_middleware(compat_paths)], client_max_size=MAX_BODY_BYTES
    )
    app.router.add_post("/v1/completions/log", api.log_completion)
    app.router.add_post("/v1/feedback", api.log_feedback)
    app.router.add_post("/v1/events:batch", api.events_batch)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/metrics", api.metrics)
    try:
        compat = importlib.import_module("gateway.openai_compat")
    except ModuleNotFoundError as e:
        if e.name != "gateway.openai_compat":
            raise
        compat = None
    if compat is not None and scorer_client is not None:
        compat.add_routes(app, scorer_client, api.completion_logger())
        log.info("mounted the OpenAI-compatible routes")
    elif compat is not None:
        log.info("OpenAI-compatible routes not mounted: no scorer_address configured")
    return app
