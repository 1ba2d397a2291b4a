"""Multi-label evaluation: mAP, per-finding AP, macro/micro F1, hamming loss.

Findings with no positive in ``y_true`` have no defined average precision (and a macro F1 term
that is 0 or undefined whatever the model does), so they are reported in ``excluded`` and left
out of ``map``, ``per_finding_ap`` and ``macro_f1``. ``micro_f1`` and ``hamming_loss`` pool every
(sample, finding) decision, so they keep all findings: a false positive on a finding absent from
the test split is still an error.

A probability counts as a positive prediction when ``p >= threshold`` (:func:`predict_labels`);
the active-learning strategies use the same rule at 0.5.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, hamming_loss


def predict_labels(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``(N, L)`` probabilities -> ``(N, L)`` uint8 decisions, positive when ``p >= threshold``."""
    return (np.asarray(probs) >= threshold).astype(np.uint8)


def multilabel_report(
    y_true: np.ndarray,
    scores: np.ndarray,
    names: Sequence[str],
    threshold: float = 0.5,
) -> dict:
    """Multi-label metrics over a test split.

    Shape:
        - y_true: ``(N, L)`` 0/1.
        - scores: ``(N, L)`` probabilities in [0, 1].
        - names: ``L`` finding names.

    Returns:
        ``{"map": float, "per_finding_ap": {name: ap}, "macro_f1": float, "micro_f1": float,
        "hamming_loss": float, "excluded": [names], "threshold": float, "n_samples": int}``;
        ``map`` and ``macro_f1`` are NaN when every finding is excluded.

    Example:
        >>> r = multilabel_report(np.array([[1, 0], [0, 0]]), np.array([[0.9, 0.2], [0.3, 0.1]]),
        ...                       ["b_lines", "effusion"])
        >>> r["map"], r["excluded"], r["hamming_loss"]
        (1.0, ['effusion'], 0.0)
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    names = list(names)
    if y_true.ndim != 2 or scores.shape != y_true.shape:
        raise ValueError(
            f"y_true and scores must both be (N, L), got {y_true.shape} and {scores.shape}"
        )
    if y_true.shape[0] == 0:
        raise ValueError("need at least one sample")
    if len(names) != y_true.shape[1]:
        raise ValueError(f"got {len(names)} names for {y_true.shape[1]} label columns")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold only 0/1 values")
    if not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1:
        raise ValueError("scores must be probabilities in [0, 1]")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    y_true = y_true.astype(np.int64)
    y_pred = predict_labels(scores, threshold).astype(np.int64)
    has_positive = y_true.sum(axis=0) > 0
    kept = np.flatnonzero(has_positive)
    per_finding_ap = {
        names[j]: float(average_precision_score(y_true[:, j], scores[:, j])) for j in kept
    }
    per_finding_f1 = [
        float(f1_score(y_true[:, j], y_pred[:, j], zero_division=0.0)) for j in kept
    ]
    return {
        "map": float(np.mean(list(per_finding_ap.values()))) if len(kept) else float("nan"),
        "per_finding_ap": per_finding_ap,
        "macro_f1": float(np.mean(per_finding_f1)) if len(kept) else float("nan"),
        "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0.0)),
        "hamming_loss": float(hamming_loss(y_true, y_pred)),
        "excluded": [names[j] for j in np.flatnonzero(~has_positive)],
        "threshold": float(threshold),
        "n_samples": int(y_true.shape[0]),
    }


def positive_balance(labels: np.ndarray, max_weight: float = 50.0) -> np.ndarray:
    """The one "#negatives / #positives, clipped" rule of the weighted BCE losses (MSML's
    ``pos_weight="auto"`` and the simulator head's): per finding, clipped to
    ``[1/max_weight, max_weight]``; 1 for a finding without positives (its term never fires).

    Shape: labels ``(N, L)`` 0/1 (any numeric dtype) -> ``(L,)`` float32.

    Example:
        >>> positive_balance(np.array([[1, 0], [0, 0], [0, 0], [0, 0]])).tolist()
        [3.0, 1.0]
    """
    if max_weight < 1:
        raise ValueError(f"max_weight must be >= 1, got {max_weight}")
    labels = np.asarray(labels)
    positives = labels.sum(axis=0).astype(np.float64)
    negatives = labels.shape[0] - positives
    ratio = np.divide(negatives, positives, out=np.ones_like(positives), where=positives > 0)
    return np.clip(ratio, 1.0 / max_weight, max_weight).astype(np.float32)
