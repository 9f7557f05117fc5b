"""``prefstream bench criteria-ceiling``: how good can a reply that keeps the rule be, by the loop's quality judge?

criteria-loop's quality target asks the final policy's reply to beat the base policy's at least 45% of
the time (``quality_win_rate_vs_base``), judged by the reward model trained on the HH pairs.  That
judge likes long replies and a word limit asks for shorter ones, so the two targets pull apart.  This
bench measures how far, with no training: the base policy answers each of the loop's held-out prompts
(the loop's system prompt, evaluation temperature and token budget, a fixed seed per prompt) once as
the *reference* and N more times as *candidates*; the judge compares every candidate with the
reference of its prompt, which is what ``quality_win_rate_vs_base`` does with the final policy's reply.

Reported (``ceiling_stats``): the candidates' win rate against the reference by length (10-word
bins) and whether they keep the criterion; the within-prompt correlation of length and judge score;
and for a few ways to pick one candidate per prompt, what a policy that always answered like that
would score -- win rate, violation rate, words: a random candidate (the base policy itself), the
criteria's best-of-N winner (passing first, then the judge: what the loop's pairs teach), the judge's
own pick, and the judge's best passing candidate (prompts where one passes); the same again among
each prompt's first N candidates, N the loop's own best-of-N (``policies_first_k``).

Quick mode is a smoke run (tiny sizes, the untrained reward backbone as judge: its numbers mean
nothing and are reported as such).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

FULL = {"eval_count": 48, "candidates": 12, "max_tokens": 128}
QUICK = {"eval_count": 3, "candidates": 3, "max_tokens": 24}
#: Upper edge of the last length bin: longer candidates fall in it too.
LAST_BIN = 80


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--criterion", default="docs/criteria/concise.yaml",
                   help="a rule criterion's definition file (YAML/JSON); rules are checked offline")
    p.add_argument("--candidates", type=int, default=None, help="candidates per prompt besides the reference "
                                                                 "(default 12; 3 quick)")
    p.add_argument("--eval-count", type=int, default=None, help="held-out prompts (default 48 = criteria-loop's)")
    p.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i, as the loop evaluates")


def _win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def ceiling_stats(rows: Sequence[Mapping[str, Any]], first_k: Sequence[int] = ()) -> dict[str, Any]:
    """The judge's verdicts on candidates against each prompt's reference reply.

    Each row is one prompt: ``reference`` (the judge's score of the reference reply), ``scores``,
    ``words`` and ``passed`` (one per candidate).  Ties count half, as in ``quality_win_rate_vs_base``.
    ``policies`` choose among all candidates; ``policies_first_k[k]`` among each prompt's first ``k``
    (e.g. the loop's own N), for every k below the candidate count.
    """
    if not rows or any(not r["scores"] or not len(r["scores"]) == len(r["words"]) == len(r["passed"]) for r in rows):
        raise ValueError("every row needs >= 1 candidate with a score, a word count and a pass flag")
    bins: dict[int, dict[str, list[float]]] = {}
    correlations, longer = [], []
    for r in rows:
        n = len(r["scores"])
        for s, w, ok in zip(r["scores"], r["words"], r["passed"]):
            b = bins.setdefault(min(w // 10 * 10, LAST_BIN), {"win": [], "passed": []})
            b["win"].append(_win(s, r["reference"]))
            b["passed"].append(float(ok))
        c = _correlation(r["words"], r["scores"])
        if c is not None:
            correlations.append(c)
        for i in range(n):
            for j in range(i + 1, n):
                if r["words"][i] != r["words"][j] and r["scores"][i] != r["scores"][j]:
                    long_, short = (i, j) if r["words"][i] > r["words"][j] else (j, i)
                    longer.append(float(r["scores"][long_] > r["scores"][short]))

    return {
        "by_words": [{"words": f"{lo}-{lo + 9}" if lo < LAST_BIN else f"{LAST_BIN}+", "candidates": len(b["win"]),
                      "win_rate_vs_reference": _mean(b["win"]), "passing_share": _mean(b["passed"])}
                     for lo, b in sorted(bins.items())],
        "words_score_correlation_within_prompt": _mean(correlations),
        "longer_preferred_share": _mean(longer),
        "policies": pick_policies(rows),
        "policies_first_k": {str(k): pick_policies([{**r, **{f: r[f][:k] for f in ("scores", "words", "passed")}}
                                                    for r in rows])
                             for k in first_k if k < min(len(r["scores"]) for r in rows)},
    }


def pick_policies(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """What a policy that always answered with one chosen candidate would score: win rate against
    the reference, violation rate and words, for four ways to choose (prompts with nothing to choose
    are left out and counted in ``prompts``)."""

    def policy(pick: Callable[[Mapping[str, Any]], int | None]) -> dict[str, Any]:
        chosen = [(r, pick(r)) for r in rows]
        chosen = [(r, k) for r, k in chosen if k is not None]
        return {
            "prompts": len(chosen),
            "win_rate_vs_reference": _mean([_win(r["scores"][k], r["reference"]) for r, k in chosen]),
            "violation_rate": _mean([0.0 if r["passed"][k] else 1.0 for r, k in chosen]),
            "mean_words": _mean([float(r["words"][k]) for r, k in chosen]),
        }

    def best(r: Mapping[str, Any], key: Callable[[int], Any], among: Sequence[int] | None = None) -> int | None:
        ks = list(range(len(r["scores"]))) if among is None else list(among)
        return max(ks, key=key) if ks else None

    return {
        "random_candidate": policy(lambda r: 0),
        "criteria_best_of_n": policy(lambda r: best(r, lambda k: (r["passed"][k], r["scores"][k]))),
        "judge_best_of_n": policy(lambda r: best(r, lambda k: r["scores"][k])),
        "judge_best_passing": policy(lambda r: best(r, lambda k: r["scores"][k],
                                                    [k for k, ok in enumerate(r["passed"]) if ok])),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.criteria_loop import FULL as LOOP_FULL, held_out
    from loop.prompts import conversation, violated
    from loop.reward import cached_reward_model
    from services.criteria import parse_criterion
    from services.criteria_cli import read_definitions
    from services.criteria_eval import count_words, evaluate
    from services.data import TRAIN_FILE, shared_data_dir
    from services.errors import InvalidArgument
    from services.policy_model import PolicyModel, SamplingParams
    from services.reward_model import RewardModel, default_reward_model_path

    sizes = dict(QUICK if args.quick else FULL)
    if args.candidates:
        sizes["candidates"] = args.candidates
    if args.eval_count:
        sizes["eval_count"] = args.eval_count
    [definition, *_] = read_definitions(args.criterion)
    criterion = parse_criterion(definition)
    if criterion.kind != "rules":
        raise InvalidArgument("criterion", f"{criterion.name} is a {criterion.kind} criterion; this bench checks "
                                           "rule criteria offline: give a definition file with rules")
    loop, plan = held_out(sizes["eval_count"], args.seed)
    judge_path = str(cached_reward_model(str(shared_data_dir() / TRAIN_FILE))) if not args.quick \
        else default_reward_model_path()
    started = time.perf_counter()
    policy = PolicyModel.from_pretrained()
    judge = RewardModel.from_pretrained(judge_path)
    rows = []
    for i, prompt in enumerate(plan.eval_prompts):
        conv = conversation(prompt, loop.system_prompt)
        [replies] = policy.generate_batch([conv], SamplingParams(
            n=1 + sizes["candidates"], temperature=loop.eval_temperature, max_tokens=sizes["max_tokens"],
            seed=args.seed + i))
        scores = [s.reward for s in judge.score([conv] * len(replies), replies)]
        kept = [not violated(r) for r in evaluate(criterion, conv, replies[1:])]
        rows.append({"reference": scores[0], "scores": scores[1:], "words": [count_words(t) for t in replies[1:]],
                     "passed": kept, "reference_words": count_words(replies[0])})
        if (i + 1) % 8 == 0 or i + 1 == len(plan.eval_prompts):
            log.info("%d/%d prompts answered and judged (%.0f s)", i + 1, len(plan.eval_prompts),
                     time.perf_counter() - started)
    stats = ceiling_stats(rows, first_k=(LOOP_FULL["candidates"],))
    return {
        "criterion": f"{criterion.name} ({args.criterion})",
        "eval_prompts": len(rows),
        "candidates_per_prompt": sizes["candidates"],
        "reference_mean_words": _mean([float(r["reference_words"]) for r in rows]),
        "quality_judge": "reward model trained on the 2k HH train pairs" if not args.quick else
                         "the untrained reward backbone (quick mode): the numbers are not meaningful",
        "settings": {"system_prompt": loop.system_prompt, "temperature": loop.eval_temperature,
                     "max_tokens": sizes["max_tokens"], "seed": args.seed, "policy": "embedded SmolLM2-135M-Instruct"},
        "generate_and_judge_s": round(time.perf_counter() - started, 1),
        **stats,
    }
