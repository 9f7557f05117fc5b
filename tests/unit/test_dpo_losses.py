"""trainer.dpo_losses against values worked out by hand (ln, e and σ to 9 digits)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from trainer.dpo_losses import (IGNORE_INDEX, chosen_nll, dpo_loss, ipo_loss, kto_loss, kto_reference_point, mean_token_kl,
                                plackett_luce_dpo_loss, sequence_logps)

LN2 = 0.693147181
LN3 = 1.098612289
# -log σ(x) = ln(1 + e^-x)
NLS_02 = 0.598138869  # -log σ(0.2)  = ln(1 + e^-0.2) = ln(1.818730753)
NLS_M02 = 0.798138869  # -log σ(-0.2) = ln(1 + e^0.2) = 0.2 + ln(1 + e^-0.2)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- sequence_logps -------------------------------------------------------------------------------

def tiny_lm_logits() -> torch.Tensor:
    """(B=2, T=4, V=3) logits whose softmaxes are easy by hand."""
    per_position = [
        [LN2, 0.0, 0.0],  # e^z = (2, 1, 1) -> p = (1/2, 1/4, 1/4)
        [0.0, 0.0, 0.0],  # p = (1/3, 1/3, 1/3)
        [0.0, LN3, 0.0],  # e^z = (1, 3, 1) -> p = (1/5, 3/5, 1/5)
        [50.0, -50.0, 0.0],  # the last position predicts nothing: never read
    ]
    return torch.tensor([per_position, per_position], dtype=torch.float64)  # (2, 4, 3)


def test_sequence_logps_shifts_and_masks_by_hand() -> None:
    logits = tiny_lm_logits()
    labels = torch.tensor([[IGNORE_INDEX, 0, 2, IGNORE_INDEX], [1, 1, 1, 1]])  # (B, T)
    mask = torch.tensor([[True, True, True, False], [False, False, True, True]])  # (B, T)
    logps, n_tokens = sequence_logps(logits, labels, mask)
    # row 0: position 0 predicts label 1 (=0): ln(1/2); position 1 predicts label 2 (=2): ln(1/3); label 3 is
    # masked out, and label 0 has no prediction at all (its mask is ignored, its -100 never read):
    # -ln 2 - ln 3 = -ln 6 = -1.791759469 over 2 tokens
    # row 1: position 1 predicts label 2 (=1): ln(1/3); position 2 predicts label 3 (=1): ln(3/5):
    # -ln 3 + ln 3 - ln 5 = -ln 5 = -1.609437912 over 2 tokens
    assert logps.tolist() == pytest.approx([-1.791759469, -1.609437912], abs=1e-9)
    assert n_tokens.tolist() == [2.0, 2.0]
    assert n_tokens.dtype == logps.dtype


def test_sequence_logps_upcasts_half_precision_and_carries_gradients() -> None:
    logits = tiny_lm_logits().to(torch.bfloat16).requires_grad_(True)
    labels = torch.tensor([[0, 0, 2, 0], [1, 1, 1, 1]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    logps, _ = sequence_logps(logits, labels, mask)
    assert logps.dtype == torch.float32
    logps.sum().backward()
    assert logits.grad is not None
    assert bool((logits.grad[:, -1] == 0).all())  # the last position predicts nothing
    assert bool((logits.grad[:, :-1] != 0).any())


def test_sequence_logps_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        sequence_logps(torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5))
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logps(torch.zeros(2, 4, 3), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3))


# --- DPO and cDPO ---------------------------------------------------------------------------------

def pair(h_ratio_chosen: float, h_ratio_rejected: float) -> tuple[torch.Tensor, ...]:
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected) with the given log-ratios."""
    return t(-11.0 + h_ratio_chosen), t(-11.0 + h_ratio_rejected), t(-11.0), t(-11.0)


def test_dpo_at_zero_margin_is_ln2_whatever_beta() -> None:
    for beta in (0.01, 0.1, 3.0):
        out = dpo_loss(*pair(0.5, 0.5), beta=beta)  # h = 0.5 - 0.5 = 0: -log σ(0) = ln 2
        assert out.loss.item() == pytest.approx(LN2, abs=1e-9)


def test_dpo_by_hand_with_rewards() -> None:
    # log-ratios +1 (chosen) and -1 (rejected): h = 2, β = 0.1 -> -log σ(0.2) = 0.598138869
    out = dpo_loss(*pair(1.0, -1.0), beta=0.1)
    assert out.loss.item() == pytest.approx(NLS_02, abs=1e-9)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1], abs=1e-12)  # β·(+1)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1], abs=1e-12)  # β·(-1)
    assert not out.chosen_rewards.requires_grad


