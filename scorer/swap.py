"""Keeping the served models equal to what the registry says, by zero-downtime swaps.

Why it exists: the trainer publishes checkpoints, operators pin and roll back; every scorer must
follow within about a poll interval, and a bad checkpoint must never replace a working model.

:class:`ModelManager` polls the registry's per-model ``generation`` counter (one cheap Redis read per
model per ``poll_interval_s``) and, when ``kafka_bootstrap`` is set, also listens to the model-updates
topic so a publish is picked up at once.  On a change it reads the target (pinned, else latest
published), and if that differs from what is served:

1. verifies the checkpoint's manifest checksums, loads it beside the live model on the loader
   thread (serving continues) and warms it up (non-finite outputs refuse it).  A reward model whose
   config, tokenizer and spec are unchanged is loaded by copying the new weights into the copy the
   previous swap retired (``swap_in_place``: no module construction, no re-conversion); the phases
   (fetch_verify, load, warmup, install) are metrics;
2. installs it with :meth:`scorer.engine.ServingEngine.install`: one reference swap; in-flight requests
   finish on the old version, which is then freed.

A refused checkpoint is counted (``prefstream_scorer_swap_failures_total{reason}``), logged at ERROR
and recorded so it is not retried on every poll; the registry is told (``note_refused``), so pins and
rollbacks avoid it, but what scorers serve does not change: a bad copy may be local to this scorer's
volume, and un-publishing it would need a pin that freezes every scorer; an operator who sees the
alert rolls back through ModelAdminService.  A scorer that has nothing to serve yet (start-up, or a
policy loaded on first use) and whose target is refused serves the newest published version no
scorer refused instead, else the base model: a bad newest version never keeps a scorer down.  Pin, unpin and rollback (``scorer/admin.py``) only change the registry and then call
:meth:`ModelManager.sync`, so they take effect through this same path.  With nothing published, the
configured base model is served as version ``"base"``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from scorer.config import BASE_VERSION, ScorerConfig
from scorer.engine import ServingEngine
from scorer.metrics import ScorerMetrics
from scorer.runners import CheckpointRefused, NotReloadable, load_policy, load_reward, open_published
from services.errors import Unavailable
from services.kinds import ModelKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """What should be served for one name: a published version, or the base model."""

    name: str
    kind: ModelKind
    version: str
    uri: str  # "" for the base model

    @property
    def is_base(self) -> bool:
        return self.version == BASE_VERSION and not self.uri


@dataclass(frozen=True)
class SyncOutcome:
    """What one sync did: ``swapped`` to ``version``, kept it, or ``refused`` with a reason."""

    name: str
    serving: str | None
    swapped: bool = False
    refused: str | None = None


class ModelManager:
    """Loads, verifies and swaps models to follow the registry."""

    def __init__(
        self,
        cfg: ScorerConfig,
        engine: ServingEngine,
        metrics: ScorerMetrics,
        registry: Any | None = None,
        *,
        load_executor: concurrent.futures.Executor,
        registry_executor: concurrent.futures.Executor,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.metrics = metrics
        self.registry = registry
        self._load = load_executor
        self._reg = registry_executor
        self._locks: dict[str, asyncio.Lock] = {}
        self._generations: dict[str, Any] = {}
        self._kinds: dict[str, ModelKind] = {n: ModelKind.REWARD for n in cfg.reward_models}
        self._kinds.update({n: ModelKind.POLICY for n in cfg.policy_models})
        self._refused: dict[tuple[str, str], str] = {}
        self._dirty: set[str] = set()
        self._kick = asyncio.Event()
        self._stop = threading.Event()
        self._tasks: list[asyncio.Task] = []
        self._kafka_thread: threading.Thread | None = None
        self._last_discovery = 0.0

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load every configured reward model and (``policy_preload``) policy, each its registry target
        else base, then start watching.  Returns once all are served: the caller reports SERVING then."""
        self.engine.demand_loader = self.ensure_loaded
        preload = self.cfg.policy_models if self.cfg.policy_preload else ()
        for name in (*self.cfg.reward_models, *preload):
            outcome = await self.sync(name)
            if outcome.serving is None:
                raise RuntimeError(f"could not serve {self._kinds[name]} model {name!r}: {outcome.refused}")
        if self.registry is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._poll_loop(), name="registry-poll"))
        if self.cfg.kafka_bootstrap:
            self._start_kafka_watch(self.cfg.kafka_bootstrap)

    async def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._kafka_thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._kafka_thread.join, 5.0)

    async def ensure_loaded(self, name: str, kind: ModelKind) -> None:
        """Load a model on first use (the policy, unless preloaded)."""
        self._kinds.setdefault(name, kind)
        outcome = await self.sync(name)
        if outcome.serving is None:
            from services.errors import Unavailable

            raise Unavailable(f"{kind} model {name!r} could not be loaded: {outcome.refused or 'see the scorer log'}")

    def watched(self) -> list[str]:
        """Names whose registry entries are polled: configured reward models, discovered ones, and
        policies once loaded."""
        names = [n for n, k in self._kinds.items() if k == ModelKind.REWARD]
        names += [s.name for s in self.engine.served(ModelKind.POLICY)]
        return list(dict.fromkeys(names))

    def known(self) -> dict[str, ModelKind]:
        """Every name this scorer serves or will load on demand, with its kind."""
        return dict(self._kinds)

    # ------------------------------------------------------------------------------ sync

    async def _registry(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._reg, fn, *args)

    async def target(self, name: str) -> Target:
        kind = self._kinds.get(name, ModelKind.REWARD)
        if self.registry is not None:
            mv = await self._registry(self.registry.target, name)
            if mv is not None:
                return Target(name=name, kind=mv.kind, version=mv.version, uri=mv.uri)
        return Target(name=name, kind=kind, version=BASE_VERSION, uri="")

    async def sync(self, name: str) -> SyncOutcome:
        """Serve the registry's target for ``name`` (swap if needed); never replaces with a bad model."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                target = await self.target(name)
            except Exception as e:  # noqa: BLE001 - a registry outage keeps the current model
                log.warning("registry unreachable while syncing %s: %s", name, e)
                cur = self.engine.serving(name)
                return SyncOutcome(name, cur.version if cur else None, refused="registry_unavailable")
            current = self.engine.serving(name)
            if current is not None and current.version == target.version:
                return SyncOutcome(name, current.version)
            if target.is_base and not self._has_base(target):
                return SyncOutcome(name, current.version if current else None, refused="no_base_model")
            key = (name, target.version)
            if key in self._refused:
                outcome = SyncOutcome(name, current.version if current else None, refused=self._refused[key])
            else:
                outcome = await self._swap(target, current.version if current else None)
            if outcome.serving is None and not target.is_base:
                return await self._fallback(target, outcome)
            return outcome

    async def _fallback(self, target: Target, outcome: SyncOutcome) -> SyncOutcome:
        """Nothing served and the target refused: the newest servable published version, else base."""
        refused = [v for (n, v) in self._refused if n == target.name]
        candidates: list[Any] = []
        if self.registry is not None:
            try:
                candidates = await self._registry(self.registry.servable, target.name, refused)
            except Exception as e:  # noqa: BLE001 - without the registry only the base is left
                log.warning("registry unreachable while looking past %s@%s: %s", target.name, target.version, e)
        for mv in candidates:
            log.warning("%s %s cannot be served (%s); trying %s", target.name, target.version, outcome.refused, mv.version)
            attempt = await self._swap(Target(name=target.name, kind=mv.kind, version=mv.version, uri=mv.uri), None)
            if attempt.serving is not None:
                return attempt
        base = Target(name=target.name, kind=target.kind, version=BASE_VERSION, uri="")
        if self._has_base(base):
            log.warning("%s: no published version can be served; serving the base model", target.name)
            return await self._swap(base, None)
        return outcome

    def _has_base(self, target: Target) -> bool:
        # Reward models discovered in the registry have no base of their own to fall back to.
        return target.name in self.cfg.reward_models or target.name in self.cfg.policy_models

    async def _swap(self, target: Target, previous: str | None) -> SyncOutcome:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        log.info("loading %s %s version %s (serving %s)", target.kind, target.name, target.version, previous)
        phases: dict[str, float] = {}
        try:
            path = await loop.run_in_executor(self._load, self._open, target)
            phases["fetch_verify"] = time.perf_counter() - t0
            spare = self.engine.take_spare(target.name) if target.kind == ModelKind.REWARD else None
            runner = await loop.run_in_executor(self._load, self._load_runner, target, path, spare, phases)
        except CheckpointRefused as e:
            return await self._refuse(target, previous, e.reason, str(e))
        except Unavailable as e:  # the checkpoint store is briefly unreachable: nothing is wrong with the version
            log.warning("could not fetch %s@%s (%s); still serving %s, retrying at the next sync",
                        target.name, target.version, e, previous or "nothing")
            return SyncOutcome(target.name, previous)
        except Exception as e:  # noqa: BLE001 - never let a bad checkpoint take the scorer down
            log.exception("unexpected error loading %s@%s", target.name, target.version)
            return await self._refuse(target, previous, "load_failed", f"{type(e).__name__}: {e}")
        t_install = time.perf_counter()
        slot = self.engine.new_slot(target.name, target.kind, target.version, target.uri, runner)
        self.engine.install(slot)
        now = time.perf_counter()
        phases["install"] = now - t_install
        elapsed = now - t0
        for phase, seconds in phases.items():
            self.metrics.swap_phase_seconds.labels(target.name, phase).observe(seconds)
        self.metrics.swap_seconds.labels(target.name).observe(elapsed)
        if previous is not None:
            self.metrics.swaps_total.labels(target.name).inc()
        log.info("swapped %s from %s to %s in %.2fs (%s)", target.name, previous, target.version, elapsed,
                 ", ".join(f"{k} {v:.3f}s" for k, v in phases.items()))
        return SyncOutcome(target.name, target.version, swapped=True)

    def _open(self, target: Target) -> str:
        """The local, verified folder of the target (fetched first where its URI is remote)."""
        cfg = self.cfg
        if target.kind == ModelKind.POLICY:
            return open_published(target.uri) if target.uri else cfg.policy_base_path
        if target.uri:
            return open_published(target.uri)
        from services.reward_model import default_reward_model_path

        return cfg.reward_base_path or default_reward_model_path()

    def _load_runner(self, target: Target, path: str, spare: Any = None, phases: dict[str, float] | None = None) -> Any:
        """Load the opened checkpoint at ``path``: into ``spare`` (a retired copy of the same model)
        when only its weights differ, else in full.  ``phases`` gets the load and warm-up seconds."""
        cfg = self.cfg
        if target.kind == ModelKind.POLICY:
            self.metrics.swap_loads.labels(target.name, "full").inc()
            return load_policy(path, device=cfg.device, dtype=cfg.dtype, warmup=cfg.warmup,
                               batch_rows=cfg.decode_batch_rows, name=f"decode_{target.name}"[:15])
        if spare is not None:
            try:
                runner = spare.reload(path, warmup=cfg.warmup, timings=phases)
                self.metrics.swap_loads.labels(target.name, "in_place").inc()
                return runner
            except NotReloadable as e:
                log.info("%s@%s needs a full load: %s", target.name, target.version, e)
                spare.close()
            except BaseException:
                spare.close()  # its weights are half-replaced or failed the warm-up: never serve it
                raise
        self.metrics.swap_loads.labels(target.name, "full").inc()
        return load_reward(path, device=cfg.device, dtype=cfg.dtype, warmup=cfg.warmup,
                           max_length=cfg.max_length or None, cpu_fast_path=cfg.cpu_fast_path, timings=phases)

    async def _refuse(self, target: Target, previous: str | None, reason: str, message: str) -> SyncOutcome:
        self._refused[(target.name, target.version)] = reason
        self.metrics.swap_failures.labels(target.name, reason).inc()
        log.error("refused %s version %s (%s); still serving %s: %s",
                  target.name, target.version, reason, previous or "nothing", message)
        if self.registry is not None and not target.is_base:
            try:
                await self._registry(self.registry.note_refused, target.name, target.version, f"{reason}: {message}")
            except Exception as e:  # noqa: BLE001 - the refusal stands locally; the registry learns it next time
                log.warning("could not record the refusal of %s@%s in the registry: %s", target.name, target.version, e)
        return SyncOutcome(target.name, previous, refused=reason)

    # ------------------------------------------------------------------------------ watching

    async def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=self.cfg.poll_interval_s)
            except TimeoutError:
                pass
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                await self._poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep polling through registry outages
                log.warning("registry poll failed: %s", e)

    async def _poll_once(self) -> None:
        now = time.monotonic()
        if self.cfg.discover_models and now - self._last_discovery >= self.cfg.discover_interval_s:
            self._last_discovery = now
            await self._discover()
        dirty, self._dirty = self._dirty, set()
        for name in self.watched():
            gen = await self._registry(self.registry.generation, name)
            if gen != self._generations.get(name) or name in dirty:
                self._generations[name] = gen
                await self.sync(name)

    async def _discover(self) -> None:
        """Start serving reward models that appeared in the registry (bounded by max_models)."""
        statuses = await self._registry(self.registry.list_models)
        for st in statuses:
            name = st.name
            if name in self._kinds or st.kind != ModelKind.REWARD:
                continue
            if sum(1 for k in self._kinds.values() if k == ModelKind.REWARD) >= self.cfg.max_models:
                log.warning("not serving reward model %s: max_models=%d reached", name, self.cfg.max_models)
                continue
            self._kinds[name] = ModelKind.REWARD
            log.info("discovered reward model %s in the registry", name)

    def kick(self, name: str | None = None) -> None:
        """Check now instead of at the next poll (thread-safe)."""
        def _set() -> None:
            if name:
                self._dirty.add(name)
            self._kick.set()

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            _set()
        else:
            self._loop.call_soon_threadsafe(_set)

    def _start_kafka_watch(self, bootstrap: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._kafka_thread = threading.Thread(target=self._kafka_watch, args=(bootstrap,), name="model-updates",
                                              daemon=True)
        self._kafka_thread.start()

    def _kafka_watch(self, bootstrap: str) -> None:
        """Wake the poll loop on every model-updates record (the registry stays the source of truth)."""
        from kafka import TopicPartition

        from services.kafka import make_consumer
        from services.schemas import ModelUpdate
        from services.topics import MODEL_UPDATES, topic_name

        while not self._stop.is_set():
            consumer = None
            try:
                consumer = make_consumer(bootstrap, group_id=None, auto_offset_reset="latest")
                topic = topic_name(MODEL_UPDATES, self.cfg.topic_prefix)
                parts = [TopicPartition(topic, p) for p in range(MODEL_UPDATES.partitions)]
                consumer.assign(parts)
                consumer.seek_to_end(*parts)
                while not self._stop.is_set():
                    for records in consumer.poll(timeout_ms=500).values():
                        for rec in records:
                            try:
                                update = ModelUpdate.from_kafka(rec.value)
                            except Exception as e:  # noqa: BLE001 - a bad record must not stop the watch
                                log.warning("ignoring unreadable model-update at offset %d: %s", rec.offset, e)
                                continue
                            log.info("model update: %s %s %s", update.model_name, update.action, update.version)
                            self.kick(update.model_name)
            except Exception as e:  # noqa: BLE001 - Kafka is optional here; the registry poll continues
                log.warning("model-updates watch interrupted (%s); retrying in 5s", e)
                self._stop.wait(5.0)
            finally:
                if consumer is not None:
                    consumer.close()


__all__ = ["ModelManager", "SyncOutcome", "Target"]
