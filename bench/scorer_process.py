"""What the phases of ``prefstream bench scorer`` share: a real scorer process, a throwaway Redis
registry, the scorer's Prometheus metrics, and the percentile every latency key is read with.

Why it exists: the reward phases (bench/scorer.py) and the policy phase (bench/scorer_policy.py) each
start scorers and registries the same way; one module keeps them identical and the two phases
independent of each other.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0-100) of ``values``; None when there are none."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100.0 * (len(s) - 1))))]


def start_scorer(log_dir: Path, name: str, env: dict[str, str]) -> tuple[Any, str]:
    """A ``python -m scorer`` process on a free port, its log at ``log_dir/<name>.log``, once its gRPC
    port answers: (the ServiceProcess, its address).  Policies are off unless ``env`` names some."""
    from services.stack import ServiceProcess

    port = free_port()
    full_env = {"PREFSTREAM_SCORER_PORT": str(port), "PREFSTREAM_SCORER_POLICY_MODELS": "", **env}
    proc = ServiceProcess(name, "scorer", full_env, log_dir / f"{name}.log").start()
    address = f"127.0.0.1:{port}"
    proc.wait_grpc(address, timeout_s=180)
    return proc, address


def start_redis() -> tuple[subprocess.Popen, Any, str]:
    """A throwaway ``redis-server`` (no persistence) on a free port, once it answers PING:
    (the process, a client, its URL).  The caller terminates the process."""
    from services.redis_client import connect

    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = connect(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except Exception:  # noqa: BLE001 - waiting for redis-server to listen
            time.sleep(0.1)
    return proc, client, url


def fetch_metrics(port: int) -> str:
    """The Prometheus exposition text of a scorer's ``--metrics-port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def served_dtype(metrics_port: int, model: str = "reward") -> str | None:
    """The dtype a scorer process reports for ``model`` in ``prefstream_scorer_serving_version_info``."""
    for line in fetch_metrics(metrics_port).splitlines():
        if line.startswith("prefstream_scorer_serving_version_info{") and f'model="{model}"' in line:
            m = re.search(r'dtype="([^"]+)"', line)
            if m:
                return m.group(1)
    return None


__all__ = ["fetch_metrics", "free_port", "percentile", "served_dtype", "start_redis", "start_scorer"]
