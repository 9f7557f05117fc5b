"""The trainer against real Kafka, Redis and Ray: DDP on 2 Ray workers, a real kill -9 and resume with
every record trained exactly once, and the evaluation gate publishing and rejecting in the registry.

Each test gets its own preference topic (created like the stack's), model name and checkpoint store,
so other suites producing to ``prefstream.preferences`` on the shared stack cannot interfere.  Models
are tiny BERTs built from a config with the embedded MiniLM tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from services.config import replace as config_replace
from services.checkpoints import CheckpointStore
from services.registry import ModelRegistry
from services.reward_model import RewardModel
from services.schemas import ChatMessage, ModelUpdate, PreferenceRecord
from services.topics import MODEL_UPDATES, PREFERENCES, ensure_topics
from trainer.testing import tiny_reward_model

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GOOD = ["yes , here is a clear and helpful answer", "sure , this works well", "great question , the answer is simple"]
BAD = ["no", "i do not know", "go away"]


# --- helpers -------------------------------------------------------------------------------------


def tiny_model(folder: Path) -> str:
    return tiny_reward_model(folder)


def records(n: int, *, start: int = 0, split: str = "train", tag: str = "") -> list[PreferenceRecord]:
    rng = random.Random(start)
    return [
        PreferenceRecord(record_id=f"{tag}r{i}", prompt=(ChatMessage("user", f"question number {i}"),),
                         ranked_responses=(rng.choice(GOOD), rng.choice(BAD)), split=split,
                         source_acked_at=time.time())
        for i in range(start, start + n)
    ]


def new_topic(bootstrap: str) -> str:
    name = f"{PREFERENCES.name}.test-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [dataclasses.replace(PREFERENCES, name=name)])
    return name


def produce(bootstrap: str, topic: str, recs: list[PreferenceRecord]) -> None:
    from services.kafka import make_producer

    producer = make_producer(bootstrap)
    try:
        futures = [producer.send(topic, key=r.record_id.encode(), value=r.to_kafka()) for r in recs]
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close()


def trained_ids(store: CheckpointStore, name: str) -> list[str]:
    return [e["record_id"] for ref in store.list(name) for e in store.read_metadata(ref)["records"]]


def committed(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) or 0 for p in range(PREFERENCES.partitions)}
    finally:
        c.close()


def announcements(bootstrap: str, model_name: str) -> list[ModelUpdate]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tp = TopicPartition(MODEL_UPDATES.name, 0)
        c.assign([tp])
        c.seek_to_beginning(tp)
        end = c.end_offsets([tp])[tp]
        out = []
        while c.position(tp) < end:
            for msgs in c.poll(timeout_ms=2000).values():
                out += [ModelUpdate.from_kafka(m.value) for m in msgs]
        return [u for u in out if u.model_name == model_name]
    finally:
        c.close()


def dead_letters(bootstrap: str, source_topic: str) -> list:
    from kafka import KafkaConsumer, TopicPartition

    from prefstream.events.v1.events_pb2 import DeadLetter as DeadLetterProto
    from services.codec import decode_event
    from services.topics import DEAD_LETTER

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(DEAD_LETTER.name, p) for p in range(DEAD_LETTER.partitions)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = c.end_offsets(tps)
        out = []
        while any(c.position(tp) < ends[tp] for tp in tps):
            for msgs in c.poll(timeout_ms=2000).values():
                out += [decode_event(m.value, DeadLetterProto) for m in msgs]
        return [d for d in out if d.source_topic == source_topic]
    finally:
        c.close()


# --- Ray Train, DDP over 2 CPU workers -----------------------------------------------------------


def test_ray_train_ddp_two_workers_consumes_checkpoints_and_publishes(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str, ray_address: str
) -> None:
    from trainer.config import TrainerConfig, trainer_config
    from trainer.ray_train import run_on_ray

    topic = new_topic(kafka_bootstrap)
    train = records(24, tag="ray")
    held_out = records(4, start=100, split="test", tag="ray")
    produce(kafka_bootstrap, topic, train[:12] + held_out + train[12:])
    name = f"ray-{uuid.uuid4().hex[:6]}"
    cfg = trainer_config(
        base_model=tiny_model(tmp_path / "tiny"), model_name=name, max_length=64, lr=1e-3, warmup_steps=0,
        batch_size=4, replay_ratio=0.5, topic=topic, group_id=f"g-{name}", kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url, ray_address=ray_address, num_workers=2, checkpoint_url=str(tmp_path / "ckpt"),
        checkpoint_every_records=12, checkpoint_every_s=0, max_batch_wait_s=0.2, max_records=24,
        idle_exit_s=60, ray_storage_path=str(tmp_path / "ray"), ray_max_failures=0,
    )
    summary = run_on_ray(cfg)
    assert summary["world_size"] == 2 and summary["records"] == 24, summary
    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    refs = store.list(name)
    metas = [store.read_metadata(r) for r in refs]
    assert all(m["trainer"]["world_size"] == 2 for m in metas)
    ids = trained_ids(store, name)
    assert sorted(ids) == sorted(r.record_id for r in train)  # each TRAIN record exactly once
    assert metas[-1]["eval"]["pairs"] == 4 and metas[-1]["eval_topic_records"] == 4
    assert sum(int(v) for v in metas[-1]["offsets"].values()) == 28
    assert committed(kafka_bootstrap, topic, cfg.stream.group_id) == {int(p): o for p, o in metas[-1]["offsets"].items()}
    # weights moved away from the base model
    base = RewardModel.from_pretrained(cfg.model.base_model).hf_model.state_dict()
    final = RewardModel.from_pretrained(store.open(refs[-1])).hf_model.state_dict()
    assert any(not torch.equal(base[k], final[k]) for k in base)
    registry = ModelRegistry(__import__("redis").Redis.from_url(redis_url))
    versions = registry.versions(name, include_rejected=True)
    assert [v.version for v in versions] == [r.version for r in refs]
    assert registry.target(name) is not None
    assert {u.version for u in announcements(kafka_bootstrap, name)} == {r.version for r in refs}
    # every rank reported each checkpoint to Ray Train; the run's last metrics are the last checkpoint's
    reported = summary["ray_metrics"]
    assert reported["version"] == refs[-1].version and reported["records_seen"] == 24, reported
    assert reported["step"] == metas[-1]["step"] and 0.0 <= reported["eval_accuracy"] <= 1.0
    assert summary["ray_checkpoint"] == {"version": refs[-1].version, "uri": refs[-1].uri}  # Ray's pointer


# --- kill -9 and resume ---------------------------------------------------------------------------


def _start_trainer(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    full = {**os.environ, **env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "trainer"], cwd=REPO, env=full, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def trainer_env(**leaves: object) -> dict[str, str]:
    """``PREFSTREAM_TRAINER_<LEAF>`` variables for ``python -m trainer`` from flat config leaves."""
    from services.config import env_vars

    return env_vars("trainer", leaves)


def kill_9_after_first_checkpoint(env: dict[str, str], log_path: Path, store: CheckpointStore, name: str,
                                  timeout_s: float = 240) -> None:
    """Start ``python -m trainer`` with ``env`` and kill -9 it as soon as its first checkpoint is durable:
    no handler runs, no final checkpoint is written, nothing more is committed."""
    proc = _start_trainer(env, log_path)
    deadline = time.monotonic() + timeout_s
    try:
        while not store.list(name):
            assert proc.poll() is None, f"trainer exited early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint in time:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL


def run_trainer_to_the_end(env: dict[str, str], log_path: Path, timeout_s: float = 300) -> None:
    """Start ``python -m trainer`` with ``env`` and wait for it to stop by itself (max_records), cleanly."""
    proc = _start_trainer(env, log_path)
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log_path.read_text()[-3000:]


def kill_9_then_resume(tmp_path: Path, kafka_bootstrap: str, redis_url: str, checkpoint_url: str) -> tuple[str, CheckpointStore]:
    """A trainer killed -9 after its first durable checkpoint resumes from it and trains every record
    exactly once (this checkout's file store here; the object store in test_checkpoints_s3.py)."""
    topic = new_topic(kafka_bootstrap)
    first, second = records(40, tag="k"), records(20, start=40, tag="k")
    produce(kafka_bootstrap, topic, first)
    name = f"kill-{uuid.uuid4().hex[:6]}"
    env = trainer_env(
        base_model=tiny_model(tmp_path / "tiny"), model_name=name, max_length=64, batch_size=4, lr="1e-3",
        topic=topic, group_id=f"g-{name}", kafka_bootstrap=kafka_bootstrap, redis_url=redis_url,
        checkpoint_url=checkpoint_url, checkpoint_every_records=8, checkpoint_every_s=0, max_batch_wait_s=0.1,
        max_records=60, idle_exit_s=120, torch_threads=1,
    )
    log_path = tmp_path / "trainer.log"
    store = CheckpointStore(checkpoint_url)
    kill_9_after_first_checkpoint(env, log_path, store, name)
    before = trained_ids(store, name)
    assert 0 < len(before) < len(first), "the kill must land mid-stream"
    committed_before = committed(kafka_bootstrap, topic, f"g-{name}")
    assert sum(committed_before.values()) <= len(before)  # committed never runs ahead of durable checkpoints

    produce(kafka_bootstrap, topic, second)
    run_trainer_to_the_end(env, log_path, timeout_s=240)  # stops by itself at max_records=60
    ids = trained_ids(store, name)
    assert len(ids) == len(set(ids)), "a record was trained on twice"
    assert sorted(ids) == sorted(r.record_id for r in first + second), "a record was skipped"
    metas = [store.read_metadata(r) for r in store.list(name)]
    assert metas[-1]["records_seen"] == 60
    assert "resuming own checkpoint" in log_path.read_text()
    final_offsets = {int(p): o for p, o in metas[-1]["offsets"].items()}
    assert committed(kafka_bootstrap, topic, f"g-{name}") == final_offsets
    registry = ModelRegistry(__import__("redis").Redis.from_url(redis_url))
    assert registry.target(name).version == store.list(name)[-1].version
    return name, store


def test_kill_9_mid_stream_then_resume_trains_every_record_exactly_once(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    kill_9_then_resume(tmp_path, kafka_bootstrap, redis_url, str(tmp_path / "ckpt"))


# --- the evaluation gate -------------------------------------------------------------------------


def test_gate_rejects_a_worse_checkpoint_with_its_reason_and_publishes_a_better_one(
    tmp_path: Path, redis_client, kafka_bootstrap: str
) -> None:
    from trainer.checkpointing import LineageState, find_resume_point
    from trainer.runtime import build_learner
    from trainer.config import TrainerConfig, trainer_config
    from trainer.learner import Learner
    from trainer.evaluation import EvalSet, evaluate
    from services.announce import KafkaAnnouncer
    from trainer.gate import Gate
    from trainer.objectives import objective_for
    from trainer.loop import ContinualTrainer
    from trainer.replay import ReservoirBuffer
    from trainer.stream import ListSource

    name = f"gate-{uuid.uuid4().hex[:6]}"
    cfg = trainer_config(base_model=tiny_model(tmp_path / "tiny"), model_name=name, max_length=64, lr=3e-3,
                        warmup_steps=0, batch_size=4, checkpoint_url=str(tmp_path / "ckpt"),
                        checkpoint_every_records=16, checkpoint_every_s=0, max_batch_wait_s=0, poll_timeout_s=0.01,
                        gate_tolerance=0.05, eval_max_records=8)
    from services.kafka import make_producer

    producer = make_producer(kafka_bootstrap)
    registry = ModelRegistry(redis_client, announcer=KafkaAnnouncer(producer, MODEL_UPDATES.name))
    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    eval_set = EvalSet(8, records(8, start=500, split="test", tag="g"))

    def run(max_records: int, lr: float, source_start: int) -> ContinualTrainer:
        c = config_replace(cfg, max_records=max_records, lr=lr)
        point = find_resume_point(c, store, registry)
        learner = build_learner(c, point)
        loop = ContinualTrainer(
            c, learner, ListSource(records(64, tag="g"), start_offset=source_start),
            lineage=LineageState(step=point.step, records_seen=point.records_seen, base_model=point.base_model),
            replay=ReservoirBuffer(0), eval_set=eval_set, store=store, gate=Gate(c, registry, eval_set, objective_for(c)))
        loop.run()
        return loop

    good = run(16, 3e-3, 0)  # learns GOOD > BAD: first version, published
    v1 = good.summary.published[0]
    acc1 = store.read_metadata(store.get(name, v1))["eval"]["accuracy"]
    assert acc1 >= 0.75 and registry.target(name).version == v1

    # a poisoned update: 48 records with the ranking reversed (the good run learned from 16), one
    # checkpoint; a huge learning rate for a few steps instead made a candidate that depended on the seed
    flipped = [dataclasses.replace(r, ranked_responses=r.ranked_responses[::-1]) for r in records(64, tag="g")]
    c = config_replace(cfg, max_records=64, checkpoint_every_records=48)
    point = find_resume_point(c, store, registry)
    learner = build_learner(c, point)
    bad = ContinualTrainer(
        c, learner, ListSource(flipped, start_offset=16),
        lineage=LineageState(step=point.step, records_seen=point.records_seen, base_model=point.base_model),
        replay=ReservoirBuffer(0), eval_set=eval_set, store=store, gate=Gate(c, registry, eval_set, objective_for(c)))
    bad.run()
    assert bad.summary.rejected, bad.summary
    v2 = bad.summary.rejected[-1]
    rejected = registry.get(name, v2)
    assert rejected.state == "rejected"
    assert f"below the served version {v1}" in rejected.reason and "gate_tolerance is 0.05" in rejected.reason
    # paired against v1's per-pair outcomes, read from v1's own metadata
    assert "gate_confidence 0.9" in rejected.reason and "unpaired" not in rejected.reason
    assert len(store.read_metadata(store.get(name, v1))["eval"]["outcomes"]) == 8
    assert registry.target(name).version == v1  # the served model did not change
    actions = {(u.version, u.action) for u in announcements(kafka_bootstrap, name)}
    assert (v1, "published") in actions and (v2, "rejected") in actions

    # the served accuracy is recomputed from the served checkpoint when the eval set changes
    bigger = EvalSet(12, records(12, start=500, split="test", tag="g"))
    gate = Gate(cfg, registry, bigger, objective_for(cfg))
    target, served = gate.served()
    expected = evaluate(RewardModel.from_pretrained(store.open(store.get(name, v1))), bigger.records)
    assert target.version == v1 and served.accuracy == pytest.approx(expected.accuracy)
    assert served.pairs == 12 and served.outcomes == expected.outcomes
    producer.close()


# --- offline publish, then a continual trainer warm-starts from it ----------------------------------


def test_offline_publish_then_continual_training_warm_starts_from_it(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str, capsys
) -> None:
    from prefstream.cli import main
    from trainer.config import TrainerConfig, trainer_config
    from trainer.runtime import run_in_process

    name = f"warm-{uuid.uuid4().hex[:6]}"
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": f"question number {i}"},
                     {"role": "assistant", "content": GOOD[i % 3]}],
        "rejected_message": {"role": "assistant", "content": BAD[i % 3]}}) + "\n" for i in range(8)))
    ckpt = tmp_path / "ckpt"
    rc = main(["--log-level", "WARNING", "train", "reward", "--data", str(data), "--out", str(tmp_path / "out"),
               "--base-model", tiny_model(tmp_path / "tiny"), "--max-length", "64", "--batch-size", "4",
               "--lr", "1e-3", "--publish", "--model-name", name, "--checkpoint-url", str(ckpt),
               "--redis-url", redis_url, "--kafka-bootstrap", kafka_bootstrap, "--eval-data", str(data), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["published_version"] == "v000001" and summary["verdict"].startswith("published: first version")
    registry = ModelRegistry(__import__("redis").Redis.from_url(redis_url))
    assert registry.target(name).version == "v000001"

    topic = new_topic(kafka_bootstrap)
    produce(kafka_bootstrap, topic, records(4, tag="w"))
    from services.kafka import make_producer

    raw = make_producer(kafka_bootstrap)
    raw.send(topic, key=b"junk", value=b'{"record_id": "x", "ranked_responses": ["only one"]}').get(timeout=30)
    raw.close()
    produce(kafka_bootstrap, topic, records(4, start=4, tag="w"))
    cfg = trainer_config(model_name=name, max_length=64, batch_size=4, topic=topic, group_id=f"g-{name}",
                        kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, checkpoint_url=str(ckpt),
                        checkpoint_every_records=8, max_records=8, idle_exit_s=60, eval_data=str(data))
    run_in_process(cfg)
    store = CheckpointStore(ckpt)
    meta = store.read_metadata(store.get(name, "v000002"))
    assert meta["parent"] == {"source": "published", "version": "v000001", "uri": store.get(name, "v000001").uri}
    assert meta["records_count"] == 8 and sum(meta["offsets"].values()) == 9  # the bad record is skipped
    letters = dead_letters(kafka_bootstrap, topic)
    assert len(letters) == 1 and letters[0].field == "ranked_responses" and "at least 2" in letters[0].reason
    # warm-started weights: before any update the continual model scored like the published one
    assert registry.get(name, "v000002").metrics["served_accuracy"] == pytest.approx(
        store.read_metadata(store.get(name, "v000001"))["eval"]["accuracy"])
