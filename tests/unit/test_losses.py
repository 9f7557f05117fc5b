"""trainer.losses against values worked out by hand (ln, e and σ to 9 digits)."""

from __future__ import annotations

import pytest
import torch

from trainer.losses import (attribute_regression_loss, bradley_terry_loss, expand_to_pairs, kwise_ranking_loss,
                            ranking_pair_indices)

# -log σ(x) = ln(1 + e^-x)
NLS = {
    -0.5: 0.974076984,  # ln(1 + e^0.5)  = ln(2.648721271)
    0.0: 0.693147181,  # ln 2
    0.5: 0.474076984,  # ln(1 + e^-0.5) = ln(1.606530660)
    1.0: 0.313261688,  # ln(1 + e^-1)   = ln(1.367879441)
    2.0: 0.126928011,  # ln(1 + e^-2)   = ln(1.135335283)
    3.0: 0.048587352,  # ln(1 + e^-3)   = ln(1.049787068)
}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_bradley_terry_by_hand() -> None:
    # pairs (1, 0) and (0, 0): differences 1 and 0
    loss = bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0))
    assert loss.item() == pytest.approx((NLS[1.0] + NLS[0.0]) / 2, abs=1e-9)  # 0.503204434


def test_bradley_terry_margin_by_hand() -> None:
    # differences 1 - 0.5 = 0.5 and 0 - 0.5 = -0.5
    loss = bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0), margin=0.5)
    assert loss.item() == pytest.approx((NLS[0.5] + NLS[-0.5]) / 2, abs=1e-9)  # 0.724076984
    per_pair = bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0), margin=t(0.5, -0.5))  # differences 0.5 and 0.5
    assert per_pair.item() == pytest.approx(NLS[0.5], abs=1e-9)


def test_bradley_terry_centering_by_hand() -> None:
    # λ·mean((r_c + r_r)^2) = 0.1 · mean(1, 0) = 0.05 on top of 0.503204434
    loss = bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0), center_coefficient=0.1)
    assert loss.item() == pytest.approx((NLS[1.0] + NLS[0.0]) / 2 + 0.05, abs=1e-9)  # 0.553204434


def test_bradley_terry_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))


def test_kwise_by_hand_k3() -> None:
    # ranking rewards (3, 1, 0): pairs 3-1=2, 3-0=3, 1-0=1, averaged over C(3,2)=3 pairs
    loss = kwise_ranking_loss(t(3.0, 1.0, 0.0).unsqueeze(0), torch.ones(1, 3, dtype=torch.bool))
    assert loss.item() == pytest.approx((NLS[2.0] + NLS[3.0] + NLS[1.0]) / 3, abs=1e-9)  # 0.162925684


def test_kwise_mixed_k_batch_pads_and_masks() -> None:
    # row 0: K=3 (3, 1, 0) -> 0.162925684; row 1: K=2 (0, 0) padded with a junk value -> ln 2.
    rewards = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 99.0]], dtype=torch.float64)  # (B, K)
    mask = torch.tensor([[True, True, True], [True, True, False]])  # (B, K)
    loss = kwise_ranking_loss(rewards, mask)
    expected = ((NLS[2.0] + NLS[3.0] + NLS[1.0]) / 3 + NLS[0.0]) / 2  # each ranking weighs the same: 0.428036432
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    # the padded value never reaches the loss or its gradient
    rewards.requires_grad_(True)
    kwise_ranking_loss(rewards, mask).backward()
    assert rewards.grad[1, 2].item() == 0.0


def test_kwise_with_k2_is_exactly_pairwise() -> None:
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(7, generator=g, dtype=torch.float64)
    rejected = torch.randn(7, generator=g, dtype=torch.float64)
    margin = torch.rand(7, generator=g, dtype=torch.float64)
    rewards = torch.stack([chosen, rejected], dim=1)  # (B, 2)
    mask = torch.ones(7, 2, dtype=torch.bool)
    for kw in ({}, {"margin": margin}, {"center_coefficient": 0.3}, {"margin": margin, "center_coefficient": 0.3}):
        assert kwise_ranking_loss(rewards, mask, **kw).item() == pytest.approx(
            bradley_terry_loss(chosen, rejected, **kw).item(), abs=1e-12)


