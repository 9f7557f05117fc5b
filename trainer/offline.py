"""Offline training and evaluation on preference files, through the continual trainer's own step.

``prefstream train reward|dpo`` and ``prefstream eval reward|dpo`` (and the benchmarks' offline arms)
use the same :class:`~trainer.learner.Learner` step, objective, losses and batching as the streaming
service; only the feed differs: shuffled epochs over a file instead of micro-batches from Kafka.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from services.schemas import PreferenceRecord
from trainer.config import TrainerConfig
from trainer.evaluation import EvalResult
from trainer.learner import Learner
from trainer.objectives import Objective, objective_for

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


def load_base(cfg: TrainerConfig, objective: Objective | None = None) -> object:
    """The base model of ``cfg``'s kind (``base_model``, else the embedded default)."""
    objective = objective or objective_for(cfg)
    return objective.load(objective.resolved_base_model())


def batches(records: Sequence[PreferenceRecord], batch_size: int, seed: int) -> list[list[PreferenceRecord]]:
    """Seeded shuffle, then consecutive chunks of ``batch_size``."""
    order = list(records)
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def train_offline(
    cfg: TrainerConfig,
    records: Sequence[PreferenceRecord],
    *,
    learner: Learner | None = None,
    progress: str | None = None,
) -> tuple[Learner, OfflineResult]:
    """``cfg.optim.epochs`` shuffled passes over ``records`` (TEST-split records are skipped); with
    ``progress``, a tqdm bar of that name over the steps (loss and batch accuracy beside it)."""
    train = [r for r in records if not r.is_eval]
    if not train:
        from services.errors import InvalidArgument

        raise InvalidArgument("data", "has no TRAIN-split records to train on")
    if learner is None:
        import torch

        torch.manual_seed(cfg.optim.seed)
        objective = objective_for(cfg)
        learner = Learner(objective, load_base(cfg, objective), cfg)
    admitted = learner.admit(train)
    if admitted:
        log.warning("%d records cannot be trained on and are skipped, e.g. %s", len(admitted),
                    next(iter(admitted.values())))
        train = [r for r in train if r.record_id not in admitted]
    from tqdm import tqdm

    result = OfflineResult()
    started = time.perf_counter()
    steps = cfg.optim.epochs * -(-len(train) // cfg.optim.batch_size)
    with tqdm(total=steps, desc=progress, unit="step", disable=progress is None) as bar:
        for epoch in range(cfg.optim.epochs):
            for batch in batches(train, cfg.optim.batch_size, cfg.optim.seed + epoch):
                stats = learner.train(batch)
                result.steps += 1
                result.records += len(batch)
                result.losses.append(stats.loss)
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.4f}", acc=f"{stats.pair_accuracy:.2f}", refresh=False)
            log.info("epoch %d/%d done: %d steps, last loss %.4f", epoch + 1, cfg.optim.epochs, result.steps,
                     result.losses[-1])
    result.seconds = time.perf_counter() - started
    return learner, result


def save_offline(learner: Learner, cfg: TrainerConfig, result: OfflineResult, out: str | Path, data: str) -> Path:
    """The model folder (loads with AutoModelForSequenceClassification) plus how it was trained.

    Saves the weights ``learner.model`` holds: call it inside ``learner.serving_weights()`` for the average."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    learner.objective.save(learner.model, out)
    (out / TRAINING_FILE).write_text(json.dumps({
        "data": str(data),
        "kind": learner.objective.kind.value,
        "base_model": learner.objective.base_of(learner.model),
        "loss": learner.objective.loss_config(),
        "epochs": cfg.optim.epochs,
        "ema_decay": cfg.optim.ema_decay,
        "steps": result.steps,
        "records": result.records,
        "seconds": result.seconds,
        "final_loss": result.losses[-1] if result.losses else None,
        "eval": result.eval.to_dict(outcomes=False) if result.eval else None,
    }, indent=2, sort_keys=True))
    return out


def evaluate_file(model_dir: str, records: Sequence[PreferenceRecord], cfg: TrainerConfig) -> EvalResult:
    """The gate's evaluation of a saved model folder of ``cfg``'s kind on ``records``."""
    objective = objective_for(cfg)
    return objective.evaluate(objective.load_for_eval(model_dir), records)


def publish_offline(cfg: TrainerConfig, learner: Learner, result: OfflineResult, *, data: str,
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
        eval_set = EvalSet(cfg.gate.eval_max_records, eval_records, seed=cfg.optim.seed)
        objective = learner.objective
        candidate = learner.evaluate(eval_set.records) if len(eval_set) else None
        metadata = {
            "format": FORMAT, "kind": objective.kind.value, "model_name": cfg.model.model_name,
            "base_model": objective.base_of(learner.model), "spec": objective.spec(learner.model),
            "loss": objective.loss_config(), "parent": {"source": "offline", "data": str(data)},
            "step": result.steps, "records_seen": result.records, "records": [], "records_count": 0,
            "offsets": {}, "eval": candidate.to_dict() if candidate else None,
            "trainer": {"offline": True, "epochs": cfg.optim.epochs}, "created_at": time.time(),
        }
        ref = store.write(cfg.model.model_name, store.next_version(cfg.model.model_name),
                          lambda d: objective.save(learner.model, d), metadata)
        gate = Gate(cfg, services.registry, eval_set, objective, learner.precision)
        decision = gate.judge(ref, candidate, records_seen=result.records, base_model=objective.base_of(learner.model),
                              extra_metrics={"step": float(result.steps)})
        return ref.version, ("published: " if decision.publish else "rejected: ") + decision.reason
    finally:
        services.close()
