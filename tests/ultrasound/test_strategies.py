"""Each strategy's scores on small hand-made probability arrays equal values worked out by hand
(the arithmetic is in the comments), plus ranking and the registry."""
from __future__ import annotations

import numpy as np
import pytest

from ultrasound.active.correlation import cooccurrence
from ultrasound.active.strategies import (
    Adaptive,
    LabelCardinality,
    LeastMargin,
    MeanEntropy,
    MultiLabelMargin,
    RandomSampling,
    Strategy,
    StrategyContext,
    make_strategy,
    select_top,
    separation_margin,
)

PROBS = np.array([
    [0.9, 0.2, 0.55],
    [0.5, 0.1, 0.95],
    [0.7, 0.4, 0.3],
    [0.05, 0.1, 0.2],
])
# label counts 1, 2, 0, 0 -> mean cardinality 0.75
LABELLED = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])


def context(labels=LABELLED, seed=0):
    return StrategyContext(labelled_labels=labels, rng=np.random.default_rng(seed))


def test_least_margin():
    # smallest |p - 0.5| per row: 0.05, 0.0, 0.1, 0.3 -> 1 - 2 * margin
    assert LeastMargin().score(PROBS, context()) == pytest.approx([0.9, 1.0, 0.8, 0.4])


def test_mean_entropy_in_bits():
    # H(0.9)=0.468996 H(0.2)=0.721928 H(0.55)=0.992774 H(0.5)=1 H(0.1)=0.468996 H(0.95)=0.286397
    # H(0.7)=H(0.3)=0.881291 H(0.4)=0.970951 H(0.05)=0.286397
    expected = [
        (0.468996 + 0.721928 + 0.992774) / 3,
        (1.0 + 0.468996 + 0.286397) / 3,
        (0.881291 + 0.970951 + 0.881291) / 3,
        (0.286397 + 0.468996 + 0.721928) / 3,
    ]
    assert MeanEntropy().score(PROBS, context()) == pytest.approx(expected, abs=1e-5)
    assert MeanEntropy().score(np.array([[0.0, 1.0]]), context(np.zeros((1, 2), int))) == [0.0]


def test_label_cardinality_inconsistency():
    # predicted counts (p >= 0.5): 2, 2, 1, 0; |count - 0.75|
    assert LabelCardinality().score(PROBS, context()) == pytest.approx([1.25, 1.25, 0.25, 0.75])


def test_adaptive_li_guo():
    # logits: ln(0.9/0.1)=2.197225 ln(0.2/0.8)=-1.386294 ln(0.55/0.45)=0.200671 ln(0.1/0.9)=-2.197225
    #         ln(0.7/0.3)=0.847298 ln(0.4/0.6)=-0.405465
    # separation margin = min positive logit - max negative logit (an empty side counts as 0):
    #   row 0: 0.200671 + 1.386294 = 1.586965   row 1: 0 (p=0.5 is positive) + 2.197225
    #   row 2: 0.847298 + 0.405465 = 1.252763   row 3: no positive -> 0 + 1.386294
    margins = [1.586965, 2.197225, 1.252763, 1.386294]
    assert separation_margin(PROBS) == pytest.approx(margins, abs=1e-6)
    u = [1 / 1.586965, 1 / 2.197225, 1 / 1.252763, 1 / 1.386294]  # 0.630134 0.455120 0.798236 0.721348
    c = [1.25, 1.25, 0.25, 0.75]
    # beta = 0.5: sqrt(u * c)
    expected = [0.887506, 0.754254, 0.446720, 0.735534]
    assert Adaptive(beta=0.5).score(PROBS, context()) == pytest.approx(expected, abs=1e-5)
    assert Adaptive(beta=1.0).score(PROBS, context()) == pytest.approx(u, abs=1e-6)
    assert Adaptive(beta=0.0).score(PROBS, context()) == pytest.approx(c)


# two findings that always agree in the labelled set:
# P(1|0=1) = (2+1)/(2+2) = 0.75, P(1|0=0) = (0+1)/(2+2) = 0.25, phi = (2*2 - 0) / sqrt(2*2*2*2) = 1
AGREEING = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])


def test_cooccurrence_statistics_by_hand():
    stats = cooccurrence(AGREEING)
    assert stats.given_positive.tolist() == [[1.0, 0.75], [0.75, 1.0]]
    assert stats.given_negative.tolist() == [[0.0, 0.25], [0.25, 0.0]]
    assert stats.phi.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    # one disagreement among 5: n11=2 n00=2 n10=1 n01=0 -> phi = 4 / sqrt(3*2*2*3) = 2/3
    stats = cooccurrence(np.array([[1, 1], [1, 1], [1, 0], [0, 0], [0, 0]]))
    assert stats.phi[0, 1] == pytest.approx(2 / 3)
    assert stats.given_positive[0, 1] == pytest.approx(3 / 5)  # (2+1)/(3+2)
    assert stats.given_negative[1, 0] == pytest.approx(2 / 5)  # P(0=1|1=0) = (1+1)/(3+2)


