"""The reward-model objective: K-wise (or expanded pairwise) ranking loss over a sequence classifier.

Every response of a micro-batch goes through the model once, in length buckets, inside one call of
:class:`RankingScorer` (the module DDP wraps); the rewards are regrouped into ``(B, Kmax)`` for the
ranking loss and the optional attribute regression.  The gate scores each held-out response once and
counts, per pair, whether the better response got the higher reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from services.kinds import ModelKind
from services.reward_model import RewardModel, default_reward_model_path
from services.schemas import PreferenceRecord
from trainer.batching import RankingBatch, collate, expand_rankings_to_pairs, regroup, unbucket
from trainer.config import TrainerConfig
from trainer.evaluation import EvalResult, evaluate
from trainer.losses import attribute_regression_loss, kwise_ranking_loss
from trainer.objectives.base import Batch, Objective


@dataclass(frozen=True)
class LossSettings:
    """The reward section of TrainerConfig, as the loss needs it."""

    loss: str = "kwise"
    use_margin: bool = False
    center_rewards_coefficient: float = 0.0
    attribute_loss_weight: float = 1.0

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> "LossSettings":
        r = cfg.reward
        return cls(r.loss, r.use_margin, r.center_rewards_coefficient, r.attribute_loss_weight)


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


class RewardObjective(Objective):
    """Reward models (sequence classifiers with a reward logit and optional attribute heads)."""

    kind = ModelKind.REWARD

    def __init__(self, cfg: TrainerConfig) -> None:
        super().__init__(cfg)
        self.settings = LossSettings.from_config(cfg)
        self._scorers: dict[int, RankingScorer] = {}

    def default_base_model(self) -> str:
        return default_reward_model_path()

    def load(self, path: str) -> RewardModel:
        m = self.cfg.model
        return RewardModel.from_pretrained(path, max_length=m.max_length, attributes=m.attributes, dtype=m.dtype)

    def load_for_eval(self, path: str) -> RewardModel:
        return RewardModel.from_pretrained(path, max_length=self.cfg.model.max_length)

    def module(self, model: RewardModel) -> nn.Module:
        key = id(model)
        if key not in self._scorers:
            self._scorers[key] = RankingScorer(model.hf_model)
        return self._scorers[key]

    def transformer(self, model: RewardModel) -> nn.Module:
        return model.hf_model

    def parameters(self, model: RewardModel) -> list[nn.Parameter]:
        return [p for p in model.hf_model.parameters() if p.requires_grad]

    def save(self, model: RewardModel, directory: Path) -> None:
        model.save(directory)

    def spec(self, model: RewardModel) -> dict[str, Any]:
        return model.spec.to_dict()

    def loss_config(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "loss": c.reward.loss,
            "use_margin": c.reward.use_margin,
            "center_rewards_coefficient": c.reward.center_rewards_coefficient,
            "attribute_loss_weight": c.reward.attribute_loss_weight,
            "attributes": list(c.model.attributes),
            "lr": c.optim.lr,
            "schedule": c.optim.schedule,
            "warmup_steps": c.optim.warmup_steps,
            "ema_decay": c.optim.ema_decay,
            "batch_size": c.optim.batch_size,
            "replay_ratio": c.stream.replay_ratio,
            "replay_weight": c.stream.replay_weight,
            "max_length": c.model.max_length,
            "disable_dropout": c.model.disable_dropout,
        }

    def batch(self, model: RewardModel, records: Sequence[PreferenceRecord],
              weights: Sequence[float] | None) -> Batch:
        """Pairwise mode expands rankings first, each pair keeping its ranking's weight."""
        rows = list(records)
        if self.settings.loss == "pairwise":
            rows = expand_rankings_to_pairs(records)
            if weights is not None:
                weights = [w for rec, w in zip(records, weights) for _ in range(rec.k * (rec.k - 1) // 2)]
        data = collate(rows, model.encode, attributes=model.spec.attributes,
                       max_tokens_per_forward=self.cfg.optim.max_tokens_per_forward, weights=weights)
        return Batch(data, records=len(records), sequences=data.num_sequences, padded_tokens=data.padded_tokens)

    def loss(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        data: RankingBatch = batch.data
        logits = module(data.bucket_inputs(), data.buckets, data.num_sequences)  # (N, 1 + A)
        return ranking_loss(logits.float(), data, self.settings)

    def evaluate(self, model: RewardModel, records: Sequence[PreferenceRecord],
                 known: EvalResult | None = None) -> EvalResult:
        return evaluate(model, records, self.cfg.gate.eval_batch_size)
