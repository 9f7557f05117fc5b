"""``prefstream bench train-reward``: reward-model quality and throughput of the trainer.

Three arms train the same base model on the same data with the same settings (one epoch over
hh_helpful_train_2k by default) and are evaluated on hh_helpful_test_500 (pairwise accuracy, ties
wrong):

* ``streaming``: the continual loop (:class:`trainer.loop.ContinualTrainer`) fed micro-batches from an
  in-memory source (the same step, replay and checkpoint-free loop code the Kafka service runs);
* ``offline``: shuffled epochs through the same Learner step (``prefstream train reward``);
* ``trl``: TRL's ``RewardTrainer`` with the same base model, batch size, learning rate, warm-up,
  clipping and dropout setting.  It gets the very same token ids (prompt left-truncated to keep the
  response): TRL's own preprocessing drops any pair longer than ``max_length`` instead of truncating,
  which on this data would discard most of it.  Its collator passes no ``token_type_ids``, so it is
  evaluated the same way it was trained.

Forgetting (``bench/forgetting.py``, left out with ``--skip-forgetting``): the same pairs streamed
topic by topic, without replay, with the streaming arm's replay, and (when its ``replay_weight`` is
below 1) with replay at full weight: what replay buys where the stream shifts, beside what it costs
above where it does not.

Throughput: new records per second of each arm.  K-wise: synthetic K=4 rankings (the chosen and the
rejected response of a prompt, then two responses to other prompts) trained with the InstructGPT loss
(each response encoded once) vs the same rankings expanded into 6 independent pairs per ranking;
the speedup is the ratio of median step times over the same batches, with the two arms alternating
step by step.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import statistics
import tempfile
import time
from typing import Any, Sequence

from services.config import replace as config_replace
from bench.arms import fresh_learner, paired_diff, stream_phases

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", default=None, help="reward backbone folder (default: the embedded MiniLM-L6)")
    p.add_argument("--train-records", type=int, default=None, help="training pairs (default quick 192, full all 2000)")
    p.add_argument("--test-records", type=int, default=None, help="test pairs (default quick 200, full all 500)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per (prompt, response) (quick 64, full 128)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training data (every arm)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per optimiser step (every arm)")
    p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (every arm)")
    p.add_argument("--replay-ratio", type=float, default=None,
                   help="replayed records per new record (streaming arm; default: the trainer's replay_ratio)")
    p.add_argument("--replay-weight", type=float, default=None,
                   help="loss weight of a replayed record (streaming arm; default: the trainer's replay_weight)")
    p.add_argument("--skip-forgetting", action="store_true",
                   help="leave out the topic-shift forgetting measurement (bench/forgetting.py)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="weight averaging of the prefstream arms (default: the trainer's ema_decay; 0 = last iterate)")
    p.add_argument("--kwise-rankings", type=int, default=8, help="K=4 rankings per step in the K-wise measurement")
    p.add_argument("--kwise-steps", type=int, default=None, help="timed steps per K-wise arm (quick 3, full 9)")
    p.add_argument("--skip-trl", action="store_true", help="leave out the TRL RewardTrainer arm")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds; every accuracy arm runs once per seed and the means are compared "
                        "(quick 0, full 0,1,2): one seed's accuracy on 500 pairs is +-2 points of noise")
    p.add_argument("--autocast", choices=("none", "bf16", "auto"), default="auto",
                   help="mixed precision of every arm (TRL's bf16 flag follows it); auto = bf16 where native")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    return {
        "base_model": args.base_model or "",
        "train_records": args.train_records or (192 if quick else 0),
        "test_records": args.test_records or (200 if quick else 0),
        "max_length": args.max_length or (64 if quick else 128),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": 10,
        "max_grad_norm": 1.0,
        "disable_dropout": True,
        "replay_ratio": args.replay_ratio,
        "replay_weight": args.replay_weight,
        "ema_decay": args.ema_decay,
        "kwise_k": 4,
        "kwise_rankings": args.kwise_rankings,
        "kwise_steps": args.kwise_steps or (3 if quick else 9),
        "seeds": [int(x) for x in (args.seeds or ("0" if quick else "0,1,2")).split(",") if x.strip()],
        "seed": 0,
        "autocast": args.autocast,
    }


def _config(s: dict[str, Any], **kw: Any):
    from trainer.config import TrainerConfig, trainer_config

    values = dict(base_model=s["base_model"], max_length=s["max_length"], epochs=s["epochs"],
                  batch_size=s["batch_size"], lr=s["lr"], warmup_steps=s["warmup_steps"],
                  max_grad_norm=s["max_grad_norm"], disable_dropout=s["disable_dropout"], seed=s["seed"],
                  autocast=s["autocast"],
                  publish=False, max_batch_wait_s=0.0, poll_timeout_s=0.01,
                  checkpoint_every_records=0, checkpoint_every_s=3600.0, eval_batch_size=64)
    for key in ("ema_decay", "replay_ratio", "replay_weight"):  # None: the trainer's default
        if s[key] is not None:
            values[key] = s[key]
    values.update(kw)
    return trainer_config(**values)


def _bf16(cfg) -> bool:
    """Whether ``cfg.model.autocast`` trains in bf16 here (the Learner's own rule, so TRL follows it)."""
    import torch

    from trainer.learner import uses_bf16_autocast

    return uses_bf16_autocast(cfg.model.autocast, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- arms


def _evaluate_arm(learner, test: Sequence, cfg) -> dict[str, Any]:
    """Accuracy of what the trainer serves (the weight average when ``ema_decay`` > 0), and of the
    last iterate, so the average's share of the result is visible."""
    from trainer.evaluation import evaluate

    last = served = evaluate(learner.model, test, cfg.gate.eval_batch_size)
    if learner.average is not None:
        with learner.serving_weights():
            served = evaluate(learner.model, test, cfg.gate.eval_batch_size)
    return {"accuracy": served.accuracy, "accuracy_last_iterate": last.accuracy, "pairs": served.pairs,
            "mean_margin": served.mean_margin}


def run_streaming(cfg, train: Sequence, test: Sequence) -> dict[str, Any]:
    """The continual loop over an in-memory stream, epochs times (each in the offline arm's order)."""
    from trainer.offline import batches

    epochs = [[r for b in batches(train, cfg.optim.batch_size, cfg.optim.seed + e) for r in b] for e in range(cfg.optim.epochs)]
    learner, stats = stream_phases(cfg, epochs)
    return {**_evaluate_arm(learner, test, cfg), **stats}


def run_offline(cfg, train: Sequence, test: Sequence) -> dict[str, Any]:
    from trainer.offline import train_offline

    learner, res = train_offline(cfg, train, learner=fresh_learner(cfg), progress="offline arm")
    return {**_evaluate_arm(learner, test, cfg), "records": res.records, "steps": res.steps, "seconds": res.seconds,
            "records_per_s": res.records_per_s,
            "final_loss": res.losses[-1]}


def _token_ids(model, prompts: Sequence, responses: Sequence[str]) -> list[list[int]]:
    enc = model.encode(prompts, responses)
    return [row[: int(m.sum())].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]


def _score_ids(hf_model, ids: list[list[int]], pad_id: int, batch_size: int = 64) -> list[float]:
    """Rewards from input_ids alone (no token_type_ids), the way TRL's collator feeds the model."""
    import torch

    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = [0.0] * len(ids)
    hf_model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), width), pad_id, dtype=torch.long)
            m = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                x[j, : len(ids[i])] = torch.tensor(ids[i])
                m[j, : len(ids[i])] = 1
            scores = hf_model(input_ids=x, attention_mask=m).logits[:, 0].tolist()
            for j, i in enumerate(idx):
                out[i] = scores[j]
    return out


