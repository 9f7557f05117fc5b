"""Command-line face of the trainer.

* ``prefstream trainer run [--config FILE] [--<field> VALUE ...]``: the continual service (same as
  ``python -m trainer``); every TrainerConfig field is a flag (``--model-kind policy`` trains a DPO policy).
* ``prefstream train reward|dpo --data FILE --out DIR [...]``: offline training through the same step.
* ``prefstream eval reward|dpo --model DIR --data FILE [--json]``: the gate's evaluation of a model folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Iterable

from services.config import add_config_flags, overrides_from_args
from services.kinds import ModelKind
from trainer.config import DPOSettings, TrainerConfig

log = logging.getLogger(__name__)

#: The TrainerConfig fields that matter to offline training of any kind.
COMMON_OFFLINE_FIELDS: tuple[str, ...] = (
    "base_model", "max_length", "dtype", "autocast", "lr", "weight_decay", "schedule", "warmup_steps",
    "max_grad_norm", "ema_decay", "disable_dropout", "batch_size", "max_tokens_per_forward",
    "max_tokens_per_backward", "epochs", "seed", "device", "torch_threads", "eval_batch_size",
)
#: ... of a reward model, and of a DPO policy.
REWARD_FIELDS: tuple[str, ...] = ("attributes", "loss", "use_margin", "center_rewards_coefficient",
                                  "attribute_loss_weight")
DPO_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DPOSettings))
OFFLINE_FIELDS: dict[ModelKind, tuple[str, ...]] = {
    ModelKind.REWARD: COMMON_OFFLINE_FIELDS + REWARD_FIELDS,
    ModelKind.POLICY: COMMON_OFFLINE_FIELDS + DPO_FIELDS,
}
#: Where ``train ... --publish`` puts the model.
PUBLISH_FIELDS: tuple[str, ...] = (
    "model_name", "checkpoint_url", "redis_url", "kafka_bootstrap", "announce", "gate_tolerance",
    "gate_confidence", "publish_without_eval", "eval_max_records", "stack_run_dir",
)
#: What ``eval reward|dpo`` reads: how the folder is loaded and scored.
EVAL_FIELDS: dict[ModelKind, tuple[str, ...]] = {
    ModelKind.REWARD: ("max_length", "eval_batch_size", "device"),
    ModelKind.POLICY: ("base_model", "max_length", "eval_batch_size", "device", "beta", "guard_prompts",
                       "guard_set", "guard_max_new_tokens", "seed"),
}
#: The objective each ``train``/``eval`` subcommand trains.
COMMANDS: dict[str, ModelKind] = {"reward": ModelKind.REWARD, "dpo": ModelKind.POLICY}


def load_from_args(args: argparse.Namespace, fields: Iterable[str] | None = None,
                   kind: ModelKind | None = None) -> TrainerConfig:
    from trainer.config import load_trainer_config

    overrides = overrides_from_args(args, TrainerConfig, fields)
    if kind is not None:
        overrides["model_kind"] = kind.value
    return load_trainer_config(getattr(args, "config", None), overrides=overrides)


def _clean_errors(handler):
    """Bad input (a malformed data line, a missing model folder) ends with its message, not a traceback."""

    def wrapped(args: argparse.Namespace) -> int:
        from services.errors import PrefstreamError

        try:
            return handler(args)
        except PrefstreamError as e:
            print(f"prefstream: {e}", file=sys.stderr)
            return 2
        except FileNotFoundError as e:
            print(f"prefstream: {e.filename or e}: no such file; check the path", file=sys.stderr)
            return 2

    return wrapped


# ---------------------------------------------------------------------------------------------


def run_service(args: argparse.Namespace) -> int:
    from trainer.service import serve

    cfg = load_from_args(args)
    return serve(cfg, log_level=args.log_level if hasattr(args, "log_level") else "INFO")


def train_model(args: argparse.Namespace) -> int:
    """``prefstream train reward|dpo``: epochs over a file through the continual trainer's own step."""
    from services.data import load_openpipe_jsonl
    from trainer.offline import save_offline, train_offline

    kind = COMMANDS[args.train_command]
    cfg = load_from_args(args, OFFLINE_FIELDS[kind] + PUBLISH_FIELDS, kind)
    records = load_openpipe_jsonl(args.data)
    train = [r for r in records if not r.is_eval]
    log.info("training a %s model on %d records from %s (%d epochs)", kind, len(train), args.data, cfg.optim.epochs)
    learner, result = train_offline(cfg, records, progress=None if args.no_progress else f"train {args.train_command}")
    eval_records = load_openpipe_jsonl(args.eval_data) if args.eval_data else []
    with learner.serving_weights():  # the weight average (ema_decay) is the trained model
        if eval_records:
            result.eval = learner.evaluate(eval_records)
        out = save_offline(learner, cfg, result, args.out, args.data)
        if args.publish:
            from trainer.offline import publish_offline

            version, verdict = publish_offline(cfg.with_endpoints(), learner, result, data=args.data,
                                               eval_records=eval_records)
            log.info("%s/%s %s", cfg.model.model_name, version, verdict)
    summary = {
        "out": str(out), "kind": kind.value, "steps": result.steps, "records": result.records,
        "seconds": round(result.seconds, 1), "records_per_s": round(result.records_per_s, 2),
        "final_loss": result.losses[-1],
        **({"eval": result.eval.to_dict(outcomes=False)} if result.eval else {}),
        **({"published_version": version, "verdict": verdict} if args.publish else {}),
    }
    print(json.dumps(summary, indent=2) if args.json else
          f"saved {out}: {result.steps} steps, {result.records} records in {result.seconds:.1f}s "
          f"({result.records_per_s:.1f} records/s), final loss {result.losses[-1]:.4f}"
          + (f", eval accuracy {result.eval.accuracy:.4f} on {result.eval.pairs} pairs" if result.eval else ""))
    return 0


