"""gRPC server bootstrap shared by the gateway and the scorer.

``create_server(...) -> (server, port)`` builds a ``grpc.aio`` server with the error interceptor,
the standard health service and reflection; ``serve_until_signal`` runs it and drains in-flight RPCs
with a grace period on SIGTERM/SIGINT.  Health starts NOT_SERVING for the named services until the
caller marks them SERVING (the scorer does so only once a model is loaded).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.audit import audit
from services.errors import AioErrorInterceptor, PrefstreamError

if TYPE_CHECKING:
    from services.tls import ClientTls, ServerTls

log = logging.getLogger(__name__)

#: The overall-server health entry (empty service name), as gRPC health checking defines it.
OVERALL = ""

# Messages up to 32 MiB: best-of-N and bulk scoring carry many long texts.
DEFAULT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
)


@dataclass
class ServerHandle:
    """A built server plus the health servicer used to flip serving status."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...] = field(default_factory=tuple)
    initially_serving: bool = False

    async def set_serving(self, serving: bool, services: Iterable[str] | None = None) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in (*(services if services is not None else self.service_names), OVERALL):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


#: The stable reflection service (what grpcurl, ghz and Postman ask for first); grpcio-reflection
#: ships only ``v1alpha``, whose messages are the same on the wire.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection_v1(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve ``grpc.reflection.v1`` with the v1alpha implementation: the two protos differ only in
    their package name, so v1alpha's messages parse and write v1's bytes unchanged."""
    from grpc_reflection.v1alpha import reflection_pb2 as messages

    servicer = reflection.aio.ReflectionServicer(service_names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=messages.ServerReflectionRequest.FromString,
        response_serializer=messages.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),))


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class TokenGuard(grpc.aio.ServerInterceptor):
    """Methods that change state need ``authorization: Bearer <token>``, and each call of one, allowed or
    refused, leaves an audit line (:func:`audit`).

    Without a configured token they are served only to a server bound to loopback (a developer's
    machine); a server listening on the network refuses them (PERMISSION_DENIED), so an admin API is
    never open by accident.  Other methods pass untouched.
    """

    def __init__(self, guarded: Iterable[str], token: str, *, host: str, setting: str) -> None:
        self.guarded = frozenset(guarded)
        self.token = token.encode()
        self.open_locally = not token and host in LOOPBACK_HOSTS
        self.setting = setting

    def _refusal(self, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        if self.open_locally:
            return None
        if not self.token:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"this call changes what is served and this server listens beyond loopback without an admin token; "
                    f"set {self.setting}")
        given = ""
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                given = value[len("Bearer "):]
        if not hmac.compare_digest(given.encode(), self.token):
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "authorization: send the admin token as 'authorization: Bearer <token>'")
        return None

    async def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method not in self.guarded:
            return handler
        method = details.method
        refusal = self._refusal(details.invocation_metadata)
        if refusal is None:
            behavior = handler.unary_unary

            async def audited(request: Any, context: grpc.aio.ServicerContext) -> Any:
                outcome = "OK"
                try:
                    return await behavior(request, context)
                except PrefstreamError as e:
                    outcome = e.grpc_code.name
                    raise
                except BaseException:
                    outcome = "ERROR"
                    raise
                finally:
                    audit(method, context.peer(), outcome, request)

            return grpc.unary_unary_rpc_method_handler(audited, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            audit(method, context.peer(), f"REFUSED {refusal[0].name}", request)
            await context.abort(*refusal)

        return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


def create_server(
    adders: Sequence[Callable[[grpc.aio.Server], None]],
    service_names: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Sequence[tuple[str, int]] = DEFAULT_OPTIONS,
    serving: bool = False,
    tls: "ServerTls | None" = None,
) -> ServerHandle:
    """Build (not start) an aio server.

    ``adders`` are callables that register servicers (``lambda s: add_FooServicer_to_server(x, s)``);
    ``service_names`` are the full proto service names, used for health and reflection.  ``port=0``
    picks a free port; the bound port is returned in the handle.  ``tls`` serves TLS (mutual TLS when it
    has a client CA) instead of plaintext.
    """
    server = grpc.aio.server(interceptors=(AioErrorInterceptor(), *interceptors), options=list(options))
    for add in adders:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(names, server)
    _add_reflection_v1(names, server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.grpc_credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind gRPC port {host}:{port}; choose a free port")
    return ServerHandle(
        server=server,
        port=bound,
        health=health_servicer,
        service_names=tuple(service_names),
        initially_serving=serving,
    )


async def start(handle: ServerHandle) -> None:
    """Start serving and publish the initial health status."""
    await handle.server.start()
    await handle.set_serving(handle.initially_serving)
    log.info("gRPC server listening on port %d (%s)", handle.port, ", ".join(handle.service_names))


async def serve_until_signal(
    handle: ServerHandle,
    *,
    grace_s: float = 10.0,
    on_shutdown: Callable[[], object] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then stop accepting, drain in-flight RPCs for ``grace_s`` seconds."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    await stop.wait()
    log.info("shutting down: draining in-flight RPCs for up to %.1fs", grace_s)
    await handle.set_serving(False)
    if on_shutdown is not None:
        result = on_shutdown()
        if asyncio.iscoroutine(result):
            await result
    await handle.server.stop(grace_s)
    log.info("server stopped")


def channel(address: str, *, aio: bool = True, tls: "ClientTls | None" = None) -> grpc.Channel | grpc.aio.Channel:
    """A client channel with the same message limits as the servers; TLS when ``tls`` is given."""
    opts = [(k, v) for k, v in DEFAULT_OPTIONS if k.startswith("grpc.max_")]
    if tls is not None:
        creds = tls.grpc_credentials()
        return grpc.aio.secure_channel(address, creds, options=opts) if aio else grpc.secure_channel(address, creds, options=opts)
    return grpc.aio.insecure_channel(address, options=opts) if aio else grpc.insecure_channel(address, options=opts)
