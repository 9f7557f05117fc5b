"""The gateway against a broker that dies: it resumes acking on its own once the broker is back, and
an event Kafka could never take is the client's error, not an outage."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import requests

from gateway.auth import create_key
from gateway.ingest import MAX_EVENT_BYTES
from gateway.testing import GatewayHarness, read_topic
from prefstream.events.v1 import events_pb2 as ev
from prefstream.gateway.v1 import gateway_pb2 as g
from prefstream.gateway.v1 import gateway_pb2_grpc as gg
from services import topics
from services.stack import Stack, free_stack_config
from services.stack.procs import read_pidfile

pytestmark = pytest.mark.integration


def _completion(project: str, i: int) -> dict:
    return {"completion": {"event_id": f"c-{i}", "project": project, "prompt": [{"role": "ROLE_USER", "content": f"q{i}"}],
                           "candidates": ["a", "b"]}}


def test_the_gateway_resumes_acking_after_its_broker_is_killed_and_restarted(redis_url: str, redis_client,
                                                                            tmp_path: Path) -> None:
    """kill -9 of the only broker while batches are in flight, restart it: acks resume, no gateway restart."""
    kafka = Stack(free_stack_config(tmp_path / "kafka", components=("kafka",)))
    kafka.up()
    try:
        project = f"proj-{uuid.uuid4().hex[:8]}"
        key, _ = create_key(redis_client, project, pepper="")
        headers = {"Authorization": f"Bearer {key}"}
        with GatewayHarness(kafka.cfg.kafka_bootstrap, redis_url, run_processor=False, kafka_ack_timeout_s=3.0,
                            dedup_pending_ttl_s=6.0) as gw:
            acked: list[tuple[float, str]] = []
            failed = [0]
            wrong: list = []  # any answer but OK or UNAVAILABLE
            stop = threading.Event()
            lock = threading.Lock()

            def load(worker: int) -> None:
                n = 0
                while not stop.is_set():
                    events = [_completion(project, worker * 10_000_000 + n * 100 + j) for j in range(40)]
                    n += 1
                    try:
                        r = requests.post(f"{gw.http_url}/v1/events:batch", json={"events": events}, headers=headers,
                                          timeout=30)
                    except requests.RequestException:
                        failed[0] += 1
                        continue
                    with lock:
                        if r.status_code != 200:
                            wrong.append(r.text)
                            return
                        for e, res in zip(events, r.json()["results"]):
                            if res["status"].get("code", 0) == 0:
                                acked.append((time.time(), e["completion"]["event_id"]))
                            elif res["status"]["code"] == grpc.StatusCode.UNAVAILABLE.value[0]:
                                failed[0] += 1
                            else:
                                wrong.append(res)
                                return

            threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
            for t in threads:
                t.start()
            time.sleep(4)
            assert acked, "nothing was acked before the kill"
            os.kill(read_pidfile(kafka._component("kafka").pidfile).pid, signal.SIGKILL)  # batches are in flight
            killed = time.time()
            time.sleep(4)
            kafka.up()  # the same broker, port and data
            back = time.time()
            deadline = back + 60
            while time.time() < deadline and not any(t > back for t, _ in acked):
                time.sleep(0.2)
            time.sleep(2)
            stop.set()
            for t in threads:
                t.join(60)
            assert not wrong, wrong[:3]
            after = [t for t, _ in acked if t > back]
            assert after, f"no event acked in the 60 s after the broker came back ({failed[0]} answered UNAVAILABLE)"
            print(f"acks resumed {min(after) - back:.1f} s after the broker was back "
                  f"({back - killed:.1f} s down; {len(acked)} acked, {failed[0]} UNAVAILABLE)")
            # health reports the recent failures for a few seconds, then green again
            healthy_by = time.time() + 20
            while requests.get(f"{gw.http_url}/healthz", timeout=10).status_code != 200:
                assert time.time() < healthy_by, "the gateway stayed unhealthy after the broker came back"
                time.sleep(0.5)

            # every acknowledged event is in the topic
            written = {json.loads(r.value)["event_id"]
                       for r in read_topic(kafka.cfg.kafka_bootstrap, gw.topic(topics.COMPLETIONS), timeout_s=60)}
            lost = {eid for _, eid in acked} - written
            assert not lost, f"{len(lost)} acked event(s) are not in Kafka"
    finally:
        kafka.down()


def test_an_event_too_large_for_kafka_is_invalid_argument_and_health_stays_green(kafka_bootstrap: str, redis_url: str,
                                                                               redis_client) -> None:
    project = f"proj-{uuid.uuid4().hex[:8]}"
    key, _ = create_key(redis_client, project, pepper="")
    big = ["x" * 99_000] * 11  # every field within its limit, the whole over Kafka's 1 MiB
    with GatewayHarness(kafka_bootstrap, redis_url, run_processor=False) as gw, grpc.insecure_channel(gw.address) as ch:
        stub = gg.GatewayServiceStub(ch)
        md = (("authorization", f"Bearer {key}"),)
        request = g.LogCompletionRequest(completion=ev.Completion(
            project=project, prompt=[ev.ChatMessage(role=ev.ROLE_USER, content="q")], candidates=big))
        with pytest.raises(grpc.RpcError) as err:
            stub.LogCompletion(request, metadata=md, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(MAX_EVENT_BYTES) in err.value.details() and "shorten" in err.value.details()
        body = {"completion": {"project": project, "prompt": [{"role": "ROLE_USER", "content": "q"}], "candidates": big}}
        r = requests.post(f"{gw.http_url}/v1/completions/log", json=body, headers=dict(md), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "completion", r.text
        health = requests.get(f"{gw.http_url}/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["kafka"] is True
        assert stub.LogCompletion(g.LogCompletionRequest(completion=ev.Completion(
            project=project, prompt=[ev.ChatMessage(role=ev.ROLE_USER, content="q")], candidates=["a", "b"])),
            metadata=md, timeout=30).completion_id
        assert not read_topic(kafka_bootstrap, gw.topic(topics.COMPLETIONS), timeout_s=10) or all(
            len(r.value) < MAX_EVENT_BYTES for r in read_topic(kafka_bootstrap, gw.topic(topics.COMPLETIONS)))
