"""The criteria loop's pure parts: prompt files, the prompt plan, the measures, the config and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loop.config import LoopConfig, load_loop_config
from loop.prompts import (conversation, load_prompts, mean_words, parse_prompt_line, plan_prompts, retention, violated,
                          violation_rate, win_rate, word_spread)
from services.config import ConfigError
from services.criteria import parse_criterion
from services.criteria_eval import CriterionResult, evaluate
from services.errors import InvalidArgument


def test_prompt_lines_in_every_shape() -> None:
    openpipe = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": " How tall? "},
                             {"role": "assistant", "content": "x"}], "rejected_message": {"role": "assistant", "content": "y"}}
    assert parse_prompt_line(json.dumps(openpipe), "l1") == "How tall?"
    assert parse_prompt_line(json.dumps({"prompt": "Hi there"}), "l2") == "Hi there"
    assert parse_prompt_line("  plain text prompt \n", "l3") == "plain text prompt"
    assert parse_prompt_line(json.dumps({"messages": [{"role": "ROLE_USER", "content": "enum role"}]}), "l4") == "enum role"


@pytest.mark.parametrize("line, field, words", [
    ("{not json", "f (p line 3)", "does not parse"),
    (json.dumps({"text": "x"}), "f (p line 3)", "'prompt' string or a 'messages' list"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), "f (p line 3).messages", "no user message"),
    (json.dumps({"messages": [{"role": "user"}]}), "f (p line 3).messages[0]", "string 'content'"),
    (json.dumps({"prompt": "  "}), "f (p line 3)", "empty prompt"),
])
def test_bad_prompt_lines_name_the_line_and_the_fix(line: str, field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_prompt_line(line, "f (p line 3)")
    assert e.value.field == field and words in str(e.value)


def test_prompt_files_are_read_in_order_without_duplicates_or_blanks(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("b\n\na\nb\n" + json.dumps({"prompt": "c"}) + "\n")
    assert load_prompts(f) == ["b", "a", "c"]
    with pytest.raises(InvalidArgument, match="is not a file"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InvalidArgument, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt", field_name="eval_prompts")


def test_the_shipped_hh_files_give_disjoint_train_and_eval_prompts() -> None:
    from services.data import TEST_FILE, TRAIN_FILE, shared_data_dir

    train, held = load_prompts(shared_data_dir() / TRAIN_FILE), load_prompts(shared_data_dir() / TEST_FILE)
    plan = plan_prompts(train, held, eval_count=48, per_phase=200, phases=2, seed=0)
    assert len(plan.eval_prompts) == 48 and [len(p) for p in plan.phases] == [200, 200]
    assert not set(plan.eval_prompts) & (set(plan.phases[0]) | set(plan.phases[1]))
    assert not set(plan.phases[0]) & set(plan.phases[1])  # enough prompts: each phase gets its own


def test_the_plan_never_trains_on_an_eval_prompt_and_is_seeded() -> None:
    train = [f"p{i}" for i in range(10)]
    held = ["p3", "p7", "x"]
    plan = plan_prompts(train, held, eval_count=2, per_phase=4, phases=3, seed=1)
    assert plan.eval_prompts == ("p3", "p7") and plan.dropped_overlap == 2
    assert all("p3" not in ph and "p7" not in ph for ph in plan.phases)
    assert plan == plan_prompts(train, held, eval_count=2, per_phase=4, phases=3, seed=1)
    assert plan != plan_prompts(train, held, eval_count=2, per_phase=4, phases=3, seed=2)
    assert plan.train_prompts == 12
    with pytest.raises(InvalidArgument) as e:
        plan_prompts(train, held, eval_count=4, per_phase=4, phases=1, seed=0)
    assert e.value.field == "eval_count"
    with pytest.raises(InvalidArgument) as e:
        plan_prompts(["a"], ["a"], eval_count=1, per_phase=1, phases=1, seed=0)
    assert e.value.field == "prompts"


def test_the_gate_s_guard_prompts_are_set_aside_from_training_before_the_phases_take_theirs() -> None:
    from services.data import TEST_FILE, TRAIN_FILE, shared_data_dir

    train, held = load_prompts(shared_data_dir() / TRAIN_FILE), load_prompts(shared_data_dir() / TEST_FILE)
    plan = plan_prompts(train, held, eval_count=48, per_phase=240, phases=2, seed=0, guard_count=24)
    trained = set(plan.phases[0]) | set(plan.phases[1])
    assert len(plan.guard_prompts) == 24 and set(plan.guard_prompts) <= set(train)
    assert not set(plan.guard_prompts) & (trained | set(plan.eval_prompts))  # never trained on, never evaluated on
    assert [len(p) for p in plan.phases] == [240, 240]
    assert plan_prompts(train, held, eval_count=48, per_phase=240, phases=2, seed=0).guard_prompts == ()
    with pytest.raises(InvalidArgument) as e:
        plan_prompts([f"p{i}" for i in range(10)], ["x"], eval_count=1, per_phase=4, phases=1, seed=0, guard_count=10)
    assert e.value.field == "guard_prompts"


def test_the_loop_writes_the_gate_s_guard_set_and_names_each_phase_s_criteria_there(tmp_path: Path) -> None:
    from loop.run import LoopProcesses
    from services.config import env_vars
    from trainer.config import load_trainer_config
    from trainer.guard_set import load_guard_set

    cfg = load_loop_config(env={}, overrides={"system_prompt": "Be brief.", "project": "acme"})
    procs = LoopProcesses(cfg, ["first?", "second?"])
    procs.stack_dir, procs.checkpoints, procs.trainer_metrics_port = tmp_path, tmp_path / "ckpt", 9
    assert "guard_set" not in procs.trainer_leaves()  # until the run dir is there to write it in
    procs.guard_set = tmp_path / "guard_set.jsonl"
    procs.name_guard_criteria(())
    assert load_trainer_config(env=env_vars("trainer", procs.trainer_leaves())).dpo.guard_set == str(procs.guard_set)
    first = load_guard_set(procs.guard_set)
    assert [g.prompt[-1].content for g in first] == ["first?", "second?"] and first[0].prompt[0].content == "Be brief."
    assert all(g.criteria == () and g.project == "acme" for g in first)
    procs.name_guard_criteria(["concise@v1", "impersonal@v2"])  # the second phase judges both
    again = load_guard_set(procs.guard_set)
    assert [g.key for g in again] == [g.key for g in first]  # the same prompts, so the reference's replies are kept
    assert all(g.criteria == ("concise@v1", "impersonal@v2") for g in again)


def test_conversation_puts_the_system_prompt_first_when_given() -> None:
    assert [m.role for m in conversation("q", "be brief")] == ["system", "user"]
    assert [m.content for m in conversation("q", "")] == ["q"]


def _result(**kw: object) -> CriterionResult:
    return CriterionResult(**{"criterion": "c", "version": "v1", "status": "success", "score": 1.0, **kw})


def test_violations_of_rule_graded_and_failed_criteria() -> None:
    concise = parse_criterion({"name": "concise", "rules": [{"max_words": 3}]})
    results = [evaluate(concise, (), [t])[0] for t in ("one two three", "one two three four", "")]
    assert [violated(r) for r in results] == [False, True, False]
    assert violation_rate(results) == pytest.approx(1 / 3)
    assert violated(_result(score=0.4)) and not violated(_result(score=0.6))  # graded: under one half breaks it
    assert violated(_result(status="error", score=0.0))  # unscored never counts as kept
    assert math.isnan(violation_rate([]))


def test_win_rate_counts_ties_half_and_retention_is_the_share_of_the_cut_kept() -> None:
    assert win_rate([1.0, 0.0, 2.0, 5.0], [0.5, 0.0, 3.0, 1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError):
        win_rate([1.0], [])
    assert retention(0.6, 0.1, 0.1) == pytest.approx(1.0)
    assert retention(0.6, 0.1, 0.2) == pytest.approx(0.8)
    assert retention(0.6, 0.1, 0.7) == pytest.approx(-0.2)
    assert math.isnan(retention(0.3, 0.3, 0.1))
    assert mean_words(["a b", "c d e f"]) == 3.0
    ten = [" ".join(["w"] * n) for n in (10, 1, 9, 2, 8, 3, 7, 4, 6, 5)]
    assert word_spread(ten) == {"p10": 1.0, "p50": 5.0, "p90": 9.0}
    assert word_spread(["one two"]) == {"p10": 2.0, "p50": 2.0, "p90": 2.0} and word_spread([]) == {}


def test_loop_config_defaults_layers_and_errors(tmp_path: Path) -> None:
    cfg = load_loop_config(env={})
    assert cfg.criteria == ("docs/criteria/concise.yaml",) and Path(cfg.criteria[0]).is_file()
    cfg = load_loop_config(env={"PREFSTREAM_LOOP_CANDIDATES": "6"}, overrides={"criteria": ["a", "b@v2"]})
    assert cfg.candidates == 6 and cfg.criteria == ("a", "b@v2")
    for bad, field in [({"candidates": 1}, "candidates"), ({"gate_every": 1}, "gate_every"),
                       ({"temperature": 0}, "temperature"), ({"beta": 0}, "beta"), ({"criteria": []}, "criteria"),
                       ({"max_tokens_per_backward": -1}, "max_tokens_per_backward"), ({"max_backlog": -1}, "max_backlog"),
                       ({"label_smoothing": 0.5}, "label_smoothing"),
                       ({"label_smoothing": 0.1, "dpo_loss": "ipo"}, "label_smoothing"), ({"dpo_loss": "nope"}, "dpo_loss"),
                       ({"pairing": "ranking"}, "pairing"), ({"pairing": "best"}, "pairing"),
                       ({"together": True, "keep_earlier": True}, "keep_earlier"),
                       ({"train_temperature": -1}, "train_temperature"), ({"stop_anchor": -1}, "stop_anchor")]:
        with pytest.raises((ConfigError, InvalidArgument)) as e:
            load_loop_config(env={}, overrides=bad)
        assert field in str(e.value)
    assert LoopConfig().system_prompt == "Answer in at most 50 words."
    assert load_loop_config(env={}, overrides={"pairing": "matched"}).pairing == "matched"
    assert load_loop_config(env={}, overrides={"pairing": "trim"}).pairing == "trim"
    # The trainer reads log-probs at the model's own temperature, or (0) at the candidates' sampling one.
    assert load_loop_config(env={}, overrides={"temperature": 0.9}).trainer_temperature == 1.0
    assert load_loop_config(env={}, overrides={"temperature": 0.9, "train_temperature": 0}).trainer_temperature == 0.9


def test_the_policy_trainer_gets_the_loops_adapter_settings_through_its_environment(tmp_path: Path) -> None:
    from loop.run import LoopProcesses
    from services.config import env_vars
    from trainer.config import load_trainer_config

    def trainer_dpo(**overrides):
        procs = LoopProcesses(load_loop_config(env={}, overrides=overrides))
        procs.stack_dir, procs.checkpoints, procs.trainer_metrics_port = tmp_path, tmp_path / "ckpt", 9
        return load_trainer_config(env=env_vars("trainer", procs.trainer_leaves())).dpo

    mlp = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    dpo = trainer_dpo(lora_target_modules=",".join(mlp), lora_rank=32, lora_alpha=64)
    assert (dpo.finetune, dpo.lora_rank, dpo.lora_alpha, dpo.lora_target_modules) == ("lora", 32, 64.0, mlp)
    assert trainer_dpo(finetune="full").finetune == "full"
    dpo = trainer_dpo()  # the loop's defaults are the trainer's own
    assert (dpo.lora_rank, dpo.lora_target_modules) == (16, ("q_proj", "k_proj", "v_proj", "o_proj"))
    for bad, field in [({"lora_rank": 0}, "lora_rank"), ({"lora_target_modules": ""}, "lora_target_modules"),
                       ({"stop_anchor_sides": "fall"}, "stop_anchor_sides"),
                       ({"finetune": "qlora"}, "finetune"), ({"lora_alpha": 0}, "lora_alpha")]:
        with pytest.raises((ConfigError, InvalidArgument)) as e:
            load_loop_config(env={}, overrides=bad)
        assert field in str(e.value)


def test_the_policy_trainer_gets_the_loops_gate_settings_through_its_environment(tmp_path: Path) -> None:
    from loop.run import LoopProcesses
    from services.config import env_vars
    from trainer.config import load_trainer_config

    def trainer(**overrides):
        procs = LoopProcesses(load_loop_config(env={}, overrides=overrides))
        procs.stack_dir, procs.checkpoints, procs.trainer_metrics_port = tmp_path, tmp_path / "ckpt", 9
        return load_trainer_config(env=env_vars("trainer", procs.trainer_leaves()))

    cfg = trainer(criteria_guard=True, max_violation_giveback=0.1, min_guard_prompts=6, rollback_lr_factor=1.0,
                  doubt_z=1.0, warmup_steps=10)
    assert (cfg.dpo.criteria_guard, cfg.dpo.max_violation_giveback, cfg.dpo.min_guard_prompts) == (True, 0.1, 6)
    assert cfg.gate.rollback_lr_factor == 1.0 and cfg.dpo.doubt_z == 1.0 and cfg.optim.warmup_steps == 10
    cfg = trainer()  # off by default, and the trainer's own rollback factor
    assert (cfg.dpo.criteria_guard, cfg.dpo.max_violation_giveback, cfg.gate.rollback_lr_factor) == (False, 1.0, 0.5)
    assert cfg.dpo.doubt_z == 0.0 and cfg.optim.warmup_steps == 0 and cfg.dpo.stop_anchor == 0.0
    assert (trainer(stop_anchor=5.0, stop_anchor_sides="rise").dpo.stop_anchor, trainer(stop_anchor_sides="rise").dpo.stop_anchor_sides) == (5.0, "rise")
    for bad, field in [({"max_violation_giveback": 1.5}, "max_violation_giveback"),
                       ({"rollback_lr_factor": 0}, "rollback_lr_factor"), ({"doubt_z": -1}, "doubt_z"),
                       ({"warmup_steps": -1}, "warmup_steps")]:
        with pytest.raises((ConfigError, InvalidArgument)) as e:
            load_loop_config(env={}, overrides=bad)
        assert field in str(e.value)


def test_phases_rank_by_their_criterion_alone_with_the_earlier_ones_or_all_at_once() -> None:
    from loop.run import phase_criteria

    a, b, c = (parse_criterion({"name": n, "rules": [{"max_words": 5}]}, project="default") for n in "abc")
    assert phase_criteria([a, b, c], together=False, keep_earlier=False) == [[a], [b], [c]]
    assert phase_criteria([a, b, c], together=False, keep_earlier=True) == [[a], [a, b], [a, b, c]]
    assert phase_criteria([a, b, c], together=True, keep_earlier=False) == [[a, b, c]]


def test_report_has_every_figure_and_escapes_replies(tmp_path: Path) -> None:
    from loop.report import FIGURES, write_loop_report

    summary = {
        "criterion": "concise@v1", "criteria": ["concise@v1", "impersonal@v1"], "violation_rate_base": 0.56,
        "phase_marks": [(10.0, "concise@v1"), (300.0, "impersonal@v1")],
        "evaluations": [
            {"t": 5.0, "phase": 0, "version": "base", "versions": {"base": 4}, "violation": {"concise@v1": 0.56, "impersonal@v1": 0.4},
             "mean_words": 62.0, "mean_reward": 0.1, "kl_to_ref": None},
            {"t": 200.0, "phase": 0, "version": "v000002", "versions": {"v000002": 4},
             "violation": {"concise@v1": 0.1, "impersonal@v1": 0.35}, "mean_words": 30.0, "mean_reward": 0.2, "kl_to_ref": 0.05,
             "words": {"p10": 12.0, "p50": 29.0, "p90": 47.0}},
        ],
        "examples": [{"prompt": "<b>q</b>", "base": "long", "final": "short"}], "final_version": "v000002",
    }
    page = write_loop_report(tmp_path, summary)
    text = page.read_text()
    assert "&lt;b&gt;q&lt;/b&gt;" in text and "<b>q</b>" not in text
    for name in FIGURES:
        assert (tmp_path / name).stat().st_size > 1000 and name in text
    assert json.loads((tmp_path / "summary.json").read_text())["violation_rate_base"] == 0.56


def test_the_replies_digest_tells_two_measurements_apart_only_by_their_text() -> None:
    from loop.run import replies_digest

    d = replies_digest(["Short answer.", "Another one."])
    assert d == replies_digest(["Short answer.", "Another one."]) and len(d) == 16 and int(d, 16) >= 0
    assert d != replies_digest(["Short answer.", "Another one!"])  # one character
    assert d != replies_digest(["Another one.", "Short answer."])  # prompt order counts
    assert replies_digest(["ab", "c"]) != replies_digest(["a", "bc"])  # where one reply ends counts
