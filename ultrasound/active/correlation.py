"""Label co-occurrence statistics of the labelled set, used by MLM and confidence validation.

TSAL uses "label correlation information" in both of its streams (see docs/tsal.md). From the
labelled label matrix ``Y (N, L)`` we keep, with Laplace smoothing ``alpha``:

- ``given_positive[i, j] = P(j=1 | i=1) = (n(i=1, j=1) + alpha) / (n(i=1) + 2 alpha)``
- ``given_negative[i, j] = P(j=1 | i=0) = (n(i=0, j=1) + alpha) / (n(i=0) + 2 alpha)``
- ``phi[i, j]``: the phi (Matthews) coefficient of columns i and j,
  ``(n11 n00 - n10 n01) / sqrt(n1. n0. n.1 n.0)``, 0 when a column is constant.

The diagonals are exact by definition: ``given_positive[i, i] = 1``, ``given_negative[i, i] = 0``,
``phi[i, i] = 1`` (0 for a constant column). Smoothing keeps a rule seen on 3 samples from
looking certain: 10 of 10 co-occurrences give 11/12 = 0.917, 2 of 2 give 0.75.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Cooccurrence:
    """Co-occurrence statistics; all matrices are ``(L, L)`` float64, ``prevalence`` is ``(L,)``."""

    given_positive: np.ndarray
    given_negative: np.ndarray
    phi: np.ndarray
    prevalence: np.ndarray
    n_samples: int

    @property
    def num_labels(self) -> int:
        return int(self.phi.shape[0])


def check_label_matrix(labels: np.ndarray, name: str = "labels", num_labels: int | None = None) -> np.ndarray:
    """Validate a 0/1 ``(N, L)`` matrix and return it as float64."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be (N, L), got shape {labels.shape}")
    if num_labels is not None and labels.shape[1] != num_labels:
        raise ValueError(f"{name} must have L={num_labels} columns, got {labels.shape[1]}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 values")
    return labels.astype(np.float64)


def cooccurrence(labels: np.ndarray, smoothing: float = 1.0) -> Cooccurrence:
    """Conditional probabilities and phi coefficients of a label matrix.

    Shape:
        - labels: ``(N, L)`` 0/1 (N may be 0: every conditional is then 0.5, phi 0).

    Example:
        >>> c = cooccurrence(np.array([[1, 1], [1, 1], [0, 0], [0, 0]]))
        >>> float(c.given_positive[0, 1]), float(c.given_negative[0, 1]), float(c.phi[0, 1])
        (0.75, 0.25, 1.0)
    """
    y = check_label_matrix(labels)
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    n, num = y.shape
    both = y.T @ y  # n(i=1, j=1)
    positives = y.sum(axis=0)  # n(i=1)
    negatives = n - positives
    neg_then_pos = (1.0 - y).T @ y  # n(i=0, j=1)
    given_positive = _ratio(both + smoothing, positives[:, None] + 2 * smoothing)
    given_negative = _ratio(neg_then_pos + smoothing, negatives[:, None] + 2 * smoothing)
    n11 = both
    n10 = positives[:, None] - both  # i=1, j=0
    n01 = neg_then_pos  # i=0, j=1
    n00 = n - n11 - n10 - n01
    denominator = np.sqrt(np.outer(positives, positives) * np.outer(negatives, negatives))
    phi = _ratio(n11 * n00 - n10 * n01, denominator, empty=0.0)
    np.fill_diagonal(given_positive, 1.0)
    np.fill_diagonal(given_negative, 0.0)
    np.fill_diagonal(phi, ((positives > 0) & (negatives > 0)).astype(np.float64))
    prevalence = _ratio(positives + smoothing, np.full(num, n + 2 * smoothing))
    return Cooccurrence(
        given_positive=given_positive,
        given_negative=given_negative,
        phi=np.clip(phi, -1.0, 1.0),
        prevalence=prevalence,
        n_samples=int(n),
    )


def _ratio(numerator: np.ndarray, denominator: np.ndarray, empty: float = 0.5) -> np.ndarray:
    numerator, denominator = np.broadcast_arrays(np.asarray(numerator, np.float64),
                                                 np.asarray(denominator, np.float64))
    return np.divide(numerator, denominator, out=np.full(numerator.shape, empty),
                     where=denominator > 0)
