"""The one training step every path shares: in-process, each Ray Train DDP worker, offline and bench.

``Learner`` owns a model, its optimizer, LR schedule and weight average, and turns a list of
PreferenceRecords into one optimiser step through its :class:`~trainer.objectives.base.Objective`:
collate -> one forward of the objective's module (the unit DDP wraps) -> loss -> backward -> clip ->
step.  It does not know which kind of model it trains.  Under DDP each rank trains on its slice of
the same micro-batch with its loss scaled so that DDP's gradient average equals the gradient of the
whole micro-batch's mean loss.

A step may be split over several micro-batches (gradient accumulation): ``train(records, share=s,
apply=False)`` adds ``s`` times the gradient of the micro-batch's mean loss, and ``apply()`` takes the
optimiser step on the sum.  With shares ``n_i / batch_size`` the accumulated gradient is the gradient of
the mean loss over all ``batch_size`` records, so a step on micro-batches of 3, 5 and 8 records is the
step on the 16 of them (the continual loop relies on this to make arrival timing irrelevant).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from services.precision import bf16_native
from services.schemas import PreferenceRecord
from trainer.averaging import WeightAverage
from trainer.config import TrainerConfig
from trainer.objectives.base import Batch, Objective
from trainer.schedule import make_scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    """What one optimiser step did (this rank's share under DDP)."""

    step: int
    loss: float
    pair_accuracy: float
    parts: dict[str, float]  # the objective's loss terms, e.g. preference_loss, attribute_loss
    lr: float
    records: int
    sequences: int
    padded_tokens: int
    seconds: float
    applied: bool = True  # False: the gradient was accumulated, the optimiser step is still to come
    pieces: int = 1  # backward passes the micro-batch took (max_tokens_per_backward)


def shard(
    records: Sequence[PreferenceRecord], rank: int, world_size: int, weights: Sequence[float] | None = None
) -> tuple[list[PreferenceRecord], list[float] | None, float]:
    """This rank's slice of a micro-batch, its weights, and the loss scale that makes DDP's average exact.

    Each rank's loss is the weighted mean over its own records.  DDP averages gradients over ranks:
    with scale ``world * W_rank / W_total`` (W: the sum of the weights; the record count when all are
    equal) that average is the gradient of the weighted mean loss over the whole micro-batch.  A rank
    left without records trains on a copy of the first one with scale 0, because every rank must take
    part in every all-reduce.
    """
    if not records:
        raise ValueError("cannot shard an empty micro-batch")
    mine = list(records[rank::world_size])
    if weights is None:
        return (mine, None, world_size * len(mine) / len(records)) if mine else ([records[0]], None, 0.0)
    if not mine:
        return [records[0]], [1.0], 0.0
    my_weights = list(weights[rank::world_size])
    return mine, my_weights, world_size * sum(my_weights) / sum(weights)


def disable_dropout(module: nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL's ``disable_dropout`` does for reward models)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def uses_bf16_autocast(autocast: str, device: torch.device) -> bool:
    """The ``autocast`` setting resolved on ``device``: bf16 when asked, or on ``auto`` where bf16 is native."""
    return autocast == "bf16" or (autocast == "auto" and bf16_native(device))


def eager_attention_for_cpu_bf16(hf_model: nn.Module) -> bool:
    """Train with eager (matmul + softmax) attention instead of sdpa under CPU bf16 autocast.

    PyTorch's CPU flash-attention backward is slow in bf16 at small head sizes: on the 2-core Zen 4
    dev box it took ~35% of a MiniLM-L6 training step (16 pairs, 128 tokens), and the same step with
    eager attention ran in 0.62 s instead of 0.87 s.  Eager attention is the same math; autocast runs
    its matmuls in bf16 and its softmax in fp32.  Only the in-memory module changes: saved
    checkpoints carry no attention setting, so they load with the reader's default (sdpa).
    """
    current = getattr(getattr(hf_model, "config", None), "_attn_implementation", None)
    if current != "sdpa" or not hasattr(hf_model, "set_attn_implementation"):
        return False
    try:
        hf_model.set_attn_implementation("eager")
    except (ValueError, NotImplementedError) as e:  # a model without an eager path keeps sdpa
        log.info("keeping sdpa attention for bf16 training: %s", e)
        return False
    log.info("CPU bf16 training: eager attention instead of sdpa (faster backward on CPU)")
    return True


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from services.config import ConfigError

        raise ConfigError("device: cuda was requested but torch sees no GPU; use device=cpu or auto")
    return torch.device(name)


class Learner:
    """A model with its optimizer and schedule; ``train(records)`` is one optimiser step."""

    def __init__(
        self,
        objective: Objective,
        model: Any,
        cfg: TrainerConfig,
        *,
        start_step: int = 0,
        device: torch.device | None = None,
        wrap: Any = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """``wrap(module) -> module`` wraps the objective's module for distributed training (Ray's prepare_model)."""
        self.cfg = cfg
        self.objective = objective
        self.model = model
        self.rank, self.world_size = rank, world_size
        self.device = device or pick_device(cfg.optim.device)
        # bf16 autocast only where bf16 is native: elsewhere it is emulated and slower than fp32.
        self.autocast = uses_bf16_autocast(cfg.model.autocast, self.device)
        module = objective.module(model)
        if self.autocast:
            log.info("training with bf16 autocast on %s (fp32 master weights)", self.device)
            if self.device.type == "cpu":
                eager_attention_for_cpu_bf16(objective.transformer(model))
        model.to(self.device)
        if cfg.model.disable_dropout:
            disable_dropout(module)
        self.module: nn.Module = wrap(module) if wrap is not None else module
        self.params = objective.parameters(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, start_step)
        self.step = start_step
        # Adam's moments are empty at the start, and stay so on a resume unless its optimizer state is loaded
        self._schedule(warm_from=start_step, lr_factor=1.0)
        self._accumulated = False
        #: the weight average that is evaluated, saved and served (None: the live weights are)
        self.average = WeightAverage(self.params, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        #: what :meth:`roll_back` returns to (set by :meth:`keep_weights`)
        self._kept: tuple[list[torch.Tensor], list[torch.Tensor] | None, dict[str, Any]] | None = None

    @classmethod
    def of(cls, model: Any, cfg: TrainerConfig, **kw: Any) -> "Learner":
        """A learner for ``model`` with the objective of ``cfg``'s model kind."""
        from trainer.objectives import objective_for

        return cls(objective_for(cfg), model, cfg, **kw)

    def serving_weights(self) -> AbstractContextManager[None]:
        """``with learner.serving_weights():`` the model holds what gets evaluated, saved and served."""
        return self.average.swapped_in() if self.average is not None else nullcontext()

    def live_state(self) -> dict[str, torch.Tensor] | None:
        """The live weights when they differ from the served ones (saved for an exact resume)."""
        return self.average.live_state() if self.average is not None else None

    def load_live_state(self, state: dict[str, torch.Tensor]) -> None:
        """Go on training from saved live weights; the model's current weights stay the average."""
        if self.average is None:
            log.info("ema_decay is 0: training goes on from the checkpoint's averaged weights")
            return
        self.average.load_live_state(state)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def precision(self) -> AbstractContextManager[Any]:
        """``with learner.precision():`` forwards run as training runs them (bf16 autocast or not)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def evaluate(self, records: Sequence[PreferenceRecord]) -> Any:
        """The objective's evaluation of the model as it is now, in the training precision."""
        with self.precision():
            return self.objective.evaluate(self.model, records)

    def admit(self, records: Sequence[PreferenceRecord]) -> dict[str, str]:
        """The objective's admission of ``records`` (record id -> why it is refused), under the same
        precision as the training forward: what admission computes for a record (a policy's reference
        log-probs) is then on the scale of what the step compares it with."""
        with self.precision():
            return self.objective.admit(self.model, records)

    def prepare(self, records: Sequence[PreferenceRecord], weights: Sequence[float] | None = None) -> Batch:
        """The batch this learner trains on for ``records``."""
        return self.objective.batch(self.model, records, weights)

    def train(self, records: Sequence[PreferenceRecord], weights: Sequence[float] | None = None, *,
              sharded: bool = True, share: float = 1.0, apply: bool = True) -> StepStats:
        """Backward of ``share`` x the mean loss of ``records`` with their loss ``weights`` (None: all
        equal; under DDP: on this rank's slice of them), then, with ``apply``, the optimiser step on every
        gradient accumulated since the last one."""
        started = time.perf_counter()
        if not share > 0:
            raise ValueError(f"share must be > 0, got {share}")
        scale = 1.0
        if self.world_size > 1 and sharded:
            records, weights, scale = shard(records, self.rank, self.world_size, weights)
        pieces = self._pieces(list(records), list(weights) if weights is not None else None)
        total = sum(w for _, w in pieces)
        self.module.train()
        loss_sum, parts_sum, sequences, tokens = 0.0, {}, 0, 0
        for i, (batch, weight) in enumerate(pieces):
            fraction = weight / total  # > 0: shard() gives an empty rank weight 1, replay_weight > 0
            with self._sync(last=i == len(pieces) - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    loss, parts = self.objective.loss(self.module, batch.to(self.device))
                if not math.isfinite(float(loss.detach())):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._accumulated = False
                    raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}; lower lr or check "
                                             "the data")
                (loss * (scale * share * fraction)).backward()
            self._accumulated = True
            loss_sum += float(loss.detach()) * fraction
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * fraction
            sequences += batch.sequences
            tokens += batch.padded_tokens
        lr = self.apply() if apply else self.lr
        return StepStats(
            step=self.step,
            loss=loss_sum,
            pair_accuracy=parts_sum.get("pair_accuracy", 0.0),
            parts={k: v for k, v in parts_sum.items() if k != "pair_accuracy"},
            lr=lr,
            records=len(records) if scale else 0,
            sequences=sequences,
            padded_tokens=tokens,
            seconds=time.perf_counter() - started,
            applied=apply,
            pieces=len(pieces),
        )

    def _pieces(self, records: list[PreferenceRecord], weights: list[float] | None) -> list[tuple[Batch, float]]:
        """The micro-batch as batches of at most ``max_tokens_per_backward`` padded tokens (halved until
        they fit; a single record always goes alone), each with its records' total loss weight."""
        batch = self.prepare(records, weights)
        budget = self.cfg.optim.max_tokens_per_backward
        if not budget or batch.padded_tokens <= budget or len(records) == 1:
            return [(batch, float(sum(weights)) if weights is not None else float(len(records)))]
        mid = len(records) // 2
        return (self._pieces(records[:mid], weights[:mid] if weights is not None else None)
                + self._pieces(records[mid:], weights[mid:] if weights is not None else None))

    def _sync(self, *, last: bool) -> AbstractContextManager[Any]:
        """Under DDP, every piece but the micro-batch's last keeps its gradient local (``no_sync``): each
        rank then all-reduces once per micro-batch, however many pieces its own records made."""
        if last or not hasattr(self.module, "no_sync"):
            return nullcontext()
        return self.module.no_sync()

    @property
    def accumulating(self) -> bool:
        """Gradients were accumulated that no optimiser step has used yet."""
        return self._accumulated

    def apply(self) -> float:
        """The optimiser step on the accumulated gradients (clip, AdamW, schedule, weight average);
        returns the learning rate it stepped with."""
        if not self._accumulated:
            raise RuntimeError("no accumulated gradient to apply; call train() first")
        if self.cfg.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        lr = self.lr
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._accumulated = False
        if self.average is not None:
            self.average.update(self.step)
        self.step += 1
        return lr

    # A version the gate's guard refuses is not trained on: the learner goes back to the last kept one.

    def keep_weights(self) -> None:
        """Remember the live weights, the weight average and the optimizer moments, for :meth:`roll_back`."""
        with torch.no_grad():
            self._kept = ([p.detach().clone() for p in self.params],
                          [s.clone() for s in self.average.shadow] if self.average is not None else None,
                          copy.deepcopy(self.optimizer.state_dict()))

    def roll_back(self, lr_factor: float = 1.0) -> None:
        """Go on from what :meth:`keep_weights` remembered, the learning rate from now on scaled by
        ``lr_factor``; the step count and the schedule go on, and the warm-up runs again when the kept
        optimizer state has no moments (weights kept before the first step)."""
        if self._kept is None:
            raise RuntimeError("no kept weights to roll back to; call keep_weights() first")
        params, shadow, optimizer = self._kept
        with torch.no_grad():
            for p, kept in zip(self.params, params):
                p.copy_(kept)
            if shadow is not None and self.average is not None:
                for s, kept in zip(self.average.shadow, shadow):
                    s.copy_(kept)
        # load_state_dict keeps same-device tensors as they are: hand it a copy, so stepping cannot alter the kept one
        self.load_optimizer_state(copy.deepcopy(optimizer), lr_factor=self.lr_factor * lr_factor)
        self.optimizer.zero_grad(set_to_none=True)
        self._accumulated = False

    # Optimizer state travels with checkpoints only when configured (it doubles their size). Its param groups
    # carry where the warm-up last began and the rollbacks' factor on the configured rate, so a resume with
    # it goes on at the rate it left (a configured rate that changed meanwhile still applies, times the factor).

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any], *, lr_factor: float | None = None) -> None:
        """Go on with ``state``'s moments, its warm-up (one that began at step 0 when it names none) and its
        rate factor (or ``lr_factor``); without moments, the warm-up runs again from this step."""
        self.optimizer.load_state_dict(state)
        group = self.optimizer.param_groups[0]
        factor = float(group.get("lr_factor", 1.0)) if lr_factor is None else lr_factor
        if self.optimizer.state:
            self._schedule(int(group.get("warm_from", 0)), factor)
            return
        self._schedule(self.step, factor)
        if self.step and self.cfg.optim.warmup_steps and self.rank == 0:
            log.info("the optimizer state has no moments: the %d-step warm-up runs again from step %d",
                     self.cfg.optim.warmup_steps, self.step)

    @property
    def lr_factor(self) -> float:
        """The product of the rollbacks' ``lr_factor``: the rate is the configured one times this, scheduled."""
        return float(self.optimizer.param_groups[0]["lr_factor"])

    def _schedule(self, warm_from: int, lr_factor: float) -> None:
        """The schedule's warm-up begins at step ``warm_from``, its rate is the configured one times
        ``lr_factor``, and the rate of this step is set from both (kept in the param groups, which a
        checkpoint's optimizer state carries).

        Adam's update is its first moment over the root of its second, bias-corrected: on empty moments the
        first update moves every weight by about the learning rate, whatever the size of its gradient. The
        warm-up against that is needed wherever the moments start empty, not only at step 0.
        """
        multiplier = self.scheduler.lr_lambdas[0]
        multiplier.warm_from = warm_from
        self.scheduler.base_lrs = [self.cfg.optim.lr * lr_factor for _ in self.optimizer.param_groups]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["warm_from"], group["lr_factor"] = warm_from, lr_factor
            group["lr"] = base * multiplier(self.scheduler.last_epoch)  # the schedule decides
