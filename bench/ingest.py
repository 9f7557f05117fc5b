"""``prefstream bench ingest``: events/s and ack latency through the gateway vs. Kafka's own producers.

All four producers write the same ~0.5 KB completion events with acks=all to fresh topics of the
same broker, in the same run:

* **gateway, streaming** (``gateway_stream_eps``): one ``StreamEvents`` call carrying
  ``EventBatch`` requests of ``--batch-size`` events (what bulk producers and ``prefstream import``
  send), with a window of unacknowledged events; the gateway runs as its own process
  (``python -m gateway``) with auth and dedup on, as in production, and without its feedback
  processor (ingestion alone is measured);
* **gateway, streaming one event per message** (``gateway_stream_single_eps``): the same stream
  without batches (what a client that sends events one by one gets);
* **gateway, unary**: ``LogCompletion`` from concurrent callers;
* **raw kafka-python**: the durable producer of :mod:`services.kafka` sending the same bytes;
* **kafka-producer-perf-test**: Kafka's Java tool, same record size.

Ack latency is measured per event, from the moment the client handed it (or its batch) to gRPC to
its response:
``ack_p50_ms``/``ack_p99_ms`` under saturation (``--window`` events outstanding, so latency is about
window / rate), ``light_ack_*`` with only ``--light-window`` outstanding.
Afterwards every gateway topic is consumed back: ``lost_events`` counts acknowledged event ids that
are not in Kafka (must be 0), ``duplicate_records`` ids present more than once.

The benchmark starts its own Kafka + Redis on free ports in a temp dir, or uses the stack of
``--run-dir`` when given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
_PROMPT = "Could you explain, in a few sentences, how a write-ahead log makes a database durable? " * 2
_CANDIDATES = ("A write-ahead log records every change before it is applied, so after a crash " * 2,
               "The database appends intended changes to a log and flushes it; replaying the log " * 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=None, help="events per producer (default 60000; --quick 6000)")
    parser.add_argument("--unary-events", type=int, default=None, help="events sent with unary calls (default 6000; --quick 1000)")
    parser.add_argument("--unary-concurrency", type=int, default=64, help="concurrent unary callers")
    parser.add_argument("--window", type=int, default=4000, help="unacknowledged events allowed in the stream (a bulk client)")
    parser.add_argument("--batch-size", type=int, default=256, help="events per EventBatch in the batched stream")
    parser.add_argument("--light-window", type=int, default=8,
                        help="window of the light-load stream whose latency is reported as light_ack_*")
    parser.add_argument("--rounds", type=int, default=None, help="alternating gateway/raw rounds (default 3; --quick 1)")
    parser.add_argument("--run-dir", default=None, help="use the running stack of this run dir instead of starting one")


# ---------------------------------------------------------------------------------------------
# payloads


def _completion(project: str, event_id: str) -> Any:
    from prefstream.events.v1 import events_pb2 as ev

    return ev.Completion(
        event_id=event_id,
        project=project,
        prompt=[ev.ChatMessage(role=ev.ROLE_USER, content=_PROMPT)],
        candidates=list(_CANDIDATES),
        model="bench-policy",
        model_version="v1",
    )


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# ---------------------------------------------------------------------------------------------
# gateway clients


async def _stream(address: str, key: str, project: str, n: int, window: int, tag: str, batch: int = 0) -> dict[str, Any]:
    """One StreamEvents call of ``n`` completions: one per message, or ``batch`` per EventBatch."""
    import grpc

    from prefstream.gateway.v1 import gateway_pb2 as g

    # Requests are serialized before the clock starts, and sent as bytes, so the client's own
    # protobuf work does not compete with the gateway for the machine's two cores.
    singles = [g.StreamEventsRequest(seq=i, completion=_completion(project, f"{tag}-{i}")) for i in range(n)]
    if batch:
        groups = [list(range(i, min(n, i + batch))) for i in range(0, n, batch)]
        reqs = [g.StreamEventsRequest(seq=k, batch=g.EventBatch(events=[singles[i] for i in grp])).SerializeToString()
                for k, grp in enumerate(groups)]
    else:
        groups = [[i] for i in range(n)]
        reqs = [r.SerializeToString() for r in singles]
    del singles
    sent_at = [0.0] * len(reqs)
    lat: list[float] = []
    acked: list[str] = []
    errors: dict[str, int] = {}
    slots = asyncio.Semaphore(max(1, window // max(1, batch)))  # the window counts events either way

    async def gen():
        for k, r in enumerate(reqs):
            await slots.acquire()
            sent_at[k] = time.perf_counter()
            yield r

    def note(resp: Any, latency: float) -> None:
        if resp.status.code == 0:
            lat.append(latency)
            acked.append(resp.event_id)
        else:
            errors[resp.status.message[:80]] = errors.get(resp.status.message[:80], 0) + 1

    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.stream_stream("/prefstream.gateway.v1.GatewayService/StreamEvents",
                                request_serializer=None, response_deserializer=None)
        t0 = time.perf_counter()
        async for raw in call(gen(), metadata=(("authorization", f"Bearer {key}"),)):
            now = time.perf_counter()
            slots.release()
            resp = g.StreamEventsResponse.FromString(raw)
            latency = now - sent_at[resp.seq]
            if not batch:
                note(resp, latency)
            elif resp.status.code != 0 or len(resp.batch) != len(groups[resp.seq]):
                errors[f"batch refused: {resp.status.message[:60]}"] = errors.get(f"batch refused: {resp.status.message[:60]}", 0) + 1
            else:
                for inner in resp.batch:
                    note(inner, latency)
        elapsed = time.perf_counter() - t0
    return {"eps": len(acked) / elapsed, "latencies": lat, "acked": acked, "errors": errors, "elapsed_s": elapsed}


async def _unary(address: str, key: str, project: str, n: int, concurrency: int, tag: str) -> dict[str, Any]:
    import grpc

    from prefstream.gateway.v1 import gateway_pb2 as g

    reqs = [g.LogCompletionRequest(completion=_completion(project, f"{tag}-{i}")).SerializeToString() for i in range(n)]
    lat: list[float] = []
    acked: list[str] = []
    errors: dict[str, int] = {}
    md = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary("/prefstream.gateway.v1.GatewayService/LogCompletion",
                              request_serializer=None, response_deserializer=None)
        from prefstream.gateway.v1.gateway_pb2 import LogCompletionResponse

        async def worker(k: int) -> None:
            for i in range(k, n, concurrency):
                t = time.perf_counter()
                try:
                    raw = await call(reqs[i], metadata=md, timeout=30)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    continue
                lat.append(time.perf_counter() - t)
                acked.append(LogCompletionResponse.FromString(raw).event_id)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"eps": len(acked) / elapsed, "latencies": lat, "acked": acked, "errors": errors, "elapsed_s": elapsed}


# ---------------------------------------------------------------------------------------------
# baselines


def _raw_kafka_python(bootstrap: str, topic: str, n: int) -> dict[str, Any]:
    from services.codec import encode_event
    from services.kafka import make_producer

    payloads = [encode_event(_completion("bench", f"raw-{i}")) for i in range(n)]
    producer = make_producer(bootstrap)
    producer.send(topic, b"warm-up").get(30)
    done: list[float] = [0.0] * n
    start: list[float] = [0.0] * n
    t0 = time.perf_counter()
    futures = []
    for i, p in enumerate(payloads):
        start[i] = time.perf_counter()
        f = producer.send(topic, value=p, key=f"raw-{i}".encode())
        f.add_callback(lambda _m, i=i: done.__setitem__(i, time.perf_counter()))
        futures.append(f)
    producer.flush(timeout=120)
    elapsed = time.perf_counter() - t0
    ok = sum(1 for f in futures if f.succeeded())
    producer.close()
    lat = [done[i] - start[i] for i in range(n) if done[i]]
    return {"eps": ok / elapsed, "latencies": lat, "acked": ok, "elapsed_s": elapsed}


def _perf_test(bootstrap: str, topic: str, n: int, record_size: int) -> dict[str, Any]:
    from services.stack import run_kafka_tool

    proc = run_kafka_tool("kafka-producer-perf-test", [
        "--topic", topic, "--num-records", str(n), "--record-size", str(record_size), "--throughput", "-1",
        "--producer-props", f"bootstrap.servers={bootstrap}", "acks=all", "enable.idempotence=true", "linger.ms=2",
    ], timeout=600)
    out = proc.stdout + proc.stderr
    m = re.findall(r"(\d+) records sent, ([\d.]+) records/sec .*?([\d.]+) ms avg latency, ([\d.]+) ms max latency"
                   r"(?:, (\d+) ms 50th, (\d+) ms 95th, (\d+) ms 99th)?", out)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"kafka-producer-perf-test failed (rc {proc.returncode}): {out[-2000:]}")
    last = m[-1]
    return {"eps": float(last[1]), "avg_ms": float(last[2]), "p50_ms": float(last[4] or 0), "p99_ms": float(last[6] or 0)}


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one producer: median rate, all latencies and acked ids, per-round rates kept."""
    acked: Any = [a for r in runs for a in r["acked"]] if isinstance(runs[0]["acked"], list) else sum(r["acked"] for r in runs)
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
    return {"eps": statistics.median(r["eps"] for r in runs), "rounds_eps": [round(r["eps"], 1) for r in runs],
            "latencies": [x for r in runs for x in r["latencies"]], "acked": acked, "errors": errors}


