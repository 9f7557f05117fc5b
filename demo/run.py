"""The whole loop, end to end: feedback in, better served model out, measured.

``run_demo(cfg)`` brings up the stack (or uses a running one), starts the three deployables as real
processes (``python -m gateway|trainer|scorer``, configured by ``PREFSTREAM_*`` env exactly as in
k8s/), creates a project API key, then streams preference pairs as a simulated production app while a
steady best-of-N load runs against the scorer.  A progress line shows events acked, records trained,
Kafka lag, versions published/rejected, the served model's held-out accuracy and freshness.  When
every event is trained and the last version is served, it computes freshness and the event ledger,
evaluates the base and final models on the held-out set, writes the report and stops what it
started.  ``bench freshness`` and the end-to-end test run this same function with smaller settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from demo.app_sim import SimulatedApp
from demo.config import DemoConfig
from demo.freshness import compute, first_served_times, summarize, summarize_convergence
from demo.load import ReplicaWatch, ScorerLoad
from demo.monitor import LoopMonitor, build_ledger
from demo.report import Timeline, write_report
from gateway.auth import create_key
from gateway.config import load_gateway_config
from services.checkpoints import CheckpointStore, version_sort_key
from services.config import env_vars
from services.data import TEST_FILE, TRAIN_FILE, load_openpipe_jsonl, shared_data_dir
from services.endpoints import load_stack_endpoints
from services.redis_client import connect
from services.registry import ModelRegistry
from services.stack import ServiceProcess, Stack, check_running, free_port, open_run_stack, stop_run

log = logging.getLogger(__name__)

MODEL_NAME = "reward"


def _out(line: str) -> None:
    print(line, flush=True)


def trainer_learning_settings(cfg: DemoConfig) -> dict[str, Any]:
    """The trainer leaves (flat names) the demo sets that decide what its trainer learns; the rest are
    the trainer's defaults.  ``bench loop-quality`` trains its offline arm with exactly these."""
    return {"max_length": cfg.max_length, "seed": cfg.seed, "replay_ratio": cfg.replay_ratio, "autocast": "auto"}


