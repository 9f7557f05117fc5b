"""Reward-model losses as small pure functions over tensors.

Kept free of models, batches and config so each can be checked against numbers worked out by hand
(tests/unit/test_losses.py) and reused by the in-process trainer, the Ray workers and the benchmarks.
Every function returns a scalar tensor that still carries the autograd graph.

Shapes: ``B`` rankings in a batch, ``K`` responses per ranking (``Kmax`` when padded), ``N`` responses
in a flattened batch, ``A`` attribute heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Pairwise Bradley-Terry loss, mean over pairs.

    ``loss = mean(-log σ(r_c - r_r - m)) + λ · mean((r_c + r_r)^2)``

    * The first term is the Bradley-Terry negative log-likelihood used for reward models since
      Stiennon et al. 2020 (eq. 1) and Ouyang et al. 2022 (eq. 1 with K = 2); the optional margin
      ``m`` is Llama 2's (Touvron et al. 2023, eq. 2): a pair labelled as clearly better must be
      separated by at least ``m``.
    * The second term is the reward-centering regulariser of Eisenstein et al. 2023 ("Helping or
      Herding?", §3), as TRL's ``center_rewards_coefficient``: it pins the otherwise free offset of
      the reward so that scores stay near zero.

    chosen, rejected: ``# (P,)`` rewards of the preferred and the rejected response of each pair.
    margin: scalar or ``# (P,)``; ``None`` means no margin.
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must have the same shape")
    diff = chosen - rejected  # (P,)
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def ranking_pair_indices(k: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j), i < j, of all K(K-1)/2 ordered pairs of a best-first ranking of length ``k``."""
    i, j = torch.triu_indices(k, k, offset=1, device=device)  # (K(K-1)/2,) each
    return i, j


def kwise_ranking_loss(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coefficient: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """InstructGPT's K-wise ranking loss (Ouyang et al. 2022, eq. 1), rankings of mixed K.

    ``loss(θ) = -1/C(K,2) · E_{(x, y_w, y_l)} [log σ(r(x, y_w) - r(x, y_l))]``

    Each of a prompt's K responses went through the model once (``rewards``); all K(K-1)/2 pairs are
    formed from those rewards, averaged within the ranking (the ``1/C(K,2)``: every prompt weighs the
    same whatever its K, which is what keeps InstructGPT from overfitting to prompts with many
    responses), then averaged over the batch.  Responses are best first, so ``y_w`` is the one with
    the smaller index.  Rankings shorter than ``Kmax`` are padded on the right and masked out.

    With ``margin`` every pair of ranking ``b`` is separated by ``margin[b]``; with
    ``center_coefficient`` the Eisenstein et al. 2023 regulariser ``λ·(r_w + r_l)^2`` is averaged the
    same way.  For K = 2 this is exactly :func:`bradley_terry_loss`.

    With ``weights`` the batch average is weighted, ``Σ_b w_b·loss_b / Σ_b w_b``: the continual
    trainer gives replayed rankings a weight below 1 (``replay_weight``) so that replay, on a stream
    that does not shift, does not amount to a second epoch at full strength.

    rewards: ``# (B, Kmax)``; mask: ``# (B, Kmax)`` bool, True for real responses (a prefix of each
    row); margin: scalar or ``# (B,)``; weights: ``# (B,)``, >= 0 with a positive sum.
    """
    if rewards.dim() != 2 or rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(mask.shape)} must both be (B, Kmax)")
    mask = mask.bool()
    bsz, kmax = rewards.shape
    if kmax < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got Kmax={kmax}")
    i, j = ranking_pair_indices(kmax, rewards.device)  # (P,), P = Kmax(Kmax-1)/2
    better, worse = rewards[:, i], rewards[:, j]  # (B, P)
    pair_mask = (mask[:, i] & mask[:, j]).to(rewards.dtype)  # (B, P)
    n_pairs = pair_mask.sum(dim=1)  # (B,)
    if bool((n_pairs == 0).any()):
        raise ValueError("every ranking needs at least 2 unmasked responses")
    diff = better - worse  # (B, P)
    if margin is not None:
        m = torch.as_tensor(margin, dtype=rewards.dtype, device=rewards.device)
        diff = diff - (m.unsqueeze(-1) if m.dim() == 1 else m)
    per_pair = -F.logsigmoid(diff)  # (B, P)
    if center_coefficient:
        per_pair = per_pair + center_coefficient * (better + worse) ** 2
    per_ranking = (per_pair * pair_mask).sum(dim=1) / n_pairs  # (B,)
    if weights is None:
        return per_ranking.mean()
    w = _check_weights(weights, bsz).to(per_ranking)
    return (per_ranking * w).sum() / w.sum()


def _check_weights(weights: torch.Tensor, n: int) -> torch.Tensor:
    if weights.shape != (n,):
        raise ValueError(f"weights {tuple(weights.shape)} must be ({n},), one per row")
    if bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    return weights


def expand_to_pairs(
    rewards: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(better, worse, owner) of every valid pair of padded rankings: ``# (P_total,)`` each.

    Used by the pairwise path that treats a K-ranking as K(K-1)/2 independent comparisons.
    """
    i, j = ranking_pair_indices(rewards.shape[1], rewards.device)
    valid = mask[:, i] & mask[:, j]  # (B, P)
    owner = torch.arange(rewards.shape[0], device=rewards.device).unsqueeze(1).expand_as(valid)
    return rewards[:, i][valid], rewards[:, j][valid], owner[valid]


def attribute_regression_loss(
    predicted: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked mean-squared error on the attribute heads (HelpSteer-style score feedback).

    ``loss = Σ m·(ŷ - y)^2 / Σ m`` over the responses and attributes that carry a score — the
    regression objective of SteerLM / HelpSteer (Dong et al. 2023 §2.2; Wang et al. 2023, HelpSteer
    §4) where each attribute (helpfulness, correctness, coherence, complexity, verbosity) is a scalar
    head.  Missing scores (mask 0) contribute nothing; with none at all the loss is an exact zero
    that still depends on ``predicted`` so a backward pass works.  ``weights`` scale each response's
    terms, numerator and denominator (``m`` becomes ``w·m``), as in :func:`kwise_ranking_loss`.

    predicted, target, mask: ``# (N, A)``; weights: ``# (N,)``.
    """
    if predicted.shape != target.shape or predicted.shape != mask.shape:
        raise ValueError(
            f"predicted {tuple(predicted.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} must match"
        )
    m = mask.to(predicted.dtype)
    if weights is not None:
        m = m * _check_weights(weights, predicted.shape[0]).to(m).unsqueeze(-1)  # (N, A)
    denom = m.sum()
    if float(denom) == 0.0:
        return predicted.sum() * 0.0
    return (m * (predicted - target) ** 2).sum() / denom
