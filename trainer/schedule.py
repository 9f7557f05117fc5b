"""Learning-rate schedules that suit an unbounded stream.

Cosine or linear decay need the total number of steps, which a continual trainer never knows, and
restarting them on every resume would re-warm a model that is already trained.  These schedules are
functions of the global step, so a resumed trainer (its step restored from the checkpoint) lands
exactly where it left off, and of one more number: the step the warm-up last began at.  That is 0,
or the step from which Adam's moments were empty again (a resume without the optimizer state, a
rollback to weights kept before the first step): a fresh Adam moves every weight by about the rate
whatever its gradient, so the warm-up that protected the first steps is needed again.
"""

from __future__ import annotations

import math

import torch

SCHEDULES: tuple[str, ...] = ("constant", "inverse_sqrt")


def lr_multiplier(step: int, schedule: str, warmup_steps: int, warm_from: int = 0) -> float:
    """The factor applied to the base learning rate at global step ``step`` (0-based).

    * ``constant``: linear warm-up over ``warmup_steps`` then 1.0 for ever.
    * ``inverse_sqrt``: the same warm-up, then ``sqrt(warmup / (step + 1))`` (Vaswani et al. 2017,
      §5.3, with the peak normalised to 1): it keeps decaying slowly however long the stream runs.

    The warm-up ramps over the ``warmup_steps`` steps from ``warm_from``; a later warm-up ramps up to
    the decayed rate of its step, not back to the peak.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warm_from < 0:
        raise ValueError(f"warm_from must be >= 0, got {warm_from}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    warm = max(int(warmup_steps), 0)
    since = max(step - warm_from, 0)
    ramp = (since + 1) / warm if warm and since < warm else 1.0
    if schedule == "constant":
        return ramp
    return ramp * min(1.0, math.sqrt(max(warm, 1) / (step + 1)))


class Multiplier:
    """:func:`lr_multiplier` as LambdaLR's function of its own step count (0 at ``start_step``), with
    ``warm_from`` settable while training (the Learner moves it where Adam's moments start empty)."""

    def __init__(self, schedule: str, warmup_steps: int, start_step: int = 0) -> None:
        lr_multiplier(0, schedule, warmup_steps)  # validate eagerly
        self.schedule, self.warmup_steps, self.start_step = schedule, warmup_steps, start_step
        self.warm_from = 0

    def __call__(self, s: int) -> float:
        return lr_multiplier(s + self.start_step, self.schedule, self.warmup_steps, self.warm_from)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over :func:`lr_multiplier` whose first step is ``start_step`` (resume); its warm-up
    began at step 0 (see :class:`Multiplier` to move it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Multiplier(schedule, warmup_steps, start_step))
