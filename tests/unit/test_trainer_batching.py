"""trainer.batching, trainer.replay and trainer.schedule: flattening, buckets, regrouping, reservoir, LR."""

from __future__ import annotations

import math
import dataclasses
from collections import Counter

import pytest
import torch

from services.schemas import ChatMessage, PreferenceRecord
from trainer.batching import (attribute_targets, collate, expand_rankings_to_pairs, flatten, plan_buckets, regroup,
                              unbucket)
from trainer.replay import ReservoirBuffer, load_records, load_replay_counts, replay_count, save_records
from trainer.schedule import lr_multiplier, make_scheduler


def rec(rid: str, *responses: str, attrs: tuple[dict[str, float], ...] = (), margin: float = 0.0) -> PreferenceRecord:
    return PreferenceRecord(record_id=rid, prompt=(ChatMessage("user", f"prompt of {rid}"),),
                            ranked_responses=tuple(responses), response_attributes=attrs, margin=margin)


def fake_encode(prompts, responses):
    """One token per word of the response (+1 for the prompt), right-padded with 0."""
    rows = [[1] + [len(w) + 1 for w in r.split()] for r in responses]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_flatten_and_regroup_round_trip() -> None:
    records = [rec("a", "x", "y", "z"), rec("b", "p", "q")]
    owner, position = flatten(records)
    assert owner == [0, 0, 0, 1, 1] and position == [0, 1, 2, 0, 1]
    flat = torch.tensor([3.0, 2.0, 1.0, 5.0, 4.0], requires_grad=True)  # (N,)
    rewards, mask = regroup(flat, torch.tensor(owner), torch.tensor(position), 2, 3)  # (B, Kmax)
    assert rewards.tolist() == [[3.0, 2.0, 1.0], [5.0, 4.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    rewards[mask].sum().backward()  # gradients flow back to every flat reward
    assert flat.grad.tolist() == [1.0] * 5


def test_flatten_rejects_a_single_response() -> None:
    bad = PreferenceRecord(record_id="x", prompt=(), ranked_responses=("only",))
    with pytest.raises(ValueError, match="at least 2 responses"):
        flatten([bad])


def test_plan_buckets_cover_every_row_once_within_budget() -> None:
    lengths = [5, 50, 7, 48, 6, 49, 120, 3]
    buckets = plan_buckets(lengths, max_tokens=160)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        width = max(lengths[i] for i in b)
        assert width * len(b) <= 160 or len(b) == 1
    # similar lengths share buckets: the three ~50-token rows are together
    assert any({1, 3, 5} <= set(b) for b in buckets)
    assert all(len(b) <= 2 for b in plan_buckets(lengths, max_tokens=10_000, max_rows=2))
    with pytest.raises(ValueError):
        plan_buckets(lengths, max_tokens=0)


def test_collate_buckets_trim_padding_and_unbucket_restores_order() -> None:
    records = [rec("a", "one", "one two three four five six"), rec("b", "x y", "z", "w w w w w w w")]
    batch = collate(records, fake_encode, max_tokens_per_forward=16)
    assert batch.num_rankings == 2 and batch.kmax == 3 and batch.num_sequences == 5
    assert batch.padded_tokens < batch.num_sequences * batch.inputs["input_ids"].shape[1]
    outs = []
    for inputs, idx in zip(batch.bucket_inputs(), batch.buckets):
        # every bucket is trimmed to its own longest row and keeps the rows' tokens
        assert inputs["attention_mask"][:, -1].any()
        assert torch.equal(inputs["input_ids"], batch.inputs["input_ids"][idx, : inputs["input_ids"].shape[1]])
        outs.append(inputs["attention_mask"].sum(dim=1, keepdim=True).float())  # "logits" = length, (n_b, 1)
    flat = unbucket(outs, batch.buckets, batch.num_sequences)  # (N, 1)
    assert flat[:, 0].tolist() == batch.lengths.float().tolist()


def test_attribute_targets_and_mask() -> None:
    records = [rec("a", "x", "y", attrs=({"helpfulness": 3.0}, {"helpfulness": 1.0, "verbosity": 4.0})),
               rec("b", "p", "q")]
    target, mask = attribute_targets(records, ("helpfulness", "verbosity"))  # (N, A)
    assert target.tolist() == [[3.0, 0.0], [1.0, 4.0], [0.0, 0.0], [0.0, 0.0]]
    assert mask.tolist() == [[True, False], [True, True], [False, False], [False, False]]
    empty_t, empty_m = attribute_targets(records, ())
    assert empty_t.shape == (4, 0) and empty_m.shape == (4, 0)


def test_expand_rankings_to_pairs() -> None:
    pairs = expand_rankings_to_pairs([rec("a", "1", "2", "3", "4"), rec("b", "x", "y")])
    assert [p.ranked_responses for p in pairs] == [
        ("1", "2"), ("1", "3"), ("1", "4"), ("2", "3"), ("2", "4"), ("3", "4"), ("x", "y")]
    assert len({p.record_id for p in pairs}) == 7
    # an unfinished response stays unfinished in every pair it is in, at its index there
    opened = expand_rankings_to_pairs([dataclasses.replace(rec("c", "1", "2", "3"), unfinished=(1,))])
    assert [(p.ranked_responses, p.unfinished) for p in opened] == [
        (("1", "2"), (1,)), (("1", "3"), ()), (("2", "3"), (0,))]


def test_reservoir_is_bounded_and_uniform() -> None:
    counts: Counter[int] = Counter()
    for seed in range(400):
        buf: ReservoirBuffer[int] = ReservoirBuffer(capacity=10, seed=seed)
        buf.extend(range(100))
        assert len(buf) == 10 and buf.seen == 100
        counts.update(buf.items())
    # each of the 100 items is kept with probability 10/100: 40 of 400 runs on average
    first, last = sum(counts[i] for i in range(50)), sum(counts[i] for i in range(50, 100))
    assert abs(first - last) < 0.15 * (first + last)
    assert all(counts[i] > 10 for i in range(100))


def test_reservoir_sample_and_restore() -> None:
    buf: ReservoirBuffer[int] = ReservoirBuffer(capacity=5, seed=1)
    assert buf.sample(3) == []
    buf.extend([1, 2, 3])
    s = buf.sample(10)
    assert sorted(s) == [1, 2, 3]  # fewer than asked, never duplicates
    buf.restore([7, 8, 9, 10, 11, 12], seen=40)
    assert buf.items() == [7, 8, 9, 10, 11] and buf.seen == 40
    assert ReservoirBuffer(0).sample(3) == []
    with pytest.raises(ValueError):
        ReservoirBuffer(-1)


def test_replay_is_least_replayed_first() -> None:
    """A growing stream: every stored item's replay count stays within one of any other's, so the
    first items are not replayed many more times than later ones (uniform draws do that)."""
    buf: ReservoirBuffer[int] = ReservoirBuffer(capacity=2000, seed=3)  # keeps all 1600
    for step in range(100):
        replayed = buf.sample(8)
        assert len(set(replayed)) == len(replayed)
        buf.extend(range(step * 16, step * 16 + 16))
        counts = buf.replay_counts()
        assert max(counts) - min(counts) <= 1
    counts = buf.replay_counts()
    assert sum(counts) == 99 * 8  # every draw after the first step was counted once
    first, last = counts[:100], counts[-100:]
    assert max(first) <= 1 and sum(first) >= sum(last)  # early items at most once more than late ones


def test_replay_counts_reset_on_replacement_and_restore() -> None:
    buf: ReservoirBuffer[int] = ReservoirBuffer(capacity=3, seed=0)
    buf.extend([1, 2, 3])
    a, b = buf.sample(2), buf.sample(2)
    assert set(a) | set(b) == {1, 2, 3} and len(set(a) & set(b)) == 1  # the third item before any repeat
    counts = dict(zip(buf.items(), buf.replay_counts()))
    assert sorted(counts.values()) == [1, 1, 2]
    for i in range(4, 200):  # replacements start from a count of 0
        buf.add(i)
    for item, count in zip(buf.items(), buf.replay_counts()):
        assert count == (counts[item] if item in counts else 0)
    buf.restore([7, 8, 9], seen=40, replays=[2, 5])
    assert buf.replay_counts() == [2, 5, 0]
    assert buf.sample(1) == [9]


def test_replay_count_and_persistence(tmp_path) -> None:
    assert replay_count(16, 0.5) == 8 and replay_count(16, 0.0) == 0 and replay_count(3, 1.0) == 3
    with pytest.raises(ValueError):
        replay_count(4, -0.1)
    buf: ReservoirBuffer[PreferenceRecord] = ReservoirBuffer(capacity=4)
    buf.extend([rec(f"r{i}", "good", "bad", margin=i) for i in range(6)])
    buf.sample(3)
    state = save_records(buf, tmp_path)
    assert state == {"size": 4, "seen": 6}
    back = load_records(tmp_path)
    assert [r.record_id for r in back] == [r.record_id for r in buf.items()]
    assert load_replay_counts(tmp_path) == buf.replay_counts() and sum(buf.replay_counts()) == 3
    assert load_records(tmp_path / "missing") == [] and load_replay_counts(tmp_path / "missing") == []


def test_lr_schedules() -> None:
    assert [lr_multiplier(s, "constant", 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(3, "inverse_sqrt", 4) == 1.0  # the peak at the end of warm-up
    assert lr_multiplier(15, "inverse_sqrt", 4) == pytest.approx(math.sqrt(4 / 16))  # 0.5
    assert lr_multiplier(399, "inverse_sqrt", 4) == pytest.approx(0.1)
    assert lr_multiplier(10, "constant", 0) == 1.0
    # a warm-up that began again at step 10 (Adam's moments empty there)
    assert [lr_multiplier(s, "constant", 4, warm_from=10) for s in range(10, 15)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_multiplier(12, "inverse_sqrt", 4, warm_from=12) == pytest.approx(0.25 * math.sqrt(4 / 13))
    assert lr_multiplier(15, "inverse_sqrt", 4, warm_from=12) == pytest.approx(0.5)  # up to the decayed rate
    assert lr_multiplier(2, "constant", 4, warm_from=0) == lr_multiplier(2, "constant", 4)
    with pytest.raises(ValueError, match="warm_from"):
        lr_multiplier(3, "constant", 4, warm_from=-1)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0, "cosine", 4)


def test_scheduler_resumes_at_the_saved_step() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt, "inverse_sqrt", warmup_steps=4, start_step=15)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # continues at step 15, no second warm-up
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(math.sqrt(4 / 17))