def test_mlm_contradiction_is_less_certain():
    probs = np.array([[0.9, 0.2], [0.9, 0.8]])  # row 0 contradicts the pair, row 1 agrees
    # row 0, weight 0.5: finding 0 implied by finding 1: 0.2*0.75 + 0.8*0.25 = 0.35
    #   p'0 = 0.9 + 0.5*1*(0.35-0.9) = 0.625 (margin 0.125)
    #   finding 1 implied: 0.9*0.75 + 0.1*0.25 = 0.7, p'1 = 0.2 + 0.5*(0.7-0.2) = 0.45 (margin 0.05)
    # row 1: implied 0.8*0.75+0.2*0.25 = 0.65 -> p'0 = 0.775 (0.275);
    #        implied 0.7 -> p'1 = 0.8 + 0.5*(0.7-0.8) = 0.75 (0.25)
    mlm = MultiLabelMargin(correlation_weight=0.5, smallest=2)
    assert mlm.adjusted_margins(probs, context(AGREEING)) == pytest.approx(np.array([[0.125, 0.05], [0.275, 0.25]]))
    assert mlm.score(probs, context(AGREEING)) == pytest.approx([1 - 2 * 0.0875, 1 - 2 * 0.2625])
    one = MultiLabelMargin(correlation_weight=0.5, smallest=1)
    assert one.score(probs, context(AGREEING)) == pytest.approx([0.9, 0.5])
    # without correlation both rows have margins 0.4, 0.3 and tie
    plain = MultiLabelMargin(correlation_weight=0.0, smallest=2)
    assert plain.score(probs, context(AGREEING)) == pytest.approx([0.3, 0.3])


def test_mlm_uncorrelated_finding_keeps_its_probability():
    # finding 2 is independent of 0 and 1 (phi = (1*1 - 1*1) / 4 = 0); 0 and 1 agree as above
    labelled = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 1]])
    probs = np.array([[0.9, 0.2, 0.6]])
    mlm = MultiLabelMargin(correlation_weight=0.5, smallest=2)
    assert mlm.adjusted_margins(probs, context(labelled)) == pytest.approx(np.array([[0.125, 0.05, 0.1]]))
    assert mlm.score(probs, context(labelled)) == pytest.approx([1 - 2 * 0.075])
    # smallest larger than L uses all findings
    assert MultiLabelMargin(0.5, smallest=9).score(probs, context(labelled)) == pytest.approx(
        [1 - 2 * (0.125 + 0.05 + 0.1) / 3])


def test_mlm_reduces_to_least_margin():
    a = MultiLabelMargin(correlation_weight=0.0, smallest=1).score(PROBS, context())
    assert a == pytest.approx(LeastMargin().score(PROBS, context()))


def test_random_uses_the_context_generator():
    expected = np.random.default_rng(7).random(4)
    assert RandomSampling().score(PROBS, context(seed=7)) == pytest.approx(expected)


def test_every_strategy_follows_the_protocol():
    for name in ("random", "least_margin", "mean_entropy", "lci", "adaptive", "mlm"):
        strategy = make_strategy(name)
        assert isinstance(strategy, Strategy) and strategy.name == name
        scores = strategy.score(PROBS, context())
        assert scores.shape == (4,) and np.isfinite(scores).all()


def test_select_top_orders_and_breaks_ties_by_rng():
    scores = np.array([0.2, 0.9, 0.9, 0.1, 0.5])
    orders = {tuple(select_top(scores, 3, np.random.default_rng(s))) for s in range(20)}
    assert orders == {(1, 2, 4), (2, 1, 4)}
    a = select_top(scores, 5, np.random.default_rng(3))
    assert a.tolist() == select_top(scores, 5, np.random.default_rng(3)).tolist()
    assert a[2:].tolist() == [4, 0, 3]
    assert select_top(scores, 0, np.random.default_rng(0)).size == 0
    with pytest.raises(ValueError, match="k must be"):
        select_top(scores, 6, np.random.default_rng(0))


def test_validation_errors():
    with pytest.raises(ValueError, match="unknown strategy 'tsal'"):
        make_strategy("tsal")
    with pytest.raises(ValueError, match="valid: \\['correlation_weight', 'smallest', 'smoothing'\\]"):
        make_strategy("mlm", weight=0.3)
    with pytest.raises(ValueError, match="probabilities"):
        LeastMargin().score(PROBS + 1, context())
    with pytest.raises(ValueError, match="non-empty labelled set"):
        LabelCardinality().score(PROBS, context(np.zeros((0, 3), int)))
    with pytest.raises(ValueError, match="columns"):
        MultiLabelMargin().score(PROBS, context(AGREEING))
    with pytest.raises(ValueError, match="beta"):
        Adaptive(beta=1.5)
