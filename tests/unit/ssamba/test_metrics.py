"""Downstream metrics against independent float64 references and hand-worked cases."""

import math

import numpy as np
import pytest
import torch

from ssamba.metrics import accuracy, average_precision, mean_average_precision


def reference_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP without ties: the mean over positives of the precision at that positive's rank."""
    ranked = positive[np.argsort(-scores, kind="stable")]
    ranks = np.flatnonzero(ranked) + 1
    return float(np.mean([np.count_nonzero(ranked[:rank]) / rank for rank in ranks]))


def test_map_matches_rank_precision_reference_on_random_scores():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((200, 12))  # continuous: no ties
    targets = (rng.random((200, 12)) < rng.uniform(0.02, 0.5, 12)).astype(np.float64)
    targets[:, 5] = 0  # a class without positives is left out of the mean
    expected = [reference_ap(scores[:, c], targets[:, c] > 0) for c in range(12) if c != 5]
    per_class = average_precision(torch.from_numpy(scores).float(), torch.from_numpy(targets))
    assert per_class[5].isnan()
    np.testing.assert_allclose(per_class[[c for c in range(12) if c != 5]].numpy(), expected, rtol=1e-6)
    assert mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets)) == pytest.approx(np.mean(expected))


def test_average_precision_hand_worked_with_ties():
    # Class 0: ranks 0.8(+) 0.4(−) 0.35(+) 0.1(−) → (1/1 + 2/3) / 2.
    # Class 1: 0.5(+) and 0.5(−) tie, then 0.2(+): the tie enters together at precision 1/2 and
    # recall 1/2, then precision 2/3 at recall 1 → 0.5·0.5 + 0.5·2/3 (sklearn's step interpolation).
    scores = torch.tensor([[0.1, 0.5], [0.4, 0.5], [0.35, 0.2], [0.8, 0.0]])
    targets = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    per_class = average_precision(scores, targets)
    np.testing.assert_allclose(per_class.numpy(), [5 / 6, 0.25 + 1 / 3])
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 0.25 + 1 / 3) / 2)
    assert math.isnan(mean_average_precision(scores, torch.zeros_like(targets)))  # no class has a positive


def test_accuracy_is_argmax_agreement():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 5.0]])
    assert accuracy(scores, torch.eye(3)) == pytest.approx(2 / 3)
