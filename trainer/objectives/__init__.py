"""Objectives: what the continual machinery trains, one module per model kind (see ``base.py``)."""

from __future__ import annotations

from services.kinds import ModelKind
from trainer.config import TrainerConfig
from trainer.objectives.base import Batch, Objective

__all__ = ["Batch", "Objective", "objective_for"]


def objective_for(cfg: TrainerConfig) -> Objective:
    """The objective that trains ``cfg.model.model_kind``."""
    kind = cfg.model.kind
    if kind == ModelKind.REWARD:
        from trainer.objectives.reward import RewardObjective

        return RewardObjective(cfg)
    if kind == ModelKind.POLICY:
        from trainer.objectives.dpo import DPOObjective

        return DPOObjective(cfg)
    raise ValueError(f"no objective trains {kind!r} models")
