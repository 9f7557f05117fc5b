"""Process bookkeeping for the local stack: spawn detached, record, check, stop, sweep.

``prefstream stack up`` exits while Kafka, Redis and Ray keep running, so each is spawned in its
own session and remembered by a pidfile holding the pid *and* its kernel start time: a pid that was
recycled by an unrelated process is then never mistaken for ours (and never killed).  Stopping is
SIGTERM, a grace period, SIGKILL, then a sweep of anything left in the component's session, which is
what guarantees ``down`` leaves no process behind (Ray's raylet and workers in particular).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A stack component failed to start, stop or answer; the message names it and what to do."""


@dataclass(frozen=True)
class PidRecord:
    """A process we started: its pid and the start time that makes the pid unambiguous."""

    pid: int
    start_time: int

    def to_text(self) -> str:
        return f"{self.pid} {self.start_time}\n"

    @classmethod
    def from_text(cls, text: str) -> "PidRecord | None":
        parts = text.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            return None
        return cls(int(parts[0]), int(parts[1]))


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is parenthesised and may itself hold spaces or parentheses.
    return raw[raw.rfind(")") + 2 :].split()


def start_time_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def session_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[3]) if fields else None


def _reap(pid: int) -> None:
    """Collect the exit status when ``pid`` is our own child so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def pid_alive(pid: int) -> bool:
    _reap(pid)
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def record_alive(rec: PidRecord) -> bool:
    return pid_alive(rec.pid) and start_time_of(rec.pid) == rec.start_time


def read_pidfile(path: Path) -> PidRecord | None:
    try:
        return PidRecord.from_text(path.read_text())
    except FileNotFoundError:
        return None


def write_pidfile(path: Path, pid: int) -> PidRecord:
    st = start_time_of(pid)
    if st is None:
        raise StackError(f"process {pid} exited right after it was started; see its log in {path.parent}")
    rec = PidRecord(pid, st)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(rec.to_text())
    tmp.replace(path)
    return rec


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """Start ``argv`` detached in its own session, stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        out.flush()
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(cwd),
            env=dict(env) if env is not None else None,
            start_new_session=True,
            close_fds=True,
        )


def pids_in_session(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


def pids_with_cmdline(needle: str) -> list[int]:
    """Pids of live processes (owned by us) whose command line contains ``needle``."""
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd and pid_alive(int(entry)):
            out.append(int(entry))
    return out


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_gone(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Wait until every pid has exited; return those still alive after ``timeout_s``."""
    pending = list(pids)
    deadline = time.monotonic() + timeout_s
    while pending:
        pending = [p for p in pending if pid_alive(p)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    return pending


def stop_record(
    rec: PidRecord,
    *,
    name: str,
    timeout_s: float,
    extra: Callable[[], list[int]] | None = None,
) -> None:
    """SIGTERM ``rec``, SIGKILL after ``timeout_s``, then kill whatever is left in its session.

    ``extra`` returns further pids that belong to the component (found by command line) and are
    swept the same way; used for Ray, whose workers may leave the session.
    """
    if record_alive(rec):
        log.info("stopping %s (pid %s)", name, rec.pid)
        _signal([rec.pid], signal.SIGTERM)
        if wait_gone([rec.pid], timeout_s):
            log.warning("%s (pid %s) ignored SIGTERM for %.0fs; sending SIGKILL", name, rec.pid, timeout_s)
            _signal([rec.pid], signal.SIGKILL)
            wait_gone([rec.pid], 5.0)
    leftovers = set(pids_in_session(rec.pid)) if session_of(rec.pid) in (None, rec.pid) else set()
    if extra is not None:
        leftovers.update(extra())
    leftovers.discard(os.getpid())
    if leftovers:
        log.info("%s: terminating %d leftover process(es) %s", name, len(leftovers), sorted(leftovers))
        _signal(leftovers, signal.SIGTERM)
        still = wait_gone(leftovers, min(timeout_s, 5.0))
        _signal(still, signal.SIGKILL)
        still = wait_gone(still, 5.0)
        if still:
            raise StackError(f"{name}: processes {still} survived SIGKILL; check them with ps")


def tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port nothing listens on right now, below the kernel's ephemeral range.

    A port the OS hands out for ``bind(0)`` comes from the ephemeral range, which every outgoing
    connection also draws its local port from: on a busy machine one of them can take the port between
    this call and the server's bind ("Address already in use", seen with Kafka under the test suite).
    Ports below that range are never given to outgoing connections, so they stay ours; from 20000 up,
    above the ports Ray gives its workers (10002-19999).
    """
    lo, _ = _ephemeral_range()
    for _ in range(200 if lo > 20000 else 0):
        port = random.randint(20000, lo - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded machine: let the OS pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
