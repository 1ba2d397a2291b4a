"""The semi-supervised cross-entropy against hand computation."""
from __future__ import annotations

import math

import pytest
import torch

from ultrasound.losses import SemiSupervisedCE


def ce_by_hand(row: list[float], target: int) -> float:
    return -math.log(math.exp(row[target]) / sum(math.exp(v) for v in row))


def test_matches_hand_computation_on_labelled_views_only():
    logits_i = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [0.0, 3.0, 1.0], [9.0, -9.0, 0.0]]
    logits_j = [[1.0, 1.0, 0.0], [4.0, 0.0, 0.0], [0.2, 0.1, 0.3], [0.0, 0.0, 9.0]]
    labels = [0, -1, 2, -1]  # items 1 and 3 unlabelled: their (extreme) logits must not count
    expected_i = (ce_by_hand(logits_i[0], 0) + ce_by_hand(logits_i[2], 2)) / 2
    expected_j = (ce_by_hand(logits_j[0], 0) + ce_by_hand(logits_j[2], 2)) / 2
    loss = SemiSupervisedCE(weight=0.3)(torch.tensor(logits_i), torch.tensor(logits_j),
                                       torch.tensor(labels))
    assert float(loss) == pytest.approx(0.3 * expected_i + 0.3 * expected_j, rel=1e-6)


def test_no_labelled_item_gives_connected_zero():
    logits_i = torch.randn(3, 2, requires_grad=True)
    logits_j = torch.randn(3, 2, requires_grad=True)
    loss = SemiSupervisedCE()(logits_i, logits_j, torch.tensor([-1, -1, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert logits_i.grad is not None and torch.all(logits_i.grad == 0)
    assert logits_j.grad is not None and torch.all(logits_j.grad == 0)


def test_gradient_only_reaches_labelled_rows():
    logits_i = torch.zeros(3, 2, requires_grad=True)
    logits_j = torch.zeros(3, 2, requires_grad=True)
    SemiSupervisedCE(weight=1.0)(logits_i, logits_j, torch.tensor([1, -1, -1])).backward()
    # d CE / d logits = softmax - onehot = [0.5, -0.5] for the one labelled row (class 1)
    assert torch.allclose(logits_i.grad, torch.tensor([[0.5, -0.5], [0, 0], [0, 0]]))


def test_argument_validation():
    with pytest.raises(ValueError, match="weight"):
        SemiSupervisedCE(weight=-0.1)
    ce = SemiSupervisedCE()
    with pytest.raises(ValueError, match="class_index values"):
        ce(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="class_index values"):
        ce(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, -2]))
    with pytest.raises(ValueError, match="entries"):
        ce(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="equal"):
        ce(torch.zeros(2, 3), torch.zeros(2, 2), torch.tensor([0, 1]))
