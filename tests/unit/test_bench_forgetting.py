"""bench/forgetting.py's topic split: deterministic spherical 2-means, larger cluster first."""

import torch
import torch.nn.functional as F

from bench.forgetting import first_user_turn, nearest, two_means
from services.schemas import ChatMessage, PreferenceRecord


def _blobs(n0: int, n1: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors around two orthogonal directions in 8-d: (points (n0 + n1, 8), true labels)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1.0, 1.0
    pts = torch.cat([a + 0.1 * torch.randn(n0, 8, generator=g), b + 0.1 * torch.randn(n1, 8, generator=g)])
    return F.normalize(pts, dim=-1), torch.cat([torch.zeros(n0), torch.ones(n1)]).long()


def test_two_means_recovers_two_separated_topics_with_the_larger_one_as_label_0():
    pts, truth = _blobs(30, 12)
    labels, centroids = two_means(pts)
    assert torch.equal(labels, truth)
    assert centroids.shape == (2, 8)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(2))
    assert centroids[0, 0] > 0.9 and centroids[1, 1] > 0.9  # the larger blob's centroid is row 0


def test_two_means_puts_the_larger_cluster_first_whatever_the_order():
    pts, truth = _blobs(10, 25)
    labels, _ = two_means(pts)
    assert torch.equal(labels, 1 - truth)  # the 25-point blob (given second) is label 0


def test_two_means_is_deterministic_and_order_independent_in_its_partition():
    pts, _ = _blobs(20, 20, seed=3)
    first, _ = two_means(pts)
    again, _ = two_means(pts.clone())
    assert torch.equal(first, again)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    shuffled, _ = two_means(pts[perm])
    same = torch.equal(shuffled, first[perm]) or torch.equal(shuffled, 1 - first[perm])
    assert same


def test_nearest_assigns_by_cosine_similarity():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pts = F.normalize(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.55]]), dim=-1)
    assert nearest(pts, centroids).tolist() == [0, 1, 0]


def test_two_means_rejects_fewer_than_two_points():
    try:
        two_means(torch.ones(1, 4))
    except ValueError as e:
        assert "N >= 2" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_first_user_turn_skips_a_system_message():
    rec = PreferenceRecord(record_id="r", prompt=(ChatMessage("system", "be brief"), ChatMessage("user", "hi?")),
                           ranked_responses=("a", "b"))
    assert first_user_turn(rec) == "hi?"
