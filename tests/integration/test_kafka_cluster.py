"""A 3-node KRaft cluster from the local stack (``kafka_brokers=3``): topics replicate 3 ways with
min.insync.replicas 2, and killing the leader of a partition with SIGKILL while a producer writes with
acks=all loses no acknowledged record; the killed node rejoins and catches up."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest

from services.stack import Stack, free_stack_config
from services.stack.kafka import describe_partitions, node_component
from services.stack.procs import read_pidfile
from services.topics import FEEDBACK, TopicSpec, ensure_topics

pytestmark = pytest.mark.integration


def _leader(bootstrap: str, topic: str, partition: int, *, isr: list[int] | None = None,
            timeout_s: float = 30.0) -> tuple[int, list[int], list[int]]:
    """Leader, replicas and ISR of one partition, as soon as some broker's metadata has it with a leader
    (and, given ``isr``, that in-sync set). A topic's creation is acknowledged by the controller; the broker
    this admin client asks may learn of it a moment later, so one early answer can lack the partition."""
    deadline = time.monotonic() + timeout_s
    while True:
        p = describe_partitions(bootstrap, topic).get(partition)
        got = (p.leader, list(p.replicas), list(p.isr)) if p is not None else None
        if got is not None and got[0] != -1 and (isr is None or got[2] == isr):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{topic}[{partition}] not settled in {timeout_s:.0f} s: last seen {got}")
        time.sleep(0.5)


def test_a_leader_killed_9_mid_produce_loses_no_acked_record(tmp_path_factory: pytest.TempPathFactory) -> None:
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    cfg = free_stack_config(tmp_path_factory.mktemp("kafka3"), components=("kafka",), kafka_brokers=3,
                            create_topics=False)
    st = Stack(cfg)
    try:
        st.up()
        topic = f"cluster-{uuid.uuid4().hex[:8]}"
        ensure_topics(cfg.kafka_bootstrap, [TopicSpec(topic, 1, dict(FEEDBACK.configs))])
        leader, replicas, isr = _leader(cfg.kafka_bootstrap, topic, 0, isr=[1, 2, 3])
        assert replicas == [1, 2, 3] and isr == [1, 2, 3]

        producer = KafkaProducer(bootstrap_servers=cfg.kafka_bootstrap, acks="all", retries=2**31 - 1,
                                 request_timeout_ms=5000, delivery_timeout_ms=60000, max_in_flight_requests_per_connection=1)
        acked: list[bytes] = []
        failed: list[str] = []
        stop = threading.Event()

        def write() -> None:
            i = 0
            while not stop.is_set():
                value = f"r{i}".encode()
                try:
                    producer.send(topic, value=value).get(timeout=60)
                    acked.append(value)
                except Exception as e:  # noqa: BLE001 - counted; the test asserts what was acked
                    failed.append(repr(e))
                i += 1

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        time.sleep(2.0)
        before = len(acked)
        pid = read_pidfile(cfg.component_dir(node_component(leader)) / "kafka.pid").pid
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        # The controller moves the leadership once the node's session lapses (4 s); the producer follows.
        while len(acked) == before and time.monotonic() - killed_at < 30:
            time.sleep(0.05)
        during = len(acked)
        failover_s = time.monotonic() - killed_at
        time.sleep(2.0)
        st.up()  # brings the killed node back
        time.sleep(2.0)
        stop.set()
        writer.join(90)
        producer.close()
        new_leader, _, _ = _leader(cfg.kafka_bootstrap, topic, 0)
        assert new_leader != -1
        assert during > before, "no record was acknowledged in 30 s while the old leader was dead"
        assert failover_s < 30

        consumer = KafkaConsumer(bootstrap_servers=cfg.kafka_bootstrap, enable_auto_commit=False, group_id=None)
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        seen: set[bytes] = set()
        while consumer.position(tp) < end:
            for recs in consumer.poll(timeout_ms=2000).values():
                seen.update(r.value for r in recs)
        consumer.close()
        lost = [v for v in acked if v not in seen]
        assert not lost, f"{len(lost)} of {len(acked)} acked records lost, e.g. {lost[:3]}"
        # the killed node is back in sync
        assert _leader(cfg.kafka_bootstrap, topic, 0, isr=[1, 2, 3], timeout_s=60)[2] == [1, 2, 3]
    finally:
        stopped = st.down()
    assert sorted(stopped) == ["kafka", "kafka-2", "kafka-3"]
