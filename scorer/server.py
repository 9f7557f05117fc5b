"""The scorer's gRPC servicer and process assembly.

:class:`ScorerServicer` is the edge of ``prefstream.scorer.v1.ScorerService``: it converts messages to
domain queries (validating every field), awaits the engine and converts results back; nothing here
blocks the event loop.  :class:`Scorer` wires the pieces of one process (metrics, executors, engine,
model manager, registry, gRPC server with health and reflection) and :func:`serve` runs it until
SIGTERM.  Health is NOT_SERVING until every reward model and (with ``policy_preload``, the default)
every policy it serves is loaded and warmed up, so no request routed to a ready replica waits for a
load.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any, AsyncIterator, Iterator

import grpc

from prefstream.admin.v1 import admin_pb2, admin_pb2_grpc
from prefstream.scorer.v1 import scorer_pb2, scorer_pb2_grpc
from prefstream.scorer.v1.scorer_pb2 import BestOfNRequest as BestOfNRequestProto
from prefstream.scorer.v1.scorer_pb2 import BestOfNResponse as BestOfNResponseProto
from prefstream.scorer.v1.scorer_pb2 import GenerateBatchRequest as GenerateBatchRequestProto
from prefstream.scorer.v1.scorer_pb2 import GenerateBatchResponse as GenerateBatchResponseProto
from prefstream.scorer.v1.scorer_pb2 import GenerateChunk as GenerateChunkProto
from prefstream.scorer.v1.scorer_pb2 import GenerateRequest as GenerateRequestProto
from prefstream.scorer.v1.scorer_pb2 import GenerateResponse as GenerateResponseProto
from prefstream.scorer.v1.scorer_pb2 import ScoreRequest as ScoreRequestProto
from prefstream.scorer.v1.scorer_pb2 import ScoreResponse as ScoreResponseProto
from scorer.admin import MUTATING_METHODS, ModelAdminServicer
from scorer.config import ScorerConfig
from scorer.domain import BestOfNQuery, RequestLimits, ScoreQuery
from scorer.engine import ModelSlot, ServingEngine
from scorer.generation import GenerateBatchQuery, GenerateQuery, batch_response_to_proto
from scorer.metrics import ScorerMetrics
from scorer.precision import cpu_bf16_support, resolve_dtype
from scorer.runners import configure_torch_threads, plan_workers, resolve_device
from scorer.swap import ModelManager
from services.errors import PrefstreamError
from services.grpc_server import ServerHandle, TokenGuard, create_server, serve_until_signal, start
from services.threads import named_executor

log = logging.getLogger(__name__)

SCORER_SERVICE = scorer_pb2.DESCRIPTOR.services_by_name["ScorerService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["ModelAdminService"].full_name
#: Prefix of the inference threads' names, in Python and for the OS (``infer_0``, ``infer_1``, ...).
INFER_THREADS = "infer"


class ScorerServicer(scorer_pb2_grpc.ScorerServiceServicer):
    """Score, BestOfN, ScoreStream, Generate, GenerateStream and GenerateBatch over the engine."""

    def __init__(self, engine: ServingEngine, metrics: ScorerMetrics, limits: RequestLimits, stream_window: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.limits = limits
        self.stream_window = stream_window

    @contextlib.contextmanager
    def _observe(self, method: str) -> Iterator[None]:
        t0 = time.perf_counter()
        code = "OK"
        self.metrics.in_flight.inc()
        try:
            yield
        except PrefstreamError as e:
            code = e.grpc_code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.request_seconds.labels(method).observe(time.perf_counter() - t0)
            self.metrics.requests_total.labels(method, code).inc()

    async def Score(self, request: ScoreRequestProto, context: grpc.aio.ServicerContext) -> ScoreResponseProto:
        with self._observe("Score"):
            query = ScoreQuery.from_proto(request, self.limits)
            return (await self.engine.score(query)).to_proto()

    async def BestOfN(self, request: BestOfNRequestProto, context: grpc.aio.ServicerContext) -> BestOfNResponseProto:
        with self._observe("BestOfN"):
            query = BestOfNQuery.from_proto(request, self.limits)
            return (await self.engine.best_of_n(query)).to_proto()

    async def Generate(self, request: GenerateRequestProto, context: grpc.aio.ServicerContext) -> GenerateResponseProto:
        with self._observe("Generate"):
            query = GenerateQuery.from_proto(request, self.limits)
            return (await self.engine.generate_text(query)).to_proto()

    async def GenerateBatch(self, request: GenerateBatchRequestProto,
                            context: grpc.aio.ServicerContext) -> GenerateBatchResponseProto:
        with self._observe("GenerateBatch"):
            batch = GenerateBatchQuery.from_proto(request, self.limits)
            return batch_response_to_proto(await self.engine.generate_batch(batch))

    async def GenerateStream(
        self, request: GenerateRequestProto, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[GenerateChunkProto]:
        """Text deltas while decoding; a failure mid-stream ends it with the mapped status code."""
        with self._observe("GenerateStream"):
            query = GenerateQuery.from_proto(request, self.limits)
            chunks = self.engine.generate_stream(query)
            try:
                async for chunk in chunks:
                    yield chunk.to_proto()
            finally:
                await chunks.aclose()

    async def ScoreStream(
        self, request_iterator: AsyncIterator[ScoreRequestProto], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ScoreResponseProto]:
        """Requests are scored concurrently (up to ``stream_window`` in flight) and answered in order.

        An invalid request ends the stream with INVALID_ARGUMENT after the answers before it.
        """
        loop = asyncio.get_running_loop()
        window = asyncio.Semaphore(self.stream_window)
        order: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()

        async def score_one(query: ScoreQuery) -> ScoreResponseProto:
            with self._observe("ScoreStream"):
                return (await self.engine.score(query)).to_proto()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    try:
                        query = ScoreQuery.from_proto(request, self.limits)
                    except PrefstreamError as e:
                        failed = loop.create_future()
                        failed.set_exception(e)
                        order.put_nowait(failed)
                        return
                    order.put_nowait(loop.create_task(score_one(query)))
            finally:
                order.put_nowait(None)

        reader = loop.create_task(read())
        try:
            while True:
                fut = await order.get()
                if fut is None:
                    break
                result = await fut
                window.release()
                yield result
            await reader
        finally:
            reader.cancel()
            while not order.empty():
                fut = order.get_nowait()
                if fut is not None:
                    fut.cancel()


class Scorer:
    """One scorer process: build with ``Scorer(cfg)``, ``await start()``, ``await stop()``."""

    def __init__(self, cfg: ScorerConfig, *, registry: Any | None = None) -> None:
        self.cfg = cfg
        self.metrics = ScorerMetrics()
        self._registry = registry
        # Model threads (see runners.plan_workers); tokenization, generation, loading and registry
        # reads each get their own thread so none of them waits behind another.  Each pool's threads
        # carry its name as their OS name (infer_0, infer_1, tokenize_0, ...: `top -H`, the bench).
        self.infer_workers, self.torch_threads = plan_workers(cfg.device, cfg.infer_workers, cfg.torch_threads)
        # Generation needs no pool: each policy's decoder (scorer/decoding.py) has its own thread and the
        # event loop awaits its futures.  Judge criteria (one forward of a policy each) run on "judge".
        sizes = {INFER_THREADS: self.infer_workers, "tokenize": 1, "judge": 2, "load": 1, "registry": 2}
        # Loading a new version (hashing, from_pretrained) runs niced: on a shared CPU the serving threads
        # come first, so a hot swap delays requests less.
        self._executors = {name: named_executor(n, name, niceness=10 if name == "load" else 0)
                           for name, n in sizes.items()}
        self.engine: ServingEngine | None = None
        self.manager: ModelManager | None = None
        self.handle: ServerHandle | None = None

    @property
    def port(self) -> int:
        if self.handle is None:
            raise RuntimeError("the scorer has not been started")
        return self.handle.port

    @property
    def address(self) -> str:
        host = self.cfg.host if self.cfg.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"{host}:{self.port}"

    def _make_registry(self) -> Any | None:
        if self._registry is not None:
            return self._registry
        url = self.cfg.redis_url
        if not url and self.cfg.stack_run_dir:
            from services.config import fill_endpoints

            url = fill_endpoints(self.cfg, {"redis_url": True}, self.cfg.stack_run_dir).redis_url
        if not url:
            log.warning("no redis_url: serving base models only (no registry, no hot swaps)")
            return None
        from services.redis_client import connect
        from services.registry import ModelRegistry

        self._registry = ModelRegistry(connect(url))
        return self._registry

    async def start(self) -> None:
        """Listen (health NOT_SERVING), load every served model, then report SERVING."""
        cfg = self.cfg
        threads = configure_torch_threads(self.torch_threads)
        device = resolve_device(cfg.device)
        why = cpu_bf16_support()[1] if device.type == "cpu" else device.type
        log.info("%d inference worker(s) x %d torch thread(s); dtype %s -> %s on %s (%s)", self.infer_workers, threads,
                 cfg.dtype, resolve_dtype(cfg.dtype, device), device, why)
        ex = self._executors
        self.engine = ServingEngine(
            cfg, self.metrics,
            infer_executor=ex[INFER_THREADS], tokenize_executor=ex["tokenize"], judge_executor=ex["judge"],
            infer_workers=self.infer_workers,
        )
        registry = self._make_registry()
        if registry is not None:
            from services.criteria_store import CriteriaStore

            self.engine.criteria.definitions = CriteriaStore(registry.redis, namespace=registry.namespace, registry=registry)
        self.manager = ModelManager(
            cfg, self.engine, self.metrics, registry, load_executor=ex["load"], registry_executor=ex["registry"],
        )
        limits = RequestLimits(
            max_responses=cfg.max_responses, max_text_chars=cfg.max_text_chars,
            max_n=cfg.max_n, max_new_tokens=cfg.max_new_tokens, max_generate_batch=cfg.max_generate_batch,
        )
        servicer = ScorerServicer(self.engine, self.metrics, limits, cfg.stream_window)
        admin = ModelAdminServicer(self.engine, self.manager, registry, swap_wait_s=cfg.swap_wait_s)
        self.handle = create_server(
            [
                lambda s: scorer_pb2_grpc.add_ScorerServiceServicer_to_server(servicer, s),
                lambda s: admin_pb2_grpc.add_ModelAdminServiceServicer_to_server(admin, s),
            ],
            [SCORER_SERVICE, ADMIN_SERVICE],
            host=cfg.host,
            port=cfg.port,
            interceptors=[TokenGuard(MUTATING_METHODS, cfg.admin_token, host=cfg.host,
                                     setting="PREFSTREAM_SCORER_ADMIN_TOKEN (admin_token)")],
            tls=cfg.server_tls(),
        )
        await start(self.handle)
        self.metrics.serve(cfg.metrics_port, cfg.host)
        await self.manager.start()
        await self.handle.set_serving(True)

    async def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, drain RPCs, stop watching, free models, stop threads."""
        if self.handle is not None:
            await self.handle.stop(self.cfg.grace_s if grace_s is None else grace_s)
        if self.manager is not None:
            await self.manager.stop()
        if self.engine is not None:
            await self.engine.close()
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)

    async def serve_forever(self) -> None:
        """Start, then run until SIGTERM/SIGINT and shut down gracefully."""
        await self.start()
        assert self.handle is not None
        # Everything alive now (torch, transformers, the start-up models) lives as long as the process:
        # move it out of the collector's sight, so the full collections a hot swap's allocations trigger
        # scan the new objects only (ms) instead of ~450k (~0.2 s holding the GIL; see scorer/runners.py).
        gc.collect()
        gc.freeze()
        await serve_until_signal(self.handle, grace_s=self.cfg.grace_s, on_shutdown=self._shutdown_models)

    async def _shutdown_models(self) -> None:
        if self.manager is not None:
            await self.manager.stop()


def serve(cfg: ScorerConfig) -> int:
    """Run a scorer process until SIGTERM (``prefstream scorer serve`` / ``python -m scorer``)."""
    scorer = Scorer(cfg)

    async def main() -> None:
        try:
            await scorer.serve_forever()
        finally:
            if scorer.engine is not None:
                await scorer.engine.close()

    asyncio.run(main())
    return 0


__all__ = ["ADMIN_SERVICE", "INFER_THREADS", "SCORER_SERVICE", "Scorer", "ScorerServicer", "serve"]
