"""The shared step (Learner), the continual loop over an in-memory source, checkpoints and the gate rule.

Models are tiny BERTs built from a config with the embedded MiniLM tokenizer: a few hundred KB of
weights, milliseconds per step.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from services.config import replace as config_replace
from services.checkpoints import CheckpointStore
from services.reward_model import RewardModel
from services.schemas import ChatMessage, PreferenceRecord
from trainer.checkpointing import LineageState, find_resume_point
from trainer.runtime import build_learner
from trainer.config import TrainerConfig, trainer_config
from trainer.learner import Learner, shard
from trainer.evaluation import EvalSet, evaluate, fingerprint
from trainer.gate import decide
from trainer.loop import ContinualTrainer
from trainer.replay import ReservoirBuffer
from trainer.stream import ListSource
from trainer.testing import tiny_reward_model

GOOD = ["yes , here is a clear and helpful answer", "sure , this works well", "great question , the answer is simple"]
BAD = ["no", "i do not know", "go away"]


def tiny_model(tmp_path, attributes: tuple[str, ...] = ()) -> str:
    return tiny_reward_model(tmp_path / "tiny", attributes)


def make_records(n: int, k: int = 2, seed: int = 0, split: str = "train", start: int = 0) -> list[PreferenceRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        responses = [rng.choice(GOOD)] + [rng.choice(BAD) + " " * j for j in range(k - 1)]
        out.append(PreferenceRecord(record_id=f"r{i}", prompt=(ChatMessage("user", f"question number {i}"),),
                                    ranked_responses=tuple(responses), split=split, source_acked_at=1000.0 + i))
    return out


def config(tmp_path, base: str, **kw) -> TrainerConfig:
    values = dict(base_model=base, max_length=64, lr=3e-3, warmup_steps=0, batch_size=4, replay_ratio=0.5,
                  checkpoint_url=str(tmp_path / "ckpt"), checkpoint_every_records=8, checkpoint_every_s=0,
                  max_batch_wait_s=0, poll_timeout_s=0.01, publish=False, eval_max_records=16)
    values.update(kw)
    return trainer_config(**values)


def test_tiny_model_trains_params_change_and_loss_falls(tmp_path) -> None:
    cfg = config(tmp_path, tiny_model(tmp_path))
    learner = Learner.of(RewardModel.from_pretrained(cfg.model.base_model), cfg)
    before = [p.detach().clone() for p in learner.model.hf_model.parameters()]
    records = make_records(8, k=3)
    losses = [learner.train(records).loss for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0]
    changed = sum(not torch.equal(a, b) for a, b in zip(before, learner.model.hf_model.parameters()))
    assert changed == len(before)
    assert learner.step == 25


def test_kwise_encodes_each_response_once_and_pairwise_expands(tmp_path) -> None:
    base = tiny_model(tmp_path)
    records = make_records(3, k=4)
    kwise = Learner.of(RewardModel.from_pretrained(base), config(tmp_path, base, loss="kwise"))
    pairwise = Learner.of(RewardModel.from_pretrained(base), config(tmp_path, base, loss="pairwise"))
    assert kwise.prepare(records).sequences == 3 * 4
    assert pairwise.prepare(records).sequences == 3 * 4 * 3  # 6 pairs of 2 per ranking
    assert kwise.train(records).sequences == 12


def test_attribute_heads_train_on_scores(tmp_path) -> None:
    attrs = ("helpfulness", "verbosity")
    base = tiny_model(tmp_path, attributes=attrs)
    cfg = config(tmp_path, base, attributes=attrs)
    learner = Learner.of(RewardModel.from_pretrained(base), cfg)
    recs = [PreferenceRecord(record_id=f"s{i}", prompt=(ChatMessage("user", "q"),), ranked_responses=(GOOD[0], BAD[0]),
                             response_attributes=({"helpfulness": 4.0, "verbosity": 2.0}, {"helpfulness": 0.0}))
            for i in range(4)]
    first = learner.train(recs)
    for _ in range(20):
        last = learner.train(recs)
    assert first.parts["attribute_loss"] > 0 and last.parts["attribute_loss"] < 0.5 * first.parts["attribute_loss"]


def test_shard_scales_make_the_ddp_average_exact() -> None:
    recs = make_records(5)
    parts = [shard(recs, r, 2) for r in range(2)]
    assert [len(p[0]) for p in parts] == [3, 2]
    assert [p[1] for p in parts] == [None, None]
    # DDP averages: (s0 * mean0 + s1 * mean1) / 2 must equal the mean over all 5 records
    assert [p[2] for p in parts] == [pytest.approx(2 * 3 / 5), pytest.approx(2 * 2 / 5)]
    lonely, weights, scale = shard(recs[:1], 1, 2)
    assert lonely == recs[:1] and weights is None and scale == 0.0
    with pytest.raises(ValueError):
        shard([], 0, 2)


def test_weighted_shards_average_to_the_weighted_mean() -> None:
    recs = make_records(5)
    weights = [1.0, 1.0, 1.0, 0.25, 0.25]
    losses = {r.record_id: float(i + 1) for i, r in enumerate(recs)}  # a per-record loss to average
    whole = sum(w * losses[r.record_id] for r, w in zip(recs, weights)) / sum(weights)
    ddp = 0.0
    for rank in range(2):
        mine, mine_w, scale = shard(recs, rank, 2, weights)
        rank_loss = sum(w * losses[r.record_id] for r, w in zip(mine, mine_w)) / sum(mine_w)
        ddp += scale * rank_loss / 2
    assert ddp == pytest.approx(whole, abs=1e-12)
    lonely, lonely_w, scale = shard(recs[:1], 1, 2, [0.5])
    assert lonely == recs[:1] and lonely_w == [1.0] and scale == 0.0


def test_zero_weight_records_leave_the_step_unchanged(tmp_path) -> None:
    base = tiny_model(tmp_path)
    cfg = config(tmp_path, base, disable_dropout=True)
    recs = make_records(4)

    def first_step(records, weights=None):
        torch.manual_seed(0)
        learner = Learner.of(RewardModel.from_pretrained(base), cfg)
        stats = learner.train(records, weights)
        return stats.loss, [p.detach().clone() for p in learner.model.hf_model.parameters()]

    loss_alone, params_alone = first_step(recs[:2])
    loss_mixed, params_mixed = first_step(recs, [1.0, 1.0, 0.0, 0.0])
    assert loss_mixed == pytest.approx(loss_alone, abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(params_alone, params_mixed))


def test_gate_rule() -> None:
    from trainer.evaluation import EvalResult

    cand = EvalResult(accuracy=0.60, pairs=100, records=100, mean_margin=0.1, fingerprint="f")
    ok = decide(cand, "v000001", 0.61, tolerance=0.02, publish_without_eval=True)
    assert ok.publish
    bad = decide(cand, "v000001", 0.63, tolerance=0.02, publish_without_eval=True)
    assert not bad.publish and "0.0300 below the served version v000001" in bad.reason
    assert decide(cand, "", None, tolerance=0.0, publish_without_eval=False).publish  # first version
    assert decide(None, "v1", 0.7, tolerance=0.0, publish_without_eval=True).publish
    held = decide(None, "v1", 0.7, tolerance=0.0, publish_without_eval=False)
    assert not held.publish and "no evaluation records" in held.reason
    # ties on accuracy with zero tolerance pass
    assert decide(cand, "v1", 0.60, tolerance=0.0, publish_without_eval=True).publish


def test_evaluate_counts_all_pairs_and_ties_as_wrong(tmp_path) -> None:
    model = RewardModel.from_pretrained(tiny_model(tmp_path))
    same = PreferenceRecord(record_id="t", prompt=(ChatMessage("user", "q"),), ranked_responses=("same", "same", "same"))
    result = evaluate(model, [same], batch_size=2)
    assert result.pairs == 3 and result.accuracy == 0.0 and result.mean_margin == pytest.approx(0.0, abs=1e-6)
    assert result.fingerprint == fingerprint([same])
    assert evaluate(model, []).pairs == 0


def test_eval_set_caps_and_fingerprints() -> None:
    file_recs = make_records(10, split="test")
    es = EvalSet(12, file_recs, seed=0)
    fp0 = es.fingerprint
    assert len(es) == 10
    assert es.offer(make_records(1, split="test", start=50)[0]) and es.fingerprint != fp0
    assert not es.offer(make_records(1, split="test", start=50)[0])  # duplicate id
    es.offer(make_records(1, split="test", start=51)[0])
    assert not es.offer(make_records(1, split="test", start=52)[0])  # full
    assert len(EvalSet(4, file_recs).records) == 4


def _loop(cfg, source, point=None):
    point = point or find_resume_point(cfg, CheckpointStore(cfg.checkpoint.checkpoint_url))
    learner = build_learner(cfg, point)
    replay: ReservoirBuffer = ReservoirBuffer(cfg.stream.replay_capacity, seed=1)
    replay.restore(point.replay_records, point.replay_seen, point.replay_counts)
    es = EvalSet(cfg.gate.eval_max_records)
    es.restore_topic_records(point.eval_topic_records)
    lineage = LineageState(step=point.step, records_seen=point.records_seen, parent=point.parent,
                           previous_version=point.version, base_model=point.base_model)
    return ContinualTrainer(cfg, learner, source, lineage=lineage, replay=replay, eval_set=es,
                            store=CheckpointStore(cfg.checkpoint.checkpoint_url), recent_ids=point.recent_record_ids)


def test_loop_checkpoints_every_record_once_and_resumes_at_the_offsets(tmp_path) -> None:
    base = tiny_model(tmp_path)
    stream = make_records(20)
    tests = make_records(4, split="test", start=100)
    stream = stream[:6] + tests[:2] + stream[6:14] + tests[2:] + stream[14:]  # 24 items, TEST ones interleaved
    cfg = config(tmp_path, base, max_records=12)
    first = _loop(cfg, ListSource(stream))
    summary = first.run()
    assert summary.records == 12 and summary.eval_records == 2
    assert summary.replayed > 0  # replay mixes past records into later batches
    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    metas = [store.read_metadata(r) for r in store.list(cfg.model.model_name)]
    assert [m["records_count"] for m in metas] == [8, 4]  # steps of 4 TRAIN records (TEST ones do not count)
    assert metas[-1]["offsets"] == {"0": 14}  # 12 train + 2 test records consumed
    assert metas[-1]["eval_topic_records"] == 2 and metas[-1]["eval"]["pairs"] == 2

    # restart: the resume point is our own last checkpoint; the source starts at its offsets
    point = find_resume_point(dataclass_replace(cfg, max_records=20), store)
    assert point.source == "checkpoint" and point.offsets == {0: 14} and point.records_seen == 12
    assert len(point.eval_topic_records) == 2 and point.replay_records
    cfg2 = dataclass_replace(cfg, max_records=20)
    second = _loop(cfg2, ListSource(stream, start_offset=point.offsets[0]), point)
    second.run()
    metas = [store.read_metadata(r) for r in store.list(cfg.model.model_name)]
    trained = [e["record_id"] for m in metas for e in m["records"]]
    assert sorted(trained) == sorted(r.record_id for r in stream if r.split == "train")
    assert len(trained) == len(set(trained)) == 20  # each TRAIN record in exactly one checkpoint
    assert not set(trained) & {t.record_id for t in tests}  # TEST records are evaluated, never trained on
    assert metas[-1]["step"] > metas[1]["step"] and metas[-1]["eval_topic_records"] == 4
    assert metas[-1]["max_source_acked_at"] == max(e["source_acked_at"] for e in metas[-1]["records"])


def test_checkpoint_loads_with_plain_transformers_and_pipeline(tmp_path) -> None:
    cfg = config(tmp_path, tiny_model(tmp_path), max_records=8)
    _loop(cfg, ListSource(make_records(8))).run()
    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    path = store.open(store.latest(cfg.model.model_name))
    hf = AutoModelForSequenceClassification.from_pretrained(path)
    assert hf.config.num_labels == 1 and hf.config.id2label[0] == "reward"
    tok = AutoTokenizer.from_pretrained(path)
    pipe = pipeline("text-classification", model=hf, tokenizer=tok, function_to_apply="none")
    out = pipe({"text": "User: question number 1", "text_pair": GOOD[0]})
    ours = RewardModel.from_pretrained(path).score([[ChatMessage("user", "question number 1")]], [GOOD[0]])[0]
    assert out["score"] == pytest.approx(ours.reward, abs=1e-4)
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["records_count"] == 8 and meta["loss"]["loss"] == "kwise"


def dataclass_replace(cfg: TrainerConfig, **kw) -> TrainerConfig:
    import dataclasses

    return config_replace(cfg, **kw)


def test_old_checkpoints_are_garbage_collected(tmp_path) -> None:
    cfg = config(tmp_path, tiny_model(tmp_path), max_records=24, checkpoint_every_records=4, keep_checkpoints=2)
    summary = _loop(cfg, ListSource(make_records(24))).run()
    assert len(summary.checkpoints) == 6
    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    assert [r.version for r in store.list(cfg.model.model_name)] == summary.checkpoints[-2:]


def test_replayed_records_reach_the_step_with_replay_weight(tmp_path) -> None:
    cfg = config(tmp_path, tiny_model(tmp_path), max_records=12, checkpoint_every_records=0, checkpoint_every_s=3600,
                 replay_ratio=0.5, replay_weight=0.25)
    loop = _loop(cfg, ListSource(make_records(12)))
    real, seen = loop.stepper.train, []

    def spy(records, weights, **kw):
        seen.append((len(records), weights))
        return real(records, weights, **kw)

    loop.stepper.train = spy
    loop.run()
    assert seen[0] == (4, None)  # nothing to replay yet: all new, equal weights
    for n, weights in seen[1:]:
        assert n == 6 and weights == [1.0] * 4 + [0.25] * 2  # 4 new, round(4 x 0.5) replayed


def test_a_failed_step_checkpoints_nothing_and_the_resume_trains_its_records(tmp_path) -> None:
    cfg = config(tmp_path, tiny_model(tmp_path), max_records=16, checkpoint_every_records=4)
    stream = make_records(16)
    loop = _loop(cfg, ListSource(stream))
    real, calls = loop.stepper.train, []

    def flaky(records, weights, **kw):
        calls.append(len(records))
        if len(calls) == 3:
            raise RuntimeError("worker lost")
        return real(records, weights, **kw)

    loop.stepper.train = flaky
    with pytest.raises(RuntimeError, match="worker lost"):
        loop.run()
    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    ids = [e["record_id"] for ref in store.list(cfg.model.model_name) for e in store.read_metadata(ref)["records"]]
    assert ids == [r.record_id for r in stream[:8]]  # the 4 records of the failed step are not claimed
    point = find_resume_point(cfg, store)
    _loop(cfg, ListSource(stream, start_offset=point.offsets[0]), point).run()
    ids = [e["record_id"] for ref in store.list(cfg.model.model_name) for e in store.read_metadata(ref)["records"]]
    assert ids == [r.record_id for r in stream]


def test_streaming_without_replay_reproduces_offline_training_exactly(tmp_path) -> None:
    from trainer.offline import batches, train_offline

    base = tiny_model(tmp_path)
    cfg = config(tmp_path, base, replay_ratio=0.0, publish=False, max_records=12)
    records = make_records(12, k=3)
    torch.manual_seed(0)
    offline, _ = train_offline(cfg, records, learner=Learner.of(RewardModel.from_pretrained(base), cfg))
    stream = [r for b in batches(records, cfg.optim.batch_size, cfg.optim.seed) for r in b]  # the offline order
    loop = _loop(cfg, ListSource(stream))
    loop.store = None  # no checkpoints: pure training path
    loop.run()
    for a, b in zip(offline.model.hf_model.parameters(), loop.learner.model.hf_model.parameters()):
        assert torch.equal(a, b)


class ChunkedSource(ListSource):
    """A ListSource whose polls return at most ``sizes[i]`` records (cycling): arrivals in ragged bursts."""

    def __init__(self, records, sizes, **kw) -> None:
        super().__init__(records, **kw)
        self._sizes, self._polls = list(sizes), 0

    def poll(self, max_records: int, timeout_s: float):
        size = self._sizes[self._polls % len(self._sizes)]
        self._polls += 1
        return super().poll(min(max_records, size), timeout_s)


def test_a_step_accumulated_over_micro_batches_equals_the_step_on_all_of_them(tmp_path) -> None:
    base = tiny_model(tmp_path)
    cfg = config(tmp_path, base, max_grad_norm=0.5, autocast="none")  # fp32: other paddings, same sums
    records = make_records(6, k=3)
    whole = Learner.of(RewardModel.from_pretrained(base), cfg)
    whole.train(records, apply=False)
    parts = Learner.of(RewardModel.from_pretrained(base), cfg)
    first = parts.train(records[:1], share=1 / 6, apply=False)
    assert not first.applied and parts.accumulating and parts.step == 0
    parts.train(records[1:4], share=3 / 6, apply=False)
    parts.train(records[4:], share=2 / 6, apply=False)
    for a, b in zip(whole.model.hf_model.parameters(), parts.model.hf_model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)  # the gradient of the mean over all 6
    assert parts.apply() == cfg.optim.lr and not parts.accumulating and parts.step == 1
    with pytest.raises(RuntimeError, match="no accumulated gradient"):
        parts.apply()


def test_arrival_timing_does_not_change_what_the_loop_learns(tmp_path) -> None:
    """Records arriving 1, 3, 2 ... at a time train the same model as offline batches of 4."""
    from trainer.offline import batches, train_offline

    base = tiny_model(tmp_path)
    cfg = config(tmp_path, base, replay_ratio=0.0, publish=False, max_records=24, checkpoint_every_records=1,
                 autocast="none")
    records = make_records(24, k=3)
    torch.manual_seed(0)
    offline, _ = train_offline(cfg, records, learner=Learner.of(RewardModel.from_pretrained(base), cfg))
    stream = [r for b in batches(records, cfg.optim.batch_size, cfg.optim.seed) for r in b]
    loop = _loop(cfg, ChunkedSource(stream, [1, 3, 2, 1, 1, 4, 3]))
    summary = loop.run()
    assert summary.steps == 6 and loop.learner.step == 6
    # Same steps on the same gradients, to float rounding.  Adam turns rounding noise on a gradient that is
    # exactly 0 into a step of ±lr (the reward head's bias: a ranking loss sees only reward differences), so
    # the models are compared by the reward differences they compute.
    batch = offline.model.encode([r.prompt for r in records], [r.ranked_responses[0] for r in records])
    with torch.inference_mode():
        a, b = offline.model(batch).rewards, loop.learner.model(batch).rewards
    assert torch.allclose(a - a.mean(), b - b.mean(), atol=1e-4)
    # a checkpoint holds whole steps: never a record whose gradient still waited for its step
    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    metas = [store.read_metadata(r) for r in store.list(cfg.model.model_name)]
    assert [m["records_seen"] for m in metas] == [4 * m["step"] for m in metas] and metas[-1]["step"] == 6
    assert [m["offsets"]["0"] for m in metas] == [m["records_seen"] for m in metas]


def test_a_slow_stream_steps_with_what_arrived_after_max_step_wait_s(tmp_path) -> None:
    ticks = iter(range(0, 10_000, 10))  # every clock reading is 10 s after the previous one
    cfg = config(tmp_path, tiny_model(tmp_path), replay_ratio=0.0, max_records=6, max_step_wait_s=5)
    loop = _loop(cfg, ChunkedSource(make_records(6), [1]))
    loop.clock = lambda: float(next(ticks))
    summary = loop.run()
    assert summary.records == 6 and summary.steps == 6  # one partial step per record, none lost
    no_accumulation = _loop(config(tmp_path / "b", tiny_model(tmp_path), replay_ratio=0.0, max_records=6,
                                   max_step_wait_s=0), ChunkedSource(make_records(6), [1]))
    assert no_accumulation.run().steps == 6


def test_the_loop_reports_each_checkpoint(tmp_path) -> None:
    cfg = config(tmp_path, tiny_model(tmp_path), max_records=16, checkpoint_every_records=8)
    reports: list[dict] = []
    loop = _loop(cfg, ListSource(make_records(16)))
    loop.report = reports.append
    summary = loop.run()
    assert [r["version"] for r in reports] == summary.checkpoints
    assert [r["records_seen"] for r in reports] == [8, 16] and all(r["step"] for r in reports)


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path) -> None:
    cfg = config(tmp_path, tiny_model(tmp_path), autocast="bf16")
    learner = Learner.of(RewardModel.from_pretrained(cfg.model.base_model), cfg)
    assert learner.autocast
    records = make_records(8, k=3)
    losses = [learner.train(records).loss for _ in range(25)]
    assert all(p.dtype == torch.float32 for p in learner.model.hf_model.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_cpu_bf16_training_uses_eager_attention_and_checkpoints_stay_default(tmp_path) -> None:
    """Eager attention is the same math as sdpa (same scores before training), and a saved model loads
    with the reader's default attention."""
    base = tiny_model(tmp_path)
    stock = RewardModel.from_pretrained(base)
    assert stock.hf_model.config._attn_implementation == "sdpa"
    fp32 = config(tmp_path, base, autocast="none")
    assert Learner.of(RewardModel.from_pretrained(base), fp32).model.hf_model.config._attn_implementation == "sdpa"
    learner = Learner.of(RewardModel.from_pretrained(base), config(tmp_path, base, autocast="bf16"))
    assert learner.model.hf_model.config._attn_implementation == "eager"
    batch = stock.encode([[ChatMessage("user", "hi there")]] * 2, ["a short answer", "a much longer answer than that"])
    with torch.inference_mode():
        assert torch.allclose(learner.model(batch).rewards, stock(batch).rewards, atol=1e-5)
    learner.train(make_records(4))
    learner.model.save(tmp_path / "saved")
    assert RewardModel.from_pretrained(str(tmp_path / "saved")).hf_model.config._attn_implementation == "sdpa"


