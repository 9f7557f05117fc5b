"""The local stack really works: every topic round-trips, Redis persists, tools and Ray run, down cleans up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from services.endpoints import StackNotRunning
from services.stack import Stack, StackError, load_endpoints, run_kafka_tool
from services.stack import free_stack_config
from services.stack.kafka_tools import KAFKA_TOOLS
from services.stack.procs import PidRecord, pid_alive, pids_in_session, pids_with_cmdline, read_pidfile
from services.topics import TOPICS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _payload(topic: str, i: int) -> bytes:
    """A unique value; on model-updates and dead-letter a schema-valid event, because the session's other
    consumers of those topics (scorers, trainer and gateway tests) decode what they read."""
    from prefstream.events.v1.events_pb2 import DeadLetter
    from services.codec import encode_event
    from services.schemas import ModelUpdate
    from services.topics import DEAD_LETTER, MODEL_UPDATES

    tag = f"{topic}-{i}-{uuid.uuid4().hex}"
    if topic == DEAD_LETTER.name:
        return encode_event(DeadLetter(source_topic="stack-roundtrip", reason=tag, payload=tag))
    if topic == MODEL_UPDATES.name:
        return ModelUpdate(model_name=f"stack-roundtrip-{tag[-8:]}", version=f"v{i:06d}", action="rejected",
                           reason=tag).to_kafka()
    return tag.encode()


def test_every_topic_round_trips_with_acks_all(kafka_bootstrap: str) -> None:
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        for spec in TOPICS:
            parts = consumer.partitions_for_topic(spec.name)
            assert parts == set(range(spec.partitions)), f"{spec.name}: partitions {parts}"
            tps = [TopicPartition(spec.name, p) for p in sorted(parts)]
            start = consumer.end_offsets(tps)
            sent = {_payload(spec.name, i) for i in range(20)}
            for i, value in enumerate(sorted(sent)):
                producer.send(spec.name, key=str(i).encode(), value=value).get(timeout=30)
            producer.flush()

            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, start[tp])
            got: set[bytes] = set()
            deadline = time.monotonic() + 30
            while got != sent and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=500).values():
                    got.update(r.value for r in records)
            assert got == sent, f"{spec.name}: {len(got)} of {len(sent)} records came back"
    finally:
        producer.close()
        consumer.close()


def test_kafka_tool_wrapper_lists_our_topics(stack: Stack, kafka_bootstrap: str) -> None:
    proc = run_kafka_tool("kafka-topics", ["--bootstrap-server", kafka_bootstrap, "--list"], cfg=stack.cfg, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = set(proc.stdout.split())
    assert {t.name for t in TOPICS} <= listed

    proc = run_kafka_tool(
        "kafka-topics.sh",
        ["--bootstrap-server", kafka_bootstrap, "--describe", "--topic", "prefstream.model-updates"],
        cfg=stack.cfg, timeout=120, check=True,
    )
    assert "PartitionCount: 1" in proc.stdout


def test_kafka_tool_classes_exist_in_the_jars(stack: Stack) -> None:
    classes: set[str] = set()
    for jar in stack.cfg.kafka_libs.glob("kafka*.jar"):
        with zipfile.ZipFile(jar) as z:
            classes.update(n[:-6].replace("/", ".") for n in z.namelist() if n.endswith(".class"))
    missing = [t.main_class for t in KAFKA_TOOLS.values() if t.main_class not in classes]
    assert not missing


def test_cli_kafka_tool_adds_bootstrap_server(stack: Stack) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prefstream", "stack", "kafka-tool", "--run-dir", str(stack.cfg.run_path),
         "kafka-topics", "--list"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "prefstream.preferences" in proc.stdout.split()


def test_redis_data_survives_a_restart(stack: Stack, redis_client) -> None:
    key = f"test:stack:{uuid.uuid4().hex}"
    redis_client.set(key, "v1")
    redis_client.hset(key + ":h", mapping={"version": "7"})
    old = read_pidfile(stack._component("redis").pidfile)
    stack.stop_component("redis")
    assert old is not None and not pid_alive(old.pid)

    stack.up()  # idempotent: only Redis is (re)started
    new = read_pidfile(stack._component("redis").pidfile)
    assert new is not None and new != old
    import redis

    client = redis.Redis.from_url(stack.endpoints.redis_url)
    try:
        assert client.get(key) == b"v1"
        assert client.hgetall(key + ":h") == {b"version": b"7"}
        assert client.config_get("appendonly")["appendonly"] == "yes"
    finally:
        client.close()


def test_up_is_idempotent_and_status_is_healthy(stack: Stack) -> None:
    before = {s.name: s.pid for s in stack.status()}
    t0 = time.monotonic()
    stack.up()
    assert time.monotonic() - t0 < 15
    after = stack.status()
    assert {s.name: s.pid for s in after} == before
    assert all(s.healthy for s in after), after
    assert load_endpoints(stack.cfg.run_path) == stack.endpoints


def test_ray_runs_a_remote_task(ray_address: str) -> None:
    code = (
        "import ray\n"
        f"ray.init(address={ray_address!r}, log_to_driver=False)\n"
        "@ray.remote\n"
        "def double(x):\n    return 2 * x\n"
        "print('RESULT', ray.get(double.remote(21)))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT 42" in proc.stdout


def test_status_json_from_cli(stack: Stack) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prefstream", "stack", "status", "--json", "--run-dir", str(stack.cfg.run_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    comps = {c["name"]: c for c in json.loads(proc.stdout)["components"]}
    assert set(comps) == {"kafka", "redis", "ray"}
    assert comps["kafka"]["address"] == stack.endpoints.kafka_bootstrap
    assert all(c["healthy"] and c["pid"] for c in comps.values())


def test_down_leaves_no_process_and_up_cleans_stale_pidfiles(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A second, private stack: the session stack must keep running for the other tests."""
    cfg = free_stack_config(tmp_path_factory.mktemp("downstack"), ray_num_cpus=1, create_topics=False)
    st = Stack(cfg)
    # A pidfile of a process that no longer exists (pid recycled or machine rebooted).
    stale = cfg.component_dir("redis") / "redis.pid"
    stale.parent.mkdir(parents=True)
    stale.write_text(PidRecord(2**22 - 1, 1).to_text())
    try:
        st.up()
        recs = {name: read_pidfile(st._component(name).pidfile) for name in ("kafka", "redis", "ray")}
        assert all(r is not None and pid_alive(r.pid) for r in recs.values()), recs
        everything = {r.pid for r in recs.values() if r}
        for r in recs.values():
            everything.update(pids_in_session(r.pid))
        everything.update(pids_with_cmdline(str(cfg.ray_temp_dir)))
        assert len(everything) > 3  # Ray's head brought its GCS, raylet and agents
    finally:
        stopped = st.down()
    assert sorted(stopped) == ["kafka", "ray", "redis"]
    alive = [p for p in everything if pid_alive(p)]
    assert not alive, f"still running after down: {alive}"
    assert not pids_with_cmdline(str(cfg.ray_temp_dir))
    assert not cfg.state_file.exists()
    with pytest.raises(StackNotRunning, match="stack up"):
        load_endpoints(cfg.run_path)
    assert st.down() == []  # a second down is a no-op


