"""The one training step every path shares: in-process, each Ray Train DDP worker, offline and bench.

``Engine`` owns a reward model, its optimizer and LR schedule, and turns a list of PreferenceRecords
into one optimiser step: collate (every response once, length buckets) -> one forward of the
:class:`RankingScorer` module (the unit DDP wraps) -> regroup into ``(B, Kmax)`` -> loss -> backward
-> clip -> step.  Under DDP each rank trains on its slice of the same micro-batch with its loss
scaled so that DDP's gradient average equals the gradient of the whole micro-batch's mean loss.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from services.precision import bf16_native
from services.reward_model import RewardModel
from services.schemas import PreferenceRecord
from trainer.averaging import WeightAverage
from trainer.batching import RankingBatch, collate, expand_rankings_to_pairs, regroup, unbucket
from trainer.config import TrainerConfig
from trainer.losses import attribute_regression_loss, kwise_ranking_loss
from trainer.schedule import make_scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossSettings:
    """The loss part of TrainerConfig, as the step function needs it."""

    loss: str = "kwise"
    use_margin: bool = False
    center_rewards_coefficient: float = 0.0
    attribute_loss_weight: float = 1.0

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> "LossSettings":
        return cls(cfg.loss, cfg.use_margin, cfg.center_rewards_coefficient, cfg.attribute_loss_weight)


@dataclass(frozen=True)
class StepStats:
    """What one optimiser step did (this rank's share under DDP)."""

    step: int
    loss: float
    preference_loss: float
    attribute_loss: float
    pair_accuracy: float
    lr: float
    records: int
    sequences: int
    padded_tokens: int
    seconds: float


class RankingScorer(nn.Module):
    """Runs the HF head over every length bucket in one ``forward`` and returns flat logits.

    One module call per step is what DDP expects (it arms its gradient hooks once per forward), so the
    bucket loop lives inside the module rather than around it.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model

    def forward(self, bucket_inputs: list[dict[str, torch.Tensor]], buckets: list[torch.Tensor], n: int) -> torch.Tensor:
        outs = [self.hf_model(**inp).logits for inp in bucket_inputs]  # each (n_b, 1 + A)
        return unbucket(outs, buckets, n)  # (N, 1 + A)


def ranking_loss(
    logits: torch.Tensor, batch: RankingBatch, settings: LossSettings
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of a batch from its flat logits ``# (N, 1 + A)``, and its parts for logging."""
    rewards, mask = regroup(logits[:, 0], batch.owner, batch.position, batch.num_rankings, batch.kmax)  # (B, Kmax)
    margin = batch.margins if settings.use_margin else None
    pref = kwise_ranking_loss(rewards, mask, margin, settings.center_rewards_coefficient, batch.weights)
    total = pref
    attr_value = 0.0
    if logits.shape[1] > 1 and settings.attribute_loss_weight > 0:
        row_weights = batch.weights[batch.owner] if batch.weights is not None else None  # (N,)
        attr = attribute_regression_loss(logits[:, 1:], batch.attr_target, batch.attr_mask, row_weights)  # (N, A)
        total = total + settings.attribute_loss_weight * attr
        attr_value = float(attr.detach())
    with torch.no_grad():
        i, j = torch.triu_indices(batch.kmax, batch.kmax, offset=1, device=rewards.device)
        valid = mask[:, i] & mask[:, j]  # (B, P)
        correct = (rewards[:, i] > rewards[:, j]) & valid
        accuracy = float(correct.sum()) / max(int(valid.sum()), 1)
    return total, {"preference_loss": float(pref.detach()), "attribute_loss": attr_value, "pair_accuracy": accuracy}


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
    current = getattr(hf_model.config, "_attn_implementation", None)
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


class Engine:
    """A reward model with its optimizer and schedule; ``train(records)`` is one optimiser step."""

    def __init__(
        self,
        model: RewardModel,
        cfg: TrainerConfig,
        *,
        start_step: int = 0,
        device: torch.device | None = None,
        wrap: Any = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """``wrap(module) -> module`` wraps the scorer for distributed training (Ray's prepare_model)."""
        self.cfg = cfg
        self.model = model
        self.settings = LossSettings.from_config(cfg)
        self.rank, self.world_size = rank, world_size
        self.device = device or pick_device(cfg.device)
        # bf16 autocast only where bf16 is native: elsewhere it is emulated and slower than fp32.
        self.autocast = uses_bf16_autocast(cfg.autocast, self.device)
        if self.autocast:
            log.info("training with bf16 autocast on %s (fp32 master weights)", self.device)
            if self.device.type == "cpu":
                eager_attention_for_cpu_bf16(model.hf_model)
        self.model.to(self.device)
        if cfg.disable_dropout:
            disable_dropout(model.hf_model)
        self.scorer = RankingScorer(model.hf_model)
        self.module: nn.Module = wrap(self.scorer) if wrap is not None else self.scorer
        params = [p for p in model.hf_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg.schedule, cfg.warmup_steps, start_step)
        self.step = start_step
        #: the weight average that is evaluated, saved and served (None: the live weights are)
        self.average = WeightAverage(params, cfg.ema_decay) if cfg.ema_decay else None

    def serving_weights(self) -> AbstractContextManager[None]:
        """``with engine.serving_weights():`` the model holds what gets evaluated, saved and served."""
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

    def prepare(self, records: Sequence[PreferenceRecord], weights: Sequence[float] | None = None) -> RankingBatch:
        """The batch this engine trains on for ``records`` (pairwise mode expands rankings first, each
        pair keeping its ranking's weight)."""
        rows = list(records)
        if self.settings.loss == "pairwise":
            rows = expand_rankings_to_pairs(records)
            if weights is not None:
                weights = [w for rec, w in zip(records, weights) for _ in range(rec.k * (rec.k - 1) // 2)]
        return collate(
            rows,
            self.model.encode,
            attributes=self.model.spec.attributes,
            max_tokens_per_forward=self.cfg.max_tokens_per_forward,
            weights=weights,
        )

    def train(self, records: Sequence[PreferenceRecord], weights: Sequence[float] | None = None, *,
              sharded: bool = True) -> StepStats:
        """One optimiser step on ``records`` with their loss ``weights`` (None: all equal; under DDP: on
        this rank's slice of them)."""
        started = time.perf_counter()
        scale = 1.0
        if self.world_size > 1 and sharded:
            records, weights, scale = shard(records, self.rank, self.world_size, weights)
        batch = self.prepare(records, weights).to(self.device)
        self.module.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.module(batch.bucket_inputs(), batch.buckets, batch.num_sequences)  # (N, 1 + A)
        loss, parts = ranking_loss(logits.float(), batch, self.settings)
        if not math.isfinite(float(loss.detach())):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}; lower lr or check the data")
        (loss * scale).backward()
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.hf_model.parameters(), self.cfg.max_grad_norm)
        lr = self.lr
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update(self.step)
        self.step += 1
        return StepStats(
            step=self.step,
            loss=float(loss.detach()),
            preference_loss=parts["preference_loss"],
            attribute_loss=parts["attribute_loss"],
            pair_accuracy=parts["pair_accuracy"],
            lr=lr,
            records=len(records) if scale else 0,
            sequences=batch.num_sequences,
            padded_tokens=batch.padded_tokens,
            seconds=time.perf_counter() - started,
        )

    # Optimizer state travels with checkpoints only when configured (it doubles their size).

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
        for group in self.optimizer.param_groups:  # the schedule, not the saved lr, decides the lr
            group["lr"] = self.cfg.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
