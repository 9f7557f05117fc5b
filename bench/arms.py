"""What the training benchmarks share: a fresh learner, the continual loop over in-memory phases, and
the paired comparison of two arms over seeds.

It sits below :mod:`bench.train_reward` (the accuracy and throughput arms) and :mod:`bench.forgetting`
(the topic-shift arms), which both use it, so neither has to import the other's module.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from services.config import replace as config_replace
from services.stats import paired_difference


def fresh_learner(cfg: Any) -> Any:
    """A learner on the untrained base model of ``cfg``'s kind, seeded with ``cfg.optim.seed``."""
    import torch

    from trainer.learner import Learner
    from trainer.offline import load_base

    torch.manual_seed(cfg.optim.seed)
    return Learner.of(load_base(cfg), cfg)


def stream_phases(cfg: Any, phases: Sequence[Sequence[Any]],
                  after_phase: Callable[[Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """A fresh learner through the continual loop over each phase's records in turn (one replay
    reservoir and lineage throughout, checkpoints off); ``after_phase(learner)`` runs after each."""
    from trainer.checkpointing import LineageState
    from trainer.evaluation import EvalSet
    from trainer.loop import ContinualTrainer
    from trainer.replay import ReservoirBuffer
    from trainer.stream import ListSource

    learner = fresh_learner(cfg)
    replay: ReservoirBuffer = ReservoirBuffer(cfg.stream.replay_capacity, seed=cfg.optim.seed)
    lineage = LineageState()
    seconds = 0.0
    replayed = 0
    for stream in phases:
        loop = ContinualTrainer(config_replace(cfg, max_records=lineage.records_seen + len(stream)), learner,
                                ListSource(stream), lineage=lineage, replay=replay, eval_set=EvalSet(0))
        summary = loop.run()
        seconds += summary.seconds
        replayed += summary.replayed
        if after_phase is not None:
            after_phase(learner)
    return learner, {"records": lineage.records_seen, "replayed": replayed, "steps": lineage.step, "seconds": seconds,
                    "records_per_s": lineage.records_seen / seconds if seconds else 0.0}


def paired_diff(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean and standard error of the per-seed differences ``a - b`` (same seed = same init and order)."""
    mean, se = paired_difference(a, b)
    return {"mean": mean, "se": se, "per_seed": [x - y for x, y in zip(a, b)]}


__all__ = ["fresh_learner", "paired_diff", "stream_phases"]
