"""Multi-label active-learning query strategies: pure scores over predicted probabilities.

Every strategy follows one tiny interface (:class:`Strategy`): a ``name`` and
``score(probs, context) -> (N,)`` where ``probs`` is ``(N, L)``, the model's probabilities for
the N unlabelled samples, and a HIGHER score means MORE informative. Ranking is
:func:`select_top`; the loop (``ultrasound.active.rounds``) never looks at which strategy it has.

Notation: ``p`` = probability of a finding, ``L`` = number of findings, a prediction is positive
when ``p >= 0.5`` (as in :func:`ultrasound.multilabel_metrics.predict_labels`). The exact
formulas, and why, are in docs/tsal.md.

========================  ===================================================================
name                      score per sample (higher = query first)
========================  ===================================================================
``random``                uniform draw from ``context.rng``
``least_margin``          ``1 - 2 * min_l |p_l - 0.5|``
``mean_entropy``          ``mean_l H2(p_l)``, binary entropy in bits
``lci``                   ``| #{l: p_l >= 0.5} - mean label count of the labelled set |``
``adaptive``              Li & Guo 2013: ``u^beta * c^(1-beta)``, ``u = 1 / separation margin``
``mlm``                   TSAL's multi-label margin with label correlation (see below)
========================  ===================================================================
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ultrasound.active.correlation import Cooccurrence, check_label_matrix, cooccurrence

PROB_EPS = 1e-6


@dataclass(frozen=True, eq=False)
class StrategyContext:
    """What a strategy may look at besides the probabilities.

    Attributes:
        labelled_labels: ``(N_l, L)`` 0/1, the human-confirmed labels of the labelled set
            (initial + oracle + audited); source of the cardinality and co-occurrence statistics.
        rng: the experiment's generator (random scores, tie-breaking).
        embeddings: optional ``(N, D)`` features of the scored samples, row-aligned with
            ``probs``, for strategies that need them (none of the built-in ones does).
    """

    labelled_labels: np.ndarray
    rng: np.random.Generator
    embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labelled_labels", check_label_matrix(self.labelled_labels, "labelled_labels"))
        if not isinstance(self.rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy Generator, got {type(self.rng).__name__}")


@runtime_checkable
class Strategy(Protocol):
    """A query strategy: ``score(probs (N, L), context) -> (N,)`` float64, higher = ask first."""

    name: str

    def score(self, probs: np.ndarray, context: StrategyContext) -> np.ndarray: ...


def check_probs(probs: np.ndarray) -> np.ndarray:
    """Validate ``(N, L)`` probabilities in [0, 1] and return them as float64."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"probs must be (N, L) with L >= 1, got shape {probs.shape}")
    if probs.size and (not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1):
        raise ValueError("probs must be finite probabilities in [0, 1]")
    return probs


def _check_context_labels(probs: np.ndarray, context: StrategyContext, name: str) -> np.ndarray:
    labels = context.labelled_labels
    if labels.shape[1] != probs.shape[1]:
        raise ValueError(f"{name}: labelled_labels has {labels.shape[1]} columns, probs has {probs.shape[1]}")
    if labels.shape[0] == 0:
        raise ValueError(f"{name} needs a non-empty labelled set (its statistics come from it)")
    return labels


def label_margins(probs: np.ndarray) -> np.ndarray:
    """``(N, L)`` -> ``(N, L)``: ``|p - 0.5|`` (0 = undecided, 0.5 = certain)."""
    return np.abs(check_probs(probs) - 0.5)


def label_cardinality_inconsistency(probs: np.ndarray, labelled_labels: np.ndarray) -> np.ndarray:
    """Li & Guo 2013: ``| #predicted positives - mean #positives of the labelled set |``.

    Shape: probs ``(N, L)``, labelled_labels ``(N_l, L)`` -> ``(N,)``.
    """
    probs = check_probs(probs)
    labels = check_label_matrix(labelled_labels, "labelled_labels", probs.shape[1])
    if labels.shape[0] == 0:
        raise ValueError("label cardinality needs a non-empty labelled set")
    predicted = (probs >= 0.5).sum(axis=1)
    return np.abs(predicted - labels.sum(axis=1).mean())


