"""Configuration of the local stack (Kafka, Redis, Ray) that development, tests and the demo run on.

One frozen dataclass, loaded through :func:`services.config.load_config` with section ``stack``, so
the usual precedence holds: defaults < ``--config`` file < ``PREFSTREAM_STACK_*`` env < CLI flags.
Every path the stack writes is derived here, in one place, so the manager, the CLI and the test
fixtures agree on where pidfiles, logs and data live.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from services.config import ConfigError, load_config, require
from services.endpoints import DEFAULT_RUN_DIR, STATE_FILE

COMPONENTS: tuple[str, ...] = ("kafka", "redis", "ray")

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
# The SLF4J 1.x binding that matches the slf4j-api Kafka 4.1.1 depends on, so the broker logs
# through log4j2 to a file instead of printing "no SLF4J providers" and dropping every line.
LOG4J_VERSION = "2.24.3"

# Ray binds unix sockets under its temp dir: <temp>/session_<date>_<pid>/sockets/plasma_store must
# stay below the 107-byte sun_path limit, which leaves roughly 40 bytes for <temp>.
_RAY_TEMP_DIR_MAX = 40


def _default_cache_dir() -> Path:
    env = os.environ.get("PREFSTREAM_CACHE_DIR")
    if env:
        return Path(os.path.expanduser(env))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(os.path.expanduser(xdg)) if xdg else Path.home() / ".cache"
    return base / "prefstream"


def _port_ok(port: int) -> bool:
    return 1 <= port <= 65535


@dataclass(frozen=True)
class StackConfig:
    """Where and how ``prefstream stack up`` runs Kafka, Redis and Ray on this machine."""

    run_dir: Path = field(
        default=Path(DEFAULT_RUN_DIR),
        metadata={"help": "directory for pidfiles, logs, data and stack.json; relative paths are against the cwd"},
    )
    cache_dir: Path = field(
        default_factory=_default_cache_dir,
        metadata={"help": "download cache outside the repo (Kafka jars); default $PREFSTREAM_CACHE_DIR or ~/.cache/prefstream"},
    )
    components: tuple[str, ...] = field(
        default=COMPONENTS,
        metadata={"help": "which of kafka, redis, ray to start (comma-separated)"},
    )
    kafka_port: int = field(default=9092, metadata={"help": "Kafka broker (PLAINTEXT) listener port on 127.0.0.1"})
    kafka_controller_port: int = field(default=9093, metadata={"help": "KRaft controller listener port on 127.0.0.1"})
    kafka_brokers: int = field(default=1, metadata={"help": (
        "Kafka nodes (each broker+controller, one KRaft quorum); with 3 or more, the project topics get "
        "replication factor 3 and min.insync.replicas 2, so a broker can die without losing an acked event")})
    kafka_extra_ports: tuple[int, ...] = field(default=(), metadata={"help": (
        "listener,controller port pairs of brokers 2..N (flattened); empty: kafka_port + 2k and "
        "kafka_controller_port + 2k for broker k+1")})
    kafka_heap: str = field(default="512m", metadata={"help": "JVM heap of the broker (-Xmx and -Xms), e.g. 512m, 1g"})
    kafka_tool_heap: str = field(default="256m", metadata={"help": "JVM heap of Kafka CLI tools run through kafka-tool"})
    create_topics: bool = field(default=True, metadata={"help": "create the prefstream topics after Kafka starts"})
    redis_port: int = field(default=6379, metadata={"help": "Redis port on 127.0.0.1"})
    redis_auth: bool = field(default=True, metadata={"help": (
        "Redis requires a password: made once per run dir (<run_dir>/redis/password, mode 0600) and carried in "
        "stack.json's redis_url, which every service reads")})
    redis_server: str = field(default="redis-server", metadata={"help": "redis-server executable (name on PATH or path)"})
    ray_port: int = field(default=6380, metadata={"help": "Ray GCS port; the address others pass to ray.init"})
    ray_client_port: int = field(default=10001, metadata={"help": "Ray client server port (ray:// address)"})
    ray_dashboard_agent_port: int = field(default=52365, metadata={"help": "Ray dashboard agent HTTP port"})
    ray_dashboard_port: int = field(
        default=8265, metadata={"help": "port of Ray's (minimal, job API) dashboard head, which runs even without the UI"}
    )
    ray_num_cpus: int | None = field(default=None, metadata={"help": "CPUs the Ray head advertises; default all"})
    ray_object_store_mb: int = field(default=1024, metadata={"help": "Ray object store size in MiB"})
    ray_executable: str | None = field(
        default=None, metadata={"help": "ray CLI to use; default the one beside the running Python"}
    )
    start_timeout_s: float = field(default=120.0, metadata={"help": "seconds to wait for each component to be healthy"})
    stop_timeout_s: float = field(default=20.0, metadata={"help": "seconds between SIGTERM and SIGKILL on down"})

    def validate(self) -> None:
        unknown = [c for c in self.components if c not in COMPONENTS]
        require(not unknown, "components", f"unknown component(s) {unknown}; choose from {', '.join(COMPONENTS)}")
        require(len(set(self.components)) == len(self.components), "components", "list each component once")
        ports = {
            "kafka_port": self.kafka_port,
            "kafka_controller_port": self.kafka_controller_port,
            "redis_port": self.redis_port,
            "ray_port": self.ray_port,
            "ray_client_port": self.ray_client_port,
            "ray_dashboard_agent_port": self.ray_dashboard_agent_port,
            "ray_dashboard_port": self.ray_dashboard_port,
        }
        for name, port in ports.items():
            require(_port_ok(port), name, f"{port} is not a TCP port; use 1-65535")
        seen: dict[int, str] = {}
        for name, port in ports.items():
            owner = self._port_owner(name)
            if owner not in self.components:
                continue
            require(port not in seen, name, f"port {port} is also {seen.get(port)}; give each listener its own port")
            seen[port] = name
        require(1 <= self.kafka_brokers <= 5, "kafka_brokers", f"{self.kafka_brokers} is not 1..5")
        require(not self.kafka_extra_ports or len(self.kafka_extra_ports) == 2 * (self.kafka_brokers - 1),
                "kafka_extra_ports", f"give {2 * (self.kafka_brokers - 1)} ports (listener, controller for each of "
                f"brokers 2..{self.kafka_brokers}) or none")
        if "kafka" in self.components:
            for k, (lp, cp) in enumerate(self.kafka_node_ports[1:], start=2):
                for port in (lp, cp):
                    require(_port_ok(port), "kafka_extra_ports", f"{port} (broker {k}) is not a TCP port")
                    require(port not in seen, "kafka_extra_ports",
                            f"port {port} of broker {k} is also {seen.get(port)}; give each listener its own port")
                    seen[port] = f"broker {k}"
        require(_parse_heap(self.kafka_heap) is not None, "kafka_heap", f"{self.kafka_heap!r} is not a JVM size like 512m or 1g")
        require(_parse_heap(self.kafka_tool_heap) is not None, "kafka_tool_heap", f"{self.kafka_tool_heap!r} is not a JVM size like 256m")
        require(self.ray_num_cpus is None or self.ray_num_cpus >= 0, "ray_num_cpus", "must be >= 0 (or unset for all CPUs)")
        require(self.ray_object_store_mb >= 80, "ray_object_store_mb", "Ray needs at least 80 MiB of object store")
        require(self.start_timeout_s > 0, "start_timeout_s", "must be > 0 seconds")
        require(self.stop_timeout_s > 0, "stop_timeout_s", "must be > 0 seconds")

    @staticmethod
    def _port_owner(name: str) -> str:
        return name.split("_", 1)[0]

    # Derived paths: everything the stack writes, resolved against the cwd at call time.

    @property
    def run_path(self) -> Path:
        return self.run_dir.expanduser().resolve()

    @property
    def state_file(self) -> Path:
        return self.run_path / STATE_FILE

    def component_dir(self, component: str) -> Path:
        return self.run_path / component

    @property
    def kafka_home(self) -> Path:
        return self.cache_dir.expanduser().resolve() / f"kafka-{KAFKA_VERSION}"

    @property
    def kafka_libs(self) -> Path:
        return self.kafka_home / "libs"

    @property
    def ray_temp_dir(self) -> Path:
        """Ray's --temp-dir: in the run dir when short enough, else a short /tmp path unique to it."""
        preferred = self.run_path / "ray" / "tmp"
        if len(str(preferred)) <= _RAY_TEMP_DIR_MAX:
            return preferred
        digest = hashlib.sha1(str(self.run_path).encode()).hexdigest()[:10]
        return Path("/tmp") / f"prefstream-ray-{digest}"

    @property
    def kafka_node_ports(self) -> tuple[tuple[int, int], ...]:
        """(listener, controller) port of every Kafka node, node 1 first."""
        extra = self.kafka_extra_ports or tuple(
            p for k in range(1, self.kafka_brokers) for p in (self.kafka_port + 2 * k, self.kafka_controller_port + 2 * k))
        return ((self.kafka_port, self.kafka_controller_port),
                *((extra[2 * i], extra[2 * i + 1]) for i in range(self.kafka_brokers - 1)))

    @property
    def kafka_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{lp}" for lp, _ in self.kafka_node_ports)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.ray_port}"