class Loop:
    """The processes and clients of one demo run."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.stack: Stack | None = None
        self.services: list[ServiceProcess] = []
        self.t0 = time.time()

    # -- set-up ---------------------------------------------------------------------------------

    def start_stack(self) -> Path:
        self.stack, stack_dir = open_run_stack(self.run_dir, stack_run_dir=self.cfg.stack_run_dir,
                                               fresh=self.cfg.fresh, say=_out)
        return stack_dir

    def start_services(self, stack_dir: Path) -> tuple[list[str], list[str]]:
        """Start the scorer and gateway replicas and the trainer; returns (gateway, scorer) gRPC addresses."""
        logs = self.run_dir / "logs"
        checkpoints = self.run_dir / "checkpoints"
        common = {"PREFSTREAM_STACK_RUN_DIR": str(stack_dir)}
        sc_ports = [free_port() for _ in range(self.cfg.scorer_replicas)]
        gw_ports = [(free_port(), free_port()) for _ in range(self.cfg.gateway_replicas)]
        scorers = [ServiceProcess(f"scorer-{i}" if len(sc_ports) > 1 else "scorer", "scorer", {
            **common,
            "PREFSTREAM_SCORER_STACK_RUN_DIR": str(stack_dir),
            "PREFSTREAM_SCORER_PORT": str(port),
            "PREFSTREAM_SCORER_POLL_INTERVAL_S": "0.5",
            # as k8s/base/scorer.yaml: a version is fetched when its announcement arrives, not at the next poll
            "PREFSTREAM_SCORER_KAFKA_BOOTSTRAP": load_stack_endpoints(stack_dir).kafka_bootstrap,
            "PREFSTREAM_SCORER_MAX_LENGTH": str(self.cfg.max_length),
            "PREFSTREAM_SCORER_REWARD_MODELS": MODEL_NAME,
        }, logs / (f"scorer-{i}.log" if len(sc_ports) > 1 else "scorer.log")) for i, port in enumerate(sc_ports)]
        gateways = [ServiceProcess(f"gateway-{i}" if len(gw_ports) > 1 else "gateway", "gateway", {
            **common,
            "PREFSTREAM_GATEWAY_STACK_RUN_DIR": str(stack_dir),
            "PREFSTREAM_GATEWAY_GRPC_PORT": str(grpc_port),
            "PREFSTREAM_GATEWAY_HTTP_PORT": str(http_port),
            "PREFSTREAM_GATEWAY_SCORER_ADDRESS": f"127.0.0.1:{sc_ports[i % len(sc_ports)]}",
        }, logs / (f"gateway-{i}.log" if len(gw_ports) > 1 else "gateway.log"))
            for i, (grpc_port, http_port) in enumerate(gw_ports)]
        trainer = ServiceProcess("trainer", "trainer", {
            **common,
            "PREFSTREAM_TRAINER_STACK_RUN_DIR": str(stack_dir),
            "PREFSTREAM_TRAINER_MODEL_NAME": MODEL_NAME,
            "PREFSTREAM_TRAINER_CHECKPOINT_URL": str(checkpoints),
            "PREFSTREAM_TRAINER_CHECKPOINT_EVERY_S": str(self.cfg.checkpoint_every_s),
            "PREFSTREAM_TRAINER_CHECKPOINT_EVERY_RECORDS": str(self.cfg.checkpoint_every_records),
            "PREFSTREAM_TRAINER_EVAL_DATA": self.eval_file,
            "PREFSTREAM_TRAINER_EVAL_MAX_RECORDS": str(self.cfg.eval_max_records),
            **env_vars("trainer", trainer_learning_settings(self.cfg)),
            "PREFSTREAM_TRAINER_NUM_WORKERS": str(self.cfg.trainer_workers),
            # the monitor caches each checkpoint's metadata within seconds, and HeldoutSnapshots keeps
            # the report's few versions, so the trainer's default retention bounds the demo's disk use
            "PREFSTREAM_TRAINER_KEEP_CHECKPOINTS": str(self.cfg.keep_checkpoints),
            "PREFSTREAM_TRAINER_RAY_STORAGE_PATH": str(self.run_dir / "ray_train"),
        }, logs / "trainer.log")
        self.services = [*scorers, *gateways, trainer]
        for s in self.services:
            s.start()
        _out(f"services starting; logs in {logs}")
        gw_addrs = [f"127.0.0.1:{grpc_port}" for grpc_port, _ in gw_ports]
        sc_addrs = [f"127.0.0.1:{port}" for port in sc_ports]
        for proc, addr in [*zip(gateways, gw_addrs), *zip(scorers, sc_addrs)]:
            proc.wait_grpc(addr, self.cfg.startup_timeout_s)
        self.checkpoints = checkpoints
        self.http_port = gw_ports[0][1]
        return gw_addrs, sc_addrs

    @property
    def train_file(self) -> str:
        return self.cfg.train_file or str(shared_data_dir() / TRAIN_FILE)

    @property
    def eval_file(self) -> str:
        return self.cfg.eval_file or str(shared_data_dir() / TEST_FILE)

    def check_services(self) -> None:
        check_running(self.services)

    def stop(self) -> None:
        stop_run(self.services, self.stack, keep_stack=self.cfg.keep_stack)


def _progress(t: float, app: SimulatedApp, mon: LoopMonitor, load: ScorerLoad, lag: int | None,
              states: dict[str, str], served: str, acc: float | None, fresh: dict[str, Any]) -> str:
    pub = sum(1 for s in states.values() if s == "published")
    rej = sum(1 for s in states.values() if s == "rejected")
    lat = sorted(s[1] for s in load.stats.samples[-200:] if s[3])
    p50 = f"{lat[len(lat) // 2] * 1000:.0f}ms" if lat else "-"
    f50 = fresh.get("freshness_p50_s")
    return (f"[{t:5.0f}s] acked {app.stats.events_acked:5d} ev | trained {mon.records_trained():5d} rec | "
            f"lag {'-' if lag is None else lag:>4} | versions {pub} pub / {rej} rej | serving {served or '-'} "
            f"acc {'-' if acc is None else f'{acc:.3f}'} | freshness p50 {'-' if f50 is None else f'{f50:.1f}s'} | "
            f"best-of-N p50 {p50}, {load.stats.failed} failed")


def _freshness(mon: LoopMonitor, load: ScorerLoad) -> tuple[list, list[str], dict[str, Any]]:
    samples, unserved = compute(mon.acked_at(), mon.version_contents(), first_served_times(load.stats.served()))
    return samples, unserved, summarize(samples)


async def _drive(loop: Loop, gw_addrs: list[str], sc_addrs: list[str], api_key: str, endpoints: Any) -> dict[str, Any]:
    cfg = loop.cfg
    records = load_openpipe_jsonl(loop.train_file)[: cfg.events]
    held_out = load_openpipe_jsonl(loop.eval_file)
    redis_client = connect(endpoints.redis_url)
    mon = LoopMonitor(ModelRegistry(redis_client), CheckpointStore(str(loop.checkpoints)), endpoints.kafka_bootstrap,
                      model_name=MODEL_NAME)
    app = SimulatedApp(gw_addrs, records, api_key=api_key, project=cfg.project, rate=cfg.rate,
                       concurrency=cfg.app_concurrency, seed=cfg.seed)
    load = ScorerLoad(sc_addrs, held_out, rate=cfg.load_rate, n=cfg.candidates, model=MODEL_NAME, seed=cfg.seed + 1)
    watch = ReplicaWatch(sc_addrs, MODEL_NAME)
    timeline = Timeline()
    kept = HeldoutSnapshots(mon.store, loop.run_dir / "heldout", 2 * len(records),
                            cfg.heldout_points if cfg.final_eval_records else 0)
    t_start = time.time()
    load_task = asyncio.create_task(load.run())
    watch_task = asyncio.create_task(watch.run())
    app_task = asyncio.create_task(app.run())
    _out(f"streaming {len(records)} preference pairs at {cfg.rate}/s as live completions + user choices; "
         f"best-of-N load at {cfg.load_rate}/s")

    seen_versions: set[str] = set()
    drain_deadline: float | None = None
    fresh: dict[str, Any] = {}
    while True:
        await asyncio.sleep(cfg.progress_every_s)
        loop.check_services()
        now = time.time() - t_start
        mon.poll_checkpoints()
        states = mon.versions()
        lag = mon.trainer_lag()
        served_now = [(t, v) for t, v in load.stats.served()]
        for t, v in served_now:
            if v not in seen_versions:
                seen_versions.add(v)
                timeline.swaps.append((t - t_start, v))
                acc = mon.accuracy_of(v) if v != "base" else None
                if acc is not None:
                    timeline.accuracy.append((t - t_start, app.stats.events_acked, acc, v))
                # copying ~90 MB blocks: off the event loop that also drives the best-of-N load
                await asyncio.to_thread(kept.offer, v, app.stats.events_acked)
        served = max(seen_versions, key=lambda v: (v != "base", v), default="")
        acc_now = mon.accuracy_of(served) if served and served != "base" else None
        _, _, fresh = _freshness(mon, load)
        _out(_progress(now, app, mon, load, lag, states, served, acc_now, fresh))
        if not app_task.done():
            continue
        if drain_deadline is None:
            drain_deadline = time.monotonic() + cfg.drain_timeout_s
            _out("all events sent; waiting for the last ones to be trained, published and served ...")
        # Done when every record is in a durable checkpoint (lag 0) and the newest published version is
        # served. Records whose only checkpoints were rejected by the gate stay "unserved": they reach
        # serving with the next published version, which needs more feedback, so waiting cannot help.
        published = sorted(v for v, s in states.items() if s == "published")
        caught_up = lag == 0 and mon.records_trained() > 0 and (not published or served == published[-1])
        _, unserved, _ = _freshness(mon, load)
        if caught_up:
            if unserved:
                _out(f"{len(unserved)} trained records are only in versions the gate rejected; "
                     "they will be served with the next published version")
            break
        if time.monotonic() > drain_deadline:
            _out(f"drain timeout: {len(unserved)} trained records not yet served by a published version")
            break
    load.stop()
    await load_task
    # Every replica reports the newest published version before the watch stops (or 30 s pass: then
    # the version counts as unconverged).
    newest = max((v for v, s in mon.versions().items() if s == "published"), key=version_sort_key, default=None)
    deadline = time.monotonic() + 30.0
    while newest and time.monotonic() < deadline and not all(newest in seen for seen in watch.first_seen.values()):
        await asyncio.sleep(0.2)
    watch.stop()
    first_seen = await watch_task
    app_stats = await app_task
    mon.poll_checkpoints()
    samples, unserved, fresh = _freshness(mon, load)
    timeline.freshness = [(s.served_at - t_start, s.seconds, s.version) for s in samples]
    timeline.latency = [(t - t_start, lat * 1000, v, ok) for t, lat, v, ok in load.stats.samples]
    states = mon.versions()
    trained_ids = {rid for c in mon.checkpoints.values() for rid in c.added}
    ledger = build_ledger(endpoints.kafka_bootstrap, feedback_events=app_stats.feedback_acks,
                          completion_events=app_stats.completion_ids, trained_record_ids=trained_ids)
    published_at = {v.version: v.created_at for v in mon.registry.versions(MODEL_NAME)} if states else {}
    converged = summarize_convergence(published_at, first_seen)
    mon.close()
    lat_ms = sorted(s[1] * 1000 for s in load.stats.samples if s[3])
    return {
        "events": app_stats.events_acked,
        "pairs": len(records),
        "feedback_acked": app_stats.feedback_acked,
        "completions_acked": app_stats.completions_acked,
        "app_failed_calls": app_stats.failed,
        "records_trained": mon.records_trained(),
        "checkpoints": len(mon.checkpoints),
        "versions_published": sum(1 for s in states.values() if s == "published"),
        "versions_rejected": sum(1 for s in states.values() if s == "rejected"),
        "final_version": max((v for v, s in states.items() if s == "published"), default="base"),
        "served_versions": [v for _, v in timeline.swaps],
        "scorer_requests": len(load.stats.samples),
        "failed_requests": load.stats.failed,
        "scorer_errors": load.stats.errors[:5],
        "scorer_p50_ms": lat_ms[len(lat_ms) // 2] if lat_ms else None,
        "scorer_p99_ms": lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))] if lat_ms else None,
        **fresh,
        "unserved_records": len(unserved),
        "gateway_replicas": len(gw_addrs),
        "trainer_world_sizes": sorted({c.world_size for c in mon.checkpoints.values()}),
        "scorer_replicas": len(sc_addrs),
        **converged,
        "per_replica_served": {str(i): dict(sorted(v.items())) for i, v in sorted(load.stats.per_replica.items())},
        "replica_first_served": {str(i): {v: round(t - t_start, 2) for v, t in seen.items()} for i, seen in first_seen.items()},
        "ledger": ledger.to_dict(),
        "ledger_complete": ledger.complete,
        "_timeline": timeline,
        "_kept": kept,
    }


class HeldoutSnapshots:
    """Copies of a few served versions, spread over the stream, kept for the report's accuracy on every
    held-out pair: the trainer keeps only its newest checkpoints, so the demo keeps these itself.

    ``offer(version, events)`` is called with each version when it is first served; the first version
    served at or after each of ``points`` evenly spaced event counts (``total × j / (points + 1)``) is
    copied under ``folder``."""

    def __init__(self, store: CheckpointStore, folder: Path, total_events: int, points: int) -> None:
        self.store = store
        self.folder = folder
        self.thresholds = [total_events * j / (points + 1) for j in range(1, points + 1)]
        self.kept: list[tuple[int, str, Path]] = []  # (events acked when first served, version, copy)
        self._next = 0  # the first threshold no kept version stands for yet

    def offer(self, version: str, events: int) -> bool:
        if version == "base" or self._next >= len(self.thresholds) or events < self.thresholds[self._next]:
            return False
        import shutil

        try:
            source = self.store.open(self.store.get(MODEL_NAME, version))
            target = self.folder / version
            shutil.copytree(source, target, dirs_exist_ok=True)
        except Exception as e:  # noqa: BLE001 - only the report's extra points depend on it
            log.warning("could not keep %s for the held-out accuracy plot: %s", version, e)
            return False
        self.kept.append((events, version, target))
        while self._next < len(self.thresholds) and events >= self.thresholds[self._next]:
            self._next += 1  # one version may stand for several points it was served past
        return True


def final_accuracy(loop: Loop, version: str, n: int, timeline: Timeline | None = None,
                   kept: HeldoutSnapshots | None = None) -> dict[str, Any]:
    """Base vs final served model on the first ``n`` held-out pairs (the same pairs for all), and the
    versions ``kept`` along the way, for the accuracy plot (into ``timeline.heldout``)."""
    if n <= 0:
        return {}
    from services.reward_model import RewardModel
    from trainer.evaluation import evaluate

    held_out = load_openpipe_jsonl(loop.eval_file)[:n]
    out: dict[str, Any] = {"final_eval_pairs": len(held_out)}
    base = RewardModel.from_pretrained(max_length=loop.cfg.max_length)
    out["accuracy_base"] = evaluate(base, held_out).accuracy
    del base
    if version != "base":
        store = CheckpointStore(str(loop.checkpoints))
        final_events = next((x for _, x, _, v in (timeline.accuracy if timeline else []) if v == version), None)
        judged = [(x, v, p) for x, v, p in (kept.kept if kept else []) if version_sort_key(v) < version_sort_key(version)]
        judged.append((final_events, version, store.open(store.get(MODEL_NAME, version))))
        if timeline is not None:
            timeline.heldout.append((0, out["accuracy_base"], "base"))
        for events, v, path in judged:
            accuracy = evaluate(RewardModel.from_pretrained(str(path), max_length=loop.cfg.max_length), held_out).accuracy
            if timeline is not None and events is not None:
                timeline.heldout.append((events, accuracy, v))
        out["accuracy_final"] = accuracy
        if timeline is not None and len(timeline.heldout) > 1:
            out["accuracy_heldout_points"] = [list(h) for h in timeline.heldout]
    return out


def run_demo(cfg: DemoConfig, *, write_html: bool = True) -> dict[str, Any]:
    """Run the loop once; returns the summary (also written into the report folder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loop = Loop(cfg)
    started = time.time()
    try:
        stack_dir = loop.start_stack()
        endpoints = load_stack_endpoints(stack_dir)
        gw_addrs, sc_addrs = loop.start_services(stack_dir)
        gw_cfg = load_gateway_config(overrides={"stack_run_dir": str(stack_dir)})
        api_key, _ = create_key(connect(endpoints.redis_url), cfg.project, pepper=gw_cfg.auth_pepper, label="demo")
        _out(f"gateway {', '.join(gw_addrs)} (HTTP :{loop.http_port}), scorer {', '.join(sc_addrs)}; "
             f"project {cfg.project!r} API key created")
        summary = asyncio.run(_drive(loop, gw_addrs, sc_addrs, api_key, endpoints))
        loop.check_services()
    finally:
        loop.stop()
    timeline: Timeline = summary.pop("_timeline")
    summary.update(final_accuracy(loop, summary["final_version"], cfg.final_eval_records, timeline, summary.pop("_kept")))
    summary["wall_s"] = round(time.time() - started, 1)
    if write_html:
        report_dir = Path(cfg.report_dir or Path("reports") / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
        summary["report"] = str(write_report(report_dir, timeline, summary))
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    def f(x: Any, fmt: str = "{:.3f}") -> str:
        return "-" if x is None else fmt.format(x)

    _out("")
    _out("=== prefstream demo: summary ===")
    _out(f"events acked          {summary['events']} ({summary['feedback_acked']} feedback, {summary['completions_acked']} completions)")
    _out(f"records trained       {summary['records_trained']} in {summary['checkpoints']} checkpoints")
    _out(f"versions              {summary['versions_published']} published, {summary['versions_rejected']} rejected; final {summary['final_version']}")
    _out(f"held-out accuracy     base {f(summary.get('accuracy_base'))} -> served {f(summary.get('accuracy_final'))} "
         f"on {summary.get('final_eval_pairs', 0)} HH test pairs")
    _out(f"freshness             p50 {f(summary.get('freshness_p50_s'), '{:.1f}')} s, p99 {f(summary.get('freshness_p99_s'), '{:.1f}')} s "
         f"over {summary.get('freshness_samples', 0)} records")
    _out(f"swap convergence      p50 {f(summary.get('convergence_p50_s'), '{:.1f}')} s, p99 {f(summary.get('convergence_p99_s'), '{:.1f}')} s "
         f"from publish to all {summary.get('scorer_replicas', 1)} scorer replica(s) serving")
    _out(f"scorer                {summary['scorer_requests']} best-of-N requests, {summary['failed_requests']} failed, "
         f"p50 {f(summary.get('scorer_p50_ms'), '{:.0f}')} ms, p99 {f(summary.get('scorer_p99_ms'), '{:.0f}')} ms")
    _out(f"ledger                {summary['ledger']} -> {'every acked event accounted for' if summary['ledger_complete'] else 'INCOMPLETE'}")
    _out(f"wall time             {summary['wall_s']} s")
    if summary.get("report"):
        _out(f"report                {summary['report']}")
    sys.stdout.flush()
