"""Domain errors and their one mapping to gRPC and HTTP status codes.

Every error a client may see is a :class:`PrefstreamError` subclass that knows its gRPC code and HTTP
status.  :class:`ErrorInterceptor` (gRPC, unary and streaming, sync and aio) and
:func:`http_error_middleware` (aiohttp) are the only places that turn exceptions into responses.
Anything unexpected becomes INTERNAL / 500 with a generic message and a logged traceback; the text
of an internal error never reaches a client.
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any, Awaitable, Callable

import grpc

log = logging.getLogger(__name__)


class PrefstreamError(Exception):
    """Base of errors that are safe to show to a client."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500
    #: OpenAI-style error type used by the HTTP edge.
    error_type: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message": str(self),
            "type": self.error_type,
            "code": self.grpc_code.name,
        }
        if self.field:
            body["param"] = self.field
        return body


class InvalidArgument(PrefstreamError):
    """A request field is malformed; the message names the field, the limit and the fix."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field=field)


class Unauthenticated(PrefstreamError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    error_type = "authentication_error"


class PermissionDenied(PrefstreamError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    error_type = "permission_error"


class NotFound(PrefstreamError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    error_type = "not_found_error"


class AlreadyExists(PrefstreamError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409
    error_type = "conflict_error"


class FailedPrecondition(PrefstreamError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409
    error_type = "failed_precondition"


class ResourceExhausted(PrefstreamError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    error_type = "rate_limit_error"


class Unavailable(PrefstreamError):
    """A dependency (Kafka, Redis, a model) cannot serve now; the client may retry."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    error_type = "service_unavailable"