def eval_model(args: argparse.Namespace) -> int:
    """``prefstream eval reward|dpo``: the gate's evaluation of a model folder on a file."""
    from contextlib import nullcontext

    from services.data import load_openpipe_jsonl
    from trainer.evaluation import progress_bar
    from trainer.offline import evaluate_file

    kind = COMMANDS[args.eval_command]
    cfg = load_from_args(args, EVAL_FIELDS[kind], kind)
    records = load_openpipe_jsonl(args.data)
    if args.max_records:
        records = records[: args.max_records]
    with nullcontext() if args.no_progress else progress_bar(f"eval {args.eval_command}"):
        result = evaluate_file(args.model, records, cfg)
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, **result.to_dict(outcomes=False), "n": result.pairs},
                         indent=2))
    else:
        extra = "".join(f"  {k} {v:.4f}" for k, v in sorted(result.metrics.items()))
        print(f"accuracy {result.accuracy:.4f}  n {result.pairs} pairs ({result.records} records)  "
              f"mean margin {result.mean_margin:.4f}{extra}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    trainer = subparsers.add_parser("trainer", help="the continual trainer (reward models and DPO policies)")
    tsub = trainer.add_subparsers(dest="trainer_command", metavar="COMMAND")
    run = tsub.add_parser("run", help="consume preferences from Kafka, train, checkpoint, gate and publish")
    run.add_argument("--config", default=None, help="YAML/JSON file with trainer fields (or a 'trainer:' section)")
    add_config_flags(run, TrainerConfig)
    run.set_defaults(handler=_clean_errors(run_service))

    train = subparsers.add_parser("train", help="offline training")
    train_sub = train.add_subparsers(dest="train_command", metavar="MODEL")
    for name, (kind, what) in {"reward": (ModelKind.REWARD, "a reward model"),
                               "dpo": (ModelKind.POLICY, "a policy with DPO")}.items():
        p = train_sub.add_parser(name, help=f"train {what} on an OpenPipe preference JSONL file")
        p.add_argument("--data", required=True, help="OpenPipe JSONL with TRAIN-split pairs")
        p.add_argument("--out", required=True, help="output folder (a Hugging Face model folder)")
        p.add_argument("--eval-data", default=None, help="OpenPipe JSONL to evaluate the trained model on")
        p.add_argument("--config", default=None, help="YAML/JSON file with trainer fields")
        p.add_argument("--json", action="store_true", help="print a JSON summary")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--publish", action="store_true",
                       help="also write the model into the checkpoint store and gate it into the registry (the "
                       "continual trainer warm-starts from it); uses --checkpoint-url, --redis-url, --model-name")
        add_config_flags(p, TrainerConfig, OFFLINE_FIELDS[kind] + PUBLISH_FIELDS)
        p.set_defaults(handler=_clean_errors(train_model))

    ev = subparsers.add_parser("eval", help="offline evaluation")
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="MODEL")
    for name, (kind, what) in {
        "reward": (ModelKind.REWARD, "pairwise accuracy (ties count as wrong) of a reward model on a file"),
        "dpo": (ModelKind.POLICY, "implicit-reward accuracy, KL to the reference and reply length of a policy "
                "on a file's pairs and prompts"),
    }.items():
        p = ev_sub.add_parser(name, help=what)
        p.add_argument("--model", required=True, help=f"model folder (a checkpoint or `train {name} --out`)")
        p.add_argument("--data", required=True, help="OpenPipe JSONL of pairs")
        p.add_argument("--max-records", type=int, default=0, help="evaluate only the first N records (0 = all)")
        p.add_argument("--config", default=None, help="YAML/JSON file with trainer fields")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        add_config_flags(p, TrainerConfig, EVAL_FIELDS[kind])
        p.set_defaults(handler=_clean_errors(eval_model))
