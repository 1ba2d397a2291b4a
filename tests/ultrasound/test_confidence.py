"""Confidence validation: the threshold on every finding, and co-occurrence rules; a label vector
that contradicts a perfectly correlated pair is rejected even at probability 0.99."""
from __future__ import annotations

import numpy as np
import pytest

from ultrasound.active.confidence import (
    ConfidenceConfig,
    ImplicationRules,
    confidence_validate,
    count_violations,
    implication_rules,
)
from ultrasound.active.correlation import cooccurrence

# findings 0 and 1 always agree (10 of 20 samples have both); finding 2 is independent of them
PAIRED = np.array([[1, 1, 0]] * 6 + [[0, 0, 0]] * 6 + [[1, 1, 1]] * 4 + [[0, 0, 1]] * 4)


def test_contradicting_a_perfectly_correlated_pair_is_rejected():
    probs = np.array([
        [0.99, 0.01, 0.02],  # 0 present, 1 absent: contradicts the pair
        [0.01, 0.99, 0.98],  # the other way round
        [0.99, 0.99, 0.01],  # consistent
        [0.01, 0.01, 0.99],  # consistent (2 is free)
        [0.99, 0.97, 0.50],  # consistent but finding 2 is undecided
    ])
    v = confidence_validate(probs, PAIRED)
    assert v.confident.tolist() == [True, True, True, True, False]
    assert v.accepted.tolist() == [False, False, True, True, False]
    # P(1=1|0=1) = 11/12 >= 0.9 and P(1=1|0=0) = 1/12: rules 0=1=>1=1, 0=0=>1=0 (and from 1);
    # row 0 breaks "0=1 => 1=1" and "1=0 => 0=0"
    assert v.violations.tolist()[:4] == [2, 2, 0, 0]
    assert v.labels.tolist()[2] == [1, 1, 0]
    assert v.confidence == pytest.approx([0.48, 0.48, 0.49, 0.49, 0.0])


def test_rules_of_the_pair_by_hand():
    rules = implication_rules(cooccurrence(PAIRED), rule_confidence=0.9, min_dependence=0.2)
    assert rules.count() == 4
    assert rules.implies_one[1].tolist() == [[False, True, False], [True, False, False], [False] * 3]
    assert rules.implies_zero[0].tolist() == [[False, True, False], [True, False, False], [False] * 3]
    assert not rules.implies_one[0].any() and not rules.implies_zero[1].any()


def test_count_violations_by_hand():
    # one rule: finding 0 present => finding 2 absent
    none = np.zeros((3, 3), bool)
    zero_rule = none.copy()
    zero_rule[0, 2] = True
    rules = ImplicationRules(implies_one=(none, none), implies_zero=(none, zero_rule))
    labels = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 1]])
    assert count_violations(labels, rules).tolist() == [1, 0, 0]


def test_base_rates_are_not_rules():
    # finding 1 was never seen positive: P(1=0 | 0=a) = 11/12 for both a, a base rate, not a
    # dependence on finding 0, so a confident [1, 1] is accepted by default ...
    labelled = np.array([[1, 0]] * 10 + [[0, 0]] * 10)
    probs = np.array([[0.99, 0.99]])
    assert confidence_validate(probs, labelled).accepted.tolist() == [True]
    # ... and rejected when every confident conditional counts as a rule
    strict = ConfidenceConfig(min_dependence=0.0)
    assert confidence_validate(probs, labelled, strict).accepted.tolist() == [False]


def test_smoothing_needs_support_before_a_rule_exists():
    # 2 of 2 co-occurrences: P = (2+1)/(2+2) = 0.75 < 0.9, so no rule yet
    few = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
    assert confidence_validate(np.array([[0.99, 0.01]]), few).accepted.tolist() == [True]


def test_threshold_is_inclusive_and_empty_labelled_set_has_no_rules():
    probs = np.array([[0.9, 0.1], [0.89, 0.1], [0.95, 0.05]])
    v = confidence_validate(probs, np.zeros((0, 2), int))
    assert v.accepted.tolist() == [True, False, True]
    assert v.violations.tolist() == [0, 0, 0]


def test_config_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        ConfidenceConfig(threshold=0.5)
    with pytest.raises(ValueError, match="rule_confidence"):
        ConfidenceConfig(rule_confidence=1.2)
    with pytest.raises(ValueError, match="L=2 columns, got 3"):
        confidence_validate(np.full((1, 2), 0.99), PAIRED)
