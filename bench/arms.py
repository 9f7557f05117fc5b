"""What the training benchmarks share: a fresh engine, the continual loop over in-memory phases, and
the paired comparison of two arms over seeds.

It sits below :mod:`bench.train_reward` (the accuracy and throughput arms) and :mod:`bench.forgetting`
(the topic-shift arms), which both use it, so neither has to import the other's module.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Callable, Sequence


def fresh_engine(cfg: Any) -> Any:
    """A trainer engine on the untrained base model, seeded with ``cfg.seed``."""
    import torch

    from trainer.engine import Engine
    from trainer.offline import load_base

    torch.manual_seed(cfg.seed)
    return Engine(load_base(cfg), cfg)


def stream_phases(cfg: Any, phases: Sequence[Sequence[Any]],
                  after_phase: Callable[[Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """A fresh engine through the continual loop over each phase's records in turn (one replay
    reservoir and lineage throughout, checkpoints off); ``after_phase(engine)`` runs after each."""
    from trainer.checkpointing import LineageState
    from trainer.evaluation import EvalSet
    from trainer.loop import ContinualTrainer
    from trainer.replay import ReservoirBuffer
    from trainer.stream import ListSource

    engine = fresh_engine(cfg)
    replay: ReservoirBuffer = ReservoirBuffer(cfg.replay_capacity, seed=cfg.seed)
    lineage = LineageState()
    seconds = 0.0
    replayed = 0
    for stream in phases:
        loop = ContinualTrainer(dataclasses.replace(cfg, max_records=lineage.records_seen + len(stream)), engine,
                                ListSource(stream), lineage=lineage, replay=replay, eval_set=EvalSet(0))
        summary = loop.run()
        seconds += summary.seconds
        replayed += summary.replayed
        if after_phase is not None:
            after_phase(engine)
    return engine, {"records": lineage.records_seen, "replayed": replayed, "steps": lineage.step, "seconds": seconds,
                    "records_per_s": lineage.records_seen / seconds if seconds else 0.0}


def paired_diff(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean and standard error of the per-seed differences ``a - b`` (same seed = same init and order)."""
    diffs = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"mean": statistics.fmean(diffs), "se": se, "per_seed": diffs}


__all__ = ["fresh_engine", "paired_diff", "stream_phases"]