class DeadlineExceeded(PrefstreamError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    error_type = "timeout_error"


INTERNAL_MESSAGE = "internal error; see the server log"

_GRPC_TO_HTTP = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status_for_grpc(code: grpc.StatusCode) -> int:
    """The HTTP status matching a gRPC code (used when an HTTP edge calls a gRPC backend)."""
    return _GRPC_TO_HTTP.get(code, 500)


def from_grpc_error(err: grpc.RpcError) -> PrefstreamError:
    """Turn a backend's gRPC error into the domain error with the same code (edge-to-backend calls)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else ""
    for cls in (InvalidArgument, Unauthenticated, PermissionDenied, NotFound, AlreadyExists,
                FailedPrecondition, ResourceExhausted, Unavailable, DeadlineExceeded):
        if cls.grpc_code == code:
            if cls is InvalidArgument:
                field, _, msg = (details or "").partition(": ")
                return InvalidArgument(field if msg else "request", msg or details or "invalid")
            return cls(details or code.name)
    return Unavailable(f"backend error {code.name}") if code == grpc.StatusCode.UNKNOWN else PrefstreamError(INTERNAL_MESSAGE)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, client-safe message) for any exception; unexpected ones are logged with traceback."""
    if isinstance(exc, PrefstreamError):
        return exc.grpc_code, str(exc)
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


# ---------------------------------------------------------------------------------------------
# gRPC: one interceptor for every servicer, sync or aio, unary or streaming.


class _Malformed:
    """What a request that protobuf could not parse becomes, so the handler answers INVALID_ARGUMENT
    (grpc would answer UNKNOWN, naming a Python exception class)."""

    def __init__(self, type_name: str, exc: BaseException) -> None:
        self.error = InvalidArgument("request", f"is not a valid {type_name} protobuf message ({exc or 'truncated'}); "
                                                "send the message the service's .proto defines, serialized whole")


def _safe_deserializer(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "") or "request"

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's malformed bytes
            return _Malformed(type_name, e)

    return safe


def _checked(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise request.error
    return request


def _checked_stream(requests: Any, is_aio: bool) -> Any:
    if is_aio and hasattr(requests, "__aiter__"):
        async def aio_items() -> Any:
            async for item in requests:
                yield _checked(item)
        return aio_items()
    if hasattr(requests, "__iter__"):
        return (_checked(item) for item in requests)
    return requests


def _wrap_behavior(behavior: Callable, kind: str, is_aio: bool) -> Callable:
    inner = behavior

    def behavior(request_or_iterator: Any, context: Any) -> Any:  # noqa: F811 - the checked behavior
        if kind.startswith("unary"):
            return inner(_checked(request_or_iterator), context)
        return inner(_checked_stream(request_or_iterator, is_aio), context)

    if is_aio:
        if kind in ("unary_unary", "stream_unary"):

            async def aio_unary(request_or_iterator: Any, context: Any) -> Any:
                try:
                    return await behavior(request_or_iterator, context)
                except PrefstreamError as e:
                    await context.abort(e.grpc_code, str(e))
                except Exception as e:  # noqa: BLE001 - the one place that maps unexpected errors
                    if _is_abort(e):
                        raise
                    code, msg = status_of(e)
                    await context.abort(code, msg)

            return aio_unary

        async def aio_stream(request_or_iterator: Any, context: Any) -> Any:
            try:
                result = behavior(request_or_iterator, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write()
                    await result
            except PrefstreamError as e:
                await context.abort(e.grpc_code, str(e))
            except Exception as e:  # noqa: BLE001
                if _is_abort(e):
                    raise
                code, msg = status_of(e)
                await context.abort(code, msg)

        return aio_stream

    if kind in ("unary_unary", "stream_unary"):

        def sync_unary(request_or_iterator: Any, context: Any) -> Any:
            try:
                return behavior(request_or_iterator, context)
            except PrefstreamError as e:
                context.abort(e.grpc_code, str(e))
            except Exception as e:  # noqa: BLE001
                if _is_abort(e):
                    raise
                code, msg = status_of(e)
                context.abort(code, msg)

        return sync_unary

    def sync_stream(request_or_iterator: Any, context: Any) -> Any:
        try:
            yield from behavior(request_or_iterator, context)
        except PrefstreamError as e:
            context.abort(e.grpc_code, str(e))
        except Exception as e:  # noqa: BLE001
            if _is_abort(e):
                raise
            code, msg = status_of(e)
            context.abort(code, msg)

    return sync_stream


def _is_abort(e: BaseException) -> bool:
    """True for the exception ``context.abort()`` raises, which must propagate untouched.

    grpc.aio raises ``grpc.aio.AbortError``; the sync server raises a bare ``Exception()``.
    """
    return isinstance(e, grpc.aio.AbortError) or (type(e) is Exception and not e.args)


def _rewrap(handler: grpc.RpcMethodHandler, is_aio: bool) -> grpc.RpcMethodHandler:
    for kind, factory in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behavior = getattr(handler, kind)
        if behavior is not None:
            return factory(
                _wrap_behavior(behavior, kind, is_aio),
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to status codes for a sync ``grpc.server``."""

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        return None if handler is None else _rewrap(handler, is_aio=False)


class AioErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes for a ``grpc.aio`` server, including mid-stream errors."""

    async def intercept_service(self, continuation: Callable[..., Awaitable], handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        return None if handler is None else _rewrap(handler, is_aio=True)


# ---------------------------------------------------------------------------------------------
# HTTP (aiohttp): one middleware, errors in OpenAI's JSON error shape.


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for any exception, OpenAI-style: {"error": {...}}."""
    if isinstance(exc, PrefstreamError):
        return exc.http_status, {"error": exc.to_dict()}
    log.error("unexpected error", exc_info=exc)
    return 500, {"error": {"message": INTERNAL_MESSAGE, "type": "internal_error", "code": "INTERNAL"}}


def http_error_middleware() -> Callable:
    """An aiohttp middleware mapping exceptions to JSON error responses."""
    from aiohttp import web

    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except json.JSONDecodeError as e:
            err = InvalidArgument("body", f"request body is not valid JSON ({e.msg} at position {e.pos})")
            status, body = error_body(err)
            return web.json_response(body, status=status)
        except Exception as e:  # noqa: BLE001 - the one HTTP place that maps errors
            status, body = error_body(e)
            return web.json_response(body, status=status)

    return middleware
