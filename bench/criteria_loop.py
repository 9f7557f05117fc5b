"""``prefstream bench criteria-loop``: the criteria loop on the real stack, measured (``bench/results/criteria-loop.json``).

The task is OpenPipe's word-limit result made continual: the system prompt "Answer in at most 50
words.", the ``concise`` criterion (``max_words: 50``, ties ordered by the reward model), first user
turns of the shipped HH-RLHF train file for training and of the test file for evaluation (disjoint).
``prefstream loop criteria`` runs best-of-N with the criterion through the gateway's OpenAI route with
``store: true``; the criteria feedback it produces trains the policy by continual DPO; every gated
version is hot-swapped into the scorer and the served policy is measured (n = 1, a fixed seed per
held-out prompt) after each.  A second phase then teaches ``impersonal`` (no "you") and the result
reports how much of the first criterion's cut survives it (``first_criterion_retention``), and how
often the reward model trained on the HH pairs prefers the final policy's reply to the base policy's
(``quality_win_rate_vs_base``, ties count half).

Quick mode is a smoke run (tiny sizes, the untrained reward backbone as tie breaker, so its quality
number means nothing and is reported as such).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

#: How the bench teaches (both modes): pairs cut from failing replies where both replies end the turn,
#: with the tie breaker's best passing reply over its worst beside them, and the gate's reward guard on
#: (without it those pairs took the policy past the limit: docs/loop.md, "A reward guard"); the earlier
#: phases' criteria kept in the later ranking, DPO alone (no NLL term, a uniform push to stop sooner),
#: and an adapter on the MLP as well as the attention (docs/loop.md, "Pairs where both replies stop");
#: the gate's criteria guard against the reference and the served version, and no verdict on fewer than 6
#: held-out prompts (docs/loop.md, "A criteria guard against the served version"); a 10-step warm-up of the
#: learning rate (docs/loop.md, "An evaluation decoded alone, and a warm-up against the first checkpoints
#: going long").
RECIPE = {"pairing": "trim_bracket", "reward_guard": True, "keep_earlier": True, "sft_weight": 0.0,
          "lora_target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
          "criteria_guard": True, "min_guard_prompts": 6, "max_violation_giveback": 0.1, "doubt_z": 1.0,
          "max_reward_giveback": 0.01,
          "max_shrink": 0.45, "warmup_steps": 10}
FULL = {"train_prompts": 240, "eval_count": 48, "phase_s": 600.0, "max_tokens": 128, "checkpoint_every_records": 24,
        "candidates": 6, "reward_checkpoint": "auto"}
QUICK = {"train_prompts": 16, "eval_count": 8, "phase_s": 150.0, "max_tokens": 48, "checkpoint_every_records": 6,
         "reward_checkpoint": "", "candidates": 3, "min_versions": 1, "drain_timeout_s": 120.0,
         "min_guard_prompts": 0}  # a quick run holds out a handful of prompts: judge on what there is

CRITERIA = ("docs/criteria/concise.yaml", "docs/criteria/impersonal.yaml")


def held_out(eval_count: int, seed: int) -> tuple[Any, Any]:
    """The loop's configuration and prompt plan with ``eval_count`` held-out prompts: the prompts the
    loop evaluates on, for the benches that read policies offline (criteria-ceiling, stop-hazard)."""
    from loop.config import LoopConfig
    from loop.run import make_plan

    loop = LoopConfig(eval_count=eval_count, train_prompts=FULL["train_prompts"], seed=seed)
    return loop, make_plan(loop, 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--criteria", default=",".join(CRITERIA),
                   help="comma-separated criteria taught one after another (names or definition files); "
                        "retention is measured for the first")
    p.add_argument("--run-dir", default=".run/bench-criteria-loop", help="stack, checkpoints and logs of the run")
    p.add_argument("--seed", type=int, default=0, help="prompt order and evaluation seeds")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other loop setting (see `prefstream loop criteria --help`), e.g. --set lr=3e-4")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    s: dict[str, Any] = {**RECIPE, **(QUICK if args.quick else FULL)}
    s.update(criteria=[c for c in args.criteria.split(",") if c], run_dir=args.run_dir, seed=args.seed, fresh=True)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write FIELD=VALUE")
        s[key.strip().replace("-", "_")] = value
    return s


KEYS = ("criterion", "violation_rate_base", "violation_rate_final", "relative_reduction", "eval_prompts",
        "train_prompts", "versions_published", "versions_rejected", "failed_requests", "first_criterion_retention",
        "quality_win_rate_vs_base", "kl_to_ref", "mean_words_base", "mean_words_final")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from loop.config import load_loop_config
    from loop.reward import cached_reward_model
    from loop.run import run_criteria_loop
    from services.data import TRAIN_FILE, shared_data_dir

    s = settings(args)
    reward_train_s = 0.0
    if s.get("reward_checkpoint") == "auto":  # trained once and cached; timed apart from the loop
        t = time.time()
        s["reward_checkpoint"] = str(cached_reward_model(str(shared_data_dir() / TRAIN_FILE)))
        reward_train_s = round(time.time() - t, 1)
    elif args.quick:
        s["reward_checkpoint"] = ""
    cfg = load_loop_config(overrides=s, env={})
    started = time.time()
    summary = run_criteria_loop(cfg)
    loop_s = round(time.time() - started, 1)
    result = {k: summary.get(k) for k in KEYS}
    result.update({
        "loop_wall_s": loop_s,
        "reward_model_prepare_s": reward_train_s,
        "quality_judge": "reward model trained on the 2k HH train pairs" if cfg.reward_checkpoint else
                         "the untrained reward backbone (quick mode): quality_win_rate_vs_base is not meaningful",
        "criteria": summary["criteria"],
        "violation_rates_base": summary["violation_rates_base"],
        "violation_rates_after_each_phase": summary["violation_rates_after_each_phase"],
        "candidates_passing_share": summary["candidates_passing_share"],
        "candidates_per_version": summary["candidates_per_version"],
        "max_backlog": summary["max_backlog"],
        "held_for_trainer_s": summary["held_for_trainer_s"],
        "held_for_evaluation_s": summary["held_for_evaluation_s"],
        "peak_trainer_backlog": summary["peak_trainer_backlog"],
        "best_of_n_sent": summary["best_of_n_sent"],
        "gate_prompts": summary["gate_prompts"],
        "guard_set_prompts": summary["guard_set_prompts"],
        "rejections": summary["rejections"],
        "gate_metrics": summary["gate_metrics"],
        "evaluations": summary["evaluations"],
        "mean_reward_base": summary["mean_reward_base"],
        "mean_reward_final": summary["mean_reward_final"],
        "words_spread_base": summary["words_spread_base"],
        "words_spread_final": summary["words_spread_final"],
        "cut_off_base": summary["cut_off_base"],
        "cut_off_final": summary["cut_off_final"],
        "examples": summary["examples"][:3],
        "errors": summary["errors"],
        "settings": summary["settings"],
        "report": summary.get("report"),
    })
    return result
