"""A local Ray head node for the trainer, started so that it can be stopped without touching others.

``ray stop`` kills every Ray process of the user on the machine, which would take down a teammate's
or a parallel test session's cluster.  Instead the head runs as ``ray start --head --block``: that
one process owns the GCS, raylet and agents, tears them down on SIGTERM, and is what our pidfile
records.  Anything that outlives it is swept by session id and by Ray temp dir (see ``procs``).

Ray binds unix sockets under its temp dir, whose path must stay short, so a long run dir gets a
``/tmp/prefstream-ray-<hash>`` temp dir instead (``StackConfig.ray_temp_dir``).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from services.stack.config import StackConfig
from services.stack.procs import StackError, port_open

READY_LINE = "Ray runtime started"


@dataclass(frozen=True)
class RayLayout:
    """Where the Ray head's files live: our pidfile and log in the run dir, Ray's own in temp_dir."""

    root: Path
    temp_dir: Path

    @property
    def stdout_log(self) -> Path:
        return self.root / "ray.out"

    @property
    def pidfile(self) -> Path:
        return self.root / "ray.pid"

    @property
    def ray_logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"


def ray_executable(cfg: StackConfig) -> str:
    """The ray CLI: configured, else beside the running interpreter (the venv), else on PATH."""
    if cfg.ray_executable:
        return cfg.ray_executable
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise StackError("ray: no `ray` executable beside Python or on PATH; pip install 'ray[default]'")
    return found


def ray_argv(cfg: StackConfig) -> tuple[list[str], RayLayout, dict[str, str]]:
    """argv, layout and environment for ``ray start --head --block`` on the configured ports."""
    lay = RayLayout(cfg.component_dir("ray"), cfg.ray_temp_dir)
    lay.root.mkdir(parents=True, exist_ok=True)
    lay.temp_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        ray_executable(cfg),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={cfg.ray_port}",
        f"--ray-client-server-port={cfg.ray_client_port}",
        f"--dashboard-agent-listen-port={cfg.ray_dashboard_agent_port}",
        f"--dashboard-port={cfg.ray_dashboard_port}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={lay.temp_dir}",
        f"--object-store-memory={cfg.ray_object_store_mb * 1024 * 1024}",
    ]
    if cfg.ray_num_cpus is not None:
        argv.append(f"--num-cpus={cfg.ray_num_cpus}")
    env = dict(os.environ)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # A RAY_ADDRESS inherited from the shell would make `ray start --head` refuse or mis-connect.
    env.pop("RAY_ADDRESS", None)
    return argv, lay, env


def ready(cfg: StackConfig, lay: RayLayout) -> bool:
    """The head printed that it started and its GCS accepts connections."""
    try:
        text = lay.stdout_log.read_text(errors="replace")
        # The log is appended to across restarts; only the latest start counts.
        started = READY_LINE in text.rsplit("\n==== ", 1)[-1]
    except FileNotFoundError:
        return False
    return started and port_open(cfg.ray_port)
