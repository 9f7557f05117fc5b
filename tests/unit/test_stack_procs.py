"""Process bookkeeping, topic specs and CLI parsing: everything that needs no server."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pytest

from services import topics
from services.stack.config import StackConfig
from services.stack.manager import Stack
from services.stack.procs import (
    PidRecord,
    pid_alive,
    read_pidfile,
    record_alive,
    spawn,
    stop_record,
    tail,
    write_pidfile,
)
from services.stack.redis import RedisLayout, render_redis_conf


def test_pid_record_round_trip_and_garbage() -> None:
    rec = PidRecord(123, 456)
    assert PidRecord.from_text(rec.to_text()) == rec
    assert PidRecord.from_text("not a pid") is None
    assert PidRecord.from_text("12") is None


def test_own_process_is_alive_but_a_recycled_pid_is_not(tmp_path: Path) -> None:
    rec = write_pidfile(tmp_path / "me.pid", os.getpid())
    assert read_pidfile(tmp_path / "me.pid") == rec
    assert record_alive(rec)
    assert not record_alive(PidRecord(os.getpid(), rec.start_time + 1))
    assert read_pidfile(tmp_path / "missing.pid") is None


def test_spawn_and_stop_kills_the_whole_session(tmp_path: Path) -> None:
    # A parent that leaves a grandchild behind: stop must take both.
    script = "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)"
    proc = spawn([sys.executable, "-c", script], log_path=tmp_path / "x.out", cwd=tmp_path)
    rec = write_pidfile(tmp_path / "x.pid", proc.pid)
    from services.stack.procs import pids_in_session

    deadline = time.monotonic() + 10
    while len(pids_in_session(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    family = pids_in_session(proc.pid)
    assert len(family) == 2
    stop_record(rec, name="x", timeout_s=5)
    assert not any(pid_alive(p) for p in family)


def test_tail_returns_last_lines(tmp_path: Path) -> None:
    f = tmp_path / "log"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(f, 3).splitlines() == ["line 97", "line 98", "line 99"]
    assert "no log" in tail(tmp_path / "nope")


def test_topic_specs_are_unique_and_ordered_where_it_matters() -> None:
    names = [t.name for t in topics.TOPICS]
    assert len(names) == len(set(names)) == 5
    assert all(n.startswith("prefstream.") for n in names)
    assert topics.topic("prefstream.model-updates").partitions == 1
    assert topics.topic("prefstream.dead-letter").partitions == 1
    assert topics.PREFERENCES.partitions == 4
    assert all("retention.ms" in t.configs for t in topics.TOPICS)
    with pytest.raises(KeyError, match="known topics"):
        topics.topic("prefstream.nope")


def test_redis_conf_persists_and_binds_loopback(tmp_path: Path) -> None:
    cfg = StackConfig(redis_port=16379, run_dir=tmp_path)
    lines = set(render_redis_conf(cfg, RedisLayout(tmp_path / "redis")).splitlines())
    assert {"bind 127.0.0.1", "port 16379", "appendonly yes", "appendfsync everysec", "daemonize no"} <= lines
    assert f"dir {tmp_path / 'redis' / 'data'}" in lines


def test_stale_pidfile_is_dropped(tmp_path: Path) -> None:
    st = Stack(StackConfig(run_dir=tmp_path))
    comp = st._component("redis")
    comp.pidfile.parent.mkdir(parents=True)
    comp.pidfile.write_text(PidRecord(os.getpid(), 1).to_text())  # our pid, wrong start time
    assert st._running(comp, healthy=lambda: pytest.fail("must not health-check a stale pid")) is False
    assert not comp.pidfile.exists()


def test_down_without_anything_running_is_a_no_op(tmp_path: Path) -> None:
    assert Stack(StackConfig(run_dir=tmp_path / "never")).down() == []


def _parse(argv: list[str]) -> argparse.Namespace:
    from services.stack.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_flags_become_config_overrides(tmp_path: Path) -> None:
    from services.stack.cli import cmd_up, config_from_args

    args = _parse(["stack", "up", "--run-dir", str(tmp_path), "--kafka-port", "19092", "--components", "kafka,redis"])
    assert args.handler is cmd_up
    cfg = config_from_args(args)
    assert cfg.kafka_port == 19092 and cfg.components == ("kafka", "redis") and cfg.run_path == tmp_path.resolve()


def test_cli_kafka_tool_passes_everything_after_the_tool() -> None:
    from services.stack.cli import cmd_kafka_tool

    args = _parse(["stack", "kafka-tool", "--run-dir", "/tmp/x", "kafka-topics", "--describe", "--topic", "t"])
    assert args.handler is cmd_kafka_tool
    assert args.tool == "kafka-topics"
    assert args.tool_args == ["--describe", "--topic", "t"]


@pytest.mark.network_guard_selftest
def test_unit_tests_cannot_connect_sockets() -> None:
    import socket

    with socket.socket() as s:
        with pytest.raises(ConnectionRefusedError, match="unit tests must not"):
            s.connect(("127.0.0.1", 9))


def test_free_ports_come_from_below_the_ephemeral_range() -> None:
    """Outgoing connections take their local ports from the ephemeral range; a free port picked there
    can be gone by the time a server binds it."""
    from services.stack.procs import _ephemeral_range, free_port

    lo, _ = _ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert all(20000 <= p < lo for p in ports) and len(ports) > 1