def run_trl(cfg, train: Sequence, test: Sequence) -> dict[str, Any]:
    """TRL's RewardTrainer on the same base, settings and token ids."""
    import torch
    from datasets import Dataset
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    from trainer.offline import load_base

    hf_logging.set_verbosity_error()
    torch.manual_seed(cfg.optim.seed)
    base = load_base(cfg)  # the same fresh head initialisation as the other arms (same seed)
    rows = {"chosen_ids": _token_ids(base, [r.prompt for r in train], [r.chosen for r in train]),
            "rejected_ids": _token_ids(base, [r.prompt for r in train], [r.rejected for r in train])}
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out, per_device_train_batch_size=cfg.optim.batch_size, learning_rate=cfg.optim.lr,
            num_train_epochs=cfg.optim.epochs, warmup_steps=cfg.optim.warmup_steps, lr_scheduler_type="constant_with_warmup",
            max_grad_norm=cfg.optim.max_grad_norm, weight_decay=cfg.optim.weight_decay, seed=cfg.optim.seed, data_seed=cfg.optim.seed,
            disable_dropout=cfg.model.disable_dropout, gradient_checkpointing=False, bf16=_bf16(cfg), fp16=False,
            max_length=None, report_to="none", save_strategy="no", logging_steps=50, use_cpu=True,
            dataloader_num_workers=0, remove_unused_columns=False,
        )
        trainer = RewardTrainer(model=base.hf_model, args=args, train_dataset=Dataset.from_dict(rows),
                                processing_class=base.tokenizer)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    hf = trainer.model
    pad = base.tokenizer.pad_token_id
    chosen = _score_ids(hf, _token_ids(base, [r.prompt for r in test], [r.chosen for r in test]), pad)
    rejected = _score_ids(hf, _token_ids(base, [r.prompt for r in test], [r.rejected for r in test]), pad)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "pairs": len(margins),
            "mean_margin": sum(margins) / len(margins), "records": len(train) * cfg.optim.epochs, "seconds": seconds,
            "records_per_s": len(train) * cfg.optim.epochs / seconds}