def test_autocast_setting_is_validated(tmp_path) -> None:
    from services.config import ConfigError

    with pytest.raises(ConfigError, match="autocast"):
        config(tmp_path, "x", autocast="fp8").validate()


def test_a_full_checkpoint_store_pauses_training_and_nothing_is_lost_or_trained_twice(tmp_path, monkeypatch) -> None:
    import trainer.loop as loop_module
    from trainer import metrics

    monkeypatch.setattr(loop_module, "FULL_STORE_FIRST_RETRY_S", 0.01)
    cfg = config(tmp_path, tiny_model(tmp_path), max_records=12, checkpoint_every_records=4)
    stream = make_records(12)
    loop = _loop(cfg, ListSource(stream))
    real, refusals = loop.store.write, []

    def full_twice(name, version, writer, metadata):
        if len(refusals) < 2 and version == "v000002":
            refusals.append(version)
            # what safetensors raises on a full disk, word for word (it carries no errno)
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(name, version, writer, metadata)

    monkeypatch.setattr(loop.store, "write", full_twice)
    before = metrics.CHECKPOINT_STORE_FULL._value.get()
    summary = loop.run()
    assert refusals == ["v000002", "v000002"] and metrics.CHECKPOINT_STORE_FULL._value.get() == before + 2
    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    assert [r.version for r in store.list(cfg.model.model_name)] == summary.checkpoints == ["v000001", "v000002", "v000003"]
    ids = [e["record_id"] for ref in store.list(cfg.model.model_name) for e in store.read_metadata(ref)["records"]]
    assert ids == [r.record_id for r in stream]  # the paused checkpoint was written once, later, complete


