"""A local redis-server for the model registry, configured so the registry survives a restart.

Debian's ``redis-server`` is started in the foreground (we own the process, not a daemon), bound
to 127.0.0.1 only, with its data, pidfile and log in the run dir and the append-only file on
(``appendfsync everysec``): a registry that forgot which model version is live after a restart
would make the scorer serve the wrong model.  ``scripts/ensure_redis.sh`` installs the server.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from services.stack.config import StackConfig
from services.stack.procs import StackError


@dataclass(frozen=True)
class RedisLayout:
    """Where the Redis server's files live inside the run dir."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "redis.conf"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "redis.log"

    @property
    def stdout_log(self) -> Path:
        return self.root / "redis.out"

    @property
    def server_pidfile(self) -> Path:
        """The pidfile redis-server writes itself (ours, with the start time, is ``pidfile``)."""
        return self.root / "redis-server.pid"

    @property
    def pidfile(self) -> Path:
        return self.root / "redis.pid"

    @property
    def password(self) -> Path:
        return self.root / "password"


def render_redis_conf(cfg: StackConfig, lay: RedisLayout) -> str:
    """redis.conf: loopback only, AOF with everysec fsync, files in the run dir, foreground."""
    lines = [
        "bind 127.0.0.1",
        "protected-mode yes",
        f"port {cfg.redis_port}",
        "daemonize no",
        f"pidfile {lay.server_pidfile}",
        f"logfile {lay.log}",
        "loglevel notice",
        f"dir {lay.data}",
        "appendonly yes",
        "appendfsync everysec",
        'appendfilename "appendonly.aof"',
        "dbfilename dump.rdb",
        "save 3600 1 300 100 60 10000",
        "databases 16",
        # The registry must never be evicted silently.
        "maxmemory-policy noeviction",
    ]
    return "\n".join(lines) + "\n"


def password(cfg: StackConfig, *, create: bool = False) -> str:
    """The run dir's Redis password ("" with ``redis_auth`` off, or when none was made yet and ``create``
    is false): random, made once, kept in ``<run_dir>/redis/password`` readable by its owner only."""
    if not cfg.redis_auth:
        return ""
    path = RedisLayout(cfg.component_dir("redis")).password
    if not path.exists():
        if not create:
            return ""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(f".tmp{os.getpid()}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24))
        os.replace(path.with_suffix(f".tmp{os.getpid()}"), path)
    return path.read_text().strip()


def client_url(cfg: StackConfig) -> str:
    """The URL clients use: ``redis://:<password>@127.0.0.1:<port>/0`` (no password part without auth)."""
    pw = password(cfg)
    return f"redis://:{pw}@127.0.0.1:{cfg.redis_port}/0" if pw else cfg.redis_url


def redis_argv(cfg: StackConfig) -> tuple[list[str], RedisLayout]:
    """Write redis.conf and return the argv that starts the server, with its file layout."""
    exe = shutil.which(cfg.redis_server)
    if exe is None:
        raise StackError(
            f"redis: {cfg.redis_server!r} is not on PATH; run scripts/ensure_redis.sh "
            "(apt-get install redis-server) or set PREFSTREAM_STACK_REDIS_SERVER"
        )
    lay = RedisLayout(cfg.component_dir("redis"))
    lay.data.mkdir(parents=True, exist_ok=True)
    conf = render_redis_conf(cfg, lay)
    if cfg.redis_auth:
        conf += f"requirepass {password(cfg, create=True)}\n"
    fd = os.open(lay.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the password
    with os.fdopen(fd, "w") as f:
        f.write(conf)
    return [exe, str(lay.conf)], lay


def ping(url: str, timeout_s: float = 2.0) -> bool:
    """True when the server at ``url`` answers PING (or answers that it needs a password: it is up)."""
    import redis as redis_client

    client = redis_client.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except redis_client.AuthenticationError:
        return True
    except redis_client.ResponseError as e:
        return "NOAUTH" in str(e)
    except redis_client.RedisError:
        return False
    finally:
        client.close()