def test_kwise_margin_and_centering_by_hand() -> None:
    # K=3 (1, 0, 0) with margin 1: differences 0, 0, -1; centering λ=0.5 over pair sums 1, 1, 0
    loss = kwise_ranking_loss(t(1.0, 0.0, 0.0).unsqueeze(0), torch.ones(1, 3, dtype=torch.bool),
                              margin=t(1.0), center_coefficient=0.5)
    nls_minus1 = 1.313261688  # ln(1 + e^1)
    expected = (NLS[0.0] + NLS[0.0] + nls_minus1) / 3 + 0.5 * (1 + 1 + 0) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-9)


def test_kwise_rejects_rankings_without_a_pair() -> None:
    with pytest.raises(ValueError, match="at least 2 unmasked"):
        kwise_ranking_loss(torch.zeros(1, 3), torch.tensor([[True, False, False]]))
    with pytest.raises(ValueError, match="Kmax"):
        kwise_ranking_loss(torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool))


def test_pair_indices_and_expansion() -> None:
    i, j = ranking_pair_indices(4)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    rewards = torch.tensor([[3.0, 2.0, 1.0], [5.0, 4.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    better, worse, owner = expand_to_pairs(rewards, mask)
    assert better.tolist() == [3.0, 3.0, 2.0, 5.0]
    assert worse.tolist() == [2.0, 1.0, 1.0, 4.0]
    assert owner.tolist() == [0, 0, 0, 1]


def test_attribute_regression_by_hand() -> None:
    pred = t(1.0, 2.0, 3.0, 4.0).view(2, 2)
    target = t(0.0, 2.0, 3.0, 0.0).view(2, 2)
    mask = torch.tensor([[True, False], [True, True]])
    # masked squared errors: (1-0)^2 = 1, (3-3)^2 = 0, (4-0)^2 = 16 -> 17 / 3
    assert attribute_regression_loss(pred, target, mask).item() == pytest.approx(17 / 3, abs=1e-12)


def test_attribute_regression_without_scores_is_a_differentiable_zero() -> None:
    pred = torch.randn(3, 2, requires_grad=True)
    loss = attribute_regression_loss(pred, torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(3, 2))


def test_kwise_weighted_by_hand() -> None:
    # row 0: K=3 (3, 1, 0) -> 0.162925684; row 1: K=2 (0, 0) -> ln 2; weights 1 and 0.25
    rewards = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # (B, K)
    mask = torch.tensor([[True, True, True], [True, True, False]])  # (B, K)
    row0 = (NLS[2.0] + NLS[3.0] + NLS[1.0]) / 3
    loss = kwise_ranking_loss(rewards, mask, weights=t(1.0, 0.25))
    assert loss.item() == pytest.approx((row0 + 0.25 * NLS[0.0]) / 1.25, abs=1e-9)
    # equal weights are the plain mean, whatever their scale
    assert kwise_ranking_loss(rewards, mask, weights=t(3.0, 3.0)).item() == pytest.approx(
        kwise_ranking_loss(rewards, mask).item(), abs=1e-12)


def test_kwise_weights_are_checked() -> None:
    rewards, mask = torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="one per row"):
        kwise_ranking_loss(rewards, mask, weights=torch.ones(3))
    with pytest.raises(ValueError, match="positive sum"):
        kwise_ranking_loss(rewards, mask, weights=torch.zeros(2))
    with pytest.raises(ValueError, match=">= 0"):
        kwise_ranking_loss(rewards, mask, weights=t(1.0, -0.5))


def test_attribute_regression_weighted_by_hand() -> None:
    pred = t(1.0, 2.0, 3.0, 4.0).view(2, 2)
    target = t(0.0, 2.0, 3.0, 0.0).view(2, 2)
    mask = torch.tensor([[True, False], [True, True]])
    # squared errors 1 (row 0, weight 2), 0 and 16 (row 1, weight 0.5): (2 + 8) / (2 + 0.5 + 0.5)
    loss = attribute_regression_loss(pred, target, mask, weights=t(2.0, 0.5))
    assert loss.item() == pytest.approx(10 / 3, abs=1e-12)