def kwise_rankings(records: Sequence, n: int, k: int, seed: int) -> list:
    """K-response rankings: a prompt's chosen and rejected responses, then k-2 answers to other prompts."""
    rng = random.Random(seed)
    out = []
    for i, rec in enumerate(records[:n]):
        others = [r.rejected for j, r in enumerate(records) if j != i]
        extra = tuple(rng.sample(others, k - 2))
        out.append(dataclasses.replace(rec, record_id=f"{rec.record_id}-k{k}",
                                       ranked_responses=(rec.chosen, rec.rejected, *extra)))
    return out


def run_kwise(s: dict[str, Any], records: Sequence) -> dict[str, Any]:
    """Steps per second on the same K=4 ranking batches: K-wise loss vs expanded independent pairs.

    The two engines alternate step by step on the same batches, so load from other processes on a
    shared machine hits both arms alike.
    """
    k, b, steps = s["kwise_k"], s["kwise_rankings"], s["kwise_steps"]
    rankings = kwise_rankings(records, b * (steps + 1), k, s["seed"])
    batches = [rankings[i * b:(i + 1) * b] for i in range(steps + 1)]
    engines = {loss: fresh_learner(_config(s, loss=loss)) for loss in ("kwise", "pairwise")}
    times: dict[str, list[float]] = {loss: [] for loss in engines}
    sequences = {loss: 0 for loss in engines}
    for i, batch in enumerate(batches):
        for loss, learner in engines.items():
            started = time.perf_counter()
            stats = learner.train(batch)
            if i:  # the first batch warms both up, untimed
                times[loss].append(time.perf_counter() - started)
                sequences[loss] += stats.sequences
    out: dict[str, Any] = {
        loss: {"steps_per_s": steps / sum(times[loss]), "median_step_s": statistics.median(times[loss]),
               "sequences_per_step": sequences[loss] / steps, "seconds": sum(times[loss])}
        for loss in engines
    }
    # Median step times: a burst of load from other processes on a shared box skews a mean of a few steps.
    out["speedup"] = out["pairwise"]["median_step_s"] / out["kwise"]["median_step_s"]
    out["speedup_mean"] = out["kwise"]["steps_per_s"] / out["pairwise"]["steps_per_s"]
    out["sequence_ratio"] = out["pairwise"]["sequences_per_step"] / out["kwise"]["sequences_per_step"]
    return out


def _timed(name: str, fn, *args: Any) -> dict[str, Any]:
    """Run one arm, recording the 1-minute load average around it (the box may be shared)."""
    load_before = os.getloadavg()[0]
    result = fn(*args)
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    log.info("%s: %s", name, {k: v for k, v in result.items() if not isinstance(v, dict)})
    return result


# ---------------------------------------------------------------------------------------------- run