def test_cdpo_by_hand() -> None:
    # ε = 0.1, h = 2, β = 0.1: 0.9·(-log σ(0.2)) + 0.1·(-log σ(-0.2)) = 0.9·0.598138869 + 0.1·0.798138869
    #                                                                  = 0.618138869
    out = dpo_loss(*pair(1.0, -1.0), beta=0.1, label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(0.9 * NLS_02 + 0.1 * NLS_M02, abs=1e-9)
    assert out.loss.item() == pytest.approx(0.618138869, abs=1e-9)


def test_dpo_gradient_by_hand() -> None:
    # d/dπ_c of -log σ(βh) = -β·σ(-βh); at h = 0, β = 0.1: -0.1·0.5 = -0.05, and +0.05 for π_r
    pc, pr, rc, rr = (x.clone().requires_grad_(True) for x in pair(0.0, 0.0))
    dpo_loss(pc, pr, rc, rr, beta=0.1).loss.backward()
    assert pc.grad.item() == pytest.approx(-0.05, abs=1e-12)
    assert pr.grad.item() == pytest.approx(0.05, abs=1e-12)
    assert rc.grad is None and rr.grad is None  # references are plain inputs, detached


def test_dpo_weights_give_the_weighted_mean() -> None:
    # row 0: h = 0 -> ln 2; row 1: h = 2, β = 0.1 -> 0.598138869
    pc, pr, rc, rr = t(-11.0, -10.0), t(-11.0, -12.0), t(-11.0, -11.0), t(-11.0, -11.0)
    loss = dpo_loss(pc, pr, rc, rr, beta=0.1, weights=t(1.0, 3.0)).loss
    assert loss.item() == pytest.approx((LN2 + 3 * NLS_02) / 4, abs=1e-9)  # 0.621890947
    only_row1 = dpo_loss(pc, pr, rc, rr, beta=0.1, weights=t(0.0, 1.0)).loss
    assert only_row1.item() == pytest.approx(NLS_02, abs=1e-9)
    unweighted = dpo_loss(pc, pr, rc, rr, beta=0.1).loss
    assert unweighted.item() == pytest.approx((LN2 + NLS_02) / 2, abs=1e-9)


# --- IPO ------------------------------------------------------------------------------------------

def test_ipo_by_hand_on_per_token_ratios() -> None:
    # τ = β = 0.5: target 1/(2τ) = 1.
    # row 0: chosen (-10 - -16)/3 = +2 per token, rejected (-20 - -18)/4 = -0.5: h = 2.5 -> (2.5 - 1)^2 = 2.25
    # row 1: chosen (-5 - -6)/1 = +1, rejected (-9 - -9)/2 = 0: h = 1 -> (1 - 1)^2 = 0
    out = ipo_loss(t(-10.0, -5.0), t(-20.0, -9.0), t(-16.0, -6.0), t(-18.0, -9.0), t(3.0, 1.0), t(4.0, 2.0),
                   beta=0.5)
    assert out.loss.item() == pytest.approx((2.25 + 0.0) / 2, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([1.0, 0.5], abs=1e-12)  # 0.5·2, 0.5·1
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.0], abs=1e-12)  # 0.5·(-0.5), 0.5·0
    # summed, not averaged, the same row 0 would have h = 6 - (-2) = 8 and loss 49: the length matters
    assert out.loss.item() != pytest.approx((49 + 0.0) / 2)


def test_ipo_has_its_minimum_at_the_target_not_beyond() -> None:
    # h = 1/(2τ) is the optimum: a larger margin costs again, unlike DPO's ever-falling loss
    beta = 0.25  # target 2
    at_target = ipo_loss(t(2.0), t(0.0), t(0.0), t(0.0), t(1.0), t(1.0), beta=beta).loss
    beyond = ipo_loss(t(5.0), t(0.0), t(0.0), t(0.0), t(1.0), t(1.0), beta=beta).loss
    assert at_target.item() == 0.0
    assert beyond.item() == pytest.approx(9.0, abs=1e-12)  # (5 - 2)^2


# --- Plackett-Luce --------------------------------------------------------------------------------

