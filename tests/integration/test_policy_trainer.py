"""The DPO policy trainer against real Kafka, Redis and Ray: a version trained from the preference topic is
gated, published with kind policy and served by the scorer; a version the drift guard refuses is
recorded with its reason and never served; a kill -9 resumes with every record trained exactly once;
DDP on 2 Ray workers trains the same objective.

The policy is a tiny random Llama over SmolLM2's tokenizer (the unit tests' fixture), so each run
takes seconds; the embedded 135M policy trains the same way in ``bench train-dpo``.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from services.checkpoints import CheckpointStore
from services.registry import ModelRegistry
from tests.integration.test_trainer import (committed, kill_9_after_first_checkpoint, new_topic, produce,
                                            run_trainer_to_the_end, trained_ids, trainer_env)
from tests.unit.test_policy_lm import smollm_tokenizer_dir, tiny_base  # noqa: F401 (fixtures)
from tests.unit.test_trainer_dpo import records

pytestmark = pytest.mark.integration


def policy_config(tmp_path: Path, base: Path, name: str, topic: str, kafka: str, redis_url: str, **kw: object):
    from trainer.config import trainer_config

    values = dict(model_kind="policy", base_model=str(base), model_name=name, max_length=64, lr=5e-3,
                  warmup_steps=0, batch_size=4, beta=0.5, lora_rank=4, lora_alpha=8.0, ema_decay=0.0,
                  topic=topic, group_id=f"g-{name}", kafka_bootstrap=kafka, redis_url=redis_url,
                  checkpoint_url=str(tmp_path / "ckpt"), checkpoint_every_records=12, checkpoint_every_s=0,
                  max_batch_wait_s=0.2, idle_exit_s=60, guard_prompts=2, guard_max_new_tokens=8,
                  max_repetition_rate=1.0, max_empty_rate=1.0, eval_batch_size=8)
    values.update(kw)
    return trainer_config(**values)


def test_a_policy_trained_from_kafka_is_published_and_served(tmp_path: Path, tiny_base: Path, kafka_bootstrap: str,
                                                             redis_url: str, redis_client) -> None:
    from scorer.client import ScorerClient
    from scorer.config import load_scorer_config
    from scorer.domain import SamplingParams
    from scorer.server import Scorer
    from trainer.runtime import run_in_process

    topic = new_topic(kafka_bootstrap)
    name = f"dpo-{uuid.uuid4().hex[:6]}"
    train, held_out = records(24), records(4, start=100, split="test")
    produce(kafka_bootstrap, topic, train[:12] + held_out + train[12:])
    cfg = policy_config(tmp_path, tiny_base, name, topic, kafka_bootstrap, redis_url, max_records=24)
    summary = run_in_process(cfg)
    assert summary.records == 24 and summary.eval_records == 4 and summary.published, summary

    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    assert sorted(trained_ids(store, name)) == sorted(r.record_id for r in train)
    registry = ModelRegistry(redis_client)
    target = registry.target(name)
    assert target is not None and target.kind == "policy" and target.version == summary.published[-1]
    assert {"accuracy", "kl_to_ref", "empty_rate", "repetition_rate"} <= set(target.metrics)
    meta = store.read_metadata(store.get(name, target.version))
    assert meta["kind"] == "policy" and meta["eval"]["pairs"] == 4

    scorer_cfg = load_scorer_config(overrides={
        "port": 0, "reward_models": ["reward"], "policy_models": [name], "redis_url": redis_url, "discover_models": False,
        "max_new_tokens": 16, "default_new_tokens": 4,
    }, env={})

    async def serve_once() -> tuple[str, str, int]:
        scorer = Scorer(scorer_cfg)
        await scorer.start()
        try:
            client = ScorerClient(f"127.0.0.1:{scorer.handle.port}")
            res = await client.generate([{"role": "user", "content": "question 1"}], model=name,
                                        sampling=SamplingParams(temperature=0.0, max_tokens=4))
            return res.model.name, res.model.version, res.usage.completion_tokens
        finally:
            await scorer.stop(grace_s=1)

    served_name, served_version, tokens = asyncio.run(serve_once())
    assert (served_name, served_version) == (name, target.version) and tokens >= 1


def test_the_drift_guard_rejects_with_its_reason_and_nothing_is_served(tmp_path: Path, tiny_base: Path,
                                                                      kafka_bootstrap: str, redis_url: str,
                                                                      redis_client) -> None:
    from trainer.runtime import run_in_process

    topic = new_topic(kafka_bootstrap)
    name = f"dpo-kl-{uuid.uuid4().hex[:6]}"
    produce(kafka_bootstrap, topic, records(12) + records(4, start=100, split="test"))
    cfg = policy_config(tmp_path, tiny_base, name, topic, kafka_bootstrap, redis_url, max_records=12,
                        max_kl=1e-9)
    summary = run_in_process(cfg)
    assert summary.rejected and not summary.published
    registry = ModelRegistry(redis_client)
    assert registry.target(name) is None  # a rejected version never reaches serving
    (version,) = registry.versions(name, include_rejected=True)
    assert version.state == "rejected" and version.reason.startswith("drift guard: mean per-token KL")


def test_kill_9_of_the_policy_trainer_resumes_with_every_record_trained_once(
    tmp_path: Path, tiny_base: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    topic = new_topic(kafka_bootstrap)
    first, second = records(32), records(16, start=32)
    produce(kafka_bootstrap, topic, first)
    name = f"dpo-kill-{uuid.uuid4().hex[:6]}"
    ckpt = tmp_path / "ckpt"
    env = trainer_env(
        model_kind="policy", base_model=tiny_base, model_name=name, max_length=64, batch_size=4, lr="5e-3",
        lora_rank=4, topic=topic, group_id=f"g-{name}", kafka_bootstrap=kafka_bootstrap, redis_url=redis_url,
        checkpoint_url=ckpt, checkpoint_every_records=8, checkpoint_every_s=0, max_batch_wait_s=0.1,
        max_records=48, idle_exit_s=120, torch_threads=1, guard_prompts=0,
    )
    log_path = tmp_path / "trainer.log"
    store = CheckpointStore(ckpt)
    kill_9_after_first_checkpoint(env, log_path, store, name)
    before = trained_ids(store, name)
    assert 0 < len(before) < len(first), "the kill must land mid-stream"

    produce(kafka_bootstrap, topic, second)
    run_trainer_to_the_end(env, log_path)
    ids = trained_ids(store, name)
    assert len(ids) == len(set(ids)), "a record was trained on twice"
    assert sorted(ids) == sorted(r.record_id for r in first + second), "a record was skipped"
    metas = [store.read_metadata(r) for r in store.list(name)]
    assert metas[-1]["records_seen"] == 48 and all(m["kind"] == "policy" for m in metas)
    assert "resuming own checkpoint" in log_path.read_text()
    assert committed(kafka_bootstrap, topic, f"g-{name}") == {int(p): o for p, o in metas[-1]["offsets"].items()}


def test_ray_train_ddp_two_workers_trains_the_policy(tmp_path: Path, tiny_base: Path, kafka_bootstrap: str,
                                                     redis_url: str, ray_address: str) -> None:
    from trainer.ray_train import run_on_ray

    topic = new_topic(kafka_bootstrap)
    name = f"dpo-ray-{uuid.uuid4().hex[:6]}"
    train = records(16)
    produce(kafka_bootstrap, topic, train)
    cfg = policy_config(tmp_path, tiny_base, name, topic, kafka_bootstrap, redis_url, max_records=16,
                        num_workers=2, ray_address=ray_address, ray_storage_path=str(tmp_path / "ray"),
                        ray_max_failures=0, checkpoint_every_records=8, guard_prompts=0)
    summary = run_on_ray(cfg)
    assert summary["world_size"] == 2 and summary["records"] == 16, summary
    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    assert sorted(trained_ids(store, name)) == sorted(r.record_id for r in train)
    metas = [store.read_metadata(r) for r in store.list(name)]
    assert all(m["trainer"]["world_size"] == 2 and m["kind"] == "policy" for m in metas)
