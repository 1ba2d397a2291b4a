"""The embeddings-mode head: fits a separable toy problem, minimises the documented objective
(checked against a slow transcription and a reference solver), treats zero sample weight as
absence, is deterministic, and a batched solve equals each fit alone."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ultrasound.active.head import HeadParams, head_problem, positive_weights, predict_head, train_head, train_heads


def toy(n=120, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, 10)).astype(np.float32) * 3 + 5
    labels = np.stack([emb[:, 0] > 5, emb[:, 1] - emb[:, 2] > 0.5, emb[:, 3] > 7], axis=1).astype(np.uint8)
    return emb, labels


def slow_objective(params: HeadParams, emb, labels, weight, pos_weight, l2) -> float:
    """J = sum_n w_n mean_l BCE_pw / sum_n w_n + l2/2 ||W||^2, term by term in float64."""
    total, wsum = 0.0, 0.0
    for x, y, w in zip(emb.astype(np.float64), labels, weight):
        z = ((x - params.mean) / params.scale) @ params.weight.astype(np.float64) + params.bias
        terms = []
        for zl, yl, pl in zip(z, y, pos_weight):
            p = 1.0 / (1.0 + math.exp(-zl))
            terms.append(-(pl * yl * math.log(p) + (1 - yl) * math.log(1 - p)))
        total += w * sum(terms) / len(terms)
        wsum += w
    return total / wsum + 0.5 * l2 * float((params.weight.astype(np.float64) ** 2).sum())


def test_fits_a_separable_problem():
    emb, labels = toy()
    head = train_head(emb, labels, l2=1e-4, max_iter=300)
    probs = predict_head(head, emb)
    assert probs.shape == (120, 3) and probs.dtype == np.float32
    assert ((probs >= 0.5) == labels.astype(bool)).mean() == 1.0
    test_emb, test_labels = toy(200, seed=1)
    assert ((predict_head(head, test_emb) >= 0.5) == test_labels.astype(bool)).mean() > 0.9


def test_minimises_the_documented_objective():
    emb, labels = toy(40)
    weight = np.linspace(0.5, 1.5, 40)
    pos_weight = np.array([2.0, 1.0, 3.0])
    head = train_head(emb, labels, weight, pos_weight=pos_weight, l2=0.05)
    at_optimum = slow_objective(head, emb, labels, weight, pos_weight, 0.05)
    assert head.loss == pytest.approx(at_optimum, rel=1e-4)
    rng = np.random.default_rng(0)
    for _ in range(3):  # any small step away costs more
        nudged = HeadParams(head.weight + 0.05 * rng.normal(size=head.weight.shape).astype(np.float32),
                            head.bias, head.mean, head.scale)
        assert slow_objective(nudged, emb, labels, weight, pos_weight, 0.05) > at_optimum


def test_zero_weight_means_absent_and_fits_are_deterministic():
    emb, labels = toy(60)
    noise = np.random.default_rng(2).normal(size=(20, 10)).astype(np.float32) * 10
    flipped = 1 - labels[:20]
    with_ignored = train_head(np.vstack([emb, noise]), np.vstack([labels, flipped]),
                              np.r_[np.ones(60), np.zeros(20)], l2=1e-2)
    without = train_head(emb, labels, l2=1e-2)
    assert predict_head(with_ignored, emb) == pytest.approx(predict_head(without, emb), abs=1e-3)
    again = train_head(emb, labels, l2=1e-2)
    assert np.array_equal(again.weight, without.weight) and np.array_equal(again.bias, without.bias)
    restored = HeadParams.from_dict(without.to_dict())
    assert np.array_equal(predict_head(restored, emb), predict_head(without, emb))


def test_auto_positive_weights_raise_recall_of_a_rare_finding():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(400, 5)).astype(np.float32)
    rare = (emb[:, 0] + rng.normal(scale=0.8, size=400) > 1.8).astype(np.uint8)[:, None]
    plain = predict_head(train_head(emb, rare), emb)[:, 0] >= 0.5
    weighted = predict_head(train_head(emb, rare, pos_weight="auto"), emb)[:, 0] >= 0.5
    positives = rare[:, 0] == 1
    assert weighted[positives].mean() > plain[positives].mean()


def simulator_sized(seed=0, n=3000, d=64):
    rng = np.random.default_rng(seed)
    emb = np.abs(rng.normal(size=(n, d))).astype(np.float32)
    w = rng.normal(size=(d, 6)).astype(np.float32)
    labels = ((emb - emb.mean(0)) @ w / np.sqrt(d) + rng.normal(size=(n, 6)) > 1.0).astype(np.uint8)
    return emb, labels


def test_solves_to_the_optimum_of_a_reference_solver():
    """scipy's L-BFGS-B on the same float64 objective, to a gradient of 1e-10, is the reference."""
    from scipy.optimize import minimize

    emb, labels = simulator_sized(n=150, d=12)
    weight = np.random.default_rng(1).uniform(0.5, 1.0, size=150)
    head = train_head(emb, labels, weight, pos_weight="auto", l2=1e-2, tol=1e-8)
    assert head.converged and 5 < head.iterations < 1000
    x = ((emb - head.mean) / head.scale).astype(np.float64)
    pw = positive_weights("auto", labels.astype(np.float32)).astype(np.float64)
    share = (weight / weight.sum())[:, None] / labels.shape[1]

    def objective(theta):
        w, b = theta[:-6].reshape(12, 6), theta[-6:]
        z = x @ w + b
        loss = (share * (pw * labels * np.logaddexp(0, -z) + (1 - labels) * np.logaddexp(0, z))).sum()
        g = share * (1 / (1 + np.exp(-z)) * (pw * labels + 1 - labels) - pw * labels)
        return loss + 0.005 * (w * w).sum(), np.concatenate([(x.T @ g + 1e-2 * w).ravel(), g.sum(0)])

    ref = minimize(objective, np.zeros(78), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 5000})
    assert head.loss == pytest.approx(ref.fun, rel=1e-9)
    assert np.abs(head.weight - ref.x[:-6].reshape(12, 6)).max() < 1e-4
    assert np.abs(head.bias - ref.x[-6:]).max() < 1e-4