def separation_margin(probs: np.ndarray) -> np.ndarray:
    """Li & Guo 2013 on logits ``f = log(p / (1 - p))``: ``min_{f>=0} f - max_{f<0} f``.

    An empty side stands at the decision boundary (0), so with no predicted positive the margin
    is ``-max f`` (distance of the most likely finding to the boundary), and with no predicted
    negative it is ``min f``. Shape: ``(N, L)`` -> ``(N,)``, values >= 0.
    """
    probs = np.clip(check_probs(probs), PROB_EPS, 1.0 - PROB_EPS)
    logits = np.log(probs) - np.log1p(-probs)
    positive = probs >= 0.5
    lowest_positive = np.where(positive, logits, np.inf).min(axis=1)
    highest_negative = np.where(positive, -np.inf, logits).max(axis=1)
    lowest_positive = np.where(np.isfinite(lowest_positive), lowest_positive, 0.0)
    highest_negative = np.where(np.isfinite(highest_negative), highest_negative, 0.0)
    return np.maximum(lowest_positive - highest_negative, 0.0)


def correlation_adjusted_probs(probs: np.ndarray, stats: Cooccurrence, weight: float) -> np.ndarray:
    """Move each probability towards what the correlated findings imply (TSAL, our reading).

    For sample n and finding l, every other finding j implies
    ``r_jl = p_j * P(l=1 | j=1) + (1 - p_j) * P(l=1 | j=0)``. With ``a_jl = |phi_jl|`` (j != l):

    - ``q_l = sum_j a_jl r_jl / sum_j a_jl``  (what the correlated findings say about l)
    - ``s_l = sum_j a_jl^2 / sum_j a_jl``     (how strongly l is correlated, in [0, 1])
    - ``p'_l = p_l + weight * s_l * (q_l - p_l)``

    A finding with no correlated partner (all ``a_jl = 0``) keeps ``p'_l = p_l``. A prediction
    that contradicts a strongly correlated partner is pulled towards (or past) 0.5, so its margin
    shrinks. Shape: ``(N, L)`` -> ``(N, L)``.
    """
    probs = check_probs(probs)
    if probs.shape[1] != stats.num_labels:
        raise ValueError(f"probs has {probs.shape[1]} columns, statistics have {stats.num_labels}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"correlation weight must be in [0, 1], got {weight}")
    strength = np.abs(stats.phi)
    np.fill_diagonal(strength, 0.0)
    total = strength.sum(axis=0)  # (L,) sum over j of a_jl
    # sum_j a_jl r_jl = sum_j a_jl [p_j (P(l|j=1) - P(l|j=0)) + P(l|j=0)]
    implied = probs @ (strength * (stats.given_positive - stats.given_negative))
    implied = implied + (strength * stats.given_negative).sum(axis=0)
    has_partner = total > 0
    safe_total = np.where(has_partner, total, 1.0)
    q = np.where(has_partner, implied / safe_total, probs)
    s = np.where(has_partner, (strength ** 2).sum(axis=0) / safe_total, 0.0)
    return probs + weight * s * (q - probs)


@dataclass(frozen=True)
class RandomSampling:
    """Uniform random scores from ``context.rng`` (the passive-learning baseline)."""

    name: str = dataclasses.field(default="random", init=False)

    def score(self, probs: np.ndarray, context: StrategyContext) -> np.ndarray:
        return context.rng.random(check_probs(probs).shape[0])


@dataclass(frozen=True)
class LeastMargin:
    """Least-confident finding: ``1 - 2 * min_l |p_l - 0.5|`` (1 = some finding at p = 0.5)."""

    name: str = dataclasses.field(default="least_margin", init=False)

    def score(self, probs: np.ndarray, context: StrategyContext) -> np.ndarray:
        return 1.0 - 2.0 * label_margins(probs).min(axis=1)


@dataclass(frozen=True)
class MeanEntropy:
    """Mean binary entropy over findings, in bits: ``mean_l -[p log2 p + (1-p) log2 (1-p)]``."""

    name: str = dataclasses.field(default="mean_entropy", init=False)

    def score(self, probs: np.ndarray, context: StrategyContext) -> np.ndarray:
        p = check_probs(probs)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
        return np.nan_to_num(terms, nan=0.0).mean(axis=1)


@dataclass(frozen=True)
class LabelCardinality:
    """Label cardinality inconsistency (Li & Guo 2013): predicted label count far from the
    labelled set's mean count = the model is likely wrong about how many findings are present."""

    name: str = dataclasses.field(default="lci", init=False)

    def score(self, probs: np.ndarray, context: StrategyContext) -> np.ndarray:
        probs = check_probs(probs)
        return label_cardinality_inconsistency(probs, _check_context_labels(probs, context, self.name))


@dataclass(frozen=True)
class Adaptive:
    """Li & Guo 2013, "Active Learning with Multi-Label SVM Classification", IJCAI:
    ``q(x) = u(x)^beta * c(x)^(1 - beta)`` with the max-margin uncertainty
    ``u = 1 / max(separation_margin, min_margin)`` and the label cardinality inconsistency ``c``.

    The paper re-picks beta among {0, 0.1, ..., 1} before every single-sample query by
    retraining on each candidate; here beta is a fixed, sweepable parameter (see docs/tsal.md).
    """

    beta: float = 0.5
    min_margin: float = 1e-3
    name: str = dataclasses.field(default="adaptive", init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.min_margin <= 0:
            raise ValueError(f"min_margin must be > 0, got {self.min_margin}")

    def score(self, probs: np.ndarray, context: StrategyContext) -> np.ndarray:
        probs = check_probs(probs)
        labels = _check_context_labels(probs, context, self.name)
        uncertainty = 1.0 / np.maximum(separation_margin(probs), self.min_margin)
        inconsistency = label_cardinality_inconsistency(probs, labels)
        return uncertainty ** self.beta * inconsistency ** (1.0 - self.beta)


@dataclass(frozen=True)
class MultiLabelMargin:
    """TSAL's multi-label margin (MLM) with label correlation (our reading; docs/tsal.md).

    ``p' = correlation_adjusted_probs(p, cooccurrence(labelled), correlation_weight)``,
    ``m'_l = |p'_l - 0.5|``, score ``= 1 - 2 * mean(smallest `smallest` values of m')``.
    ``correlation_weight = 0`` and ``smallest = 1`` give :class:`LeastMargin`.
    """

    correlation_weight: float = 0.5
    smallest: int = 2
    smoothing: float = 1.0
    name: str = dataclasses.field(default="mlm", init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.correlation_weight <= 1.0:
            raise ValueError(f"correlation_weight must be in [0, 1], got {self.correlation_weight}")
        if self.smallest < 1:
            raise ValueError(f"smallest must be >= 1, got {self.smallest}")
        if self.smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {self.smoothing}")

    def adjusted_margins(self, probs: np.ndarray, context: StrategyContext) -> np.ndarray:
        """``(N, L)`` correlation-adjusted margins ``|p' - 0.5|``."""
        probs = check_probs(probs)
        labels = _check_context_labels(probs, context, self.name)
        stats = cooccurrence(labels, self.smoothing)
        return np.abs(correlation_adjusted_probs(probs, stats, self.correlation_weight) - 0.5)

    def score(self, probs: np.ndarray, context: StrategyContext) -> np.ndarray:
        margins = self.adjusted_margins(probs, context)
        m = min(self.smallest, margins.shape[1])
        smallest = np.sort(margins, axis=1)[:, :m]
        return 1.0 - 2.0 * smallest.mean(axis=1)


STRATEGIES: dict[str, type] = {
    "random": RandomSampling,
    "least_margin": LeastMargin,
    "mean_entropy": MeanEntropy,
    "lci": LabelCardinality,
    "adaptive": Adaptive,
    "mlm": MultiLabelMargin,
}


def make_strategy(name: str, cls: type | None = None, **params: Any) -> Strategy:
    """Build a strategy by name, e.g. ``make_strategy("mlm", correlation_weight=0.3)``, or from
    its class ``cls`` (a strategy registered in another process: nothing global changes here).

    Unknown names or parameters raise ``ValueError`` naming the valid ones.
    """
    if cls is None and name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {sorted(STRATEGIES)}")
    cls = cls or STRATEGIES[name]
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"strategy {name!r} has no parameter(s) {unknown}; valid: {valid}")
    return cls(**params)


def select_top(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the ``k`` highest scores, best first; equal scores are ordered by ``rng``.

    Shape: scores ``(N,)`` -> ``(k,)`` int64 positions into ``scores``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be (N,), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if not 0 <= k <= scores.shape[0]:
        raise ValueError(f"k must be in [0, {scores.shape[0]}], got {k}")
    tiebreak = rng.random(scores.shape[0])
    order = np.lexsort((tiebreak, -scores))
    return order[:k].astype(np.int64)


def select_spread(scores: np.ndarray, k: int, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """:func:`select_top` with at most one sample per group (video) while unpicked groups remain.

    A clinician labels a clip, not a frame: near-duplicate frames of one video carry one
    video's information, so a round takes each group's best sample in score order first; only
    when fewer than ``k`` groups are left does it take second-best samples, and so on.
    ``groups=None`` is :func:`select_top`.

    Shape: scores ``(N,)``, groups ``(N,)`` any hashable ids -> ``(k,)`` int64 positions.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> select_spread(np.array([0.9, 0.8, 0.7, 0.1]), 2, np.array([0, 0, 1, 1]), rng).tolist()
        [0, 2]
    """
    order = select_top(scores, np.asarray(scores).shape[0], rng)  # every position, best first
    if not 0 <= k <= order.shape[0]:
        raise ValueError(f"k must be in [0, {order.shape[0]}], got {k}")
    if groups is None:
        return order[:k]
    groups = np.asarray(groups).ravel()
    if groups.shape[0] != order.shape[0]:
        raise ValueError(f"groups has {groups.shape[0]} entries, scores {order.shape[0]}")
    _, code = np.unique(groups[order], return_inverse=True)
    by_group = np.argsort(code, kind="stable")  # positions in `order`, grouped, best first within
    sorted_code = code[by_group]
    starts = np.flatnonzero(np.r_[True, sorted_code[1:] != sorted_code[:-1]])
    sizes = np.diff(np.r_[starts, sorted_code.size])
    rank = np.empty(order.shape[0], dtype=np.int64)  # 0 = best of its group, 1 = second, ...
    rank[by_group] = np.arange(order.shape[0]) - np.repeat(starts, sizes)
    return order[np.lexsort((np.arange(order.shape[0]), rank))][:k].astype(np.int64)



def group_means(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group means of per-sample values (a video's score or probabilities from its frames').

    Shape: values ``(N,)`` or ``(N, K)``, groups ``(N,)`` any sortable ids ->
    ``(names (G,), code (N,), means (G,) or (G, K))``: the sorted distinct groups, each
    sample's group position, and the means in float64.

    Example:
        >>> names, code, means = group_means(np.array([1.0, 3.0, 5.0]), np.array(["b", "b", "a"]))
        >>> names.tolist(), code.tolist(), means.tolist()
        (['a', 'b'], [1, 1, 0], [5.0, 2.0])
    """
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups).ravel()
    if values.shape[0] != groups.shape[0]:
        raise ValueError(f"groups has {groups.shape[0]} entries, values {values.shape[0]} rows")
    names, code = np.unique(groups, return_inverse=True)
    code = code.ravel().astype(np.int64)
    counts = np.bincount(code, minlength=names.size).astype(np.float64)
    columns = values.reshape(values.shape[0], int(np.prod(values.shape[1:])))
    means = np.zeros((names.size, columns.shape[1]))
    for j in range(columns.shape[1]):
        means[:, j] = np.bincount(code, weights=columns[:, j], minlength=names.size) / counts
    return names, code, means.reshape((names.size,) + values.shape[1:])
