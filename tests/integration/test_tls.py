"""TLS on the wire: the gRPC bootstrap with TLS and mutual TLS, and a gateway whose gRPC and HTTP
listeners speak only TLS, against the real stack, with certificates from the development CA."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.auth import create_key
from gateway.client import GatewayClient
from gateway.testing import GatewayHarness
from services import grpc_server
from services.errors import Unavailable
from services.tls import ClientTls, make_dev_ca

pytestmark = pytest.mark.integration


async def _health(address: str, tls: ClientTls | None) -> str:
    async with grpc_server.channel(address, tls=tls) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def test_grpc_tls_and_mutual_tls(tmp_path: Path) -> None:
    ca = make_dev_ca(tmp_path / "ca")
    other = make_dev_ca(tmp_path / "other")  # a CA the server never heard of

    async def main() -> None:
        for mutual in (False, True):
            handle = grpc_server.create_server([], [], host="127.0.0.1", port=0, serving=True, tls=ca.server(mutual=mutual))
            await grpc_server.start(handle)
            address = f"localhost:{handle.port}"
            try:
                assert await _health(address, ca.client(with_cert=True)) == "SERVING"
                refused = [None, other.client(with_cert=True)]  # plaintext; a server cert nobody trusts
                if mutual:
                    refused.append(ca.client(with_cert=False))  # no client certificate
                else:
                    assert await _health(address, ca.client(with_cert=False)) == "SERVING"
                for tls in refused:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await _health(address, tls)
                    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                await handle.server.stop(0)

    asyncio.run(main())


def test_a_tls_gateway_takes_events_only_over_tls(tmp_path: Path, kafka_bootstrap: str, redis_url: str,
                                                  redis_client) -> None:
    ca = make_dev_ca(tmp_path / "ca")
    project = f"tls-{uuid.uuid4().hex[:6]}"
    key, _ = create_key(redis_client, project, pepper="")
    with GatewayHarness(kafka_bootstrap, redis_url, run_processor=False, tls_cert_file=str(ca.server_cert),
                        tls_key_file=str(ca.server_key)) as gw:
        port = gw.gateway.grpc_port
        client = GatewayClient(f"localhost:{port}", api_key=key, tls=ca.client())
        try:
            assert client.log_completion(project, "2+2?", ["4", "5"], event_id=f"tls-{uuid.uuid4().hex}")
        finally:
            client.close()
        plain = GatewayClient(f"localhost:{port}", api_key=key, timeout_s=5)
        try:
            with pytest.raises(Unavailable):
                plain.log_completion(project, "2+2?", ["4", "5"])
        finally:
            plain.close()
        https = f"https://localhost:{gw.gateway.http_port}"
        assert gw.http_url.startswith("https://")
        assert requests.get(f"{https}/healthz", verify=str(ca.ca_file), timeout=10).status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{https}/healthz", timeout=10)  # not signed by a CA the system trusts
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://localhost:{gw.gateway.http_port}/healthz", timeout=10)