def test_failed_component_names_itself_with_its_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    run_dir = tmp_path_factory.mktemp("badstack")
    fake = run_dir / "broken-redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot open config (simulated)'\nexit 3\n")
    fake.chmod(0o755)
    cfg = free_stack_config(run_dir, components=("redis",), redis_server=str(fake))
    with pytest.raises(StackError) as err:
        Stack(cfg).up()
    msg = str(err.value)
    assert "redis" in msg and "exited with code 3" in msg and "simulated" in msg
    assert not (cfg.component_dir("redis") / "redis.pid").exists()

    # A port someone else holds is refused up front, naming the component.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = free_stack_config(run_dir, components=("redis",), redis_port=s.getsockname()[1])
        with pytest.raises(StackError, match="redis: port .* already in use"):
            Stack(cfg).up()


def test_end_offsets_sum_what_was_written_and_are_empty_for_a_missing_topic(kafka_bootstrap: str) -> None:
    """services.kafka.end_offsets, which the loop's pacing and the demo's lag read, against the real broker."""
    import uuid

    from kafka import KafkaConsumer

    from services.kafka import end_offsets, make_producer
    from services.topics import PREFERENCES, ensure_topics, prefixed

    spec = prefixed([PREFERENCES], f"ends{uuid.uuid4().hex[:8]}.")[0]
    ensure_topics(kafka_bootstrap, [spec])
    producer = make_producer(kafka_bootstrap)
    for i in range(5):
        producer.send(spec.name, value=b"x", key=str(i).encode())
    producer.flush(timeout=60)
    producer.close(timeout=10)
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None, enable_auto_commit=False)
    try:
        ends = end_offsets(consumer, spec.name)
        assert len(ends) == spec.partitions and sum(ends.values()) == 5
        assert end_offsets(consumer, f"missing{uuid.uuid4().hex[:8]}") == {}
    finally:
        consumer.close()
