"""Assembling a running trainer from its config: store, registry, resume point, learner, source, loop.

Both execution paths call :func:`run_leader`: the in-process path (``num_workers=0``) directly, the
Ray path on every DDP worker (rank 0 builds the Kafka source, store, gate and loop; the others only
an Learner that follows rank 0's steps, see :mod:`trainer.ray_train`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from services.checkpoints import CheckpointRef, CheckpointStore
from services.data import load_openpipe_jsonl
from services.topics import DEAD_LETTER, MODEL_UPDATES, topic_name
from trainer.checkpointing import LineageState, ResumePoint, find_resume_point, load_live_weights
from trainer.config import TrainerConfig
from trainer.evaluation import EvalSet
from trainer.gate import Gate
from trainer.learner import Learner
from trainer.objectives import Objective, objective_for
from trainer.loop import ContinualTrainer, RunSummary, Stepper
from trainer.replay import ReservoirBuffer
from trainer.stream import KafkaSource

log = logging.getLogger(__name__)


@dataclass
class Services:
    """The external things rank 0 talks to; closed together."""

    store: CheckpointStore
    registry: Any = None  # services.registry.ModelRegistry
    producer: Any = None  # announcements and dead letters

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout=10)


def connect_services(cfg: TrainerConfig) -> Services:
    """Checkpoint store; with ``publish``, the registry; with a Kafka address, a durable producer."""
    from services.kafka import RenewingProducer

    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    producer = RenewingProducer(cfg.stream.kafka_bootstrap) if cfg.stream.kafka_bootstrap else None
    registry = None
    if cfg.gate.publish:
        from services.announce import KafkaAnnouncer
        from services.redis_client import connect, ping
        from services.registry import ModelRegistry

        client = connect(cfg.gate.redis_url)
        ping(client)
        updates = topic_name(MODEL_UPDATES, cfg.stream.topic_prefix)
        announcer = KafkaAnnouncer(producer, updates) if cfg.gate.announce and producer is not None else None
        registry = ModelRegistry(client, announcer=announcer)
    return Services(store=store, registry=registry, producer=producer)


def apply_runtime_settings(cfg: TrainerConfig) -> None:
    if cfg.optim.torch_threads:
        torch.set_num_threads(cfg.optim.torch_threads)
    torch.manual_seed(cfg.optim.seed)


def build_eval_set(cfg: TrainerConfig, point: ResumePoint | None = None) -> EvalSet:
    file_records = load_openpipe_jsonl(cfg.gate.eval_data) if cfg.gate.eval_data else []
    eval_set = EvalSet(cfg.gate.eval_max_records, file_records, seed=cfg.optim.seed)
    if point is not None:
        eval_set.restore_topic_records(point.eval_topic_records)
    return eval_set


def build_learner(cfg: TrainerConfig, point: ResumePoint, objective: Objective | None = None,
                  **learner_kw: Any) -> Learner:
    """The learner a (re)started trainer goes on with: the resume folder's weights, and when resuming our
    own checkpoint its objective state, optimizer moments and live weights (as configured)."""
    objective = objective or objective_for(cfg)
    model = objective.load(point.model_path)
    if point.source == "checkpoint":
        objective.load_state(Path(point.model_path))
    learner = Learner(objective, model, cfg, start_step=point.step, **learner_kw)
    if point.optimizer_path and cfg.checkpoint.save_optimizer_state:
        learner.load_optimizer_state(torch.load(point.optimizer_path, map_location=learner.device))
    elif point.step and cfg.optim.warmup_steps:
        log.info("resuming at step %d without optimizer state: the %d-step warm-up runs again (Adam's moments "
                 "start empty)", point.step, cfg.optim.warmup_steps)
    live = load_live_weights(point) if cfg.checkpoint.save_optimizer_state else None
    if live is not None:
        learner.load_live_state(live)
    return learner


def run_leader(
    cfg: TrainerConfig,
    services: Services,
    point: ResumePoint,
    learner: Learner,
    *,
    stepper: Stepper | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_idle: Callable[[], None] = lambda: None,
    report: Callable[[dict[str, Any]], None] = lambda metrics: None,
) -> RunSummary:
    """Rank 0 (or the only process): consume, train, checkpoint, gate."""
    replay: ReservoirBuffer = ReservoirBuffer(cfg.stream.replay_capacity, seed=cfg.optim.seed + point.step)
    if point.replay_records:
        replay.restore(point.replay_records, point.replay_seen, point.replay_counts)
    eval_set = build_eval_set(cfg, point)
    gate = (Gate(cfg, services.registry, eval_set, learner.objective, learner.precision)
            if services.registry is not None else None)
    if gate is not None and point.source == "checkpoint" and point.records_count and not gate.recorded(point.version):
        # The previous run died between making this checkpoint durable and gating it.
        ref = CheckpointRef(cfg.model.model_name, point.version, point.uri, Path(point.model_path))
        with learner.serving_weights():
            result = learner.evaluate(eval_set.records) if len(eval_set) else None
        gate.judge(ref, result, records_seen=point.records_seen, base_model=point.base_model)
    source = KafkaSource(cfg.stream.kafka_bootstrap, cfg.stream.topic, cfg.stream.group_id, start_offsets=point.offsets,
                         dead_letter_topic=topic_name(DEAD_LETTER, cfg.stream.topic_prefix), producer=services.producer)
    lineage = LineageState(step=point.step, records_seen=point.records_seen, replayed_records=point.replayed_records,
                           previous_version=point.version if point.source == "checkpoint" else "",
                           parent=point.parent, base_model=point.base_model)
    log.info("trainer %s: %s", cfg.model.model_name, point.describe())
    loop = ContinualTrainer(cfg, learner, source, lineage=lineage, replay=replay, eval_set=eval_set,
                            store=services.store, gate=gate, stepper=stepper, should_stop=should_stop,
                            on_idle=on_idle, recent_ids=point.recent_record_ids, report=report)
    try:
        return loop.run()
    finally:
        source.close()


def run_in_process(cfg: TrainerConfig, should_stop: Callable[[], bool] = lambda: False) -> RunSummary:
    """The whole trainer in this process (num_workers = 0): no Ray, same step and loop."""
    apply_runtime_settings(cfg)
    services = connect_services(cfg)
    try:
        objective = objective_for(cfg)
        point = find_resume_point(cfg, services.store, services.registry, objective=objective)
        learner = build_learner(cfg, point, objective)
        return run_leader(cfg, services, point, learner, should_stop=should_stop)
    finally:
        services.close()
