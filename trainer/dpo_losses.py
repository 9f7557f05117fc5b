"""Policy-optimisation losses of the DPO family as small pure functions over tensors.

The continual DPO objective trains a causal-LM policy (a LoRA on the embedded SmolLM2) directly from
the same feedback the reward model learns from, with no reward model in the loop.  Its losses live
here, apart from models, batches and config, for the same reason the reward losses live in
:mod:`trainer.losses`: each is checked against numbers worked out by hand
(tests/unit/test_dpo_losses.py) and the trainer, the Ray workers and the policy gate all share them.

The reference model's log-probabilities are computed once per record and cached, so every loss
takes them as plain tensors and detaches them itself: no gradient reaches the reference even when a
caller computed it with autograd on (e.g. the same LoRA model with its adapter disabled).

Shapes: ``B`` rows (pairs, rankings or unpaired completions), ``K`` responses per ranking (``Kmax``
when padded), ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.losses import _check_weights

#: Token ids that :func:`sequence_logps` never reads (the usual ignore index of padded labels).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PairLossOutput:
    """What a pairwise preference loss returns.

    ``loss`` is the scalar to back-propagate; ``chosen_rewards`` and ``rejected_rewards`` are the
    implicit rewards ``β·(log π − log π_ref)`` of each pair, ``# (B,)``, detached (for logging and the
    implicit-reward accuracy).
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


