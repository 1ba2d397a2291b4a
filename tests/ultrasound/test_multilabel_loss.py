"""WeightedBCE and AsymmetricLoss against hand-computed values, BCE equivalence, finite
gradients at saturation, and descent under SGD."""
from __future__ import annotations

import math

import pytest
import torch

from ultrasound.losses.multilabel import AsymmetricLoss, WeightedBCE

torch.set_num_threads(1)

LOGITS = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
TARGETS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


def test_weighted_bce_matches_hand_values():
    # terms: 2*softplus(0), softplus(2), softplus(-1), 3*softplus(-0.5)
    #      = 1.386294,      2.126928,    0.313262,     1.422231
    loss = WeightedBCE(pos_weight=[2.0, 3.0])
    assert float(loss(LOGITS, TARGETS)) == pytest.approx(5.248714 / 4, abs=1e-5)
    # per-sample weights [1, 3]: (1*(1.386294+2.126928) + 3*(0.313262+1.422231)) / (2*1 + 2*3)
    assert float(loss(LOGITS, TARGETS, torch.tensor([1.0, 3.0]))) == pytest.approx(1.089963, abs=1e-5)
    unweighted = WeightedBCE(None)
    expected = (softplus(0) + softplus(2) + softplus(-1) + softplus(-0.5)) / 4
    assert float(unweighted(LOGITS, TARGETS)) == pytest.approx(expected, abs=1e-6)


def test_asymmetric_loss_matches_hand_values():
    loss = AsymmetricLoss(gamma_neg=4, gamma_pos=1, clip=0.05)
    # positive, p = 0.5: -(1 - 0.5)^1 * ln 0.5 = 0.346574
    # negative, p = sigmoid(2) = 0.880797, p_m = 0.830797: -p_m^4 ln(1 - p_m) = 0.476409 * 1.776657
    p_m = 1 / (1 + math.exp(-2)) - 0.05
    expected = (0.5 * math.log(2) - p_m ** 4 * math.log(1 - p_m)) / 2
    assert expected == pytest.approx(0.596494, abs=1e-6)
    value = loss(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]]))
    assert float(value) == pytest.approx(expected, abs=1e-6)
    # an easy negative below the margin (p = sigmoid(-4) = 0.018 < 0.05) costs nothing
    assert float(loss(torch.tensor([[-4.0]]), torch.tensor([[0.0]]))) == 0.0


def test_asymmetric_without_focusing_is_bce():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 3), (torch.rand(5, 3) > 0.5).float()
    asl = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert float(asl(logits, targets)) == pytest.approx(float(bce), abs=1e-6)


def test_gradients_stay_finite_at_saturation():
    logits = torch.tensor([[40.0, -40.0, 0.0, -3.5]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    for loss in (AsymmetricLoss(), WeightedBCE([2.0, 2.0, 2.0, 2.0])):
        (grad,) = torch.autograd.grad(loss(logits, targets), logits)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("loss", [WeightedBCE([4.0, 1.0, 2.0]), AsymmetricLoss()])
def test_sgd_lowers_the_loss(loss):
    torch.manual_seed(1)
    x = torch.randn(32, 5)
    targets = (x[:, :3] > 0.3).float()
    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    first = float(loss(model(x), targets).detach())
    for _ in range(30):
        optimizer.zero_grad()
        loss(model(x), targets).backward()
        optimizer.step()
    assert float(loss(model(x), targets).detach()) < 0.5 * first


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="pos_weight"):
        WeightedBCE([1.0, 0.0])
    with pytest.raises(ValueError, match="clip"):
        AsymmetricLoss(clip=1.0)
    with pytest.raises(ValueError, match="targets shape"):
        WeightedBCE()(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="pos_weight has 2"):
        WeightedBCE([1.0, 2.0])(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="weight"):
        AsymmetricLoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
