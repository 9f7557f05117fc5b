"""The DPO objective on the shared machinery: steps, the reference cache, refusals, the gate, checkpoints.

A tiny random Llama over the real SmolLM2 tokenizer stands in for the policy (fixtures shared with
test_policy_lm.py), so these run in seconds on the CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from services.checkpoints import CheckpointStore
from services.config import ConfigError
from services.criteria_eval import mean_words
from services.errors import InvalidArgument
from services.schemas import ChatMessage, PreferenceRecord
from tests.unit.test_policy_lm import smollm_tokenizer_dir, tiny_base  # noqa: F401 (fixtures)
from trainer.checkpointing import LineageState, find_resume_point
from trainer.config import trainer_config
from trainer.evaluation import EvalResult, EvalSet
from trainer.gate import Decision
from trainer.learner import Learner
from trainer.loop import ContinualTrainer
from trainer.objectives import objective_for
from trainer.objectives.dpo import (ADAPTER_DIR, REF_FILE, DPOObjective, criterion_rates, rate_difference_se,
                                    repetition_rate, reply_shrink, reward_drop, reward_giveback, violation_givebacks,
                                    violation_rise, words_within_limits)
from trainer.replay import ReservoirBuffer
from trainer.runtime import build_learner
from trainer.stream import ListSource

GOOD = ["Paris is the capital of France.", "Blue is a colour.", "Hello, how can I help?"]
BAD = ["no", "I refuse to answer that question.", "go away now"]


def records(n: int, k: int = 2, split: str = "train", start: int = 0) -> list[PreferenceRecord]:
    out = []
    for i in range(start, start + n):
        responses = [GOOD[i % 3]] + [BAD[(i + j) % 3] + "!" * j for j in range(k - 1)]
        out.append(PreferenceRecord(record_id=f"p{i}", prompt=(ChatMessage("user", f"question {i % 3}"),),
                                    ranked_responses=tuple(responses), split=split, source_acked_at=1000.0 + i))
    return out


def config(tmp_path: Path, base: Path, **kw: object):
    values = dict(model_kind="policy", base_model=str(base), max_length=64, lr=5e-3, warmup_steps=0, batch_size=4,
                  replay_ratio=0.5, beta=0.5, lora_rank=4, lora_alpha=8.0, ema_decay=0.0,
                  checkpoint_url=str(tmp_path / "ckpt"), checkpoint_every_records=8, checkpoint_every_s=0,
                  max_batch_wait_s=0, poll_timeout_s=0.01, publish=False, eval_max_records=8, guard_prompts=2,
                  guard_max_new_tokens=8, eval_batch_size=8)
    values.update(kw)
    return trainer_config(**values)


def test_policy_kind_resolves_its_own_name_group_and_lr(tmp_path, tiny_base) -> None:
    cfg = config(tmp_path, tiny_base, lr=0)
    assert cfg.model.model_name == "policy" and cfg.stream.group_id == "prefstream-trainer-policy"
    assert cfg.optim.lr == 5e-5  # the policy default when lr is left at 0
    reward = trainer_config()
    assert reward.model.model_name == "reward" and reward.stream.group_id == "prefstream-trainer"
    assert isinstance(objective_for(cfg), DPOObjective)


@pytest.mark.parametrize("overrides, field", [
    ({"beta": 0}, "beta"),
    ({"beta": -1}, "beta"),
    ({"dpo_loss": "hinge"}, "dpo_loss"),
    ({"label_smoothing": 0.1, "dpo_loss": "ipo"}, "label_smoothing"),
    ({"label_smoothing": 0.6, "dpo_loss": "sigmoid"}, "label_smoothing"),
    ({"sft_weight": -0.5}, "sft_weight"),
    ({"sft_weight": float("inf")}, "sft_weight"),
    ({"finetune": "qlora"}, "finetune"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"attributes": "helpfulness"}, "attributes"),
    ({"max_shrink": 0}, "max_shrink"),
    ({"max_shrink": 1.5}, "max_shrink"),
    ({"rollback_lr_factor": 0}, "rollback_lr_factor"),
    ({"rollback_lr_factor": 2}, "rollback_lr_factor"),
])
def test_bad_dpo_settings_name_the_field(overrides, field) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        trainer_config(model_kind="policy", **overrides)


def test_a_lora_target_the_model_lacks_is_refused(tmp_path, tiny_base) -> None:
    cfg = config(tmp_path, tiny_base, lora_target_modules="q_proj,not_a_layer")
    with pytest.raises(InvalidArgument, match="not_a_layer"):
        objective_for(cfg).load(str(tiny_base))


@pytest.mark.parametrize("loss", ["plackett_luce", "sigmoid", "ipo"])
def test_steps_lower_the_loss_and_train_only_the_adapter(tmp_path, tiny_base, loss) -> None:
    cfg = config(tmp_path, tiny_base, dpo_loss=loss)
    objective = objective_for(cfg)
    learner = Learner(objective, objective.load(str(tiny_base)), cfg)
    frozen = {n: p.detach().clone() for n, p in learner.model.model.named_parameters() if not p.requires_grad}
    batch = records(6, k=3)
    assert objective.admit(learner.model, batch) == {}
    first = learner.train(batch)
    for _ in range(12):
        last = learner.train(batch)
    assert last.loss < first.loss and last.pair_accuracy >= first.pair_accuracy
    assert all(torch.equal(p, frozen[n]) for n, p in learner.model.model.named_parameters() if not p.requires_grad)
    assert all("lora_" in n for n, p in learner.model.model.named_parameters() if p.requires_grad)


def test_bf16_autocast_trains_the_policy(tmp_path, tiny_base) -> None:
    cfg = config(tmp_path, tiny_base, autocast="bf16")
    objective = objective_for(cfg)
    learner = Learner(objective, objective.load(str(tiny_base)), cfg)
    assert learner.autocast
    batch = records(4)
    learner.admit(batch)
    # admission ran the reference under the step's bf16 autocast: with a fresh adapter (policy == reference)
    # the cached numbers are exactly what the step's own autocast forward gives, so the first loss is log 2
    encoded = learner.model.encode([r.prompt for r in batch for _ in range(2)], [x for r in batch for x in r.ranked_responses])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = learner.model.logps(encoded)
    cached = torch.tensor([x for r in batch for x in objective.reference[r.record_id]])
    assert torch.allclose(under_bf16.float(), cached, atol=1e-4)
    losses = [learner.train(batch).loss for _ in range(6)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert all(p.dtype == torch.float32 for p in learner.params)  # fp32 master weights
    assert losses[-1] < losses[0]


def test_sft_weight_adds_the_chosen_nll_and_keeps_the_chosen_replies_likely(tmp_path, tiny_base) -> None:
    """RPO: the loss is the DPO loss plus α·NLL(chosen); trained with it, the chosen responses end more
    likely than DPO alone leaves them (DPO may widen the margin by lowering both)."""
    batch = records(6)
    chosen = ([r.prompt for r in batch], [r.ranked_responses[0] for r in batch])
    losses, gains = {}, {}
    for alpha in (0.0, 1.0):
        cfg = config(tmp_path, tiny_base, dpo_loss="sigmoid", autocast="none", sft_weight=alpha)
        objective = objective_for(cfg)
        torch.manual_seed(0)
        model = objective.load(str(tiny_base))
        objective.admit(model, batch)
        loss, metrics = objective.loss(objective.module(model), objective.batch(model, batch, None))
        losses[alpha] = (float(loss.detach()), metrics)
        before = model.logps(model.encode(*chosen)).detach()
        learner = Learner(objective, model, cfg)
        for _ in range(8):
            learner.train(batch)
        gains[alpha] = float((model.logps(model.encode(*chosen)).detach() - before).mean())
    (plain, m0), (rpo, m1) = losses[0.0], losses[1.0]
    assert "chosen_nll" not in m0 and m1["chosen_nll"] > 0
    assert rpo == pytest.approx(plain + m1["chosen_nll"], rel=1e-5)
    assert gains[1.0] > gains[0.0]


def trim_records(n: int) -> list[PreferenceRecord]:
    """Pairs whose chosen reply is the rejected one cut after its first sentence (the trim pairings)."""
    long = ["Paris is the capital. It is a big city with many old streets and parks.",
            "Blue is a colour. It is the colour of the sky on a clear summer day."]
    return [PreferenceRecord(record_id=f"t{i}", prompt=(ChatMessage("user", f"question {i % 2}"),),
                             ranked_responses=(long[i % 2].split(". ")[0] + ".", long[i % 2]), split="train",
                             source_acked_at=1000.0 + i) for i in range(n)]


@pytest.fixture(scope="module")
def stopping_base(tiny_base, tmp_path_factory) -> Path:
    """tiny_base with its EOS row turned toward the mean final hidden state, so that ending the turn has a
    probability of a few percent at every position (the random model's is 1/vocabulary, 2e-5): a hazard
    a trainer can move, as a real policy's is."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = tok([trim_records(1)[0].ranked_responses[1]], return_tensors="pt").input_ids
    with torch.no_grad():
        mean = model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        model.lm_head.weight[tok.eos_token_id] = 7.0 * mean / mean.norm() ** 2
        hazard = torch.softmax(model(ids).logits[0], -1)[:, tok.eos_token_id]
    assert 0.01 < float(hazard.mean()) < 0.3, hazard
    d = tmp_path_factory.mktemp("stopping-llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_stop_anchor_holds_the_stop_where_the_chosen_reply_goes_on(tmp_path, stopping_base, monkeypatch) -> None:
    """stop_anchor adds its weight times how far P(EOS) has moved from the reference's where the chosen reply
    does not end: nothing at the start (the policy is its reference), and trained on trim pairs it keeps that
    move smaller than DPO alone does, one way or both, while still learning the pairs."""
    tiny_base = stopping_base
    batch = trim_records(4)
    anchored_cfg = config(tmp_path, tiny_base, dpo_loss="sigmoid", autocast="none", stop_anchor=5.0)
    judge = objective_for(anchored_cfg)  # reads the anchor's metric on any policy
    rises, accuracies = {}, {}
    for weight, sides in ((0.0, "both"), (5.0, "both"), (5.0, "rise")):
        cfg = config(tmp_path, tiny_base, dpo_loss="sigmoid", autocast="none", stop_anchor=weight,
                     stop_anchor_sides=sides)
        objective = objective_for(cfg)
        torch.manual_seed(0)
        model = objective.load(str(tiny_base))
        objective.admit(model, batch)
        loss, metrics = objective.loss(objective.module(model), objective.batch(model, batch, None))
        if weight:
            assert metrics["stop_anchor"] == pytest.approx(0.0, abs=1e-6) and float(loss.detach()) == pytest.approx(math.log(2), abs=1e-4)
            # read once, at admission, by the reference forward that reads the log-probs; kept with the state
            assert set(objective.reference_stops) == {r.record_id for r in batch}
            objective.save_state(tmp_path, batch)  # (it trims the caches to the records it keeps: all of them)
            restored, worker = objective_for(cfg), objective_for(cfg)
            restored.load_state(tmp_path)
            worker.accept_side_data(objective.side_data(batch))  # a Ray worker's copy
            assert restored.reference_stops == worker.reference_stops == objective.reference_stops
        else:
            assert "stop_anchor" not in metrics and not objective.reference_stops
        learner = Learner(objective, model, cfg)
        calls: list[int] = []
        real = type(model).reference_read
        with monkeypatch.context() as m:
            m.setattr(type(model), "reference_read", lambda self, b, stops=False: calls.append(b.rows) or real(self, b, stops))
            for _ in range(10):
                learner.train(batch)
        assert calls == []  # the anchor's reference readings were cached at admission: no reference forward per step
        model.read_stops(True)
        judge.admit(model, batch)
        with torch.no_grad():
            _, after = judge.loss(objective.module(model), judge.batch(model, batch, None))
        rises[weight, sides], accuracies[weight, sides] = after["stop_anchor"], after["pair_accuracy"]
    assert rises[0.0, "both"] > 0.05, rises  # DPO alone moves the stop before the chosen reply's end
    assert rises[5.0, "both"] < rises[0.0, "both"] / 2, rises
    assert accuracies[5.0, "both"] == 1.0 and accuracies[5.0, "rise"] == 1.0
    assert judge.loss_config()["stop_anchor"] == 5.0 and judge.loss_config()["stop_anchor_sides"] == "both"


def test_a_rejected_reply_that_goes_on_is_read_without_its_end_of_turn_everywhere(tmp_path, stopping_base) -> None:
    """A pair whose rejected reply goes on past the chosen end (``unfinished``, criteria feedback's trim_open) is
    read without that reply's EOS by the reference at admission, by training and by evaluation, and DPO learns it."""
    ended = trim_records(4)
    going = [dataclasses.replace(r, record_id=f"open-{r.record_id}", unfinished=(1,)) for r in ended]
    cfg = config(tmp_path, stopping_base, dpo_loss="sigmoid", autocast="none")
    objective = objective_for(cfg)
    torch.manual_seed(0)
    model = objective.load(str(stopping_base))
    assert objective.admit(model, ended + going) == {}
    prompts, longer = [r.prompt for r in ended], [r.rejected for r in ended]
    with torch.no_grad():
        stop_there = model.reference_logps(model.encode(prompts, longer)) - \
            model.reference_logps(model.encode(prompts, longer, [False] * len(ended)))
    for e, g, stop in zip(ended, going, stop_there.tolist()):
        assert objective.reference[g.record_id][0] == pytest.approx(objective.reference[e.record_id][0])
        # the reply going on lacks exactly the end of turn's log-prob there
        assert objective.reference[e.record_id][1] == pytest.approx(objective.reference[g.record_id][1] + stop, abs=1e-4)
        assert -20 < stop < 0
    step = objective.batch(model, going, None)
    assert step.data.rows.response_tokens.tolist()[1::2] == \
        (objective.batch(model, ended, None).data.rows.response_tokens[1::2] - 1).tolist()
    loss, _ = objective.loss(objective.module(model), step)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-4)  # the policy is its reference
    assert objective.evaluate(model, going).accuracy == 0.0  # implicit rewards tie at the start
    learner = Learner(objective, model, cfg)
    for _ in range(10):
        learner.train(going)
    assert objective.evaluate(model, going).accuracy == 1.0


def test_a_micro_batch_over_the_backward_budget_trains_in_pieces_to_the_same_gradient(tmp_path, tiny_base) -> None:
    """max_tokens_per_backward bounds the activations one backward keeps; the weighted pieces add up to
    the whole micro-batch's gradient (Plackett-Luce over rankings of 3, replay-style weights)."""
    batch, weights = records(6, k=3), [1.0, 0.25, 1.0, 1.0, 0.25, 1.0]
    grads, stats = [], []
    for budget in (0, 96):
        cfg = config(tmp_path, tiny_base, dpo_loss="plackett_luce", autocast="none", max_tokens_per_backward=budget)
        objective = objective_for(cfg)
        torch.manual_seed(0)
        learner = Learner(objective, objective.load(str(tiny_base)), cfg)
        learner.admit(batch)
        stats.append(learner.train(batch, weights, apply=False))
        grads.append([p.grad.clone() for p in learner.params])
    whole, pieces = stats
    assert whole.pieces == 1 and pieces.pieces > 1
    assert pieces.padded_tokens <= whole.padded_tokens * 2 and pieces.sequences == whole.sequences == 18
    assert pieces.loss == pytest.approx(whole.loss, rel=1e-5)
    assert pieces.pair_accuracy == pytest.approx(whole.pair_accuracy)
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_reference_logps_are_computed_once_per_record(tmp_path, tiny_base, monkeypatch) -> None:
    cfg = config(tmp_path, tiny_base)
    objective = objective_for(cfg)
    model = objective.load(str(tiny_base))
    calls: list[int] = []
    real = type(model).reference_read
    monkeypatch.setattr(type(model), "reference_read",
                        lambda self, b, stops=False: calls.append(b.rows) or real(self, b, stops))
    batch = records(4)
    objective.admit(model, batch)
    assert sum(calls) == 8  # 4 records x 2 responses, once
    # with the adapter fresh (B = 0) the policy equals its reference: the cache holds the policy's own numbers
    fresh = model.logps(model.encode([r.prompt for r in batch for _ in range(2)],
                                     [x for r in batch for x in r.ranked_responses]))
    cached = torch.tensor([x for r in batch for x in objective.reference[r.record_id]])
    assert torch.allclose(fresh.detach(), cached, atol=1e-5)
    learner = Learner(objective, model, cfg)
    for _ in range(3):
        learner.train(batch)
    assert sum(calls) == 8  # training and replay never run the reference again


def test_empty_and_duplicate_responses_are_refused_with_the_field(tmp_path, tiny_base) -> None:
    cfg = config(tmp_path, tiny_base, max_response_tokens=100)
    objective = objective_for(cfg)
    model = objective.load(str(tiny_base))
    empty = PreferenceRecord(record_id="e", prompt=(ChatMessage("user", "q"),), ranked_responses=("fine", "  "))
    tie = PreferenceRecord(record_id="t", prompt=(ChatMessage("user", "q"),), ranked_responses=("same", "same "))
    long = PreferenceRecord(record_id="l", prompt=(ChatMessage("user", "q"),),
                            ranked_responses=("word " * 200, "short"))
    fits_cut = PreferenceRecord(record_id="c", prompt=(ChatMessage("user", "q"),),
                                ranked_responses=("word " * 60, "short"))  # over max_length, under the budget
    refused = objective.admit(model, [empty, tie, long, fits_cut, *records(1)])
    assert set(refused) == {"e", "t", "l"}
    assert all(r.startswith("ranked_responses:") for r in refused.values())
    assert "empty" in refused["e"] and "twice" in refused["t"] and "max_response_tokens=100" in refused["l"]
    rows = model.encode([fits_cut.prompt], [fits_cut.chosen])  # cut to its first tokens, the prompt kept
    assert int(rows.response_mask.sum()) == model.response_room == 48 and int(rows.attention_mask.sum()) <= 64


def test_the_loop_dead_letters_refused_records_and_trains_the_rest(tmp_path, tiny_base) -> None:
    cfg = config(tmp_path, tiny_base, checkpoint_every_records=100)
    objective = objective_for(cfg)
    learner = Learner(objective, objective.load(str(tiny_base)), cfg)
    bad = PreferenceRecord(record_id="bad", prompt=(ChatMessage("user", "q"),), ranked_responses=("a", ""))
    source = ListSource([*records(3), bad, *records(4, start=3)])
    loop = ContinualTrainer(cfg, learner, source, lineage=LineageState(), replay=ReservoirBuffer(16),
                            eval_set=EvalSet(8), store=None, should_stop=lambda: source.exhausted())
    summary = loop.run()
    assert summary.records == 7 and summary.refused == 1
    assert source.rejected == [("bad", "ranked_responses: response 1: the response is empty")]
    assert source.positions() == {0: 8}  # the refused record's offset advanced with the rest


def test_evaluate_measures_implicit_reward_accuracy_and_the_guards(tmp_path, tiny_base) -> None:
    # a random tiny model repeats itself: the repetition bound is the degeneration test's, not this one's
    cfg = config(tmp_path, tiny_base, max_repetition_rate=1.0)
    objective = objective_for(cfg)
    learner = Learner(objective, objective.load(str(tiny_base)), cfg)
    held_out = records(6, start=100)
    before = objective.evaluate(learner.model, held_out)
    assert before.pairs == 6 and len(before.outcomes) == 6
    assert before.accuracy == 0.0  # policy == reference: every implicit reward is 0, ties count as wrong
    assert before.metrics["kl_to_ref"] == pytest.approx(0.0, abs=1e-6) and before.metrics["guard_prompts"] == 2
    assert before.metrics["reference_mean_words"] == before.metrics["mean_words"]  # policy == reference
    train = records(12)
    objective.admit(learner.model, train)
    for _ in range(15):
        learner.train(train)
    after = objective.evaluate(learner.model, held_out)
    assert after.accuracy > 0.5 and after.metrics["kl_to_ref"] > 0
    assert after.metrics["reference_mean_words"] == before.metrics["reference_mean_words"]
    assert objective.guard(after) == ""
    strict = DPOObjective(config(tmp_path, tiny_base, max_kl=1e-9, max_repetition_rate=1.0))
    assert strict.guard(after).startswith("drift guard: mean per-token KL")
    repetitive = DPOObjective(config(tmp_path, tiny_base, max_repetition_rate=0.1))
    assert repetitive.guard(after).startswith("degeneration guard: repetition rate") == (
        after.metrics["repetition_rate"] > 0.1)


def guarded(mean_words: float, prompts: float = 8, tokens: float = 96) -> EvalResult:
    return EvalResult(accuracy=0.6, pairs=10, records=10, mean_margin=0.1, fingerprint="f", metrics={
        "kl_to_ref": 0.1, "empty_rate": 0.0, "repetition_rate": 0.0, "mean_words": mean_words,
        "guard_prompts": prompts, "guard_max_new_tokens": tokens})


def test_reply_shrink_compares_replies_sampled_alike() -> None:
    assert mean_words(["one two", "three four five six"]) == 3.0  # the word count the max_words rule reads
    assert reply_shrink(guarded(20).metrics, guarded(40).metrics) == pytest.approx(0.5)
    assert reply_shrink(guarded(50).metrics, guarded(40).metrics) == pytest.approx(-0.25)
    assert reply_shrink(guarded(20).metrics, guarded(40, prompts=16).metrics) is None  # other prompts
    assert reply_shrink(guarded(20).metrics, guarded(40, tokens=48).metrics) is None  # other reply budget
    sampled = guarded(40)
    sampled.metrics["guard_temperature"] = 0.7
    assert reply_shrink(guarded(20).metrics, sampled.metrics) is None  # sampled against greedy
    assert reply_shrink({**guarded(20).metrics, "guard_temperature": 0.7}, sampled.metrics) == pytest.approx(0.5)
    assert reply_shrink(guarded(20).metrics, guarded(0).metrics) is None  # the served replies were empty
    assert reply_shrink(guarded(20).metrics, {"mean_words": 40.0}) is None  # served metrics from before the guard


def test_length_guard_refuses_a_version_that_says_much_less_than_the_served_one(tmp_path, tiny_base) -> None:
    objective = DPOObjective(config(tmp_path, tiny_base, max_shrink=0.3))
    assert objective.guards
    assert objective.guard(guarded(25), guarded(35)) == ""  # 29% shorter: a cut, not a collapse
    assert objective.guard(guarded(40), guarded(35)) == ""
    assert objective.guard(guarded(19.5), None) == ""  # nothing served, no reference measured: nothing to compare
    first = guarded(19.5)
    first.metrics["reference_mean_words"] = 36.0  # nothing served yet: the reference policy's replies are the bar
    assert objective.guard(first, None) == ("length guard: the replies to 8 held-out prompts average 19.5 words, "
                                            "46% fewer than the reference policy's 36.0 (max_shrink 0.3)")
    assert objective.guard(first, guarded(25)) == ""  # a served version is the bar once there is one
    # ... unless it ran longer than the reference: cutting it back towards where the policy started is no collapse
    # (the criteria loop refused a v2 of 49 words against a served v1's 76.5; the reference's were 34)
    back = guarded(49.2)
    back.metrics["reference_mean_words"] = 34.0
    assert objective.guard(back, guarded(76.5)) == ""
    back.metrics["mean_words"] = 20.0  # 41% under the reference: refused, against the reference
    assert objective.guard(back, guarded(76.5)) == ("length guard: the replies to 8 held-out prompts average 20.0 "
                                                    "words, 41% fewer than the reference policy's 34.0 (max_shrink 0.3)")
    reason = objective.guard(guarded(19.5), guarded(35.5))
    assert reason == ("length guard: the replies to 8 held-out prompts average 19.5 words, 45% fewer than the "
                      "served version's 35.5 (max_shrink 0.3)")
    assert DPOObjective(config(tmp_path, tiny_base, max_shrink=1.0)).guard(guarded(1), guarded(35)) == ""


def test_words_within_limits_counts_each_reply_at_most_at_its_limit() -> None:
    replies = ["one two three four five six", "one two", "a b c d e f g h"]
    assert words_within_limits(replies, [4, 4, None]) == pytest.approx((4 + 2 + 8) / 3)  # None: no limit
    assert words_within_limits(replies, [None] * 3) == mean_words(replies)
    with pytest.raises(ValueError, match="one limit"):
        words_within_limits(replies, [4])


def test_length_guard_reads_the_reference_within_its_word_limit(tmp_path, tiny_base) -> None:
    # A word-limit criterion asks for the cut: a reference that ran over the limit is no bar to a version that
    # keeps it (the criteria loop refused a version at 40 words, 30% under the reference's 57, for what it learnt)
    objective = DPOObjective(config(tmp_path, tiny_base, max_shrink=0.3))
    first = guarded(40.0)
    first.metrics.update(reference_mean_words=57.0, reference_words_within_limit=45.0)
    assert objective.guard(first, None) == ""
    first.metrics["mean_words"] = 30.0  # a third under what the reference would say within the limit: a collapse
    assert objective.guard(first, None) == (
        "length guard: the replies to 8 held-out prompts average 30.0 words, 33% fewer than the reference policy's "
        "(each counted at most at its word limit) 45.0 (max_shrink 0.3)")
    assert objective.guard(first, guarded(38.0)) == ""  # a served version shorter than that is the bar


def test_reward_drop_is_the_mean_paired_difference_to_the_reference_with_its_standard_error() -> None:
    drop, se = reward_drop([0.2, 0.3, 0.1, 0.4], [0.3, 0.5, 0.2, 0.4])  # differences 0.1, 0.2, 0.1, 0.0
    assert drop == pytest.approx(0.1) and se == pytest.approx(math.sqrt(0.02 / 3 / 4))
    assert reward_drop([0.5, 0.5], [0.4, 0.4]) == pytest.approx((-0.1, 0.0))  # better than the reference, no spread
    assert reward_drop([0.5], [0.7]) == pytest.approx((0.2, 0.0))  # one prompt: no error estimate
    with pytest.raises(ValueError, match="score the same prompts"):
        reward_drop([0.1, 0.2], [0.1])


def judged(drop: float, se: float, mean: float = 0.3) -> EvalResult:
    result = guarded(30, prompts=16)
    result.metrics.update(mean_reward=mean, reward_drop=drop, reward_drop_se=se)
    return result


def test_reward_guard_refuses_a_version_the_reward_model_calls_worse_than_the_reference(tmp_path, tiny_base) -> None:
    objective = DPOObjective(config(tmp_path, tiny_base, reward_guard="judge", max_reward_drop=0.02))
    assert objective.guard(judged(0.02, 0.03)) == ""  # up to the tolerated drop
    assert objective.guard(judged(-0.05, 0.01)) == ""  # better than the reference
    assert objective.guard(judged(0.038, 0.033)) == (  # the mean decides: its noise is what the tolerance is for
        "reward guard: judge scores the replies to 16 held-out prompts 0.0380 lower than the reference policy's "
        "(mean 0.3000, SE of the paired difference 0.0330); max_reward_drop is 0.02")
    assert objective.guard(judged(0.08, 0.02), judged(0.0, 0.01)) != ""  # the bar is the reference, whatever is served
    assert objective.guard(guarded(30)) == ""  # no judge's numbers (no reward model served): nothing to refuse on
    lenient = DPOObjective(config(tmp_path, tiny_base, reward_guard="judge", max_reward_drop=0.1))
    assert lenient.guard(judged(0.08, 0.02)) == ""


def with_rewards(rewards: list[float], key: str = "k", judge: str = "judge@v1") -> EvalResult:
    """A version's evaluation whose guard replies (answering digest ``key``) ``judge`` scored ``rewards``."""
    result = judged(0.0, 0.02, mean=sum(rewards) / len(rewards))
    return dataclasses.replace(result, replies=tuple(f"reply {i}" for i in range(len(rewards))), replies_key=key,
                               rewards=tuple(rewards), rewards_judge=judge)


def test_reward_giveback_pairs_the_served_version_s_scores_prompt_by_prompt() -> None:
    served = with_rewards([0.5, 0.4, 0.3, 0.6])
    drop, se = reward_giveback(with_rewards([0.4, 0.3, 0.3, 0.4]), served)  # differences 0.1, 0.1, 0.0, 0.2
    assert drop == pytest.approx(0.1) and se == pytest.approx(math.sqrt(0.02 / 3 / 4))
    assert reward_giveback(with_rewards([0.6, 0.5, 0.4, 0.7]), served) == pytest.approx((-0.1, 0.0))
    # nothing to pair: nothing served, no scores, other prompts or sampling, a judge that scored fewer replies
    assert reward_giveback(with_rewards([0.4] * 4), None) is None
    assert reward_giveback(judged(0.0, 0.02), served) is None
    assert reward_giveback(with_rewards([0.4] * 4, key="other"), served) is None
    assert reward_giveback(with_rewards([0.4] * 3), served) is None
    assert reward_giveback(with_rewards([0.4] * 4, judge="judge@v2"), served) is None  # the judge moved on


def test_reward_guard_refuses_a_version_that_spends_the_reward_the_served_version_kept(tmp_path, tiny_base) -> None:
    # the bench's v5: 0.019 below the reference (within max_reward_drop 0.02), 0.021 below the served v4
    objective = DPOObjective(config(tmp_path, tiny_base, reward_guard="judge", max_reward_drop=0.02,
                                    max_reward_giveback=0.01))
    served = with_rewards([0.5, 0.4, 0.3, 0.6])
    assert objective.guard(with_rewards([0.49, 0.39, 0.3, 0.6]), served) == ""  # within the step's tolerance
    assert objective.guard(with_rewards([0.4, 0.3, 0.3, 0.4]), served) == (
        "reward guard: judge scores the replies to 4 held-out prompts 0.1000 lower than the served version's "
        "(SE of the paired difference 0.0408); max_reward_giveback is 0.01")
    assert objective.guard(with_rewards([0.4, 0.3, 0.3, 0.4]), None) == ""  # nothing served: the reference's bar
    doubting = DPOObjective(config(tmp_path, tiny_base, reward_guard="judge", max_reward_drop=0.02,
                                   max_reward_giveback=0.01, doubt_z=1.0))
    close = with_rewards([0.45, 0.4, 0.3, 0.6])  # 0.0125 below, SE 0.0125: over the tolerance within its noise
    assert doubting.guard(close, served) == ""
    assert doubting.unjudged(close, served).startswith("in doubt, not judged yet: reward guard: judge scores the "
                                                       "replies to 4 held-out prompts 0.0125 lower than the served")
    off = DPOObjective(config(tmp_path, tiny_base, reward_guard="judge", max_reward_drop=0.02))  # negative: off
    assert off.guard(with_rewards([0.4, 0.3, 0.3, 0.4]), served) == ""
    with pytest.raises(ValueError, match="max_reward_giveback"):
        config(tmp_path, tiny_base, max_reward_giveback=math.nan)


class LengthJudge:
    """A stand-in for the served reward model: longer replies score higher; its version can change."""

    def __init__(self) -> None:
        self.version, self.calls = "v1", []

    def score(self, prompts, replies):
        self.calls.append(list(replies))
        return f"judge@{self.version}", [len(r.split()) / 10 for r in replies]


def test_guard_metrics_score_the_replies_and_the_reference_s_with_the_served_reward_model(tmp_path, tiny_base) -> None:
    cfg = config(tmp_path, tiny_base, max_repetition_rate=1.0, reward_guard="judge", guard_prompts=3,
                 guard_temperature=0.7)
    objective = objective_for(cfg)
    assert objective.judge is None  # until the gate hands over its registry
    from trainer.gate import Gate
    from trainer.reward_judge import ServedReward

    registry = SimpleNamespace(redis="the redis", namespace="ns")  # beside it, the gate reads the records' criteria
    Gate(cfg, registry=registry, eval_set=EvalSet(8), objective=objective)
    assert isinstance(objective.judge, ServedReward) and objective.judge.registry is registry
    assert objective.judge.name == "judge"
    learner = Learner(objective, objective.load(str(tiny_base)), cfg)
    objective.judge = judge = LengthJudge()
    def distinct(n: int) -> list[PreferenceRecord]:  # one prompt each, and a second record for the first prompt
        out = [dataclasses.replace(r, prompt=(ChatMessage("user", f"question {i}"),)) for i, r in
               enumerate(records(n, start=100))]
        return out + [dataclasses.replace(out[0], record_id="again", ranked_responses=("Hi.", "no"))]

    held_out = distinct(4)
    m = objective.evaluate(learner.model, held_out).metrics
    assert m["guard_prompts"] == 3 and len({r.prompt for r in held_out if r.record_id in objective._guard_ids}) == 3
    assert m["guard_temperature"] == 0.7  # sampled (fixed seeds), the reference's alike: the same replies still
    # the policy is still the reference: the same replies, the same scores, no drop
    assert m["reward_drop"] == pytest.approx(0.0) and m["reward_drop_se"] == pytest.approx(0.0)
    assert m["mean_reward"] == pytest.approx(m["mean_words"] / 10)
    assert len(judge.calls) == 1 and len(judge.calls[0]) == 6  # the candidate's replies and the reference's, at once
    result = objective.evaluate(learner.model, held_out)
    assert result.rewards == pytest.approx([len(r.split()) / 10 for r in result.replies])  # kept for the served bar
    assert result.rewards_judge == "judge@v1"  # with the judge that gave them
    assert len(judge.calls) == 2 and judge.calls[1] == judge.calls[0]  # the reference's replies are kept, not redrawn
    chosen = list(objective._guard_ids)
    more = distinct(6)
    objective.evaluate(learner.model, more)
    assert objective._guard_ids == chosen  # the guard prompts stay put as the evaluation set grows
    objective.evaluate(learner.model, [r for r in more if r.record_id != chosen[0]])
    assert objective._guard_ids[:2] == chosen[1:] and len(objective._guard_ids) == 3  # a gone one is replaced


def test_served_reward_judges_with_the_version_the_registry_serves(tmp_path) -> None:
    from services.registry import ModelVersion
    from tests.unit.test_trainer_learner import tiny_model
    from trainer.reward_judge import ServedReward

    store = CheckpointStore(str(tmp_path / "ckpt"))
    folder = Path(tiny_model(tmp_path / "rm"))

    def publish(version: str) -> ModelVersion:
        ref = store.write("judge", version, lambda d: shutil.copytree(folder, d, dirs_exist_ok=True), {})
        return ModelVersion(name="judge", version=version, uri=ref.uri)

    class Registry:
        served: ModelVersion | None = None

        def target(self, name: str) -> ModelVersion | None:
            assert name == "judge"
            return self.served

    registry = Registry()
    judge = ServedReward(registry, "judge")
    prompts, replies = [[ChatMessage("user", "hi")]] * 2, ["hello there", "go away"]
    assert judge.score(prompts, replies) is None  # nothing served: the guard is off, not failing
    registry.served = publish("v000001")
    name, scores = judge.score(prompts, replies)
    assert name == "judge@v000001" and len(scores) == 2 and all(math.isfinite(x) for x in scores)
    first = judge._loaded[1]
    assert judge.score(prompts, replies)[0] == "judge@v000001" and judge._loaded[1] is first  # loaded once
    registry.served = publish("v000002")
    assert judge.score(prompts, replies)[0] == "judge@v000002" and judge._loaded[1] is not first
    registry.served = ModelVersion(name="judge", version="v000003", uri=(tmp_path / "missing").as_uri())
    assert judge.score(prompts, replies) is None  # an unloadable version: off (logged), never a crash


class ScriptedGate:
    """Decides as scripted and notes the learner's live weights at each verdict (a unit test's gate)."""

    def __init__(self, learner: Learner, decisions: list[Decision]) -> None:
        self.learner, self.decisions, self.seen = learner, list(decisions), []

    def judge(self, ref, result, **kw) -> Decision:
        self.seen.append([p.detach().clone() for p in self.learner.params])
        return self.decisions.pop(0)

    def protected_versions(self) -> set[str]:
        return set()


@pytest.mark.parametrize("guarded_refusal", [True, False])
def test_a_guard_refusal_rolls_training_back_to_the_published_weights(tmp_path, tiny_base, guarded_refusal) -> None:
    cfg = config(tmp_path, tiny_base, checkpoint_every_records=4, publish=True)
    objective = objective_for(cfg)
    learner = Learner(objective, objective.load(str(tiny_base)), cfg)
    start = [p.detach().clone() for p in learner.params]
    gate = ScriptedGate(learner, [Decision(True, "first version"),
                                  Decision(False, "length guard: ..." if guarded_refusal else "accuracy drop",
                                           guarded=guarded_refusal),
                                  Decision(False, "drift guard: ...", guarded=True)])
    source = ListSource(records(12))
    loop = ContinualTrainer(cfg, learner, source, lineage=LineageState(), replay=ReservoirBuffer(16),
                            eval_set=EvalSet(8), store=CheckpointStore(cfg.checkpoint.checkpoint_url), gate=gate,
                            should_stop=lambda: source.exhausted())
    summary = loop.run()
    assert summary.published == ["v000001"] and summary.rejected == ["v000002", "v000003"]
    train = json.loads((tmp_path / "ckpt" / "policy" / "v000001" / "metadata.json").read_text())["train"]
    assert {"loss_avg", "pair_accuracy_avg", "reward_margin_avg"} <= set(train)  # the objective's own terms too
    published, refused, last = gate.seen
    assert not all(torch.equal(a, b) for a, b in zip(start, published))  # it trained
    now = [p.detach() for p in learner.params]
    # the drift-guard refusal of v3 always goes back to v1's weights; v3 trained from v1's or from v2's
    assert all(torch.equal(a, b) for a, b in zip(now, published))
    assert summary.rolled_back == (["v000002", "v000003"] if guarded_refusal else ["v000003"])
    assert not all(torch.equal(a, b) for a, b in zip(refused, published))  # v2 trained on from v1
    assert loop.lineage.previous_version == "v000001"
    assert learner.lr == pytest.approx(cfg.optim.lr * 0.5 ** len(summary.rolled_back))  # rollback_lr_factor 0.5
    state = learner.optimizer.state_dict()["state"]
    assert state and all(torch.isfinite(s["exp_avg"]).all() for s in state.values())


def test_roll_back_restores_weights_and_optimizer_moments_and_goes_on(tmp_path, tiny_base) -> None:
    cfg = config(tmp_path, tiny_base)
    objective = objective_for(cfg)
    learner = Learner(objective, objective.load(str(tiny_base)), cfg)
    train = records(8)
    objective.admit(learner.model, train)
    learner.train(train[:4])
    learner.keep_weights()
    kept = [p.detach().clone() for p in learner.params]
    moments = {k: v["exp_avg"].clone() for k, v in learner.optimizer.state_dict()["state"].items()}
    learner.train(train[4:])
    learner.train(train[:4])
    learner.roll_back()
    assert all(torch.equal(a, b) for a, b in zip(learner.params, kept))
    assert all(torch.equal(learner.optimizer.state_dict()["state"][k]["exp_avg"], m) for k, m in moments.items())
    assert learner.lr == cfg.optim.lr
    step = learner.step
    learner.train(train[4:])  # training goes on from the kept weights, and rolling back again still returns there
    assert learner.step == step + 1
    learner.roll_back(lr_factor=0.5)
    assert all(torch.equal(a, b) for a, b in zip(learner.params, kept))
    assert learner.lr == pytest.approx(cfg.optim.lr * 0.5)
    learner.train(train[4:])
    assert learner.lr == pytest.approx(cfg.optim.lr * 0.5)  # the smaller rate stays
    with pytest.raises(RuntimeError, match="keep_weights"):
        Learner(objective, objective.load(str(tiny_base)), cfg).roll_back()


def test_warm_up_runs_again_wherever_adams_moments_start_empty(tmp_path, tiny_base) -> None:
    cfg = config(tmp_path, tiny_base, warmup_steps=4)
    objective = objective_for(cfg)
    train = records(8)
    learner = Learner(objective, objective.load(str(tiny_base)), cfg)
    objective.admit(learner.model, train)
    learner.keep_weights()  # before the first step: no moments
    rates = [learner.train(train[i % 2 * 4:][:4]).lr for i in range(6)]
    assert rates == pytest.approx([cfg.optim.lr * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)])
    learner.roll_back(lr_factor=0.5)  # the start's empty Adam: its first update would be ~lr per weight again
    assert learner.step == 6 and learner.lr == pytest.approx(cfg.optim.lr * 0.5 * 0.25)
    rates = [learner.train(train[:4]).lr for _ in range(5)]
    assert rates == pytest.approx([cfg.optim.lr * 0.5 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0)])

    learner.keep_weights()  # with moments: a rollback to them goes on at the full (halved) rate
    learner.train(train[4:])
    learner.roll_back()
    assert learner.lr == pytest.approx(cfg.optim.lr * 0.5)

    # a checkpoint's optimizer state carries where the warm-up began and the rollbacks' factor
    saved = learner.optimizer_state()
    assert saved["param_groups"][0]["warm_from"] == 6 and saved["param_groups"][0]["lr_factor"] == 0.5
    resumed = Learner(objective, objective.load(str(tiny_base)), cfg, start_step=12)
    assert resumed.lr == pytest.approx(cfg.optim.lr * 0.25)  # resumed without moments: warms up again
    resumed.load_optimizer_state(copy.deepcopy(saved))
    assert resumed.lr == pytest.approx(cfg.optim.lr * 0.5)  # with them: the schedule and the halved rate go on
    resumed = Learner(objective, objective.load(str(tiny_base)), cfg, start_step=7)
    resumed.load_optimizer_state(copy.deepcopy(saved))
    assert resumed.lr == pytest.approx(cfg.optim.lr * 0.5 * 0.5)  # step 7 is the 2nd of the warm-up begun at 6
    assert resumed.train(train[:4]).lr == pytest.approx(cfg.optim.lr * 0.5 * 0.5)
    assert resumed.lr == pytest.approx(cfg.optim.lr * 0.5 * 0.75)


