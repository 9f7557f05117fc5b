"""The shared gRPC bootstrap: both reflection services answer, and bytes protobuf cannot parse are
INVALID_ARGUMENT naming the message type (not UNKNOWN with a Python exception class)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.grpc_server import REFLECTION_V1, create_server, start

HEALTH = "grpc.health.v1.Health"


def test_reflection_v1_and_v1alpha_list_services_and_resolve_symbols() -> None:
    async def run() -> None:
        handle = create_server([], [HEALTH], serving=True)
        await start(handle)
        try:
            address = f"127.0.0.1:{handle.port}"
            async with grpc.aio.insecure_channel(address) as ch:
                for service in (REFLECTION_V1, "grpc.reflection.v1alpha.ServerReflection"):
                    rpc = ch.stream_stream(f"/{service}/ServerReflectionInfo",
                                           request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                           response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
                    answers = [a async for a in rpc(iter([
                        reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol=HEALTH),
                    ]))]
                    listed = {s.name for s in answers[0].list_services_response.service}
                    assert {HEALTH, REFLECTION_V1, "grpc.reflection.v1alpha.ServerReflection"} <= listed, service
                    assert answers[1].file_descriptor_response.file_descriptor_proto, service
        finally:
            await handle.server.stop(0)

    asyncio.run(run())


def test_bytes_protobuf_cannot_parse_are_invalid_argument_naming_the_type() -> None:
    async def run() -> None:
        handle = create_server([], [HEALTH], serving=True)
        await start(handle)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
                check = ch.unary_unary(f"/{HEALTH}/Check", request_serializer=lambda b: b,
                                       response_deserializer=health_pb2.HealthCheckResponse.FromString)
                try:
                    await check(b"\x0a\x09trunc")  # field 1 says 9 bytes follow; 5 do
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
                    assert "grpc.health.v1.HealthCheckRequest" in e.details() and e.details().startswith("request: ")
                else:
                    raise AssertionError("a truncated request was accepted")
                ok = await check(health_pb2.HealthCheckRequest(service="").SerializeToString())
                assert ok.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await handle.server.stop(0)

    asyncio.run(run())


def test_guarded_methods_need_the_token_and_are_closed_on_the_network_without_one() -> None:
    from services.grpc_server import TokenGuard

    check = f"/{HEALTH}/Check"

    async def call(host: str, token: str, sent: str | None) -> grpc.StatusCode:
        guard = TokenGuard([check], token, host=host, setting="ADMIN_TOKEN")
        handle = create_server([], [HEALTH], host=host, serving=True, interceptors=[guard])
        await start(handle)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
                stub = ch.unary_unary(check, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                      response_deserializer=health_pb2.HealthCheckResponse.FromString)
                metadata = (("authorization", f"Bearer {sent}"),) if sent is not None else None
                try:
                    await stub(health_pb2.HealthCheckRequest(), metadata=metadata)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                        assert "ADMIN_TOKEN" in e.details()
                    return e.code()
        finally:
            await handle.server.stop(0)

    async def run() -> None:
        assert await call("127.0.0.1", "", None) == grpc.StatusCode.OK  # a developer's loopback server
        assert await call("0.0.0.0", "", None) == grpc.StatusCode.PERMISSION_DENIED  # never open by accident
        assert await call("0.0.0.0", "", "anything") == grpc.StatusCode.PERMISSION_DENIED
        assert await call("0.0.0.0", "s3cret", None) == grpc.StatusCode.UNAUTHENTICATED
        assert await call("0.0.0.0", "s3cret", "wrong") == grpc.StatusCode.UNAUTHENTICATED
        assert await call("127.0.0.1", "s3cret", None) == grpc.StatusCode.UNAUTHENTICATED  # a token binds loopback too
        assert await call("0.0.0.0", "s3cret", "s3cret") == grpc.StatusCode.OK

    asyncio.run(run())
