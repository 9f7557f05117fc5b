"""Assembles one gateway process: Redis and Kafka clients, auth, the ingest path, gRPC, HTTP, processor.

``Gateway(cfg)`` builds nothing until ``await start()``; the ports it bound are then on the object
(``grpc_port``, ``http_port``; a configured port of 0 picks a free one).  ``serve(cfg)`` runs until
SIGTERM/SIGINT and drains in-flight calls for ``drain_grace_s``.  A gateway started while Kafka is
down comes up anyway and answers UNAVAILABLE until Kafka is reachable.

Programmatic use (tests, the demo)::

    cfg = load_gateway_config(overrides={"grpc_port": 0, "http_port": 0, "stack_run_dir": ".run/stack"})
    gw = Gateway(cfg)
    await gw.start()
    ... GatewayClient(f"127.0.0.1:{gw.grpc_port}", api_key=key) ...
    await gw.stop()
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.auth import Authenticator
from gateway.config import GatewayConfig
from gateway.http import HttpApi, build_app
from gateway.ingest import Ingestor
from gateway.kafka_writer import KafkaWriter
from gateway.processor import ProcessorThread
from gateway.server import SERVICE_NAME, GatewayServicer, add_to_server
from gateway.validation import Limits
from services import grpc_server
from services.metrics import serve_metrics
from services.redis_client import connect_async

log = logging.getLogger(__name__)


class Gateway:
    """One running gateway (see the module docstring)."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.grpc_port = 0
        self.http_port = 0
        self.processor: ProcessorThread | None = None
        self._handle: grpc_server.ServerHandle | None = None
        self._runner: web.AppRunner | None = None
        self._writer: KafkaWriter | None = None
        self._redis = None
        self._scorer = None

    @property
    def server(self) -> grpc_server.ServerHandle:
        """The started gRPC server (health, drain); only valid after start()."""
        if self._handle is None:
            raise RuntimeError("the gateway is not started")
        return self._handle

    @property
    def grpc_address(self) -> str:
        return f"{self.cfg.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{'https' if self.cfg.tls_cert_file else 'http'}://{self.cfg.host}:{self.http_port}"

    async def start(self) -> None:
        cfg = self.cfg
        kafka, redis_url = cfg.endpoints()
        if not cfg.auth_enabled:
            log.warning("API-key authentication is DISABLED (auth_enabled=false): any caller may write any project")
        self._redis = connect_async(redis_url)
        self._writer = KafkaWriter(
            kafka,
            ack_timeout_s=cfg.kafka_ack_timeout_s,
            linger_ms=cfg.kafka_linger_ms,
            compression=cfg.kafka_compression,
            in_process=not cfg.kafka_producer_process,
        )
        await self._writer.connect()
        auth = Authenticator(self._redis, pepper=cfg.auth_pepper, enabled=cfg.auth_enabled, cache_s=cfg.auth_cache_s)
        limits = Limits.from_config(cfg)
        ingestor = Ingestor(cfg, self._writer, self._redis)

        servicer = GatewayServicer(ingestor, auth, limits, max_batch_events=cfg.max_batch_events)
        tls = cfg.server_tls()
        self._handle = grpc_server.create_server(
            [lambda s: add_to_server(servicer, s)], [SERVICE_NAME], host=cfg.host, port=cfg.grpc_port, serving=True,
            tls=tls,
        )
        await grpc_server.start(self._handle)
        self.grpc_port = self._handle.port

        if cfg.http_port >= 0:
            if cfg.scorer_address:
                from scorer.client import ScorerClient

                from services.tls import ClientTls

                self._scorer = ScorerClient(cfg.scorer_address, timeout_s=cfg.scorer_timeout_s,
                                            timeout_setting="gateway scorer_timeout_s",
                                            tls=ClientTls(cfg.scorer_tls_ca_file) if cfg.scorer_tls_ca_file else None)
            api = HttpApi(
                ingestor, auth, limits, max_batch_events=cfg.max_batch_events, kafka_ready=self._writer.is_connected
            )
            # keepalive_timeout also runs from the moment a connection opens: a client that trickles its
            # request (or sends nothing) is closed after it, as is one idle between requests.
            self._runner = web.AppRunner(build_app(api, scorer_client=self._scorer), access_log=None,
                                         keepalive_timeout=cfg.http_idle_timeout_s)
            await self._runner.setup()
            site = web.TCPSite(self._runner, cfg.host, cfg.http_port, ssl_context=tls.ssl_context() if tls else None)
            await site.start()
            self.http_port = self._runner.addresses[0][1]
            log.info("HTTP API listening on %s", self.http_url)
        if cfg.metrics_port:
            serve_metrics(cfg.metrics_port, cfg.host)

        if cfg.run_processor:
            self.processor = ProcessorThread(cfg, kafka, redis_url)
            self.processor.start()
            log.info("feedback processor running in-process (group %s)", cfg.processor_group)

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.cfg.drain_grace_s if grace_s is None else grace_s
        if self._handle is not None:
            await self._handle.stop(grace)
            self._handle = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._scorer is not None:
            await self._scorer.close()
            self._scorer = None
        if self.processor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.processor.stop)
            self.processor = None
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


async def serve(cfg: GatewayConfig) -> None:
    """Run a gateway until SIGTERM/SIGINT, then drain and stop."""
    gw = Gateway(cfg)
    await gw.start()
    try:
        # Returns after SIGTERM/SIGINT once in-flight RPCs drained; stop() then closes the rest.
        await grpc_server.serve_until_signal(gw.server, grace_s=cfg.drain_grace_s)
    finally:
        await gw.stop()