def _arm_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One arm over seeds: mean accuracy and throughput, the spread, and every run."""
    acc = [r["accuracy"] for r in runs]
    last = [r.get("accuracy_last_iterate", r["accuracy"]) for r in runs]
    return {"accuracy": statistics.fmean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "accuracy_per_seed": acc, "accuracy_last_iterate": statistics.fmean(last),
            "accuracy_last_iterate_per_seed": last,
            "records_per_s": statistics.fmean([r["records_per_s"] for r in runs]),
            "seconds": sum(r["seconds"] for r in runs), "runs": list(runs)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.machine import describe
    from services.data import TEST_FILE, TRAIN_FILE, load_openpipe_jsonl, shared_data_dir
    from trainer.evaluation import evaluate
    from trainer.offline import load_base

    logging.getLogger("trainer.loop").setLevel(logging.WARNING)
    s = _settings(args)
    data = shared_data_dir()
    train = load_openpipe_jsonl(data / TRAIN_FILE)
    test = load_openpipe_jsonl(data / TEST_FILE)
    if s["train_records"]:
        train = train[: s["train_records"]]
    if s["test_records"]:
        test = test[: s["test_records"]]
    s["train_records"], s["test_records"] = len(train), len(test)
    cfg = _config(s)
    s["base_model"] = cfg.resolved_base_model()
    s["bf16"] = _bf16(cfg)
    s["ema_decay"], s["replay_ratio"], s["replay_weight"] = cfg.optim.ema_decay, cfg.stream.replay_ratio, cfg.stream.replay_weight
    started = time.perf_counter()

    import torch

    torch.manual_seed(cfg.optim.seed)
    base_acc = evaluate(load_base(cfg), test, cfg.gate.eval_batch_size).accuracy
    log.info("untrained base: accuracy %.4f", base_acc)
    arms: dict[str, list[dict[str, Any]]] = {"offline": [], "streaming": [], "trl": []}
    for seed in s["seeds"]:
        seeded = config_replace(cfg, seed=seed)
        arms["offline"].append(dict(_timed(f"offline seed {seed}", run_offline, seeded, train, test), seed=seed))
        arms["streaming"].append(dict(_timed(f"streaming seed {seed}", run_streaming, seeded, train, test), seed=seed))
        if not args.skip_trl:
            arms["trl"].append(dict(_timed(f"trl seed {seed}", run_trl, seeded, train, test), seed=seed))
    kw = _timed("kwise", run_kwise, s, train)
    shift = None
    if not args.skip_forgetting:
        from bench import forgetting

        # The streaming arm's replay against none and against replay at full weight, on a topic shift.
        shift_arms = {"no_replay": {"replay_ratio": 0.0},
                      "replay_full_weight": {"replay_weight": 1.0},
                      "streaming": {}}
        if cfg.stream.replay_weight == 1.0:
            del shift_arms["replay_full_weight"]
        shift = forgetting.run(cfg, train, test, shift_arms, s["seeds"])
    streaming, offline = _arm_summary(arms["streaming"]), _arm_summary(arms["offline"])
    trl = _arm_summary(arms["trl"]) if arms["trl"] else None
    result: dict[str, Any] = {
        "accuracy_streaming": streaming["accuracy"],
        "accuracy_offline": offline["accuracy"],
        "accuracy_trl": trl["accuracy"] if trl else None,
        "accuracy_base_untrained": base_acc,
        "streaming_minus_offline": paired_diff(streaming["accuracy_per_seed"], offline["accuracy_per_seed"]),
        "offline_minus_trl": paired_diff(offline["accuracy_per_seed"], trl["accuracy_per_seed"]) if trl else None,
        "accuracy_streaming_last_iterate": streaming["accuracy_last_iterate"],
        "accuracy_offline_last_iterate": offline["accuracy_last_iterate"],
        "seeds": s["seeds"],
        "records_per_s": streaming["records_per_s"],
        "records_per_s_offline": offline["records_per_s"],
        "records_per_s_trl": trl["records_per_s"] if trl else None,
        "kwise_speedup": kw["speedup"],
        "kwise": kw,
        "forgetting_streaming": shift["arms"]["streaming"]["forgetting"] if shift else None,
        "forgetting_no_replay": shift["arms"]["no_replay"]["forgetting"] if shift else None,
        "forgetting": shift,
        "streaming": streaming,
        "offline": offline,
        "trl": trl,
        "settings": s,
        "torch_threads": torch.get_num_threads(),
        "bench_seconds": time.perf_counter() - started,
        "machine": describe(),
        "notes": [
            "accuracy_* are means over the seeds (each seed: its own head initialisation, data order and replay "
            "sample, shared by the arms); the *_minus_* entries are paired per-seed differences with their "
            "standard error",
            "records_per_s counts new records; the streaming arm also trains on replay_ratio replayed records "
            "per new record (each weighing replay_weight in the loss), so it does more work per new record than "
            "the offline and TRL arms",
            "forgetting: the same 2000 pairs streamed topic by topic (bench/forgetting.py); forgetting_* is the "
            "accuracy on the first topic's test pairs right after it minus at the end, mean over the seeds",
            "accuracy on N test pairs has a standard error of about sqrt(p(1-p)/N) (2.2 points at N=500)",
            "the arms run one after the other on a possibly shared machine: compare records/s together with "
            "each arm's load_avg_1m; the K-wise arms alternate step by step, so their ratio is load-robust",
            "accuracy of the prefstream arms is that of the weight average they serve (settings.ema_decay; "
            "TRL's RewardTrainer has none); accuracy_last_iterate is their last iterate, comparable to TRL's",
            "TRL gets the same left-truncated token ids and the same bf16 setting; it does not use token_type_ids "
            "(its collator passes input_ids and attention_mask only) and is evaluated the same way",
        ],
    }
    return result
