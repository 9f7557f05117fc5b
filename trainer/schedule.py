"""Learning-rate schedules that suit an unbounded stream.

Cosine or linear decay need the total number of steps, which a continual trainer never knows, and
restarting them on every resume would re-warm a model that is already trained.  These schedules are
functions of the global step only, so a resumed trainer (its step restored from the checkpoint) lands
exactly where it left off.
"""

from __future__ import annotations

import math

import torch

SCHEDULES: tuple[str, ...] = ("constant", "inverse_sqrt")


def lr_multiplier(step: int, schedule: str, warmup_steps: int) -> float:
    """The factor applied to the base learning rate at global step ``step`` (0-based).

    * ``constant``: linear warm-up over ``warmup_steps`` then 1.0 for ever.
    * ``inverse_sqrt``: the same warm-up, then ``sqrt(warmup / (step + 1))`` (Vaswani et al. 2017,
      §5.3, with the peak normalised to 1): it keeps decaying slowly however long the stream runs.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    warm = max(int(warmup_steps), 0)
    if warm and step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    return math.sqrt(max(warm, 1) / (step + 1))


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over :func:`lr_multiplier` whose first step is ``start_step`` (resume)."""
    lr_multiplier(0, schedule, warmup_steps)  # validate eagerly
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s + start_step, schedule, warmup_steps)
    )
    return scheduler