def test_repetition_rate() -> None:
    assert repetition_rate("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert repetition_rate("one two three four") == 0.0
    assert repetition_rate("") == 0.0


def test_checkpoint_serves_a_merged_folder_and_resumes_adapter_and_cache(tmp_path, tiny_base) -> None:
    cfg = config(tmp_path, tiny_base, checkpoint_every_records=8)
    point = find_resume_point(cfg, CheckpointStore(cfg.checkpoint.checkpoint_url))
    assert point.source == "base"
    learner = build_learner(cfg, point)
    replay = ReservoirBuffer(16)
    source = ListSource(records(8))
    loop = ContinualTrainer(cfg, learner, source, lineage=LineageState(), replay=replay, eval_set=EvalSet(8),
                            store=CheckpointStore(cfg.checkpoint.checkpoint_url), should_stop=source.exhausted)
    summary = loop.run()
    assert len(summary.checkpoints) == 1
    point = find_resume_point(cfg, CheckpointStore(cfg.checkpoint.checkpoint_url))
    folder = Path(point.model_path)
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["kind"] == "policy" and meta["loss"]["objective"] == "dpo"
    assert (folder / ADAPTER_DIR / "adapter_config.json").exists() and (folder / REF_FILE).exists()
    served = AutoModelForCausalLM.from_pretrained(folder)  # what the scorer loads: merged, no peft
    ids = learner.model.encode([records(1)[0].prompt], ["Paris."]).input_ids
    learner.model.model.eval()
    with torch.no_grad():
        live = learner.model.model(input_ids=ids).logits
        assert torch.allclose(served(input_ids=ids).logits, live, atol=1e-4)
    assert pipeline("text-generation", model=str(folder), max_new_tokens=3)("Hi")[0]["generated_text"]

    resumed = build_learner(cfg, point)
    with torch.no_grad():
        resumed.model.model.eval()
        assert torch.allclose(resumed.model.model(input_ids=ids).logits, live, atol=1e-5)
    assert set(resumed.objective.reference) == {r.record_id for r in replay.items()}


def test_log_probs_are_read_at_the_sampling_temperature_and_the_cache_remembers_it(tmp_path, tiny_base) -> None:
    """``temperature`` reads the policy's and the reference's log-probs from logits / T; the reference
    cache a checkpoint keeps says which T it was read at, and is recomputed rather than reused at another."""
    cold, hot = objective_for(config(tmp_path, tiny_base)), objective_for(config(tmp_path, tiny_base, temperature=0.7))
    m_cold, m_hot = cold.load(str(tiny_base)), hot.load(str(tiny_base))
    assert (m_cold.logit_temperature, m_hot.logit_temperature) == (1.0, 0.7)
    batch = records(2)
    cold.admit(m_cold, batch)
    hot.admit(m_hot, batch)
    r = batch[0].record_id
    assert cold.reference[r] != pytest.approx(hot.reference[r], abs=1e-3)
    rows = m_hot.encode([batch[0].prompt] * 2, list(batch[0].ranked_responses))
    assert torch.allclose(m_hot.logps(rows).detach(), torch.tensor(hot.reference[r]), atol=1e-5)  # fresh adapter
    assert hot.loss_config()["temperature"] == 0.7
    with pytest.raises(InvalidArgument, match="temperature"):
        m_hot.logit_temperature = 0.0
    hot.save_state(tmp_path, batch)
    again = objective_for(config(tmp_path, tiny_base, temperature=0.7))
    again.load_state(tmp_path)
    assert again.reference == hot.reference
    other = objective_for(config(tmp_path, tiny_base))
    other.load_state(tmp_path)  # read at 0.7, configured 1: not reused
    assert other.reference == {}
    (tmp_path / REF_FILE).write_text(json.dumps({r: list(cold.reference[r])}))  # the format before temperatures
    other.load_state(tmp_path)
    assert other.reference == {r: cold.reference[r]}


# --- the criteria guard and the wait for enough guard prompts ------------------------------------------


def test_violation_rise_counts_the_prompts_whose_records_name_rule_criteria() -> None:
    m = violation_rise([(True, False), (False, False), (None, None), (True, True), (False, None)])
    # per prompt differences 1, 0, 0: mean 1/3, stdev 1/sqrt(3), standard error 1/3
    assert m == pytest.approx({"violation_rate": 2 / 3, "reference_violation_rate": 1 / 3, "violation_rise": 1 / 3,
                               "violation_rise_se": 1 / 3, "criteria_prompts": 3.0})
    assert violation_rise([(True, False)])["violation_rise_se"] == 0.0  # one prompt: no spread to read
    assert violation_rise([(None, None)]) == {}  # no rule criterion on any guard prompt: nothing to guard


def criteria_judged(rate: float, reference: float, prompts: int = 12, ref: str = "brief@v1") -> EvalResult:
    result = guarded(30, prompts=16)
    result.metrics.update(violation_rise([(i < rate * prompts, i < reference * prompts) for i in range(prompts)]))
    result.metrics.update(criterion_rates([{ref: i < rate * prompts} for i in range(prompts)]))
    return result


def test_criterion_rates_count_each_criterion_over_the_prompts_that_name_it() -> None:
    broken = [{"brief@v1": True, "polite@v2": False}, {"brief@v1": False}, None, {"brief@v1": True, "polite@v2": True}]
    assert criterion_rates(broken) == pytest.approx({
        "violation_rate[brief@v1]": 2 / 3, "criteria_prompts[brief@v1]": 3.0,
        "violation_rate[polite@v2]": 0.5, "criteria_prompts[polite@v2]": 2.0})
    assert criterion_rates([None, None]) == {}


def test_criteria_guard_refuses_a_version_that_breaks_the_rules_more_often_than_the_reference(tmp_path,
                                                                                           tiny_base) -> None:
    objective = DPOObjective(config(tmp_path, tiny_base, criteria_guard=True, max_violation_rise=0.1))
    assert objective.guard(criteria_judged(0.25, 0.5)) == ""  # the rule learnt
    assert objective.guard(criteria_judged(7 / 12, 0.5)) == ""  # within the tolerated rise
    assert objective.guard(criteria_judged(0.75, 0.5)) == (
        "criteria guard: 75% of the replies to 12 held-out prompts break their records' rule criteria, against 50% "
        "of the reference policy's (SE of the paired difference 0.13; max_violation_rise 0.1)")
    assert objective.guard(guarded(30)) == ""  # no criteria numbers (no criteria records held out): nothing to refuse on
    off = DPOObjective(config(tmp_path, tiny_base, max_violation_rise=0.1))  # criteria_guard off: only recorded
    assert off.guard(criteria_judged(0.75, 0.5)) == "" and off.unjudged(criteria_judged(0.75, 0.5)) == ""


def test_violation_givebacks_compare_each_criterion_on_the_same_prompts_sampled_alike() -> None:
    assert violation_givebacks(criteria_judged(0.5, 0.5).metrics, criteria_judged(0.25, 0.5).metrics) == {"brief@v1": 0.25}
    assert violation_givebacks(criteria_judged(0.25, 0.5).metrics, criteria_judged(0.5, 0.5).metrics) == {"brief@v1": -0.25}
    assert violation_givebacks(criteria_judged(0.5, 0.5).metrics, guarded(30, prompts=16).metrics) == {}
    assert violation_givebacks(criteria_judged(0.5, 0.5).metrics, criteria_judged(0.25, 0.5, prompts=8).metrics) == {}
    assert violation_givebacks(criteria_judged(0.5, 0.5).metrics, criteria_judged(0.25, 0.5, ref="other@v1").metrics) == {}
    other = criteria_judged(0.25, 0.5)
    other.metrics["guard_temperature"] = 0.7  # the served replies were sampled, the candidate's greedy
    assert violation_givebacks(criteria_judged(0.5, 0.5).metrics, other.metrics) == {}
    # two criteria, worst first
    both = criteria_judged(0.5, 0.5)
    both.metrics.update(criteria_judged(0.25, 0.5, ref="polite@v1").metrics)
    was = criteria_judged(0.25, 0.5)
    was.metrics.update(criteria_judged(0.5, 0.5, ref="polite@v1").metrics)
    assert list(violation_givebacks(both.metrics, was.metrics).items()) == [("brief@v1", 0.25), ("polite@v1", -0.25)]


def test_criteria_guard_refuses_a_version_that_gives_back_what_the_served_version_learnt(tmp_path,
                                                                                         tiny_base) -> None:
    # the bench's second phase: v4 served at 31% violations, v5 at 64%, still no worse than the reference's 64%
    objective = DPOObjective(config(tmp_path, tiny_base, criteria_guard=True, max_violation_giveback=0.1))
    served = criteria_judged(4 / 12, 8 / 12)
    assert objective.guard(criteria_judged(5 / 12, 8 / 12), served) == ""  # within the tolerated giveback
    assert objective.guard(criteria_judged(2 / 12, 8 / 12), served) == ""  # learnt more
    assert objective.guard(criteria_judged(8 / 12, 8 / 12), served) == (
        "criteria guard: 67% of the replies to 12 held-out prompts break brief@v1, against 33% of the served "
        "version's (SE of the difference 0.19; max_violation_giveback 0.1)")
    # learning a second criterion does not pay for giving back the first: the any-rule share hides the trade
    learnt_second = criteria_judged(8 / 12, 8 / 12)
    learnt_second.metrics.update(criteria_judged(0.0, 8 / 12, ref="polite@v1").metrics)
    served_both = criteria_judged(4 / 12, 8 / 12)
    served_both.metrics.update(criteria_judged(8 / 12, 8 / 12, ref="polite@v1").metrics)
    assert objective.guard(learnt_second, served_both).startswith(
        "criteria guard: 67% of the replies to 12 held-out prompts break brief@v1, against 33%")
    assert objective.guard(criteria_judged(8 / 12, 8 / 12), None) == ""  # nothing served: the reference is the bar
    off = DPOObjective(config(tmp_path, tiny_base, criteria_guard=True))  # the default, 1, is off
    assert off.guard(criteria_judged(8 / 12, 8 / 12), served) == ""
    with pytest.raises(ValueError, match="max_violation_giveback"):
        config(tmp_path, tiny_base, max_violation_giveback=1.5)


def test_rate_difference_se_is_the_unpaired_binomial_error() -> None:
    assert rate_difference_se(0.5, 0.5, 4) == pytest.approx(math.sqrt(0.5 / 4))
    assert rate_difference_se(0.0, 1.0, 10) == 0.0 and rate_difference_se(0.3, 0.2, 0) == 0.0


def reward_judged(drop: float, se: float, prompts: int = 6) -> EvalResult:
    result = guarded(30, prompts=prompts)
    result.metrics.update(mean_reward=0.4, reward_drop=drop, reward_drop_se=se)
    return result


def test_a_guard_over_its_tolerance_within_doubt_z_standard_errors_waits_instead_of_refusing(tmp_path,
                                                                                          tiny_base) -> None:
    # the criteria loop's stalls: the reward guard refused a drop of 0.023 on 6 prompts (SE 0.040) and each such
    # refusal sent training back to the base policy
    doubting = DPOObjective(config(tmp_path, tiny_base, max_reward_drop=0.02, doubt_z=1.0, criteria_guard=True,
                                   max_violation_rise=0.0))
    noisy = reward_judged(0.0233, 0.0402)
    assert doubting.guard(noisy) == ""  # not refused, so not rolled back ...
    assert doubting.unjudged(noisy).startswith(  # ... and not published either: it waits
        "in doubt, not judged yet: reward guard: ")
    assert "within doubt_z 1.0 standard errors" in doubting.unjudged(noisy)
    clear = reward_judged(0.0641, 0.0321)  # 1.4 standard errors over the tolerance: refused
    assert doubting.guard(clear).startswith("reward guard: ") and doubting.unjudged(clear) == ""
    assert DPOObjective(config(tmp_path, tiny_base, max_reward_drop=0.02)).guard(noisy).startswith("reward guard")
    # a guard with no noise estimate is never in doubt, and a sure refusal is not hidden by a doubtful one
    collapsed = reward_judged(0.0233, 0.0402)
    collapsed.metrics["kl_to_ref"] = 9.0
    assert doubting.guard(collapsed).startswith("drift guard") and doubting.unjudged(collapsed) == ""
    # the criteria guard reads its paired standard error: on 8 prompts, 3 more replies over the rule (a rise of
    # 0.375, SE 0.18) is refused; 3 against 2, broken on different prompts (0.125, SE 0.23), is in doubt
    assert doubting.guard(criteria_judged(5 / 8, 2 / 8, prompts=8)).startswith("criteria guard")
    swapped = guarded(30, prompts=16)
    swapped.metrics.update(violation_rise([(a, b) for a, b in zip([1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0])]))
    assert doubting.guard(swapped) == ""
    assert doubting.unjudged(swapped).startswith("in doubt, not judged yet: criteria guard")
    assert doubting.unjudged(criteria_judged(2 / 8, 2 / 8, prompts=8)) == ""  # nothing over a tolerance: judged
    with pytest.raises(ValueError, match="doubt_z"):
        config(tmp_path, tiny_base, doubt_z=-0.5)


def test_a_version_judged_on_too_few_guard_prompts_waits_and_is_not_rolled_back(tmp_path, tiny_base) -> None:
    from services.registry import ModelVersion
    from services.checkpoints import CheckpointRef
    from trainer.gate import Gate

    cfg = config(tmp_path, tiny_base, guard_prompts=8, min_guard_prompts=6, publish=True)
    objective = objective_for(cfg)
    assert objective.unjudged(guarded(30, prompts=5)).startswith(
        "not judged yet: the guards read 5 held-out prompts, fewer than min_guard_prompts 6")
    assert objective.unjudged(guarded(30, prompts=6)) == ""
    assert objective.unjudged(None) == ""  # no held-out records at all: publish_without_eval decides, not a wait

    class Registry:
        redis, namespace = "the redis", "ns"  # where the gate's guards read the records' criteria

        def __init__(self) -> None:
            self.published, self.rejected = [], []

        def target(self, name: str) -> ModelVersion | None:
            return None

        def publish(self, version: ModelVersion) -> None:
            self.published.append(version.version)

        def reject(self, version: ModelVersion, reason: str) -> None:
            self.rejected.append((version.version, reason))

    registry = Registry()
    gate = Gate(cfg, registry, EvalSet(8), objective)
    early = guarded(1, prompts=3)  # would fail the length guard too: not judged, so not refused by it either
    early.metrics["reference_mean_words"] = 30.0
    decision = gate.judge(CheckpointRef("policy", "v000001", "file:///x", tmp_path), early, records_seen=8, base_model="b")
    assert not decision.publish and not decision.guarded and decision.reason.startswith("not judged yet")
    assert registry.rejected == [("v000001", decision.reason)] and registry.published == []
    decision = gate.judge(CheckpointRef("policy", "v000002", "file:///x", tmp_path), guarded(30, prompts=6), records_seen=16,
                          base_model="b")
    assert decision.publish and registry.published == ["v000002"]
    # a version over a tolerance within doubt_z standard errors waits the same way: not served, not rolled back
    doubting = config(tmp_path, tiny_base, guard_prompts=8, min_guard_prompts=6, publish=True, max_reward_drop=0.02,
                      doubt_z=1.0)
    gate = Gate(doubting, registry, EvalSet(8), objective_for(doubting))
    decision = gate.judge(CheckpointRef("policy", "v000003", "file:///x", tmp_path), reward_judged(0.0233, 0.0402),
                          records_seen=24, base_model="b")
    assert not decision.publish and not decision.guarded and decision.reason.startswith("in doubt, not judged yet")
    decision = gate.judge(CheckpointRef("policy", "v000004", "file:///x", tmp_path), reward_judged(0.0641, 0.0321),
                          records_seen=32, base_model="b")
    assert not decision.publish and decision.guarded and decision.reason.startswith("reward guard")
    with pytest.raises(ConfigError, match="min_guard_prompts"):
        config(tmp_path, tiny_base, guard_prompts=4, min_guard_prompts=5)


class Store:
    """The criteria store's one read: ``get(project, ref)``; one criterion stored, one unreachable call."""

    def __init__(self) -> None:
        from services.criteria import Criterion, Rule

        self.criteria = {("default", "brief@v1"): Criterion(name="brief", version="v1",
                                                            rules=(Rule("max_words", 4),)),
                         ("default", "judged@v1"): Criterion.from_dict({"name": "judged", "version": "v1",
                                                                        "judge": {"model": "policy",
                                                                                  "question": "Is it kind?"}})}
        self.calls, self.down = 0, False

    def get(self, project: str, ref: str):
        from services.criteria_store import CriterionNotFound

        self.calls += 1
        if self.down:
            raise ConnectionError("redis is down")
        if (project, ref) not in self.criteria:
            raise CriterionNotFound(project, ref)
        return self.criteria[(project, ref)]


def test_record_criteria_judge_a_reply_by_the_rule_criteria_its_record_names() -> None:
    from services.criteria import Rule
    from trainer.criteria_judge import RecordCriteria
    from trainer.guard_set import GuardPrompt

    store = Store()
    judge = RecordCriteria(store)
    record = records(1)[0]

    def named(*sources: str) -> GuardPrompt:  # a held-out record's prompt, with the criteria the record names
        return GuardPrompt.of_record(dataclasses.replace(record, source_event_ids=sources))

    brief = named("e1", "criterion:brief@v1")
    assert judge.breaks(brief, "one two three four") is False
    assert judge.broken(brief, "one two three four five") == {"brief@v1": True}
    assert judge.breaks(brief, "one two three four five") is True
    assert store.calls == 1  # a stored version never changes: read once
    human = GuardPrompt.of_record(record)
    assert judge.breaks(human, "anything at all, however long it runs") is None  # human feedback: no criteria
    judged_only = named("criterion:judged@v1")
    assert judge.breaks(judged_only, "a reply") is None  # a judge criterion needs a served model: not read here
    gone = named("criterion:deleted@v3", "criterion:brief@v1")
    assert judge.breaks(gone, "one two three four five") is True  # the criteria that can be read still judge
    store.down = True
    other = named("criterion:other@v1")
    assert judge.breaks(other, "x") is None  # the store unreachable: not judged, and asked again next time
    store.down = False
    store.criteria[("default", "other@v1")] = store.criteria[("default", "brief@v1")]
    assert judge.breaks(other, "one two three four five") is True
    assert judge.word_limit(brief) == 4 and judge.word_limit(human) is None  # no criteria: no limit
    assert judge.word_limit(judged_only) is None  # a judge criterion limits no words
    store.criteria[("default", "briefer@v1")] = dataclasses.replace(store.criteria[("default", "brief@v1")],
                                                                    name="briefer", rules=(Rule("max_words", 2),))
    both = named("criterion:brief@v1", "criterion:briefer@v1")
    assert judge.word_limit(both) == 2  # the tightest limit binds


def test_guard_metrics_count_the_rule_breaks_of_the_replies_and_the_reference_s(tmp_path, tiny_base) -> None:
    from trainer.criteria_judge import RecordCriteria
    from trainer.gate import Gate

    cfg = config(tmp_path, tiny_base, max_repetition_rate=1.0, max_empty_rate=1.0, criteria_guard=True, guard_prompts=3)
    objective = objective_for(cfg)

    class Registry:
        redis, namespace = "the redis", "ns"

    Gate(cfg, registry=Registry(), eval_set=EvalSet(8), objective=objective)
    assert isinstance(objective.criteria, RecordCriteria) and objective.criteria.store.namespace == "ns"
    # read without the criteria guard too: the length guard's bar counts the reference at most at a word limit
    unguarded = objective_for(config(tmp_path, tiny_base, guard_prompts=3))
    Gate(cfg, registry=Registry(), eval_set=EvalSet(8), objective=unguarded)
    assert isinstance(unguarded.criteria, RecordCriteria)
    objective.criteria = RecordCriteria(Store())
    learner = Learner(objective, objective.load(str(tiny_base)), cfg)
    held_out = [dataclasses.replace(r, prompt=(ChatMessage("user", f"question {i}"),),
                                    source_event_ids=("criterion:brief@v1",) if i else ())
                for i, r in enumerate(records(3, start=200))]
    m = objective.evaluate(learner.model, held_out).metrics
    assert m["criteria_prompts"] == 2.0  # the record without criteria is not counted
    # the policy is still the reference: the same replies break the rule alike
    assert m["violation_rate"] == m["reference_violation_rate"] and m["violation_rise"] == 0.0
    assert m["reference_words_within_limit"] <= m["reference_mean_words"]  # brief's max_words 4 on two prompts
    assert objective.guard(objective.evaluate(learner.model, held_out)) == ""


def test_a_guard_set_fixes_the_guard_prompts_before_training_and_names_their_criteria(tmp_path, tiny_base, caplog) -> None:
    from trainer.criteria_judge import RecordCriteria
    from trainer.guard_set import GuardPrompt, write_guard_set

    path = tmp_path / "guard_set.jsonl"
    asked = [(ChatMessage("system", "Be brief."), ChatMessage("user", f"guard question {i}")) for i in range(5)]
    write_guard_set(path, [GuardPrompt.make(p) for p in asked])  # no criteria named yet
    cfg = config(tmp_path, tiny_base, max_repetition_rate=1.0, max_empty_rate=1.0, criteria_guard=True,
                 guard_prompts=4, guard_set=str(path))
    objective = objective_for(cfg)
    objective.criteria = RecordCriteria(Store())
    learner = Learner(objective, objective.load(str(tiny_base)), cfg)
    held_out = records(2, split="test", start=300)  # the first checkpoint of a fresh stream: two held-out records

    m = objective.evaluate(learner.model, held_out).metrics
    assert m["guard_prompts"] == 4.0  # the guard set's first 4, however few records came in
    assert objective._guard_ids == [GuardPrompt.make(p).key for p in asked[:4]]
    assert "violation_rate" not in m  # no prompt names a criterion yet
    # a phase starts: the same prompts now name a rule criterion, read at the next evaluation
    write_guard_set(path, [GuardPrompt.make(p, criteria=("brief@v1",)) for p in asked])
    reference = objective._reference_replies
    m = objective.evaluate(learner.model, held_out + records(3, split="test", start=400)).metrics
    assert m["criteria_prompts"] == 4.0 and m["violation_rate"] == m["reference_violation_rate"]
    assert objective._reference_replies is reference  # the same prompts: the reference's replies are kept
    assert math.isfinite(m["kl_to_ref"]) and m["kl_to_ref"] == pytest.approx(0.0, abs=1e-4)  # still the reference
    # a file that cannot be read now keeps the prompts read before, and says so
    path.write_text("not json\n")
    with caplog.at_level("ERROR"):
        m = objective.evaluate(learner.model, held_out).metrics
    assert m["guard_prompts"] == 4.0 and m["criteria_prompts"] == 4.0 and "cannot be read now" in caplog.text


def test_a_version_evaluated_again_reuses_its_guard_replies_while_they_answer_the_same_prompts(tmp_path,
                                                                                            tiny_base) -> None:
    """The gate evaluates the served version again whenever the held-out set grew: its checkpoint's replies
    to an unchanged guard set are reused (a guard set's prompts and sampling are fixed), the rest re-measured."""
    from trainer.evaluation import EvalResult
    from trainer.guard_set import GuardPrompt, write_guard_set

    path = tmp_path / "guard_set.jsonl"
    write_guard_set(path, [GuardPrompt.make((ChatMessage("user", f"guard question {i}"),)) for i in range(4)])
    cfg = config(tmp_path, tiny_base, max_repetition_rate=1.0, max_empty_rate=1.0, guard_prompts=3,
                 guard_set=str(path))
    objective = objective_for(cfg)
    learner = Learner(objective, objective.load(str(tiny_base)), cfg)
    first = objective.evaluate(learner.model, records(2, split="test", start=300))
    assert len(first.replies) == 3 and first.replies_key
    own = EvalResult.from_dict(first.to_dict())  # as the checkpoint's metadata gives it back
    assert (own.replies, own.replies_key) == (first.replies, first.replies_key)
    assert "replies" not in first.to_dict(outcomes=False)  # reports leave them out

    calls = []
    generate = learner.model.generate
    learner.model.generate = lambda *a, **kw: calls.append(kw) or generate(*a, **kw)
    grown = records(2, split="test", start=300) + records(2, split="test", start=400)
    again = objective.evaluate(learner.model, grown, own)
    assert calls == [] and again.replies == first.replies  # nothing generated: the reference's are kept too
    assert again.pairs > first.pairs and again.metrics["mean_words"] == first.metrics["mean_words"]
    assert again.metrics["kl_to_ref"] == pytest.approx(first.metrics["kl_to_ref"])
    stale = dataclasses.replace(own, replies_key="0" * 16)  # other prompts or other sampling: generated again
    objective.evaluate(learner.model, grown, stale)
    assert len(calls) == 1 and not calls[0].get("reference")


def test_a_guard_set_that_cannot_be_read_at_start_names_the_field_the_file_and_the_line(tmp_path, tiny_base) -> None:
    from trainer.guard_set import load_guard_set

    with pytest.raises(InvalidArgument, match="guard_set.*not a file"):
        objective_for(config(tmp_path, tiny_base, guard_set=str(tmp_path / "missing.jsonl")))
    bad = {r"\.prompt: is not a guard-set field": {"prompt": "hi"},
           r"\.messages: must be a non-empty": {"messages": []},
           r"\.messages\[0\]\.role": {"messages": [{"role": "robot", "content": "hi"}]},
           r"\.criteria\[0\].*names no version": {"messages": [{"role": "user", "content": "hi"}], "criteria": ["brief"]},
           r"\.criteria\[1\].*v1, v2": {"messages": [{"role": "user", "content": "hi"}], "criteria": ["a@v1", "b@latest"]},
           r"\.project": {"messages": [{"role": "user", "content": "hi"}], "project": ""}}
    for i, (match, obj) in enumerate(bad.items()):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text(json.dumps({"messages": [{"role": "user", "content": "fine"}]}) + "\n" + json.dumps(obj) + "\n")
        with pytest.raises(InvalidArgument, match=rf"guard_set \(bad{i}\.jsonl line 2\){match}"):
            load_guard_set(f)
    f = tmp_path / "twice.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "same"}], "criteria": ["a@v1"]})
    f.write_text(line + "\n\n" + line + "\n")
    assert len(load_guard_set(f)) == 1  # one prompt once
