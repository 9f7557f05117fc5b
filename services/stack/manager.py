"""``Stack``: bring the local Kafka, Redis and Ray up, report on them, and take them down again.

This is the one place that knows the lifecycle rules the CLI, the integration fixtures and the demo
rely on: ``up`` is idempotent (a healthy component is left alone, a stale pidfile is dropped) and
returns only when every component passed a real health check; ``down`` stops exactly the processes
``up`` recorded and verifies none is left; ``stack.json`` in the run dir publishes the addresses so
other processes find the stack through :func:`services.endpoints.load_stack_endpoints` without being
told any port.
"""

from __future__ import annotations

import fcntl
import json
import os
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from services.endpoints import StackEndpoints, load_stack_endpoints
from services.stack import kafka as kafka_mod
from services.stack import ray as ray_mod
from services.stack import redis as redis_mod
from services.stack.config import COMPONENTS, StackConfig, load_stack_config
from services.stack.procs import (
    PidRecord,
    StackError,
    pids_with_cmdline,
    port_open,
    read_pidfile,
    record_alive,
    spawn,
    stop_record,
    tail,
    write_pidfile,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1


#: The stack's address book is the runtime's type; these names are kept for the launcher's callers.
Endpoints = StackEndpoints
load_endpoints = load_stack_endpoints


@dataclass(frozen=True)
class ComponentStatus:
    """One component as ``status`` reports it."""

    name: str
    address: str
    pid: int | None
    running: bool
    healthy: bool
    log: str


@dataclass(frozen=True)
class _Component:
    """What the manager needs to know to start, check and stop one component."""

    name: str
    pidfile: Path
    log: Path
    address: str
    port: int
    stdout: Path


class Stack:
    """The local stack described by ``cfg``: ``up()``, ``down()``, ``status()``, ``endpoints``."""

    def __init__(self, cfg: StackConfig | None = None) -> None:
        self.cfg = cfg or load_stack_config()
        self.run_dir = self.cfg.run_path

    # ---------------------------------------------------------------------------------- public

    @property
    def endpoints(self) -> StackEndpoints:
        c = self.cfg
        return StackEndpoints(
            kafka_bootstrap=c.kafka_bootstrap if "kafka" in c.components else None,
            redis_url=redis_mod.client_url(c) if "redis" in c.components else None,
            ray_address=c.ray_address if "ray" in c.components else None,
        )

    def up(self) -> StackEndpoints:
        """Start every configured component that is not already running and healthy; wait for health."""
        t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            starters: dict[str, Callable[[], None]] = {
                "kafka": self._up_kafka, "redis": self._up_redis, "ray": self._up_ray,
            }
            wanted = [c for c in COMPONENTS if c in self.cfg.components]
            errors: dict[str, BaseException] = {}
            # Kafka's JVM and Ray's head each take seconds; start them side by side.
            with ThreadPoolExecutor(max_workers=len(wanted) or 1, thread_name_prefix="stack-up") as pool:
                futures = {name: pool.submit(starters[name]) for name in wanted}
                for name, fut in futures.items():
                    try:
                        fut.result()
                    except BaseException as e:  # noqa: BLE001 - collected and re-raised below
                        errors[name] = e
            self._write_state()
        if errors:
            first = next(iter(errors.values()))
            msg = "\n\n".join(str(e) for e in errors.values())
            raise StackError(f"stack up failed for {', '.join(errors)}:\n{msg}") from first
        log.info("stack up in %.1fs: %s", time.monotonic() - t0, self.endpoints)
        return self.endpoints

    def down(self) -> list[str]:
        """Stop every component ``up`` recorded in the run dir; return the names that were running."""
        stopped: list[str] = []
        if not self.run_dir.exists():
            return stopped
        with self._locked():
            state = self._read_state()
            def stop(name: str) -> None:
                comp = self._component(name)
                rec = read_pidfile(comp.pidfile)
                if rec is None:
                    return
                if record_alive(rec):
                    stopped.append(name)
                extra = None
                if name == "ray":
                    temp_dir = state.get("ray_temp_dir") or str(self.cfg.ray_temp_dir)
                    extra = lambda td=temp_dir: pids_with_cmdline(td)  # noqa: E731
                stop_record(rec, name=name, timeout_s=self.cfg.stop_timeout_s, extra=extra)
                comp.pidfile.unlink(missing_ok=True)

            names = list(reversed(self._names(state)))
            kafka_nodes = [n for n in names if n.startswith("kafka")]
            for name in names:
                if not name.startswith("kafka"):
                    stop(name)
            # Kafka nodes all at once: stopped one by one, the last ones lose their quorum and wait
            # out the SIGKILL timeout in a controlled shutdown that cannot finish.
            with ThreadPoolExecutor(max_workers=max(1, len(kafka_nodes)), thread_name_prefix="stack-down") as pool:
                list(pool.map(stop, kafka_nodes))
            self.cfg.state_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[ComponentStatus]:
        """Every component with a pidfile or in the config: address, pid, log and a live health check.

        Addresses come from stack.json when the stack is up, so ``status --run-dir X`` is right
        without repeating the ports ``up`` was given.
        """
        state = self._read_state()
        recorded = state.get("components", {})
        # What `up` started in this run dir, when it recorded that; else what the config asks for.
        listed = set(recorded) if state else set(self.cfg.components)
        out = []
        for name in self._names(state):
            comp = self._component(name)
            rec = read_pidfile(comp.pidfile)
            if rec is None and name not in listed:
                continue
            address = str(recorded.get(name, {}).get("address") or comp.address)
            running = rec is not None and record_alive(rec)
            healthy = running and self._healthy(name, address)
            out.append(ComponentStatus(name, address, rec.pid if running and rec else None, running, healthy, str(comp.log)))
        return out

    def stop_component(self, name: str) -> None:
        """Stop one component (tests use it to prove Redis data survives a restart)."""
        comp = self._component(name)
        rec = read_pidfile(comp.pidfile)
        if rec is not None:
            stop_record(rec, name=name, timeout_s=self.cfg.stop_timeout_s)
            comp.pidfile.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------- starting

    def _up_kafka(self) -> None:
        """Every Kafka node: all are spawned before any is awaited, since a KRaft quorum of several
        voters elects no leader (and no node turns healthy) until a majority runs."""
        nodes = range(1, self.cfg.kafka_brokers + 1)
        started: list[tuple[_Component, Any, PidRecord, Any]] = []
        for node in nodes:
            comp = self._component(kafka_mod.node_component(node))
            rec = read_pidfile(comp.pidfile)
            if rec is not None and record_alive(rec):
                log.info("%s: already running (pid %s); leaving it", comp.name, rec.pid)
                continue  # awaited below with the others
            comp.pidfile.unlink(missing_ok=True)  # none, or a stale one
            argv, lay = kafka_mod.prepare_broker(self.cfg, node)
            self._ports_free(comp, self.cfg.kafka_node_ports[node - 1][1])
            log.info("%s: starting on %s (log %s)", comp.name, comp.address, comp.log)
            proc = spawn(argv, log_path=comp.stdout, cwd=comp.pidfile.parent, env=None)
            started.append((comp, proc, write_pidfile(comp.pidfile, proc.pid), lay))
        for node in nodes:
            comp = self._component(kafka_mod.node_component(node))
            mine = next((s for s in started if s[0].name == comp.name), None)
            lay = mine[3] if mine else kafka_mod.KafkaLayout(comp.pidfile.parent)
            self._await_healthy(comp, mine[1] if mine else None, read_pidfile(comp.pidfile),
                                lambda a=comp.address: self._healthy("kafka", a), lambda lay=lay: kafka_mod.log_tail(lay))
        if started:
            lay = started[0][3]
            try:
                kafka_mod.produce_consume_check(self.cfg.kafka_bootstrap, timeout_s=self.cfg.start_timeout_s)
            except Exception as e:  # noqa: BLE001 - reported with the broker's log
                raise StackError(f"kafka: broker is up but a produce/consume round trip failed: {e}\n{kafka_mod.log_tail(lay)}") from e
        if self.cfg.create_topics:
            from services.topics import ensure_topics

            ensure_topics(self.cfg.kafka_bootstrap, timeout_s=self.cfg.start_timeout_s)

    def _up_redis(self) -> None:
        comp = self._component("redis")
        healthy = lambda: redis_mod.ping(redis_mod.client_url(self.cfg))  # noqa: E731
        if self._running(comp, healthy):
            return
        argv, lay = redis_mod.redis_argv(self.cfg)
        self._launch(comp, argv, None, healthy, lambda: f"--- {lay.stdout_log}\n{tail(lay.stdout_log, 10)}\n--- {lay.log}\n{tail(lay.log)}")

    def _up_ray(self) -> None:
        comp = self._component("ray")
        argv, lay, env = ray_mod.ray_argv(self.cfg)
        healthy = lambda: ray_mod.ready(self.cfg, lay)  # noqa: E731
        if self._running(comp, healthy):
            return
        self._ports_free(comp, self.cfg.ray_client_port, self.cfg.ray_dashboard_agent_port, self.cfg.ray_dashboard_port)
        self._launch(comp, argv, env, healthy, lambda: f"--- {lay.stdout_log}\n{tail(lay.stdout_log)}\n(Ray's own logs: {lay.ray_logs})")

    def _running(self, comp: _Component, healthy: Callable[[], bool]) -> bool:
        """True when ``comp`` is already running and becomes healthy; drops a stale pidfile."""
        rec = read_pidfile(comp.pidfile)
        if rec is None:
            return False
        if not record_alive(rec):
            log.info("%s: removing stale pidfile %s (pid %s is gone)", comp.name, comp.pidfile, rec.pid)
            comp.pidfile.unlink(missing_ok=True)
            return False
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            if healthy():
                log.info("%s: already running (pid %s) and healthy; leaving it", comp.name, rec.pid)
                return True
            if not record_alive(rec):
                comp.pidfile.unlink(missing_ok=True)
                return False
            time.sleep(0.5)
        raise StackError(
            f"{comp.name}: running as pid {rec.pid} but not healthy after {self.cfg.start_timeout_s:.0f}s; "
            f"run `prefstream stack down` and `up` again (log: {comp.log})"
        )

    def _ports_free(self, comp: _Component, *extra_ports: int) -> None:
        for port in (comp.port, *extra_ports):
            if port_open(port):
                raise StackError(
                    f"{comp.name}: port {port} on 127.0.0.1 is already in use by another process; "
                    f"stop it or choose another port (see `prefstream stack up --help`)"
                )

    def _launch(
        self,
        comp: _Component,
        argv: list[str],
        env: dict[str, str] | None,
        healthy: Callable[[], bool],
        log_tail: Callable[[], str],
    ) -> PidRecord:
        self._ports_free(comp)
        log.info("%s: starting on %s (log %s)", comp.name, comp.address, comp.log)
        proc = spawn(argv, log_path=comp.stdout, cwd=comp.pidfile.parent, env=env)
        rec = write_pidfile(comp.pidfile, proc.pid)
        return self._await_healthy(comp, proc, rec, healthy, log_tail)

    def _await_healthy(self, comp: _Component, proc: Any, rec: PidRecord | None, healthy: Callable[[], bool],
                       log_tail: Callable[[], str]) -> PidRecord:
        """Wait until ``comp`` is healthy; a process that exits or stays unhealthy is an error with its log."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while True:
            code = proc.poll() if proc is not None else (None if rec is not None and record_alive(rec) else -1)
            if code is not None:
                comp.pidfile.unlink(missing_ok=True)
                raise StackError(f"{comp.name}: exited with code {code} while starting; last log lines:\n{log_tail()}")
            if healthy():
                log.info("%s: healthy (pid %s)", comp.name, rec.pid if rec else "?")
                return rec  # type: ignore[return-value]
            if time.monotonic() > deadline:
                if rec is not None:
                    stop_record(rec, name=comp.name, timeout_s=5.0)
                comp.pidfile.unlink(missing_ok=True)
                raise StackError(
                    f"{comp.name}: not healthy after {self.cfg.start_timeout_s:.0f}s (raise start_timeout_s if "
                    f"the machine is slow); last log lines:\n{log_tail()}"
                )
            time.sleep(0.25)

    # ---------------------------------------------------------------------------------- helpers

    def _names(self, state: dict | None = None) -> list[str]:
        """Components in start order: every Kafka node (configured, or recorded by ``up``), Redis, Ray."""
        recorded = (state or {}).get("components", {})
        nodes = max([self.cfg.kafka_brokers] + [int(n.split("-")[1]) for n in recorded if n.startswith("kafka-")])
        return [*(kafka_mod.node_component(n) for n in range(1, nodes + 1)), *COMPONENTS[1:]]

    def _component(self, name: str) -> _Component:
        c = self.cfg
        d = c.component_dir(name)
        if name.startswith("kafka"):
            node = 1 if name == "kafka" else int(name.split("-")[1])
            ports = c.kafka_node_ports
            listener = ports[node - 1][0] if node <= len(ports) else 0
            lay = kafka_mod.KafkaLayout(d)
            return _Component(name, lay.pidfile, lay.server_log, f"127.0.0.1:{listener}", listener, lay.stdout_log)
        if name == "redis":
            rl = redis_mod.RedisLayout(d)
            return _Component(name, rl.pidfile, rl.log, c.redis_url, c.redis_port, rl.stdout_log)
        if name == "ray":
            yl = ray_mod.RayLayout(d, c.ray_temp_dir)
            return _Component(name, yl.pidfile, yl.stdout_log, c.ray_address, c.ray_port, yl.stdout_log)
        raise ValueError(f"unknown component {name!r}")

    @staticmethod
    def _healthy(name: str, address: str) -> bool:
        """Health of the component listening at ``address`` (as written in stack.json)."""
        if name.startswith("kafka"):
            port = int(address.rsplit(":", 1)[1])
            return port_open(port) and kafka_mod.probe(address)
        if name == "redis":
            return redis_mod.ping(address)
        return port_open(int(address.rsplit(":", 1)[1]))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise up/down on one run dir across processes."""
        with open(self.run_dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _read_state(self) -> dict:
        try:
            return json.loads(self.cfg.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _write_state(self) -> None:
        components = {}
        for name in self._names(self._read_state()):
            comp = self._component(name)
            rec = read_pidfile(comp.pidfile)
            if rec is not None and record_alive(rec):
                components[name] = {"pid": rec.pid, "start_time": rec.start_time, "address": comp.address, "log": str(comp.log)}
        ep = self.endpoints
        state = {
            "version": STATE_VERSION,
            "run_dir": str(self.run_dir),
            "written_at": time.time(),
            "endpoints": {
                "kafka_bootstrap": ep.kafka_bootstrap if "kafka" in components else None,
                "redis_url": ep.redis_url if "redis" in components else None,
                "ray_address": ep.ray_address if "ray" in components else None,
            },
            "components": components,
            "kafka_brokers": self.cfg.kafka_brokers,
            "ray_temp_dir": str(self.cfg.ray_temp_dir),
            "ray_client_address": f"ray://127.0.0.1:{self.cfg.ray_client_port}" if "ray" in components else None,
        }
        tmp = self.cfg.state_file.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # its redis_url carries the password
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.cfg.state_file)


def status_as_dicts(statuses: list[ComponentStatus]) -> list[dict]:
    return [asdict(s) for s in statuses]