def _parse_heap(value: str) -> int | None:
    """Bytes in a JVM size string (``512m``, ``1g``, ``65536k``), or None when it is not one."""
    v = value.strip().lower()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    mult = units.get(v[-1:], None)
    digits = v[:-1] if mult else v
    if not digits.isdigit() or int(digits) <= 0:
        return None
    return int(digits) * (mult or 1)


def load_stack_config(
    file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> StackConfig:
    """StackConfig from defaults < file < PREFSTREAM_STACK_* env < overrides (None values ignored)."""
    return load_config(StackConfig, section="stack", file=file, env=env, overrides=overrides)


def replace(cfg: StackConfig, **changes: Any) -> StackConfig:
    """A validated copy of ``cfg`` with ``changes`` applied."""
    new = dataclasses.replace(cfg, **changes)
    new.validate()
    return new


__all__ = [
    "COMPONENTS",
    "ConfigError",
    "KAFKA_VERSION",
    "StackConfig",
    "load_stack_config",
    "replace",
]


#: Every listener a stack opens; ``free_stack_config`` gives each a port that is free right now.
PORT_FIELDS: tuple[str, ...] = (
    "kafka_port", "kafka_controller_port", "redis_port", "ray_port",
    "ray_client_port", "ray_dashboard_port", "ray_dashboard_agent_port",
)


def free_stack_config(run_dir: str | os.PathLike, **overrides: Any) -> StackConfig:
    """A StackConfig for ``run_dir`` with every listener on a free port (tests, demo, benchmarks).

    PREFSTREAM_STACK_* from the caller's shell is ignored, so a developer's own stack never collides.
    """
    from services.stack.procs import free_port

    brokers = int(overrides.get("kafka_brokers", 1))
    values: dict[str, Any] = {
        "run_dir": str(run_dir),
        "ray_object_store_mb": 512,
        "start_timeout_s": 180.0,
        **{name: free_port() for name in PORT_FIELDS},
        "kafka_extra_ports": tuple(free_port() for _ in range(2 * (brokers - 1))),
        **overrides,
    }
    return load_stack_config(overrides=values, env={k: v for k, v in os.environ.items() if k == "PREFSTREAM_CACHE_DIR"})
