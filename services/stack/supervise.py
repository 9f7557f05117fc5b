"""Run a prefstream service (gateway, trainer, scorer) as a child process and wait until it serves.

The demo, the end-to-end test and the freshness benchmark start the real deployables exactly as an
operator would (``python -m gateway`` ...), configured only through ``PREFSTREAM_*`` environment
variables, and need to know when each is ready, to kill one for real (SIGKILL) and to stop all of
them cleanly.  Processes run in their own session so a stop also reaches their children.  Only
that tooling uses it, so it sits beside the launcher whose process helpers it shares, outside the
runtime part of ``services`` that the deployables import.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.stack.procs import spawn, tail

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


class ServiceFailed(RuntimeError):
    """A supervised service exited or never became ready; the message carries its log tail."""


def grpc_serving(address: str, service: str = "", timeout_s: float = 2.0) -> bool:
    """True when the gRPC health service at ``address`` reports SERVING for ``service``."""
    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


@dataclass
class ServiceProcess:
    """One supervised service: ``python -m <module>`` with env-var configuration."""

    name: str
    module: str
    env: Mapping[str, str]
    log_path: Path
    args: Sequence[str] = ()
    cwd: Path = REPO_ROOT
    proc: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> "ServiceProcess":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = spawn([sys.executable, "-m", self.module, *self.args], log_path=self.log_path, cwd=self.cwd, env=env)
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_path, lines)

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str = "ready") -> None:
        """Poll ``ready`` until true; raise ServiceFailed with the log tail on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise ServiceFailed(f"{self.name} exited (code {self.proc.returncode if self.proc else '?'}) "
                                    f"before it was {what}; log {self.log_path}:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.25)
        raise ServiceFailed(f"{self.name} was not {what} within {timeout_s:.0f}s; log {self.log_path}:\n{self.log_tail()}")

    def wait_grpc(self, address: str, timeout_s: float = 120.0, service: str = "") -> None:
        self.wait_until(lambda: grpc_serving(address, service), timeout_s, what=f"serving gRPC on {address}")

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, as far as the service can tell."""
        if self.proc is not None and self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc is None:
            return None
        if self.alive:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0fs; killing it", self.name, timeout_s)
                self.kill()
        try:  # children that outlived the leader (e.g. Ray workers) share its process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.returncode