def _count_back(bootstrap: str, topic: str, expected: set[str]) -> tuple[int, int]:
    """(lost, duplicated): acked ids missing from ``topic``, ids present more than once."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             max_poll_records=5000, fetch_max_bytes=64 * 1024 * 1024)
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    end = consumer.end_offsets(tps)
    seen: dict[str, int] = {}
    deadline = time.time() + 300
    while any(consumer.position(tp) < end[tp] for tp in tps) and time.time() < deadline:
        for records in consumer.poll(timeout_ms=1000).values():
            for r in records:
                event_id = json.loads(r.value).get("event_id", "")
                seen[event_id] = seen.get(event_id, 0) + 1
    consumer.close()
    lost = sum(1 for e in expected if e not in seen)
    dups = sum(1 for e in expected if seen.get(e, 0) > 1)
    return lost, dups


# ---------------------------------------------------------------------------------------------
# the run


def _start_gateway(endpoints: Any, prefix: str, workdir: Path) -> tuple[subprocess.Popen, int, Path]:
    from services.stack import free_port

    port = free_port()
    log_path = workdir / "gateway.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFSTREAM_LOG_LEVEL": "WARNING"}
    argv = [sys.executable, "-m", "gateway", "--grpc-port", str(port), "--http-port", "-1",
            "--kafka-bootstrap", endpoints.kafka_bootstrap, "--redis-url", endpoints.redis_url,
            "--topic-prefix", prefix, "--run-processor", "false"]
    proc = subprocess.Popen(argv, env=env, cwd=str(REPO), stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    return proc, port, log_path


def _wait_port(port: int, proc: subprocess.Popen, log_path: Path, timeout_s: float = 60) -> None:
    from services.stack.procs import port_open

    deadline = time.time() + timeout_s
    while not port_open(port):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"gateway did not start; log:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.machine import describe
    from gateway.auth import create_key
    from services.redis_client import connect
    from services import topics
    from services.stack import Stack, free_port, load_endpoints, load_stack_config
    from services.topics import TopicSpec, ensure_topics, prefixed, topic_name

    logging.getLogger("kafka").setLevel(logging.WARNING)
    load_at_start = list(os.getloadavg())  # other work on the machine skews every number here
    quick = bool(getattr(args, "quick", False))
    n = args.events or (6000 if quick else 60000)
    n_unary = args.unary_events or (1000 if quick else 6000)
    rounds = args.rounds or (1 if quick else 3)
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench-{run_id}."
    workdir = Path(tempfile.mkdtemp(prefix="prefstream-bench-ingest-"))
    stack = None
    if args.run_dir:
        endpoints = load_endpoints(args.run_dir)
    else:
        cfg = load_stack_config(overrides={
            "run_dir": str(workdir / "stack"), "components": "kafka,redis", "kafka_port": free_port(),
            "kafka_controller_port": free_port(), "redis_port": free_port(),
        })
        stack = Stack(cfg)
        endpoints = stack.up()
    gw = None
    try:
        bootstrap = endpoints.kafka_bootstrap
        specs = prefixed((topics.COMPLETIONS, topics.FEEDBACK), prefix)
        raw_spec = TopicSpec(f"bench-{run_id}.raw", topics.COMPLETIONS.partitions, topics.COMPLETIONS.configs)
        perf_spec = TopicSpec(f"bench-{run_id}.perf", topics.COMPLETIONS.partitions, topics.COMPLETIONS.configs)
        ensure_topics(bootstrap, [*specs, raw_spec, perf_spec])
        key, _ = create_key(connect(endpoints.redis_url), f"bench-{run_id}", pepper="")
        project = f"bench-{run_id}"

        gw, port, log_path = _start_gateway(endpoints, prefix, workdir)
        _wait_port(port, gw, log_path)
        address = f"127.0.0.1:{port}"
        # Warm up (connections, topic metadata, JIT-free but cache-warm paths).
        asyncio.run(_stream(address, key, project, 500, args.window, f"{run_id}-warm"))
        asyncio.run(_stream(address, key, project, 2 * args.batch_size, args.window, f"{run_id}-warmb", batch=args.batch_size))

        # Batched streaming, the raw producer and single-event streaming alternate for --rounds
        # rounds, so load that other work puts on the machine hits all alike; each rate is the median
        # over its rounds.
        streams, raws, singles = [], [], []
        for r in range(rounds):
            streams.append(asyncio.run(_stream(address, key, project, n, args.window, f"{run_id}-b{r}", batch=args.batch_size)))
            raws.append(_raw_kafka_python(bootstrap, raw_spec.name, n))
            singles.append(asyncio.run(_stream(address, key, project, n, args.window, f"{run_id}-s{r}")))
        stream = _merge(streams)
        raw = _merge(raws)
        single = _merge(singles)
        light = asyncio.run(_stream(address, key, project, min(n, 3000), args.light_window, f"{run_id}-l"))
        unary = asyncio.run(_unary(address, key, project, n_unary, args.unary_concurrency, f"{run_id}-u"))
        gw.terminate()
        gw.wait(30)
        gw = None

        size = len(_completion(project, f"{run_id}-s-0").SerializeToString())
        wire_size = len(__import__("services.codec", fromlist=["encode_event"]).encode_event(_completion(project, "x" * 20)))
        try:
            perf = _perf_test(bootstrap, perf_spec.name, n, wire_size)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            log.error("kafka-producer-perf-test could not run: %s", e)
            perf = {"eps": 0.0, "error": str(e)[:500]}

        acked = set(stream["acked"]) | set(single["acked"]) | set(unary["acked"]) | set(light["acked"])
        light_ms = [x * 1000 for x in light["latencies"]]
        lost, dups = _count_back(bootstrap, topic_name(topics.COMPLETIONS, prefix), acked)
        lat_ms = [x * 1000 for x in stream["latencies"]]
        single_ms = [x * 1000 for x in single["latencies"]]
        unary_ms = [x * 1000 for x in unary["latencies"]]
        raw_ms = [x * 1000 for x in raw["latencies"]]
        result = {
            "events": n,  # per producer and round
            "unary_events": n_unary,
            "record_bytes": wire_size,
            "request_bytes": size,
            "gateway_stream_eps": round(stream["eps"], 1),
            "gateway_stream_single_eps": round(single["eps"], 1),
            "gateway_unary_eps": round(unary["eps"], 1),
            "raw_kafka_python_eps": round(raw["eps"], 1),
            "kafka_perf_test_eps": round(perf["eps"], 1),
            "ratio_stream_vs_raw": round(stream["eps"] / raw["eps"], 3) if raw["eps"] else None,
            "rounds": rounds,
            "gateway_stream_eps_rounds": stream["rounds_eps"],
            "gateway_stream_single_eps_rounds": single["rounds_eps"],
            "ratio_stream_single_vs_raw": round(single["eps"] / raw["eps"], 3) if raw["eps"] else None,
            "stream_batch_size": args.batch_size,
            "raw_kafka_python_eps_rounds": raw["rounds_eps"],
            "ratio_unary_vs_raw": round(unary["eps"] / raw["eps"], 3) if raw["eps"] else None,
            "ratio_raw_vs_perf_test": round(raw["eps"] / perf["eps"], 3) if perf["eps"] else None,
            "ack_p50_ms": round(_pct(lat_ms, 0.50), 2),
            "ack_p99_ms": round(_pct(lat_ms, 0.99), 2),
            "ack_mean_ms": round(statistics.fmean(lat_ms), 2) if lat_ms else None,
            "single_ack_p50_ms": round(_pct(single_ms, 0.50), 2),
            "single_ack_p99_ms": round(_pct(single_ms, 0.99), 2),
            "light_stream_eps": round(light["eps"], 1),
            "light_ack_p50_ms": round(_pct(light_ms, 0.50), 2),
            "light_ack_p99_ms": round(_pct(light_ms, 0.99), 2),
            "light_window": args.light_window,
            "unary_ack_p50_ms": round(_pct(unary_ms, 0.50), 2),
            "unary_ack_p99_ms": round(_pct(unary_ms, 0.99), 2),
            "raw_ack_p50_ms": round(_pct(raw_ms, 0.50), 2),
            "raw_ack_p99_ms": round(_pct(raw_ms, 0.99), 2),
            "perf_test": perf,
            "stream_window": args.window,
            "unary_concurrency": args.unary_concurrency,
            "acked_events": len(acked),
            "lost_events": lost,
            "duplicate_records": dups,
            "rejected_events": {"stream": stream["errors"], "stream_single": single["errors"], "unary": unary["errors"],
                                "light": light["errors"]},
            "load_avg_at_start": load_at_start,
            "target_ratio_stream_vs_raw": 0.5,
            "meets_target": bool(raw["eps"] and stream["eps"] / raw["eps"] >= 0.5 and lost == 0),
            "machine": describe(),
        }
        return result
    finally:
        if gw is not None:
            gw.kill()
            gw.wait(10)
        if stack is not None:
            stack.down()