def test_plackett_luce_k3_by_hand() -> None:
    # β = 1, log-ratios (2, 1, 0), best first:
    # -log(e^2 / (e^2 + e + 1)) - log(e / (e + 1)) - log(1 / 1)
    # = ln(1 + e^-1 + e^-2) + ln(1 + e^-1) = ln(1.503214724) + ln(1.367879441)
    # = 0.407605964 + 0.313261688 = 0.720867652
    policy = torch.tensor([[-8.0, -9.0, -10.0]], dtype=torch.float64)
    ref = torch.full((1, 3), -10.0, dtype=torch.float64)
    out = plackett_luce_dpo_loss(policy, ref, torch.ones(1, 3, dtype=torch.bool), beta=1.0)
    assert out.loss.item() == pytest.approx(0.720867652, abs=1e-9)
    assert out.rewards.tolist() == [[2.0, 1.0, 0.0]]
    # β scales the log-ratios: β = 0.5 on ratios (4, 2, 0) is the same loss
    out_half = plackett_luce_dpo_loss(2 * policy + 10, ref, torch.ones(1, 3, dtype=torch.bool), beta=0.5)
    assert out_half.loss.item() == pytest.approx(0.720867652, abs=1e-9)


def test_plackett_luce_with_k2_is_exactly_dpo() -> None:
    g = torch.Generator().manual_seed(0)
    policy = -20 * torch.rand(6, 2, generator=g, dtype=torch.float64)  # (B, 2)
    ref = -20 * torch.rand(6, 2, generator=g, dtype=torch.float64)  # (B, 2)
    weights = torch.rand(6, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 2, dtype=torch.bool)
    for kw in ({}, {"weights": weights}):
        pl = plackett_luce_dpo_loss(policy, ref, mask, beta=0.3, **kw)
        dpo = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.3, **kw)
        assert pl.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-12)
        assert torch.allclose(pl.rewards[:, 0], dpo.chosen_rewards, atol=1e-12)
        assert torch.allclose(pl.rewards[:, 1], dpo.rejected_rewards, atol=1e-12)