def test_a_batched_solve_equals_each_fit_alone():
    """Eight problems of different sizes, weights and penalties in one batch (and in chunks of
    one to three) give each problem's own fit: the batch shares matmuls, not iterates (nor the
    order of any sum)."""
    emb, labels = simulator_sized()
    rng = np.random.default_rng(4)
    problems, penalties = [], []
    for size in (40, 90, 150, 220, 300, 60, 410, 130):
        rows = rng.choice(emb.shape[0], size=size, replace=False)
        problems.append(head_problem(emb[rows], labels[rows], rng.uniform(0.3, 1.0, size), "auto"))
        penalties.append(float(rng.choice([1e-3, 1e-2, 1e-1])))
    alone = [train_heads([p], l2=l2)[0] for p, l2 in zip(problems, penalties)]
    for max_bytes in (None, 300 * 64 * 8):  # one chunk; chunks of 1-3 problems
        together = train_heads(problems, l2=penalties, max_bytes=max_bytes)
        for a, b in zip(alone, together):
            assert a.converged and b.converged and a.iterations == b.iterations
            assert np.abs(predict_head(a, emb) - predict_head(b, emb)).max() <= 1e-6
            # rows padded to the same bucket alone and in a batch: equal to the last bit
            assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)


def test_arguments_are_validated():
    emb, labels = toy(10)
    with pytest.raises(ValueError, match="rows"):
        train_head(emb, labels[:5])
    with pytest.raises(ValueError, match="sample_weight"):
        train_head(emb, labels, np.zeros(10))
    with pytest.raises(ValueError, match="pos_weight"):
        train_head(emb, labels, pos_weight="balanced")
    with pytest.raises(ValueError, match="emb must be"):
        predict_head(train_head(emb, labels), emb[:, :3])
