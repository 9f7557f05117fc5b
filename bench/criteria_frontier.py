"""``prefstream bench criteria-frontier``: what the gate saw when a checkpoint cut the word limit.

``bench criteria-loop`` has two targets that pull against each other: cut the first criterion's
violations by 77% and keep the quality judge's win rate against the base at 45%.  Every run's result
keeps the gate's reading of each checkpoint (``gate_metrics``): on the gate's own held-out prompts,
its violation rate beside the reference policy's, and the judge's mean score below the reference's
(``reward_drop``, the reward guard's number).  This bench reads those from every committed
criteria-loop result (no training, no stack) and reports, for the checkpoints trained on the first
criterion alone, how far the judge's score fell at each size of cut: whether any checkpoint reached
the cut target inside the reward bar, and on how many guard prompts; and how much of the judge's drop
the reply's length alone explains (a line of the drop on the change in words).

Quick mode is the same reading (it takes a second).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

#: Lower edges of the cut bins (the share of the reference's violations a checkpoint no longer makes).
CUT_EDGES: tuple[float, ...] = (float("-inf"), 0.0, 0.3, 0.6)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", nargs="*", type=Path, default=None,
                   help="criteria-loop result files (default: every bench/results/criteria-loop*.json)")
    p.add_argument("--target-cut", type=float, default=0.77, help="the cut target (criteria-loop's relative_reduction)")
    p.add_argument("--reward-bar", type=float, default=0.02,
                   help="the reward guard's tolerance below the reference (criteria-loop's max_reward_drop)")
    p.add_argument("--min-guard-prompts", type=int, default=24,
                   help="checkpoints read on at least this many guard prompts are counted apart")


def first_phase_checkpoints(result: Mapping[str, Any], source: str = "") -> list[dict[str, Any]]:
    """The checkpoints of one criteria-loop result that the gate judged on the first criterion alone,
    each with its guard-set ``cut`` (1 - violation rate / the reference's), ``reward_drop``, words,
    KL, guard prompts and the gate's verdict.  Checkpoints without a reward reading or whose reference
    kept every rule (no cut to measure) are left out."""
    later = list(result.get("criteria") or [])[1:]
    out = []
    for version, m in sorted((result.get("gate_metrics") or {}).items()):
        if "reward_drop" not in m or any(f"criteria_prompts[{c}]" in m for c in later):
            continue
        # judged on one criterion, the version's and the reference's rates are that criterion's
        rate, ref = m.get("violation_rate"), m.get("reference_violation_rate")
        if ref is None or rate is None or ref <= 0:
            continue
        words, ref_words = m.get("mean_words"), m.get("reference_mean_words")
        out.append({"run": source, "version": version, "cut": 1.0 - rate / ref, "reward_drop": m["reward_drop"],
                    "mean_words": words, "kl_to_ref": m.get("kl_to_ref"),
                    "words_change": None if words is None or ref_words is None else words - ref_words,
                    "guard_prompts": int(m.get("guard_prompts", 0)), "state": m.get("state")})
    return out


def _median(points: Iterable[Mapping[str, Any]], key: str) -> float | None:
    values = [p[key] for p in points if p.get(key) is not None]
    return statistics.median(values) if values else None


def frontier(points: Sequence[Mapping[str, Any]], target_cut: float, reward_bar: float,
             min_guard_prompts: int) -> dict[str, Any]:
    """Bins of ``points`` by cut (:data:`CUT_EDGES`, then ``target_cut``): how many, the median reward
    drop, the share within ``reward_bar``, median words and KL; and the checkpoints that reached
    ``target_cut`` within the bar, with how many of them were read on ``min_guard_prompts`` or more."""
    edges = [*CUT_EDGES, target_cut, float("inf")]
    bins = []
    for lo, hi in zip(edges, edges[1:]):
        inside = [p for p in points if lo <= p["cut"] < hi]
        if not inside:
            continue
        bins.append({"cut_from": None if lo == float("-inf") else lo, "cut_to": None if hi == float("inf") else hi,
                     "checkpoints": len(inside), "median_reward_drop": _median(inside, "reward_drop"),
                     "within_reward_bar": sum(p["reward_drop"] <= reward_bar + 1e-12 for p in inside) / len(inside),
                     "median_words": _median(inside, "mean_words"), "median_kl_to_ref": _median(inside, "kl_to_ref"),
                     "checkpoints_on_min_guard_prompts": sum(p["guard_prompts"] >= min_guard_prompts for p in inside)})
    both = [dict(p) for p in points if p["cut"] >= target_cut and p["reward_drop"] <= reward_bar + 1e-12]
    return {"bins": bins, "target_cut_within_reward_bar": both,
            "target_cut_within_reward_bar_on_min_guard_prompts": sum(p["guard_prompts"] >= min_guard_prompts for p in both)}


def length_fit(points: Sequence[Mapping[str, Any]], reward_bar: float) -> dict[str, Any] | None:
    """How much of the judge's drop the reply length explains: the least-squares line of ``reward_drop``
    on ``words_change`` (the checkpoint's mean words minus the reference's on the same prompts), its
    correlation, the correlation of what the line leaves with the cut (near 0: at a given length, keeping
    the rule costs the judge nothing), and the words shorter than the reference at which the line
    reaches ``reward_bar``.  None with fewer than three points or no spread in length."""
    pts = [(p["words_change"], p["reward_drop"], p["cut"]) for p in points if p.get("words_change") is not None]
    if len(pts) < 3 or len({x for x, _, _ in pts}) < 2 or len({y for _, y, _ in pts}) < 2:
        return None
    xs, ys, cuts = zip(*pts)
    line = statistics.linear_regression(xs, ys)
    left = [y - (line.slope * x + line.intercept) for x, y, _ in pts]
    return {"checkpoints": len(pts), "slope_per_word": line.slope, "intercept": line.intercept,
            "correlation": statistics.correlation(xs, ys),
            "residual_correlation_with_cut": statistics.correlation(cuts, left) if len(set(cuts)) > 1 else None,
            "words_shorter_at_reward_bar": (reward_bar - line.intercept) / -line.slope if line.slope < 0 else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.cli import RESULTS_DIR

    files = args.results if args.results else sorted(RESULTS_DIR.glob("criteria-loop*.json"))
    files = [f for f in files if not f.name.endswith("-quick.json")]
    points: list[dict[str, Any]] = []
    runs = 0
    for f in files:
        result = json.loads(Path(f).read_text())
        if result.get("mode") != "full":
            continue
        runs += 1
        points.extend(first_phase_checkpoints(result, Path(f).stem))
    out = frontier(points, args.target_cut, args.reward_bar, args.min_guard_prompts)
    return {"runs": runs, "checkpoints": len(points), "target_cut": args.target_cut, "reward_bar": args.reward_bar,
            "min_guard_prompts": args.min_guard_prompts, **out, "length_fit": length_fit(points, args.reward_bar)}