@dataclass(frozen=True)
class RewardLossOutput:
    """What a ranking or unpaired loss returns: the scalar ``loss`` and the detached implicit rewards
    ``β·(log π − log π_ref)`` of every response (``# (B, Kmax)`` for rankings, zero where padded;
    ``# (B,)`` for unpaired completions)."""

    loss: torch.Tensor
    rewards: torch.Tensor


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's label tokens under a causal LM, and how many there are.

    ``log π(y | x) = Σ_t m_t · log softmax(z_{t−1})[y_t]`` — the sequence log-likelihood that every
    DPO-family loss is written in (Rafailov et al. 2023, eq. 7 uses it for ``π_θ`` and ``π_ref``).
    The logits at position ``t`` predict the token at ``t + 1``, so the first label has no prediction
    and is never counted, whatever its mask.  ``loss_mask`` marks the tokens that belong to the
    completion (not the prompt, not padding); a masked-out label may hold anything, including
    :data:`IGNORE_INDEX`.

    The log-probabilities are computed once with ``log_softmax`` and read with ``gather`` (no
    separate softmax).  Half-precision logits are upcast to float32 first: a sum over hundreds of
    tokens in bf16 loses the differences DPO is made of.

    ``temperature`` reads the log-probabilities of the distribution sampled at that temperature,
    ``log softmax(z / T)``, the one the trained replies were drawn from (see
    :attr:`trainer.config.DPOSettings.temperature`); 1 is the model's own distribution.

    logits: ``# (B, T, V)``; labels, loss_mask: ``# (B, T)``.
    Returns ``(sum_logps # (B,), n_tokens # (B,))``; ``n_tokens`` is in the dtype of ``sum_logps``
    so it can divide it (the per-token mean of :func:`ipo_loss`).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be (B, T, V) and labels {tuple(labels.shape)} and "
            f"loss_mask {tuple(loss_mask.shape)} must both be (B, T)"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logps = torch.log_softmax(_tempered(logits[:, :-1], temperature), dim=-1)  # (B, T-1, V): t predicts t+1
    mask = loss_mask[:, 1:].bool()  # (B, T-1)
    targets = torch.where(mask, labels[:, 1:], 0)  # (B, T-1): any valid id where masked out
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    token_logps = torch.where(mask, token_logps, 0.0)
    return token_logps.sum(dim=-1), mask.sum(dim=-1).to(token_logps.dtype)


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def packed_sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, num_rows: int, temperature: float = 1.0
) -> torch.Tensor:
    """:func:`sequence_logps` for logits computed only where they are needed.

    A causal LM can project to the vocabulary only at the positions that predict a completion token
    (``logits_to_keep``), which skips the prompt's share of the largest matrix and of the
    ``log_softmax``.  Those logits arrive packed, one per completion token: ``logits # (M, V)``, the
    token each predicts ``labels # (M,)`` and its row ``rows # (M,)``.  Returns the per-row sums
    ``# (num_rows,)``, equal to :func:`sequence_logps` on the full logits (tested), at the same
    ``temperature``.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or rows.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be (M, V) with labels {tuple(labels.shape)} and rows "
                         f"{tuple(rows.shape)} both (M,)")
    token_logps, _ = packed_token_logps(logits, labels, temperature)
    return torch.zeros(num_rows, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)


def packed_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, also: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position log-probabilities of packed logits ``# (M, V)``: of each ``labels`` token ``# (M,)``
    and, when ``also`` is a token id, of that one token at every position ``# (M,)`` (else None), read from
    one ``log_softmax`` at ``temperature``.  ``also`` is how :func:`stop_anchor_loss` reads the
    end-of-turn probability at every place a reply goes on."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be (M, V) and labels {tuple(labels.shape)} (M,)")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logps = torch.log_softmax(_tempered(logits, temperature), dim=-1)  # (M, V)
    tokens = logps.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (M,)
    return tokens, (logps[:, also] if also is not None else None)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    weights: torch.Tensor | None = None,
) -> PairLossOutput:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7), optionally conservative (cDPO).

    ``h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``,
    ``loss = (1 − ε)·(−log σ(βh)) + ε·(−log σ(−βh))``.

    With ``ε = label_smoothing = 0`` this is eq. 7.  With ``ε > 0`` it is conservative DPO (Mitchell
    2023, "A note on DPO with noisy preferences"): each label is taken to be flipped with
    probability ε, so the loss is the expected one under that noise and its optimum stops at a
    finite margin instead of pushing ``h`` to infinity on pairs that may be mislabelled.
    ``ε`` must be below 0.5 (at 0.5 the label carries no information).

    All four inputs: summed sequence log-probabilities, ``# (B,)`` (see :func:`sequence_logps`).
    weights: ``# (B,)``, >= 0 with a positive sum; the loss is then ``Σ w_b·loss_b / Σ w_b``, as in
    :func:`trainer.losses.kwise_ranking_loss` (replayed pairs weigh less).
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                      ref_rejected=ref_rejected)
    chosen_ratio = policy_chosen - ref_chosen.detach()  # (B,)
    rejected_ratio = policy_rejected - ref_rejected.detach()  # (B,)
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,) = βh
    per_pair = -(1.0 - label_smoothing) * F.logsigmoid(logits)  # (B,)
    if label_smoothing:
        per_pair = per_pair - label_smoothing * F.logsigmoid(-logits)
    return PairLossOutput(
        loss=_weighted_mean(per_pair, weights),
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


def chosen_nll(
    policy_chosen: torch.Tensor,
    chosen_tokens: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The negative log-likelihood per token of the preferred responses, RPO's second term.

    ``nll = Σ_b w_b·(−log π(y_b|x_b)) / Σ_b w_b·|y_b|``: one mean over every chosen token of the batch
    (as TRL's ``rpo_alpha`` computes it), not a mean of each response's own per-token NLL.
    RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization") adds ``α·nll`` to the DPO
    loss.  DPO alone only asks the chosen response to gain on the rejected one *relative to the
    reference*; it may get there by lowering both, and on pairs that always differ the same way
    (the chosen reply is the shorter one under a word limit) it learns that difference without end.
    The NLL term keeps the chosen responses themselves likely, so the policy moves toward replies
    like them (best-of-N distillation) rather than past them.

    Why per token of the batch: dividing each response by its own length (the paper's form) gives a
    short response's tokens more weight than a long one's, its end-of-sequence token included, so the
    fitted length distribution leans short of the chosen replies' own; trained on its own best-of-N
    winners round after round, a policy then shortens with no preference for brevity in the data
    (measured: docs/loop.md, "Distilling the winners").  Here every chosen token of the batch weighs
    the same.  The learner splits a micro-batch into backward pieces (``max_tokens_per_backward``) and
    DDP into shards, and weighs each by its records' loss weight, not its tokens: across pieces a
    piece of short replies still weighs its tokens more, a bias over groups of records, no longer
    over single replies.

    policy_chosen: ``# (B,)`` summed log-probabilities of the chosen responses (:func:`sequence_logps`);
    chosen_tokens: ``# (B,)`` their token counts, positive.
    """
    _check_same_shape(policy_chosen=policy_chosen, chosen_tokens=chosen_tokens)
    if bool((chosen_tokens <= 0).any()):
        raise ValueError("chosen_tokens must be positive: every chosen response needs a token")
    w = (torch.ones_like(policy_chosen) if weights is None
         else _check_weights(weights, policy_chosen.shape[0]).to(policy_chosen))
    return -(w * policy_chosen).sum() / (w * chosen_tokens.to(policy_chosen)).sum()


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
    weights: torch.Tensor | None = None,
) -> PairLossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17), on per-token log-ratios.

    ``h = (log π(y_w) − log π_ref(y_w))/|y_w| − (log π(y_l) − log π_ref(y_l))/|y_l|``,
    ``loss = (h − 1/(2τ))²`` with ``τ = beta``.

    IPO regresses ``h`` onto a fixed target instead of pushing it up without bound, so the scale of
    ``h`` sets the meaning of τ.  Here ``h`` uses the log-ratios averaged over each completion's
    tokens (``chosen_tokens``, ``rejected_tokens``, from :func:`sequence_logps`), not the sums: with
    sums a longer completion would get a larger ``h`` for the same per-token preference and τ would
    have to be tuned to the lengths of the data.  The implicit rewards returned are ``β`` times
    the same per-token log-ratios, i.e. what the loss sees.

    The four log-probability inputs and the token counts: ``# (B,)``; counts must be positive.
    weights: ``# (B,)`` as in :func:`dpo_loss`.
    """
    _check_beta(beta)
    _check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                      ref_rejected=ref_rejected, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    if bool((chosen_tokens <= 0).any()) or bool((rejected_tokens <= 0).any()):
        raise ValueError("chosen_tokens and rejected_tokens must be positive: every completion needs a token")
    chosen_ratio = (policy_chosen - ref_chosen.detach()) / chosen_tokens  # (B,)
    rejected_ratio = (policy_rejected - ref_rejected.detach()) / rejected_tokens  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    per_pair = (h - 1.0 / (2.0 * beta)) ** 2  # (B,)
    return PairLossOutput(
        loss=_weighted_mean(per_pair, weights),
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


def plackett_luce_dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    weights: torch.Tensor | None = None,
) -> RewardLossOutput:
    """DPO over whole rankings: the Plackett-Luce generalisation (Rafailov et al. 2023, App. A.3).

    With ``s_k = β·(log π(y_k) − log π_ref(y_k))`` and responses best first,
    ``loss = −Σ_k log( exp(s_k) / Σ_{j≥k} exp(s_j) )``: the negative log-likelihood of the observed
    order when the responses are drawn best-first without replacement.  For K = 2 it is exactly
    :func:`dpo_loss` (the second factor is 1).  Each ranking counts once whatever its K, and the
    batch mean is (weighted as in :func:`dpo_loss`) over rankings.

    The suffix sums ``log Σ_{j≥k} exp(s_j)`` are one reversed ``logcumsumexp``; padded responses
    are ``−∞`` there, so they add nothing, and their own terms are dropped.

    policy_logps, ref_logps: ``# (B, Kmax)`` summed sequence log-probabilities; mask: ``# (B, Kmax)``
    bool, True for real responses, padding at the end of a row; every row needs at least two real
    responses.  Values under the padding are never read (they may be anything, NaN included).
    """
    _check_beta(beta)
    if policy_logps.dim() != 2 or policy_logps.shape != ref_logps.shape or policy_logps.shape != mask.shape:
        raise ValueError(
            f"policy_logps {tuple(policy_logps.shape)}, ref_logps {tuple(ref_logps.shape)} and mask "
            f"{tuple(mask.shape)} must all be (B, Kmax)"
        )
    mask = mask.bool()
    if bool((mask.sum(dim=1) < 2).any()):
        raise ValueError("every ranking needs at least 2 unmasked responses")
    ratio = torch.where(mask, policy_logps - ref_logps.detach(), 0.0)  # (B, K); padding -> 0, NaN-free
    scores = torch.where(mask, beta * ratio, -math.inf)  # (B, K)
    suffix_lse = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)  # (B, K): log Σ_{j≥k} exp(s_j)
    log_probs = torch.where(mask, scores - suffix_lse, 0.0)  # (B, K)
    per_ranking = -log_probs.sum(dim=-1)  # (B,)
    return RewardLossOutput(loss=_weighted_mean(per_ranking, weights), rewards=(beta * ratio).detach())


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    weights: torch.Tensor | None = None,
) -> RewardLossOutput:
    """KTO for unpaired feedback (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization", eq. 8).

    ``r = log π(y|x) − log π_ref(y|x)``, ``z0 = max(kl_ref, 0)`` (a reference point, no gradient);
    a desirable completion costs ``λ_D·(1 − σ(β(r − z0)))``, an undesirable one
    ``λ_U·(1 − σ(β(z0 − r)))``.  Thumbs-up/down feedback with no counterpart arrives as exactly
    this: one completion and a sign.  ``λ_D``/``λ_U`` rebalance a stream with more of one kind (the
    paper keeps ``λ_D·n_D / (λ_U·n_U)`` in [1, 4/3]).

    policy_logps, ref_logps: ``# (B,)`` summed sequence log-probabilities; desirable: ``# (B,)`` bool;
    kl_ref: scalar, usually :func:`kto_reference_point` of the same batch; weights: ``# (B,)`` as in
    :func:`dpo_loss`.
    """
    _check_beta(beta)
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(
            f"desirable_weight ({desirable_weight}) and undesirable_weight ({undesirable_weight}) must be >= 0")
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if policy_logps.dim() != 1:
        raise ValueError(f"policy_logps {tuple(policy_logps.shape)} must be (B,)")
    z0 = torch.as_tensor(kl_ref, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0.0)
    if z0.dim() != 0:
        raise ValueError(f"kl_ref must be a scalar, got shape {tuple(z0.shape)}")
    ratio = policy_logps - ref_logps.detach()  # (B,)
    desirable = desirable.bool()
    per_row = torch.where(
        desirable,
        desirable_weight * (1.0 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - ratio))),
    )  # (B,)
    return RewardLossOutput(loss=_weighted_mean(per_row, weights), rewards=(beta * ratio).detach())


def kto_reference_point(policy_logps_mismatched: torch.Tensor, ref_logps_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0``: a batch estimate of KL(π‖π_ref) (Ethayarajh et al. 2024).

    ``z0 = max(0, mean_i(log π(y_j|x_i) − log π_ref(y_j|x_i)))`` over mismatched pairs — each prompt
    with a completion written for another prompt of the batch — so that the estimate is of the
    policy's drift in general, not of its preference for the completions being judged.  Detached: the
    paper does not back-propagate through it.  Clamped at 0 because a KL is never negative and the
    estimate from a few samples can be.

    Both inputs: ``# (B,)`` summed sequence log-probabilities.  Returns a 0-dim tensor.
    """
    _check_same_shape(policy_logps_mismatched=policy_logps_mismatched, ref_logps_mismatched=ref_logps_mismatched)
    if policy_logps_mismatched.numel() == 0:
        raise ValueError("policy_logps_mismatched is empty: the reference point needs at least one pair")
    return (policy_logps_mismatched - ref_logps_mismatched).mean().clamp(min=0.0).detach()


def stop_anchor_loss(
    policy_stop_logps: torch.Tensor,
    ref_stop_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    both_ways: bool = True,
) -> torch.Tensor:
    """How far the policy's chance of ending its turn has moved from the reference's where a preferred reply goes on.

    ``anchor_b = Σ_t m_bt · |π(stop | x, y_<t) − π_ref(stop | x, y_<t)|``, then the (weighted) mean over
    rows; with ``both_ways`` False only a rise counts, ``max(0, ·)``.  ``m`` marks the positions of the
    chosen replies that predict a token other than the stop token: places the preferred reply did not end.
    For small hazards the one-sided sum is the probability the policy has gained of ending the reply before
    the chosen reply does, so a weight of 1 prices one unit of that probability like one unit of the DPO loss.

    Why: a pair whose chosen reply is the rejected one cut at a sentence end (the criteria loop's trim
    pairings) raises the stop at that end and lowers it at the rejected reply's own end, later.  The policy
    generalises both to every sentence end: "stop sooner" everywhere when the first wins (docs/loop.md,
    "Teaching where to stop"), "go on" everywhere when the first is held back.  The preference says nothing
    about the stop anywhere the chosen reply goes on, and this term holds it at the reference's there, so
    what the pairs can still move is the stop where the chosen reply ends.  In probabilities, not
    log-probabilities: a mid-sentence stop of 1e-6 moved tenfold changes no reply.

    policy_stop_logps, ref_stop_logps: ``# (B, T)`` log-probability of the stop token at each position;
    mask: ``# (B, T)``; weights: ``# (B,)``.  Gradients flow to ``policy_stop_logps`` only.
    """
    _check_same_shape(policy_stop_logps=policy_stop_logps, ref_stop_logps=ref_stop_logps, mask=mask)
    if policy_stop_logps.dim() != 2:
        raise ValueError(f"policy_stop_logps {tuple(policy_stop_logps.shape)} must be (B, T)")
    moved = policy_stop_logps.float().exp() - ref_stop_logps.detach().float().exp()  # (B, T)
    moved = moved.abs() if both_ways else moved.clamp(min=0.0)
    per_row = torch.where(mask.bool(), moved, 0.0).sum(dim=-1)  # (B,)
    return _weighted_mean(per_row, weights)


def mean_token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of the full-vocabulary ``KL(π‖π_ref) = Σ_v π_v·(log π_v − log π_ref,v)``.

    The policy gate's drift guard: how far the trained policy's next-token distributions have moved
    from the reference on held-out text, per token, so that the bound does not depend on completion
    lengths.  Unlike the sequence-level estimate of :func:`kto_reference_point`, this is the exact KL
    at each position, never negative.

    The mask is over logit positions (position ``t`` is the distribution of token ``t + 1``); for a
    completion mask ``loss_mask`` over tokens as given to :func:`sequence_logps`, pass
    ``policy_logits[:, :-1]``, ``ref_logits[:, :-1]`` and ``loss_mask[:, 1:]``.

    policy_logits, ref_logits: ``# (B, T, V)``; mask: ``# (B, T)``, selecting at least one position.
    Gradients flow to ``policy_logits`` only.
    """
    if policy_logits.dim() != 3 or policy_logits.shape != ref_logits.shape or mask.shape != policy_logits.shape[:2]:
        raise ValueError(
            f"policy_logits {tuple(policy_logits.shape)} and ref_logits {tuple(ref_logits.shape)} must both be "
            f"(B, T, V) and mask {tuple(mask.shape)} must be (B, T)"
        )
    mask = mask.bool()
    n = mask.sum()
    if int(n) == 0:
        raise ValueError("mask selects no position: the KL needs at least one token")
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    logp = torch.log_softmax(policy_logits.to(dtype), dim=-1)  # (B, T, V)
    logq = torch.log_softmax(ref_logits.detach().to(dtype), dim=-1)  # (B, T, V)
    kl = (logp.exp() * (logp - logq)).sum(dim=-1)  # (B, T)
    return torch.where(mask, kl, 0.0).sum() / n


def _check_beta(beta: float) -> None:
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta}")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{listed} must all have the same shape")


def _weighted_mean(per_row: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``# (B,)`` per-row losses, or ``Σ w·loss / Σ w`` (a zero weight removes a row)."""
    if weights is None:
        return per_row.mean()
    w = _check_weights(weights, per_row.shape[0]).to(per_row)
    return (per_row * w).sum() / w.sum()
