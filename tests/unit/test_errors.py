"""services.errors: one mapping from domain errors to gRPC and HTTP, unexpected errors hidden."""

import asyncio

import grpc
import pytest

from services.errors import (
    INTERNAL_MESSAGE,
    ErrorInterceptor,
    InvalidArgument,
    NotFound,
    Unavailable,
    error_body,
    http_status_for_grpc,
    status_of,
)


def test_status_of_domain_and_unexpected_errors():
    assert status_of(InvalidArgument("feedback.choice.chosen_index", "out of range")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "feedback.choice.chosen_index: out of range",
    )
    code, msg = status_of(RuntimeError("secret path /etc/x"))
    assert code == grpc.StatusCode.INTERNAL and msg == INTERNAL_MESSAGE and "secret" not in msg


def test_http_bodies():
    status, body = error_body(NotFound("model rm not found"))
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = error_body(InvalidArgument("n", "must be >= 1"))
    assert status == 400 and body["error"]["param"] == "n"
    status, body = error_body(KeyError("boom"))
    assert status == 500 and "boom" not in body["error"]["message"]
    assert http_status_for_grpc(grpc.StatusCode.UNAVAILABLE) == 503


class _Ctx:
    def __init__(self):
        self.aborted = None

    def abort(self, code, details):
        self.aborted = (code, details)
        raise Exception()  # what grpc's sync server does


def _handler(behavior):
    return grpc.unary_unary_rpc_method_handler(behavior)


@pytest.mark.parametrize(
    "exc, code",
    [(Unavailable("kafka down"), grpc.StatusCode.UNAVAILABLE), (ValueError("x"), grpc.StatusCode.INTERNAL)],
)
def test_sync_interceptor_maps(exc, code):
    def behavior(req, ctx):
        raise exc

    wrapped = ErrorInterceptor().intercept_service(lambda d: _handler(behavior), None)
    ctx = _Ctx()
    with pytest.raises(Exception):
        wrapped.unary_unary(None, ctx)
    assert ctx.aborted[0] == code


def test_sync_interceptor_lets_explicit_abort_through():
    def behavior(req, ctx):
        ctx.abort(grpc.StatusCode.NOT_FOUND, "nope")

    wrapped = ErrorInterceptor().intercept_service(lambda d: _handler(behavior), None)
    ctx = _Ctx()
    with pytest.raises(Exception):
        wrapped.unary_unary(None, ctx)
    assert ctx.aborted == (grpc.StatusCode.NOT_FOUND, "nope")
