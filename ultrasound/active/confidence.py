"""TSAL confidence validation: which machine labels may join training without a human.

A sample's machine label vector ``y_hat = [p >= 0.5]`` is accepted only when both hold:

1. confidence: EVERY finding's probability clears the threshold on its side
   (``p >= t`` or ``p <= 1 - t``);
2. consistency: ``y_hat`` breaks no co-occurrence rule of the human-labelled set.

A rule "``i = a`` implies ``j = b``" (i != j, a, b in {0, 1}) holds in the labelled set when
``P(j=b | i=a) >= rule_confidence`` (Laplace-smoothed, :func:`cooccurrence`) AND the
implication is a real dependence rather than a base rate:
``P(j=b | i=a) - P(j=b | i=1-a) >= min_dependence``. Without the second condition a rare
finding would "imply" its own absence from every other finding and no machine label could ever
contain it. A perfectly correlated pair (i and j always equal) yields the rules i=1 => j=1 and
i=0 => j=0 (and the same from j), so ``y_hat`` with ``i=1, j=0`` is rejected even at p = 0.99.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ultrasound.active.correlation import Cooccurrence, check_label_matrix, cooccurrence
from ultrasound.active.strategies import check_probs


@dataclass(frozen=True)
class ConfidenceConfig:
    """Settings of the machine-label stream.

    Attributes:
        threshold: per-finding confidence ``t`` in (0.5, 1]: accept only ``p >= t`` or ``p <= 1-t``.
        rule_confidence: smoothed conditional probability from which an implication is a rule.
        min_dependence: how much more likely the implied value must be than under the opposite
            premise (0 = every confident conditional is a rule, base rates included).
        smoothing: Laplace smoothing of the conditional probabilities.
        max_per_round: keep at most this many accepted samples per round, the most confident
            ones (largest smallest-margin); ``None`` = no cap.
    """

    threshold: float = 0.9
    rule_confidence: float = 0.9
    min_dependence: float = 0.2
    smoothing: float = 1.0
    max_per_round: int | None = None

    def __post_init__(self) -> None:
        if not 0.5 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0.5, 1], got {self.threshold}")
        if not 0.5 < self.rule_confidence <= 1.0:
            raise ValueError(f"rule_confidence must be in (0.5, 1], got {self.rule_confidence}")
        if not 0.0 <= self.min_dependence <= 1.0:
            raise ValueError(f"min_dependence must be in [0, 1], got {self.min_dependence}")
        if self.smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {self.smoothing}")
        if self.max_per_round is not None and self.max_per_round < 0:
            raise ValueError(f"max_per_round must be >= 0 or None, got {self.max_per_round}")


@dataclass(frozen=True, eq=False)
class Validation:
    """Result of :func:`confidence_validate` for N candidate samples.

    Attributes:
        accepted: ``(N,)`` bool, confident AND consistent.
        labels: ``(N, L)`` uint8 machine labels ``p >= 0.5`` (meaningful where accepted).
        confident: ``(N,)`` bool, every finding clears the threshold.
        violations: ``(N,)`` int, how many co-occurrence rules the label vector breaks.
        confidence: ``(N,)`` float, the smallest ``|p - 0.5|`` (ranks accepted samples).
    """

    accepted: np.ndarray
    labels: np.ndarray
    confident: np.ndarray
    violations: np.ndarray
    confidence: np.ndarray


@dataclass(frozen=True, eq=False)
class ImplicationRules:
    """``implies_one[a][i, j]``: rule "i=a => j=1"; ``implies_zero[a][i, j]``: "i=a => j=0".

    Each is a pair (index a = 0, 1) of ``(L, L)`` bool matrices with a False diagonal.
    """

    implies_one: tuple[np.ndarray, np.ndarray]
    implies_zero: tuple[np.ndarray, np.ndarray]

    def count(self) -> int:
        return int(sum(m.sum() for m in self.implies_one + self.implies_zero))


def implication_rules(stats: Cooccurrence, rule_confidence: float, min_dependence: float) -> ImplicationRules:
    """The co-occurrence rules of a labelled set (see the module docstring)."""
    # P(j=1 | i=a) for a = 0, 1
    p_one = (stats.given_negative, stats.given_positive)
    off_diagonal = ~np.eye(stats.num_labels, dtype=bool)
    implies_one, implies_zero = [], []
    for a in (0, 1):
        here, there = p_one[a], p_one[1 - a]
        implies_one.append(off_diagonal & (here >= rule_confidence) & (here - there >= min_dependence))
        implies_zero.append(
            off_diagonal & (1 - here >= rule_confidence) & (there - here >= min_dependence)
        )
    return ImplicationRules(tuple(implies_one), tuple(implies_zero))


def count_violations(labels: np.ndarray, rules: ImplicationRules) -> np.ndarray:
    """Rules broken by each label vector. Shape: ``(N, L)`` 0/1 -> ``(N,)`` int."""
    y = np.asarray(labels, dtype=np.int64)
    ones, zeros = (y == 1).astype(np.int64), (y == 0).astype(np.int64)
    premise = (zeros, ones)  # premise[a][n, i] = 1 where y_i == a
    broken = np.zeros(y.shape[0], dtype=np.int64)
    for a in (0, 1):
        # (N, L) @ (L, L): for each j, how many i with y_i = a force j to 1 (resp. 0)
        broken += ((premise[a] @ rules.implies_one[a].astype(np.int64)) * zeros).sum(axis=1)
        broken += ((premise[a] @ rules.implies_zero[a].astype(np.int64)) * ones).sum(axis=1)
    return broken


def confidence_validate(
    probs: np.ndarray,
    labelled_labels: np.ndarray,
    config: ConfidenceConfig = ConfidenceConfig(),
) -> Validation:
    """Accept confident, co-occurrence-consistent machine labels.

    Shape:
        - probs: ``(N, L)`` probabilities of the candidate (unlabelled) samples.
        - labelled_labels: ``(N_l, L)`` 0/1 human-confirmed labels (N_l may be 0: no rules).

    Example:
        >>> labelled = np.array([[1, 1]] * 10 + [[0, 0]] * 10)  # the two findings always agree
        >>> v = confidence_validate(np.array([[0.99, 0.01], [0.99, 0.98]]), labelled)
        >>> v.accepted.tolist(), v.violations.tolist()
        ([False, True], [2, 0])
    """
    probs = check_probs(probs)
    labelled = check_label_matrix(labelled_labels, "labelled_labels", probs.shape[1])
    margins = np.abs(probs - 0.5)
    slack = 1e-9  # inclusive threshold despite float rounding (1 - 0.9 < 0.1 in binary)
    confident = (probs >= config.threshold - slack) | (probs <= 1.0 - config.threshold + slack)
    confident = confident.all(axis=1)
    labels = (probs >= 0.5).astype(np.uint8)
    if labelled.shape[0] > 0:
        rules = implication_rules(cooccurrence(labelled, config.smoothing), config.rule_confidence,
                                  config.min_dependence)
        violations = count_violations(labels, rules)
    else:
        violations = np.zeros(probs.shape[0], dtype=np.int64)
    return Validation(
        accepted=confident & (violations == 0),
        labels=labels,
        confident=confident,
        violations=violations,
        confidence=margins.min(axis=1) if probs.shape[0] else np.zeros(0),
    )
