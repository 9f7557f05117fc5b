"""The continual trainer: reward models and DPO policies from the same preference stream.

Public surface: :class:`TrainerConfig` / :func:`load_trainer_config`, :func:`serve` (the service),
:func:`train_offline` / :func:`evaluate` (offline use), :class:`Learner` (the shared training step),
:func:`objective_for` (what is trained, per model kind) and the loss functions in
:mod:`trainer.losses` and :mod:`trainer.dpo_losses`.  Heavy modules (torch, Ray) load on first use so the
``prefstream`` CLI stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from trainer.config import TrainerConfig, load_trainer_config

_LAZY = {
    "serve": "trainer.service",
    "train_offline": "trainer.offline",
    "evaluate": "trainer.evaluation",
    "EvalResult": "trainer.evaluation",
    "Learner": "trainer.learner",
    "objective_for": "trainer.objectives",
    "ContinualTrainer": "trainer.loop",
    "run_in_process": "trainer.runtime",
    "run_on_ray": "trainer.ray_train",
}

__all__ = ["TrainerConfig", "load_trainer_config", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