def test_other_write_errors_are_not_taken_for_a_full_store(tmp_path, monkeypatch) -> None:
    from services.checkpoints import is_store_full

    assert is_store_full(OSError(28, "No space left on device"))
    assert is_store_full(Exception("Error while serializing: I/O error: Disk quota exceeded (os error 122)"))
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise RuntimeError("saving failed") from e
    except RuntimeError as wrapped:
        assert is_store_full(wrapped)
    assert not is_store_full(PermissionError(13, "Permission denied"))
    assert not is_store_full(RuntimeError("worker lost"))
    cfg = config(tmp_path, tiny_model(tmp_path), max_records=8, checkpoint_every_records=4)
    loop = _loop(cfg, ListSource(make_records(8)))
    monkeypatch.setattr(loop.store, "write", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(PermissionError):
        loop.run()


def test_recent_ids_keep_the_newest_in_order() -> None:
    from trainer.stream import RecentIds

    ids = RecentIds(3, ["a", "b"])
    ids.add("c")
    ids.add("a")  # seen again: now the newest
    ids.add("d")  # b, the oldest, is forgotten
    assert "b" not in ids and all(x in ids for x in "acd") and len(ids) == 3
    off = RecentIds(0, ["a"])
    assert "a" not in off and len(off) == 0


def test_a_record_delivered_twice_is_trained_once_across_a_restart(tmp_path) -> None:
    """The processor delivers at least once with deterministic ids: a replayed batch (after Redis lost
    its newest writes) reaches the topic again under new offsets, before and after a trainer restart."""
    cfg = config(tmp_path, tiny_model(tmp_path), max_records=8, checkpoint_every_records=4)
    recs = make_records(12)
    stream = recs[:6] + recs[2:4] + recs[6:8] + recs[4:8] + recs[8:]  # 2 repeats before the restart, 4 after
    first = _loop(cfg, ListSource(stream))
    summary = first.run()
    assert summary.records == 8 and summary.duplicates == 2
    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    point = find_resume_point(dataclass_replace(cfg, max_records=12), store)
    assert point.recent_record_ids == tuple(r.record_id for r in recs[:8])  # restored from the checkpoints, in order
    second = _loop(dataclass_replace(cfg, max_records=12), ListSource(stream, start_offset=point.offsets[0]), point)
    assert second.run().duplicates == 4
    ids = [e["record_id"] for ref in store.list(cfg.model.model_name) for e in store.read_metadata(ref)["records"]]
    assert ids == [r.record_id for r in recs]  # each exactly once, in stream order


def test_evaluation_under_a_progress_bar_scores_in_chunks_with_the_same_result(capsys) -> None:
    from trainer.evaluation import PROGRESS_CHUNK, pairwise_result, progress_bar

    records = make_records(100, k=2)
    calls: list[int] = []

    def score(prompts, responses, ends):
        calls.append(len(responses))
        return [float(len(r)) for r in responses]  # the longer GOOD answers win

    plain = pairwise_result(records, score)
    assert calls == [200]
    calls.clear()
    with progress_bar("eval test"):
        shown = pairwise_result(records, score)
    assert calls == [PROGRESS_CHUNK] * 3 + [200 - 3 * PROGRESS_CHUNK]
    assert shown == plain and plain.accuracy > 0.5
    assert "eval test" in capsys.readouterr().err
