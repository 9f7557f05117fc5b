"""The markdown table comparing each benchmark result with its target and baseline.

``make bench`` ends with this table; the README shows the latest one.  Targets are the project's
acceptance numbers; each row says which baseline the ratio is taken against (measured in the same
run, because these machines are shared and noisy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Target:
    benchmark: str
    metric: str
    description: str
    baseline: str
    check: Callable[[dict[str, Any]], bool | None]
    show: Callable[[dict[str, Any]], str]


def _get(r: dict[str, Any], key: str) -> Any:
    return r.get(key)


def _hazards(r: dict) -> str:
    """P(end of turn) of each policy after 10-19, 40-49 and 80+ words."""
    rows = {row["words"]: row for row in r.get("hazard_by_words") or []}
    shown = [w for w in ("10-19", "40-49", "80+") if w in rows]
    if not shown:
        return "-"
    return "; ".join(f"{m} " + " / ".join(_fmt(rows[w].get(m)) for w in shown) for m in r.get("models", [])) + \
        f" (after {', '.join(shown)} words)"


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _ge(key: str, bound: float) -> Callable[[dict[str, Any]], bool | None]:
    return lambda r: None if _get(r, key) is None else _get(r, key) >= bound


def _le(key: str, bound: float) -> Callable[[dict[str, Any]], bool | None]:
    return lambda r: None if _get(r, key) is None else _get(r, key) <= bound


def _seeds(r: dict[str, Any]) -> str:
    """" (mean of N seeds)" for results that average accuracy over seeds."""
    seeds = r.get("seeds") or []
    return f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""


def _paired(r: dict[str, Any], key: str) -> str:
    """", paired diff +0.4 +- 1.3 pts" from a ``*_minus_*`` entry (mean and SE over seeds), when present."""
    d = r.get(key)
    if not isinstance(d, dict) or d.get("mean") is None or d.get("se") is None:
        return ""
    return f", paired diff {100 * d['mean']:+.1f} ± {100 * d['se']:.1f} pts"


def _zero_failed_over_swaps(failed: str, swaps: str) -> Callable[[dict[str, Any]], bool | None]:
    """Met when ``failed`` is 0 over at least one swap: a run that swapped nothing proves nothing."""
    def check(r: dict[str, Any]) -> bool | None:
        if r.get(failed) is None:
            return None
        return r[failed] <= 0 and (r.get(swaps) or 0) >= 1

    return check


def _policy_swaps(r: dict[str, Any]) -> str:
    """"0 over 6 swaps (p99 2.1 s steady, 3.4 s during swaps)" for the policy hot-swap row."""
    if r.get("failed_requests_during_policy_swaps") is None:
        return r.get("policy_run") or "not in this result (run the scorer bench again)"
    out = f"{_fmt(r.get('failed_requests_during_policy_swaps'))} over {_fmt(r.get('policy_swaps'))} swaps"
    steady, during = r.get("policy_p99_ms_steady"), r.get("policy_p99_ms_during_swaps")
    if steady is not None and during is not None:
        out += f" (generation p99 {_fmt(steady / 1000)} s steady, {_fmt(during / 1000)} s during swaps)"
    return out


def _frontier(r: dict[str, Any]) -> str:
    """"cut >= 0.77: 9 checkpoints, median reward drop 0.047, 4 within 0.02 (0 read on >= 24 prompts)"..."""
    if not isinstance(r.get("bins"), list):
        return "-"
    top = next((b for b in r["bins"] if b.get("cut_from") == r.get("target_cut")), None)
    head = f"{_fmt(r.get('checkpoints'))} first-criterion checkpoints of {_fmt(r.get('runs'))} runs"
    if top is None:
        return f"{head}; none reached a cut of {_fmt(r.get('target_cut'))}" + _length_fit(r.get("length_fit"))
    return (f"{head}; a guard-set cut >= {_fmt(r.get('target_cut'))}: {top['checkpoints']}, median reward drop "
            f"{_fmt(top['median_reward_drop'])} ({_fmt(top['median_words'], 2)} words), "
            f"{len(r.get('target_cut_within_reward_bar') or [])} within {_fmt(r.get('reward_bar'))} "
            f"({_fmt(r.get('target_cut_within_reward_bar_on_min_guard_prompts'))} read on >= "
            f"{_fmt(r.get('min_guard_prompts'))} prompts)" + _length_fit(r.get("length_fit")))


def _length_fit(fit: dict[str, Any] | None) -> str:
    if not fit:
        return ""
    return (f"; the judge's drop follows the length (r {_fmt(fit['correlation'], 2)}, "
            f"{_fmt(-fit['slope_per_word'], 2)} a word shorter; the bar is reached "
            f"{_fmt(fit['words_shorter_at_reward_bar'], 2)} words under the reference)")


def _gpu(r: dict[str, Any]) -> bool:
    return bool((r.get("machine") or {}).get("gpu"))


TARGETS: tuple[Target, ...] = (
    Target("ingest", "ratio_stream_vs_raw", "gateway streaming >= 50% of raw producer", "raw kafka-python producer, acks=all",
           _ge("ratio_stream_vs_raw", 0.5), lambda r: _fmt(r.get("ratio_stream_vs_raw"))),
    Target("ingest", "lost_events", "zero acknowledged events lost", "every acked id consumed back",
           _le("lost_events", 0), lambda r: _fmt(r.get("lost_events"))),
    Target("train-reward", "accuracy_streaming", "streaming within 1 point of offline", "offline, same data/model/epochs",
           lambda r: None if r.get("accuracy_streaming") is None or r.get("accuracy_offline") is None
           else r["accuracy_streaming"] >= r["accuracy_offline"] - 0.01,
           lambda r: f"{_fmt(r.get('accuracy_streaming'))} vs {_fmt(r.get('accuracy_offline'))}{_seeds(r)}"
                     f"{_paired(r, 'streaming_minus_offline')}"),
    Target("train-reward", "accuracy_offline", "offline >= TRL RewardTrainer", "TRL RewardTrainer, same base/settings",
           lambda r: None if r.get("accuracy_offline") is None or r.get("accuracy_trl") is None
           else r["accuracy_offline"] >= r["accuracy_trl"],
           lambda r: f"{_fmt(r.get('accuracy_offline'))} vs {_fmt(r.get('accuracy_trl'))}{_seeds(r)}"
                     f"{_paired(r, 'offline_minus_trl')}"),
    Target("train-reward", "kwise_speedup", "K-wise loss >= 2.5x expanded pairs (K=4)", "same rankings as independent pairs",
           _ge("kwise_speedup", 2.5), lambda r: _fmt(r.get("kwise_speedup"))),
    Target("train-dpo", "accuracy_offline", "DPO offline >= TRL DPOTrainer - 1 point", "TRL DPOTrainer + peft LoRA, same base/settings",
           lambda r: None if r.get("accuracy_offline") is None or r.get("accuracy_trl") is None
           else r["accuracy_offline"] >= r["accuracy_trl"] - 0.01,
           lambda r: f"{_fmt(r.get('accuracy_offline'))} vs {_fmt(r.get('accuracy_trl'))}{_seeds(r)}"
                     f"{_paired(r, 'offline_minus_trl')}"),
    Target("train-dpo", "accuracy_streaming", "DPO streaming (Kafka) within 1 point of offline", "offline, same data/model/epochs",
           lambda r: None if r.get("accuracy_streaming") is None or r.get("accuracy_offline") is None
           else r["accuracy_streaming"] >= r["accuracy_offline"] - 0.01,
           lambda r: f"{_fmt(r.get('accuracy_streaming'))} vs {_fmt(r.get('accuracy_offline'))}{_seeds(r)}"
                     f"{_paired(r, 'streaming_minus_offline')} (source: {r.get('streaming_source', '?')})"
                     + (f"; with the trainer's default replay {_fmt(r['accuracy_streaming_replay'])}"
                        f"{_paired(r, 'streaming_replay_minus_offline')}"
                        if r.get("accuracy_streaming_replay") is not None else "")),
    Target("train-dpo", "speedup_vs_trl", "DPO records/s >= 1.5x TRL", "TRL DPOTrainer, precompute_ref_log_probs=False",
           _ge("speedup_vs_trl", 1.5),
           lambda r: f"{_fmt(r.get('speedup_vs_trl'))} ({_fmt(r.get('records_per_s'))} vs "
                     f"{_fmt(r.get('records_per_s_trl'))} records/s; cached-reference step "
                     f"{_fmt(r.get('ref_cache_speedup'))}x)"),
    Target("train-dpo", "peak_rss_mb", "DPO peak RSS <= TRL's", "TRL DPOTrainer, each arm in its own process",
           lambda r: None if r.get("peak_rss_mb") is None or r.get("peak_rss_mb_trl") is None
           else r["peak_rss_mb"] <= r["peak_rss_mb_trl"],
           lambda r: f"{_fmt(r.get('peak_rss_mb'), 4)} vs {_fmt(r.get('peak_rss_mb_trl'), 4)} MB"),
    Target("scorer", "ratio_vs_pipeline", "CPU >= 1.5x pipeline; GPU >= 10x", "transformers pipeline, batch_size=1",
           lambda r: None if r.get("ratio_vs_pipeline") is None else r["ratio_vs_pipeline"] >= (10 if _gpu(r) else 1.5),
           lambda r: _fmt(r.get("ratio_vs_pipeline"))),
    Target("scorer", "fraction_of_matmul_bound", "CPU >= 80% of the matmul bound", "measured GEMM FLOP/s of this machine",
           lambda r: None if _gpu(r) or r.get("fraction_of_matmul_bound") is None else r["fraction_of_matmul_bound"] >= 0.8,
           lambda r: _fmt(r.get("fraction_of_matmul_bound")) + (
               f" (the model in-process, no serving: {_fmt(r['bound_breakdown'].get('in_process_fraction'))})"
               if isinstance(r.get("bound_breakdown"), dict) else "")),
    Target("scorer", "failed_requests_during_swaps", "zero failed requests during hot swaps", "-",
           _le("failed_requests_during_swaps", 0), lambda r: f"{_fmt(r.get('failed_requests_during_swaps'))} over {_fmt(r.get('swaps'))} swaps"),
    Target("scorer", "failed_requests_during_policy_swaps", "zero failed generation requests during policy hot swaps",
           "-", _zero_failed_over_swaps("failed_requests_during_policy_swaps", "policy_swaps"), _policy_swaps),
    Target("criteria-loop", "relative_reduction", "served policy's word-limit violations cut >= 77%",
           "OpenPipe: 31% -> 7% (offline, by hand)", _ge("relative_reduction", 0.77),
           lambda r: f"{_fmt(r.get('relative_reduction'))} ({_fmt(r.get('violation_rate_base'))} -> "
                     f"{_fmt(r.get('violation_rate_final'))} on {_fmt(r.get('eval_prompts'))} held-out prompts, "
                     f"{_fmt(r.get('versions_published'))} versions)"),
    Target("criteria-loop", "first_criterion_retention", "first criterion's cut kept after a second >= 90%", "-",
           _ge("first_criterion_retention", 0.9), lambda r: _fmt(r.get("first_criterion_retention"))),
    Target("criteria-loop", "quality_win_rate_vs_base", "reward model prefers final over base >= 45%",
           "base policy, same prompts and seeds", _ge("quality_win_rate_vs_base", 0.45),
           lambda r: _fmt(r.get("quality_win_rate_vs_base"))),
    Target("criteria-ceiling", "policies", "what the quality judge allows a reply that keeps the word limit "
           "(no training; the reference for criteria-loop's 45%)", "the base policy's own reply, same prompts",
           lambda r: None,
           lambda r: "; ".join(f"{label} {_fmt(p.get('win_rate_vs_reference'))} at {_fmt(p.get('mean_words'), 2)} words, "
                               f"{_fmt(p.get('violation_rate'))} violations"
                               for label, p in ((f"criteria best-of-{r.get('candidates_per_prompt')}", r["policies"]["criteria_best_of_n"]),
                                                *((f"best-of-{k}", v["criteria_best_of_n"])
                                                  for k, v in (r.get("policies_first_k") or {}).items()),
                                                ("judge's best passing", r["policies"]["judge_best_passing"]),
                                                ("a random reply", r["policies"]["random_candidate"])))
                     + f"; judge prefers the longer reply {_fmt(r.get('longer_preferred_share'))}"
           if isinstance(r.get("policies"), dict) else "-"),
    Target("criteria-frontier", "bins", "what the gate read when a checkpoint cut the word limit (no target; "
           "why criteria-loop's cut and quality targets pull apart)", "the reference policy on the same guard prompts",
           lambda r: None, _frontier),
    Target("stop-hazard", "hazard_by_words", "where a policy ends its turn, by its reply's words so far (no target; "
           "why criteria-loop's policies got shorter everywhere)", "the base policy, at the same places of its own replies",
           lambda r: None, _hazards),
    Target("criteria-loop", "failed_requests", "no failed request, >= 2 versions published", "-",
           lambda r: None if r.get("failed_requests") is None else r["failed_requests"] == 0 and (r.get("versions_published") or 0) >= 2,
           lambda r: f"{_fmt(r.get('failed_requests'))} failed, {_fmt(r.get('versions_published'))} published"),
    Target("chaos", "acked_lost_total",
           "kill -9 of broker, gateway, processor, Redis, trainer (mid-checkpoint), full checkpoint disk, partition leader "
           "and all 3 brokers, under ingest + trainer + best-of-N: 0 acked lost, 0 trained twice, 0 failed, all recover",
           "every acked id found in the topic, derived, and in exactly one checkpoint",
           lambda r: None if not any("lost" in s for s in r.get("scenarios", [])) else (
               r.get("acked_lost_total") == 0 and not r.get("duplicates_trained_total") and not r.get("trained_missing_total")
               and all(s.get("failed_requests") == 0 and s.get("recovery_s") is not None
                       for s in r.get("scenarios", []) if "lost" in s)),
           lambda r: f"{sum(1 for s in r.get('scenarios', []) if 'lost' in s)} scenarios, "
                     f"{sum(s['acked'] for s in r.get('scenarios', []) if 'lost' in s):,} acked: "
                     f"{_fmt(r.get('acked_lost_total'))} lost, {_fmt(r.get('duplicates_trained_total'))} trained twice, "
                     f"{_fmt(r.get('trained_missing_total'))} never trained ({_fmt(r.get('duplicates_derived_total'))} "
                     "derived twice, skipped by the trainer), "
                     f"{sum(s.get('failed_requests', 0) for s in r.get('scenarios', []) if 'lost' in s)} failed; recovery "
                     + ", ".join(f"{s['name']} {_fmt(s.get('recovery_s'))} s" for s in r.get("scenarios", []) if "lost" in s)),
    Target("chaos", "scorer_scenarios", "scorer kill -9 (2 replicas) and corrupt / non-finite versions under best-of-N: "
           "0 failed, bad versions refused, a restart serves the newest good one", "-",
           lambda r: None if not any(s["name"] in ("scorer-kill", "corrupt-checkpoint") for s in r.get("scenarios", []))
           else all(s.get("ok") and s.get("failed_requests") == 0 for s in r["scenarios"]
                    if s["name"] in ("scorer-kill", "corrupt-checkpoint")),
           lambda r: "; ".join(f"{s['name']}: {s['failed_requests']} failed of {s['requests']}, recovery "
                               f"{_fmt(s.get('recovery_s'))} s" + (f", restart serves {s.get('restart_serving')}"
                                                                  if s["name"] == "corrupt-checkpoint" else "")
                               for s in r.get("scenarios", []) if s["name"] in ("scorer-kill", "corrupt-checkpoint"))),
    Target("chaos", "malformed_internal_errors", ">= 100 hostile inputs (HTTP, gRPC, OpenAI routes): no 500 / INTERNAL, "
           "services healthy after", "-",
           lambda r: None if r.get("malformed_internal_errors") is None else (
               r.get("malformed_cases", 0) >= 100 and r["malformed_internal_errors"] == 0 and r.get("unhealthy_after") == 0),
           lambda r: f"{_fmt(r.get('malformed_cases'))} cases, {_fmt(r.get('malformed_internal_errors'))} internal errors, "
                     f"{_fmt(r.get('unhealthy_after'))} unhealthy after"),
    Target("chaos", "swap_p99_increase", ">= 100 hot swaps under load: 0 failed, p99 within 10% of no swaps", "p99 of the same load without swaps",
           lambda r: None if r.get("swap_p99_increase") is None else (r["swaps"] >= 100 and r["swap_p99_increase"] <= 0.10
                                                                      and all(s["failed_requests"] == 0 for s in r["scenarios"] if s["name"] == "hot-swaps")),
           lambda r: "; ".join(f"{s['swaps']} swaps, {s['failed_requests']} failed of {s['requests']}, p99 {_fmt(s['p99_ms_steady'])} -> "
                               f"{_fmt(s['p99_ms_swaps'])} ms ({_fmt(s['swap_p99_increase'])})"
                               for s in r.get("scenarios", []) if s["name"] == "hot-swaps") or "not run"),
    Target("scale", "convergence_p99_s", "2 gateways, 2 trainer workers, 3 scorers: 0 lost, 0 failed, publish -> all replicas p99 <= 10 s",
           "-", lambda r: r.get("target_met"),
           lambda r: f"{_fmt(r.get('acked_events'))} acked, {_fmt(r.get('lost_events'))} lost, "
                     f"{_fmt(r.get('failed_requests'))} failed of {_fmt(r.get('scorer_requests'))}; "
                     f"{_fmt(r.get('versions_published'))} versions, convergence p50 {_fmt(r.get('convergence_p50_s'))} s, "
                     f"p99 {_fmt(r.get('convergence_p99_s'))} s"),
    Target("freshness", "freshness_p50_s", "feedback-to-serving p50 < 5 s, p99 < 10 s (MiniLM, 2 cores, demo rate)",
           "Monolith: minute-level sync",
           lambda r: None if r.get("freshness_p50_s") is None or r.get("freshness_p99_s") is None
           else r["freshness_p50_s"] < 5 and r["freshness_p99_s"] < 10,
           lambda r: f"p50 {_fmt(r.get('freshness_p50_s'))} s, p99 {_fmt(r.get('freshness_p99_s'))} s"),
    Target("freshness", "failed_requests", "no failed scorer request", "-",
           _le("failed_requests", 0), lambda r: _fmt(r.get("failed_requests"))),
    Target("loop-quality", "accuracy_live", "the live loop (the demo through Kafka, 3 seeds) within 0.01 of offline "
           "training on the same pairs, 500 HH test pairs", "offline training, same pairs and settings",
           lambda r: None if r.get("accuracy_live") is None else r["accuracy_live"] >= r["accuracy_offline"] - 0.01,
           lambda r: f"live {_fmt(r.get('accuracy_live'))} vs offline {_fmt(r.get('accuracy_offline'))} "
                     + (f"(paired {100 * r['paired_diff']:+.1f} ± {100 * r['paired_se']:.1f} pts, "
                        f"{_fmt(r.get('seeds'))} seeds)" if r.get("paired_diff") is not None else "")),
)


def render_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| benchmark | target | baseline | measured | met |",
        "|---|---|---|---|---|",
    ]
    for t in TARGETS:
        r = results.get(t.benchmark)
        if r is None:
            lines.append(f"| {t.benchmark} | {t.description} | {t.baseline} | not run | - |")
            continue
        ok = t.check(r)
        mark = "n/a" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {t.benchmark} ({r.get('mode', '?')}) | {t.description} | {t.baseline} | {t.show(r)} | {mark} |")
    machines = {r.get("machine", {}).get("cpu_model") for r in results.values() if r}
    lines.append("")
    lines.append(f"Machine: {', '.join(sorted(m for m in machines if m)) or 'unknown'}.")
    return "\n".join(lines) + "\n"


def write_table(results: dict[str, dict[str, Any]], path: Path) -> str:
    table = render_table(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    return table


README_START = "<!-- bench-table -->"
README_END = "<!-- /bench-table -->"


def load_results(results_dir: Path, names: tuple[str, ...], quick: bool = False) -> dict[str, dict[str, Any]]:
    """The latest committed result of each benchmark (``<name>.json``, or ``<name>-quick.json``)."""
    import json

    out = {}
    for name in names:
        path = results_dir / f"{name}{'-quick' if quick else ''}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def update_readme(readme: Path, table: str) -> bool:
    """Replace the table between the README's bench markers; False when the markers are missing."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{table}{README_END}{tail}")
    return True
