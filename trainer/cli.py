"""Command-line face of the trainer.

* ``prefstream trainer run [--config FILE] [--<field> VALUE ...]``: the continual service (same as
  ``python -m trainer``); every TrainerConfig field is a flag.
* ``prefstream train reward --data FILE --out DIR [...]``: offline training through the same step.
* ``prefstream eval reward --model DIR --data FILE [--json]``: pairwise accuracy of a model folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from typing import Any, Iterable

from trainer.config import TrainerConfig

log = logging.getLogger(__name__)

#: The TrainerConfig fields that matter to offline training.
OFFLINE_FIELDS: tuple[str, ...] = (
    "base_model", "max_length", "attributes", "dtype", "loss", "use_margin", "center_rewards_coefficient",
    "attribute_loss_weight", "lr", "weight_decay", "schedule", "warmup_steps", "max_grad_norm", "disable_dropout",
    "batch_size",
    "max_tokens_per_forward", "epochs", "seed", "device", "torch_threads", "eval_batch_size",
)


#: Where ``train reward --publish`` puts the model.
PUBLISH_FIELDS: tuple[str, ...] = (
    "model_name", "checkpoint_url", "redis_url", "kafka_bootstrap", "announce", "gate_tolerance",
    "gate_confidence", "publish_without_eval", "eval_max_records", "stack_run_dir",
)


def add_config_flags(parser: argparse.ArgumentParser, fields: Iterable[str] | None = None) -> None:
    """One ``--field-name`` flag per TrainerConfig field (default None: lower layers stay in force)."""
    hints = typing.get_type_hints(TrainerConfig)
    wanted = set(fields) if fields is not None else None
    for f in dataclasses.fields(TrainerConfig):
        if wanted is not None and f.name not in wanted:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + f" (default: {_default(f)})"
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return "computed"


def overrides_from(args: argparse.Namespace, fields: Iterable[str] | None = None) -> dict[str, Any]:
    names = set(fields) if fields is not None else {f.name for f in dataclasses.fields(TrainerConfig)}
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def load_from_args(args: argparse.Namespace, fields: Iterable[str] | None = None) -> TrainerConfig:
    from trainer.config import load_trainer_config

    return load_trainer_config(getattr(args, "config", None), overrides=overrides_from(args, fields))


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


def train_reward(args: argparse.Namespace) -> int:
    from services.data import load_openpipe_jsonl
    from trainer.offline import save_offline, train_offline
    from trainer.evaluation import evaluate

    cfg = load_from_args(args, OFFLINE_FIELDS + PUBLISH_FIELDS)
    records = load_openpipe_jsonl(args.data)
    log.info("training on %d records from %s (%s loss, %d epochs)", len(records), args.data, cfg.loss, cfg.epochs)
    engine, result = train_offline(cfg, records)
    eval_records = load_openpipe_jsonl(args.eval_data) if args.eval_data else []
    with engine.serving_weights():  # the weight average (ema_decay) is the trained model
        if eval_records:
            result.eval = evaluate(engine.model, eval_records, batch_size=cfg.eval_batch_size)
        out = save_offline(engine, cfg, result, args.out, args.data)
        if args.publish:
            from trainer.offline import publish_offline

            version, verdict = publish_offline(cfg.with_endpoints(), engine, result, data=args.data,
                                               eval_records=eval_records)
            log.info("%s/%s %s", cfg.model_name, version, verdict)
    summary = {
        "out": str(out), "steps": result.steps, "records": result.records, "seconds": round(result.seconds, 1),
        "records_per_s": round(result.records_per_s, 2), "final_loss": result.losses[-1],
        **({"eval": result.eval.to_dict(outcomes=False)} if result.eval else {}),
        **({"published_version": version, "verdict": verdict} if args.publish else {}),
    }
    print(json.dumps(summary, indent=2) if args.json else
          f"saved {out}: {result.steps} steps, {result.records} records in {result.seconds:.1f}s "
          f"({result.records_per_s:.1f} records/s), final loss {result.losses[-1]:.4f}"
          + (f", eval accuracy {result.eval.accuracy:.4f} on {result.eval.pairs} pairs" if result.eval else ""))
    return 0


def eval_reward(args: argparse.Namespace) -> int:
    from services.data import load_openpipe_jsonl
    from trainer.offline import evaluate_file

    if args.batch_size < 1:
        print("prefstream: --batch-size must be >= 1", file=sys.stderr)
        return 2
    records = load_openpipe_jsonl(args.data)
    if args.max_records:
        records = records[: args.max_records]
    result = evaluate_file(args.model, records, max_length=args.max_length, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, **result.to_dict(outcomes=False), "n": result.pairs}, indent=2))
    else:
        print(f"accuracy {result.accuracy:.4f}  n {result.pairs} pairs ({result.records} records)  "
              f"mean margin {result.mean_margin:.4f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    trainer = subparsers.add_parser("trainer", help="the continual reward-model trainer")
    tsub = trainer.add_subparsers(dest="trainer_command", metavar="COMMAND")
    run = tsub.add_parser("run", help="consume preferences from Kafka, train, checkpoint, gate and publish")
    run.add_argument("--config", default=None, help="YAML/JSON file with trainer fields (or a 'trainer:' section)")
    add_config_flags(run)
    run.set_defaults(handler=_clean_errors(run_service))

    train = subparsers.add_parser("train", help="offline training")
    train_sub = train.add_subparsers(dest="train_command", metavar="MODEL")
    reward = train_sub.add_parser("reward", help="train a reward model on an OpenPipe preference JSONL file")
    reward.add_argument("--data", required=True, help="OpenPipe JSONL with TRAIN-split pairs")
    reward.add_argument("--out", required=True, help="output folder (HF save_pretrained layout)")
    reward.add_argument("--eval-data", default=None, help="OpenPipe JSONL to report pairwise accuracy on")
    reward.add_argument("--config", default=None, help="YAML/JSON file with trainer fields")
    reward.add_argument("--json", action="store_true", help="print a JSON summary")
    reward.add_argument("--publish", action="store_true",
                        help="also write the model into the checkpoint store and gate it into the registry (the "
                        "continual trainer warm-starts from it); uses --checkpoint-url, --redis-url, --model-name")
    add_config_flags(reward, OFFLINE_FIELDS + PUBLISH_FIELDS)
    reward.set_defaults(handler=_clean_errors(train_reward))

    ev = subparsers.add_parser("eval", help="offline evaluation")
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="MODEL")
    er = ev_sub.add_parser("reward", help="pairwise accuracy (ties count as wrong) of a reward model on a file")
    er.add_argument("--model", required=True, help="model folder (a checkpoint or `train reward --out`)")
    er.add_argument("--data", required=True, help="OpenPipe JSONL of pairs")
    er.add_argument("--max-length", type=int, default=None, help="token budget per row (default: the model's)")
    er.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass")
    er.add_argument("--max-records", type=int, default=0, help="evaluate only the first N records (0 = all)")
    er.add_argument("--json", action="store_true", help="print JSON")
    er.set_defaults(handler=_clean_errors(eval_reward))
