"""Paired bootstrap CIs and the sign test against slow references on fixed numbers."""
import math

import numpy as np
import pytest

from ultrasound.stats import paired_difference

A = [0.81, 0.77, 0.92, 0.68, 0.85, 0.74, 0.88, 0.79, 0.90, 0.70, 0.83, 0.76, 0.86, 0.72, 0.80]
B = [0.78, 0.77, 0.89, 0.70, 0.80, 0.71, 0.85, 0.80, 0.86, 0.66, 0.81, 0.73, 0.86, 0.69, 0.78]


def slow_bootstrap_ci(d, n_boot, seed, level):
    """One resample at a time, sorted, the order statistics numpy's default quantile uses."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = sorted(sum(d[j] for j in row) / len(d) for row in draws.tolist())

    def quantile(q):  # linear interpolation between order statistics (numpy's "linear")
        pos = q * (n_boot - 1)
        lo = math.floor(pos)
        return means[lo] + (means[min(lo + 1, n_boot - 1)] - means[lo]) * (pos - lo)

    alpha = 1 - level
    return quantile(alpha / 2), quantile(1 - alpha / 2)


def slow_sign_test_p(wins, losses):
    """Two-sided exact binomial p: the total probability of outcomes no likelier than observed."""
    n = wins + losses
    probs = [math.comb(n, k) / 2 ** n for k in range(n + 1)]
    observed = probs[wins]
    return min(1.0, sum(p for p in probs if p <= observed * (1 + 1e-7)))


def test_the_paired_ci_and_sign_test_match_slow_references():
    result = paired_difference(A, B, n_boot=3000, seed=7, level=0.95)
    d = [a - b for a, b in zip(A, B)]
    assert result.mean == pytest.approx(sum(d) / len(d), abs=1e-12)
    low, high = slow_bootstrap_ci(d, 3000, 7, 0.95)
    assert (result.low, result.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert (result.wins, result.losses, result.ties) == (11, 2, 2)
    assert result.p_sign == pytest.approx(slow_sign_test_p(11, 2), rel=1e-9)
    assert result.p_sign == pytest.approx(0.0224609375, rel=1e-9)  # 2 * (1 + 13 + 78) / 2**13
    assert result.excludes_zero and result.low > 0


def test_pairing_resolves_a_difference_the_unpaired_spread_hides():
    rng = np.random.default_rng(0)
    folds = rng.uniform(0.6, 0.95, size=15)  # fold difficulty varies a lot
    a, b = folds + 0.02 + rng.normal(0, 0.005, 15), folds
    assert abs(a.mean() - b.mean()) < a.std()  # unpaired: within one std
    assert paired_difference(a, b).excludes_zero


def test_identical_arms_give_a_zero_interval_and_p_one():
    result = paired_difference(A, A)
    assert (result.mean, result.low, result.high, result.p_sign) == (0.0, 0.0, 0.0, 1.0)
    assert not result.excludes_zero and result.ties == len(A)


@pytest.mark.parametrize("a, b, message", [
    ([0.5], [0.4], "at least 2 pairs"),
    ([0.5, 0.6], [0.4], "equal length"),
    ([0.5, float("nan")], [0.4, 0.5], "finite"),
])
def test_bad_input_is_refused(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(a, b)
