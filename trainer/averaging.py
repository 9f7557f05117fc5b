"""An exponential moving average of the weights: the model the trainer evaluates, saves and serves.

A continual trainer cannot decay its learning rate to zero at the end of a run that never ends, and
the last iterate of a constant-LR run carries the noise of its last few steps.  Averaging the
weights (Polyak & Juditsky 1992; the EMA form of Izmailov et al.'s SWA) removes most of that noise
without touching the training trajectory: training goes on from the live weights, while evaluation,
the gate, checkpoints and the scorer use the average.  On hh_helpful (MiniLM-L6, one epoch, constant
LR, 3 seeds) the average was 0.5 points more accurate than the last iterate offline and 0.6 in the
streaming arm, between -0.2 and +1.6 per seed (``bench train-reward``): a small gain, never a loss
beyond the noise.

The decay warms up as in TensorFlow's ``ExponentialMovingAverage(num_updates=...)``:
``min(decay, (1 + t) / (10 + t))`` at update ``t``, so early updates are not dominated by the
untrained starting point, and a resumed trainer (``t`` = its global step) continues the same average.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


def ema_decay_at(step: int, decay: float) -> float:
    """The averaging decay used for the update made after global step ``step`` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """A shadow copy (fp32) of ``params``, moved toward them by :meth:`update` after each step."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights in: shadow += (1 - decay_t) * (weights - shadow)."""
        weight = 1.0 - ema_decay_at(step, self.decay)
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; the live ones come back after it."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, x in zip(self.params, live):
                    p.copy_(x)

    def live_state(self) -> dict[str, torch.Tensor]:
        """The live (training) weights by position, to save beside a checkpoint of the average."""
        return {f"p{i}": p.detach().to("cpu", copy=True).contiguous() for i, p in enumerate(self.params)}

    @torch.no_grad()
    def load_live_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the live weights saved by :meth:`live_state` (the model holds the average now)."""
        if len(state) != len(self.params):
            raise ValueError(f"saved live weights have {len(state)} tensors, the model {len(self.params)}")
        for i, p in enumerate(self.params):
            t = state[f"p{i}"]
            if t.shape != p.shape:
                raise ValueError(f"saved live weight p{i} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
            p.copy_(t.to(p.device, p.dtype))
