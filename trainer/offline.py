"""Offline training and evaluation on preference files, through the continual trainer's own step.

``prefstream train reward`` and ``prefstream eval reward`` (and the benchmark's offline arm) use the
same :class:`~trainer.engine.Engine` step, losses and batching as the streaming service; only the
feed differs: shuffled epochs over a file instead of micro-batches from Kafka.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from services.reward_model import RewardModel
from services.schemas import PreferenceRecord
from trainer.config import TrainerConfig
from trainer.engine import Engine, StepStats
from trainer.evaluation import EvalResult, evaluate

log = logging.getLogger(__name__)

TRAINING_FILE = "prefstream_training.json"


@dataclass
class OfflineResult:
    steps: int = 0
    records: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    eval: EvalResult | None = None

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


def load_base(cfg: TrainerConfig) -> RewardModel:
    return RewardModel.from_pretrained(cfg.resolved_base_model(), max_length=cfg.max_length,
                                       attributes=cfg.attributes, dtype=cfg.dtype)


def batches(records: Sequence[PreferenceRecord], batch_size: int, seed: int) -> list[list[PreferenceRecord]]:
    """Seeded shuffle, then consecutive chunks of ``batch_size``."""
    order = list(records)
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def train_offline(
    cfg: TrainerConfig,
    records: Sequence[PreferenceRecord],
    *,
    engine: Engine | None = None,
    on_step: Callable[[StepStats], None] | None = None,
) -> tuple[Engine, OfflineResult]:
    """``cfg.epochs`` shuffled passes over ``records`` (TEST-split records are skipped)."""
    train = [r for r in records if not r.is_eval]
    if not train:
        from services.errors import InvalidArgument

        raise InvalidArgument("data", "has no TRAIN-split records to train on")
    if engine is None:
        import torch

        torch.manual_seed(cfg.seed)
        engine = Engine(load_base(cfg), cfg)
    result = OfflineResult()
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        for batch in batches(train, cfg.batch_size, cfg.seed + epoch):
            stats = engine.train(batch)
            result.steps += 1
            result.records += len(batch)
            result.losses.append(stats.loss)
            if on_step is not None:
                on_step(stats)
        log.info("epoch %d/%d done: %d steps, last loss %.4f", epoch + 1, cfg.epochs, result.steps, result.losses[-1])
    result.seconds = time.perf_counter() - started
    return engine, result


def save_offline(engine: Engine, cfg: TrainerConfig, result: OfflineResult, out: str | Path, data: str) -> Path:
    """The model folder (loads with AutoModelForSequenceClassification) plus how it was trained.

    Saves the weights ``engine.model`` holds: call it inside ``engine.serving_weights()`` for the average."""
    out = engine.model.save(out)
    (out / TRAINING_FILE).write_text(json.dumps({
        "data": str(data),
        "base_model": engine.model.spec.base_model,
        "loss": cfg.loss_config(),
        "epochs": cfg.epochs,
        "ema_decay": cfg.ema_decay,
        "steps": result.steps,
        "records": result.records,
        "seconds": result.seconds,
        "final_loss": result.losses[-1] if result.losses else None,
        "eval": result.eval.to_dict(outcomes=False) if result.eval else None,
    }, indent=2, sort_keys=True))
    return out


def evaluate_file(model_dir: str, records: Sequence[PreferenceRecord], *, max_length: int | None = None,
                  batch_size: int = 64) -> EvalResult:
    model = RewardModel.from_pretrained(model_dir, max_length=max_length)
    return evaluate(model, records, batch_size=batch_size)


def publish_offline(cfg: TrainerConfig, engine: Engine, result: OfflineResult, *, data: str,
                    eval_records: Sequence[PreferenceRecord] = ()) -> tuple[str, str]:
    """Write the trained model into the checkpoint store and gate it into the registry.

    The same gate as the continual trainer decides (against the served version, on ``eval_records``);
    a published offline model is what a continual trainer without a checkpoint of its own warm-starts
    from.  Returns (version, verdict reason).
    """
    from services.checkpoints import CheckpointStore
    from trainer.checkpointing import FORMAT
    from trainer.evaluation import EvalSet
    from trainer.gate import Gate
    from trainer.runtime import connect_services

    services = connect_services(cfg)
    try:
        store: CheckpointStore = services.store
        eval_set = EvalSet(cfg.eval_max_records, eval_records, seed=cfg.seed)
        candidate = evaluate(engine.model, eval_set.records, cfg.eval_batch_size) if len(eval_set) else None
        metadata = {
            "format": FORMAT, "kind": "reward", "model_name": cfg.model_name,
            "base_model": engine.model.spec.base_model, "spec": engine.model.spec.to_dict(),
            "loss": cfg.loss_config(), "parent": {"source": "offline", "data": str(data)},
            "step": result.steps, "records_seen": result.records, "records": [], "records_count": 0,
            "offsets": {}, "eval": candidate.to_dict() if candidate else None,
            "trainer": {"offline": True, "epochs": cfg.epochs}, "created_at": time.time(),
        }
        ref = store.write(cfg.model_name, store.next_version(cfg.model_name), engine.model.save, metadata)
        gate = Gate(cfg, services.registry, eval_set)
        decision = gate.judge(ref, candidate, records_seen=result.records, base_model=engine.model.spec.base_model,
                              extra_metrics={"step": float(result.steps)})
        return ref.version, ("published: " if decision.publish else "rejected: ") + decision.reason
    finally:
        services.close()