def test_plackett_luce_padding_changes_nothing() -> None:
    # a K=2 ranking with log-ratios (1, -1), β = 0.1 (h = 2: 0.598138869) padded to K=3 with junk, in a batch
    # with the K=3 ranking of test_plackett_luce_k3_by_hand at β = 0.1 (ratios (20, 10, 0) -> 0.720867652)
    policy = torch.tensor([[-10.0, -12.0, math.nan], [10.0, 0.0, -10.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-11.0, -11.0, 123.0], [-10.0, -10.0, -10.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = plackett_luce_dpo_loss(policy, ref, mask, beta=0.1)
    assert out.loss.item() == pytest.approx((NLS_02 + 0.720867652) / 2, abs=1e-9)
    assert out.rewards[0, 2].item() == 0.0
    out.loss.backward()
    assert not bool(policy.grad.isnan().any())
    assert policy.grad[0, 2].item() == 0.0
    alone = plackett_luce_dpo_loss(policy[:1, :2].detach(), ref[:1, :2], mask[:1, :2], beta=0.1)
    assert alone.loss.item() == pytest.approx(NLS_02, abs=1e-9)


def test_plackett_luce_zero_weight_removes_a_ranking() -> None:
    policy = torch.tensor([[-10.0, -12.0, 0.0], [10.0, 0.0, -10.0]], dtype=torch.float64)
    ref = torch.tensor([[-11.0, -11.0, 0.0], [-10.0, -10.0, -10.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = plackett_luce_dpo_loss(policy, ref, mask, beta=0.1, weights=t(0.0, 2.0))
    assert out.loss.item() == pytest.approx(0.720867652, abs=1e-9)


# --- KTO ------------------------------------------------------------------------------------------

def test_kto_by_hand() -> None:
    # β = 1, z0 = 0.5, λ_D = 1, λ_U = 2
    # desirable r = 1.5:   1·(1 - σ(1.5 - 0.5)) = 1 - σ(1) = 0.268941421
    # undesirable r = 0.5: 2·(1 - σ(0.5 - 0.5)) = 2·0.5 = 1
    policy, ref = t(-8.5, -9.5), t(-10.0, -10.0)
    desirable = torch.tensor([True, False])
    out = kto_loss(policy, ref, desirable, t(0.5)[0], beta=1.0, undesirable_weight=2.0)
    assert out.loss.item() == pytest.approx((0.268941421 + 1.0) / 2, abs=1e-9)
    assert out.rewards.tolist() == pytest.approx([1.5, 0.5], abs=1e-12)
    # a negative KL estimate is clamped to z0 = 0:
    # 1 - σ(1.5) = 0.182425524; 2·(1 - σ(-0.5)) = 2·σ(0.5) = 1.244918662
    clamped = kto_loss(policy, ref, desirable, -3.0, beta=1.0, undesirable_weight=2.0)
    assert clamped.loss.item() == pytest.approx((0.182425524 + 1.244918662) / 2, abs=1e-9)
    # weights: the undesirable row alone
    only_undesirable = kto_loss(policy, ref, desirable, 0.5, beta=1.0, undesirable_weight=2.0, weights=t(0.0, 1.0))
    assert only_undesirable.loss.item() == pytest.approx(1.0, abs=1e-12)


def test_kto_reference_point_by_hand() -> None:
    policy = t(-1.0, -2.0, -3.0).requires_grad_(True)
    # log-ratios (2, 1, 0): mean 1
    z0 = kto_reference_point(policy, t(-3.0, -3.0, -3.0))
    assert z0.dim() == 0 and z0.item() == pytest.approx(1.0, abs=1e-12)
    assert not z0.requires_grad
    # log-ratios (-1, -2, -3): mean -2, clamped to 0
    assert kto_reference_point(policy, t(0.0, 0.0, 0.0)).item() == 0.0


def test_kto_sends_no_gradient_into_the_reference_point() -> None:
    policy = t(-8.5, -9.5).requires_grad_(True)
    kl_ref = t(0.5)[0].clone().requires_grad_(True)
    out = kto_loss(policy, t(-10.0, -10.0), torch.tensor([True, False]), kl_ref, beta=1.0)
    out.loss.backward()
    assert kl_ref.grad is None
    # desirable: d/dr (1 - σ(r - z0)) / 2 = -σ'(1)/2 = -0.196611933/2; undesirable: +σ'(0)/2 = 0.25/2
    assert policy.grad.tolist() == pytest.approx([-0.098305966, 0.125], abs=1e-9)


# --- token KL -------------------------------------------------------------------------------------

def test_mean_token_kl_is_zero_for_equal_logits() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert mean_token_kl(logits, logits.clone(), torch.ones(2, 5)).item() == pytest.approx(0.0, abs=1e-12)


def test_mean_token_kl_two_token_vocabulary_by_hand() -> None:
    # position 0: π = (1/2, 1/2) (logits 0, 0), π_ref = (3/4, 1/4) (logits ln 3, 0):
    #   1/2·ln((1/2)/(3/4)) + 1/2·ln((1/2)/(1/4)) = 1/2·(ln(2/3) + ln 2) = 1/2·ln(4/3) = 0.143841036
    # position 1: equal logits: 0; position 2: very different, but masked out
    policy = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [9.0, -9.0]]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[[LN3, 0.0], [1.0, 2.0], [-9.0, 9.0]]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    kl = mean_token_kl(policy, ref, mask)
    assert kl.item() == pytest.approx(0.143841036 / 2, abs=1e-9)  # mean over the 2 masked-in positions
    kl.backward()
    assert ref.grad is None
    assert policy.grad[0, 0].abs().sum().item() > 0 and policy.grad[0, 2].abs().sum().item() == 0.0


# --- gradients and validation across the family --------------------------------------------------

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # each maps (policy (B, 2), ref (B, 2)) log-probabilities to a scalar loss
    "dpo": lambda p, r: dpo_loss(p[:, 0], p[:, 1], r[:, 0], r[:, 1], beta=0.1, label_smoothing=0.1).loss,
    "ipo": lambda p, r: ipo_loss(p[:, 0], p[:, 1], r[:, 0], r[:, 1], t(3.0, 5.0), t(4.0, 2.0), beta=0.1).loss,
    "plackett_luce": lambda p, r: plackett_luce_dpo_loss(p, r, torch.ones(2, 2, dtype=torch.bool), beta=0.1).loss,
    "kto": lambda p, r: kto_loss(p.flatten(), r.flatten(), torch.tensor([True, False, True, False]),
                                 kto_reference_point(p.flatten().roll(1), r.flatten()), beta=0.1).loss,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_the_policy_and_never_the_reference(name: str) -> None:
    policy = torch.tensor([[-10.0, -12.0], [-7.0, -6.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-11.0, -11.0], [-6.5, -6.0]], dtype=torch.float64, requires_grad=True)
    LOSSES[name](policy, ref).backward()
    assert ref.grad is None
    assert policy.grad is not None and bool((policy.grad != 0).all())


def test_beta_and_label_smoothing_are_validated() -> None:
    args = pair(1.0, -1.0)
    for beta in (0.0, -0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(*args, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(*args, t(1.0), t(1.0), beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        plackett_luce_dpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(t(0.0), t(0.0), torch.tensor([True]), 0.0, beta=0.0)
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(*args, beta=0.1, label_smoothing=eps)


def test_shape_and_content_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(t(1.0, 2.0), t(1.0, 2.0), t(1.0), t(1.0, 2.0), beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        ipo_loss(t(1.0), t(1.0), t(1.0), t(1.0), t(1.0, 2.0), t(1.0), beta=0.1)
    with pytest.raises(ValueError, match="positive"):
        ipo_loss(t(1.0), t(1.0), t(1.0), t(1.0), t(0.0), t(1.0), beta=0.1)
    with pytest.raises(ValueError, match=r"\(B, Kmax\)"):
        plackett_luce_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool), beta=0.1)
    with pytest.raises(ValueError, match="at least 2"):
        plackett_luce_dpo_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[True, False, False]]), beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        kto_loss(t(1.0, 2.0), t(1.0, 2.0), torch.tensor([True]), 0.0, beta=0.1)
    with pytest.raises(ValueError, match="scalar"):
        kto_loss(t(1.0, 2.0), t(1.0, 2.0), torch.tensor([True, False]), t(0.1, 0.2), beta=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        kto_loss(t(1.0), t(1.0), torch.tensor([True]), 0.0, beta=0.1, desirable_weight=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        kto_reference_point(t(1.0, 2.0), t(1.0))
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        mean_token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError, match="no position"):
        mean_token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="one per row"):
        dpo_loss(*pair(1.0, -1.0), beta=0.1, weights=t(1.0, 1.0))
    with pytest.raises(ValueError, match="positive sum"):
        dpo_loss(*pair(1.0, -1.0), beta=0.1, weights=t(0.0))


def test_packed_sequence_logps_equals_the_full_computation() -> None:
    # logits only at the positions that predict a completion token, packed, give the same sums
    from trainer.dpo_losses import packed_sequence_logps

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)  # (B, T, V)
    labels = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    full, _ = sequence_logps(logits, labels, mask)
    keep = torch.zeros_like(mask)
    keep[:, :-1] = mask[:, 1:]
    packed = packed_sequence_logps(logits[keep], labels[:, 1:][mask[:, 1:]], keep.nonzero()[:, 0], 2)
    assert torch.allclose(packed, full, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(M, V\)"):
        packed_sequence_logps(logits, labels, labels, 2)
    # At a sampling temperature both read log softmax(z / T), and still agree.
    hot, _ = sequence_logps(logits, labels, mask, temperature=0.7)
    by_hand, _ = sequence_logps(logits / 0.7, labels, mask)
    assert torch.allclose(hot, by_hand, atol=1e-6) and not torch.allclose(hot, full)
    packed_hot = packed_sequence_logps(logits[keep], labels[:, 1:][mask[:, 1:]], keep.nonzero()[:, 0], 2, 0.7)
    assert torch.allclose(packed_hot, hot, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        sequence_logps(logits, labels, mask, temperature=0.0)


def test_a_temperature_below_one_makes_the_likeliest_token_likelier_and_the_rest_less_so() -> None:
    # What the NLL fits at T: the tempered distribution.  A reply sampled at 0.7 whose tokens were the
    # likely ones reads likelier at 0.7 than at 1, so fitting it at 1 over-sharpens the model.
    logits = torch.tensor([[[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]])  # (1, 2, 3)
    mask = torch.tensor([[0, 1]], dtype=torch.bool)
    top, rare = torch.tensor([[0, 0]]), torch.tensor([[0, 2]])
    assert float(sequence_logps(logits, top, mask, 0.7)[0]) > float(sequence_logps(logits, top, mask)[0])
    assert float(sequence_logps(logits, rare, mask, 0.7)[0]) < float(sequence_logps(logits, rare, mask)[0])


# --- chosen_nll (RPO's NLL term) ------------------------------------------------------------------

def test_chosen_nll_by_hand_per_token_of_the_batch_and_weighted() -> None:
    # -6 nats over 3 tokens and -2 nats over 4 tokens: 8 nats over 7 tokens
    assert float(chosen_nll(t(-6.0, -2.0), t(3.0, 4.0))) == pytest.approx(8 / 7, abs=1e-12)
    # weights (1, 3): (1·6 + 3·2) / (1·3 + 3·4) = 12 / 15
    assert float(chosen_nll(t(-6.0, -2.0), t(3.0, 4.0), weights=t(1.0, 3.0))) == pytest.approx(0.8, abs=1e-12)
    # a zero weight removes a response, tokens included
    assert float(chosen_nll(t(-6.0, -2.0), t(3.0, 4.0), weights=t(0.0, 1.0))) == pytest.approx(0.5, abs=1e-12)


def test_chosen_nll_gradient_raises_the_chosen_log_probability() -> None:
    logps = t(-6.0, -2.0).requires_grad_(True)
    chosen_nll(logps, t(3.0, 4.0)).backward()
    # d/dlogp_b of -Σ logp / Σ n = -1 / 7 for every response: descending it raises each chosen log-prob
    assert logps.grad.tolist() == pytest.approx([-1 / 7, -1 / 7], abs=1e-12)


def test_chosen_nll_weighs_every_token_alike_whatever_its_response_length() -> None:
    # One response of 5 tokens and one of 50, each token at log-prob -1.  Per token of the batch, a
    # token of either weighs 1/55, the short reply's end-of-sequence token too.  Averaging each reply's
    # own per-token NLL would give the short reply's tokens ten times the weight (1/10 against 1/100),
    # which fits replies shorter than the chosen ones.
    per_token = torch.full((55,), -1.0, dtype=torch.float64, requires_grad=True)
    sums = torch.stack([per_token[:5].sum(), per_token[5:].sum()])
    chosen_nll(sums, t(5.0, 50.0)).backward()
    assert per_token.grad.tolist() == pytest.approx([-1 / 55] * 55, abs=1e-12)


def test_chosen_nll_refuses_empty_responses_and_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="chosen_tokens must be positive"):
        chosen_nll(t(-1.0), t(0.0))
    with pytest.raises(ValueError, match="same shape"):
        chosen_nll(t(-1.0, -2.0), t(1.0))


def test_packed_token_logps_reads_one_extra_token_from_the_same_softmax() -> None:
    from trainer.dpo_losses import packed_token_logps

    torch.manual_seed(1)
    logits, labels = torch.randn(4, 6), torch.tensor([0, 5, 2, 2])
    tokens, stop = packed_token_logps(logits, labels, 0.7, also=3)
    full = torch.log_softmax(logits / 0.7, dim=-1)
    assert torch.allclose(tokens, full[torch.arange(4), labels]) and torch.allclose(stop, full[:, 3])
    assert packed_token_logps(logits, labels)[1] is None


def test_stop_anchor_prices_the_stop_moving_where_the_chosen_reply_goes_on() -> None:
    from trainer.dpo_losses import stop_anchor_loss

    ln = math.log
    # Row 0: the stop rose 0.1 -> 0.3 at position 0 (+0.2) and fell 0.2 -> 0.1 at position 1 (-0.1);
    # position 2 rose but is the reply's end (masked).  Row 1: rose 0.05 -> 0.15 at position 1 (+0.1).
    policy = torch.tensor([[ln(0.3), ln(0.1), ln(0.9)], [ln(0.5), ln(0.15), ln(0.5)]], requires_grad=True)
    ref = torch.tensor([[ln(0.1), ln(0.2), ln(0.1)], [ln(0.5), ln(0.05), ln(0.5)]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    loss = stop_anchor_loss(policy, ref, mask)
    assert float(loss.detach()) == pytest.approx((0.2 + 0.1 + 0.1) / 2, abs=1e-6)
    loss.backward()
    # d|p - q|/dlogp = sign(p - q)·p, over the mean of 2 rows; nothing at the reply's end
    expected = torch.tensor([[0.3 / 2, -0.1 / 2, 0.0], [0.0, 0.15 / 2, 0.0]])
    assert torch.allclose(policy.grad, expected, atol=1e-6)
    # rise only: the fall at row 0 position 1 costs nothing and has no gradient
    policy.grad = None
    rise = stop_anchor_loss(policy, ref, mask, both_ways=False)
    assert float(rise.detach()) == pytest.approx((0.2 + 0.1) / 2, abs=1e-6)
    rise.backward()
    assert torch.allclose(policy.grad, torch.tensor([[0.3 / 2, 0.0, 0.0], [0.0, 0.15 / 2, 0.0]]), atol=1e-6)
    # weights: row 1 alone
    assert float(stop_anchor_loss(policy, ref, mask, weights=t(0.0, 1.0)).detach()) == pytest.approx(0.1, abs=1e-6)
    # the same distributions cost nothing
    assert float(stop_anchor_loss(ref, ref, mask)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        stop_anchor_loss(policy, ref[:, :2], mask)
