"""The labelling-budget report: hand-computed AULC, labels-to-95%, machine precision, bands."""
import math
import warnings

import numpy as np
import pytest

from ultrasound.al_report import (
    area_under_curve,
    band,
    curves_from_rows,
    learning_curves_png,
    markdown_table,
    mean_curves,
    round_metrics,
    summarize,
)
from ultrasound.multilabel_metrics import multilabel_report


def rows_of(exp_id, strategy, seed, ref, fractions, costs, maps, f1s=None, machine=(0, 0, 0, 0)):
    out = []
    for r, (x, c, m) in enumerate(zip(fractions, costs, maps)):
        out.append({"experiment_id": exp_id, "strategy": strategy, "seed": seed, "reference_id": ref, "round": r,
                    "fraction": x, "cost_total": c, "map": m, "macro_f1": (f1s or maps)[r],
                    "machine": machine[0], "machine_vectors_correct": machine[1], "audited": machine[2],
                    "audit_agreed": machine[3]})
    return out


@pytest.fixture
def hand_rows():
    rows = []
    rows += rows_of("a0", "random", 0, "r0", [0.1, 0.2, 0.3], [10, 20, 30], [0.5, 0.7, 0.8])
    rows += rows_of("a1", "random", 1, "r1", [0.1, 0.2, 0.3], [10, 20, 30], [0.6, 0.8, 0.8])
    rows += rows_of("b0", "tsal", 0, "r0", [0.1, 0.25, 0.4], [10, 25, 40], [0.5, 0.8, 0.9], machine=(20, 15, 4, 3))
    rows += rows_of("b1", "tsal", 1, "r1", [0.1, 0.25, 0.4], [10, 25, 40], [0.4, 0.6, 0.7], machine=(10, 9, 2, 2))
    return rows


REFS = {"r0": {"map": 0.8}, "r1": {"map": 0.8}}


def test_area_under_curve_by_hand():
    x, y = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.7, 0.8])
    # trapezoids 0.1 * 0.6 + 0.1 * 0.75 = 0.135 over a width of 0.2
    assert area_under_curve(x, y, 0.1, 0.3) == pytest.approx(0.675)
    # [0.15, 0.25]: y = 0.6, 0.7, 0.75 -> 0.05 * 0.65 + 0.05 * 0.725 = 0.06875 over 0.1
    assert area_under_curve(x, y, 0.15, 0.25) == pytest.approx(0.6875)
    assert area_under_curve(x, y, 0.2, 0.2) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="not inside"):
        area_under_curve(x, y, 0.1, 0.35)


def test_summary_matches_hand_computed_values(hand_rows):
    summary = summarize(curves_from_rows(hand_rows), REFS)
    assert summary["range"] == [0.1, 0.3]  # tsal runs further; the shared range stops at 0.3
    random, tsal = summary["strategies"]["random"], summary["strategies"]["tsal"]
    assert random["aulc_per_seed"] == {"0": pytest.approx(0.675), "1": pytest.approx(0.75)}
    assert random["aulc"] == pytest.approx(0.7125)
    # tsal seed 0 at 0.3: 0.8 + (0.05 / 0.15) * 0.1; area 0.15 * 0.65 + 0.05 * (0.8 + 0.8333) / 2
    b0 = (0.15 * 0.65 + 0.05 * (0.8 + 0.8 + 0.1 / 3) / 2) / 0.2
    b1 = (0.15 * 0.5 + 0.05 * (0.6 + 0.6 + 0.1 / 3) / 2) / 0.2
    assert tsal["aulc"] == pytest.approx((b0 + b1) / 2)
    assert tsal["aulc_std"] == pytest.approx(abs(b0 - b1) / math.sqrt(2))
    # 95% of 0.8 = 0.76: random reaches it at 0.3 (seed 0) and 0.2 (seed 1); tsal only seed 0 at 0.25,
    # seed 1 is censored at its final budget 0.4 (cost 40): the mean over both seeds is a lower bound
    assert random["labels_to_target"] == {"reached": 2, "of": 2, "censored": 0, "fraction": pytest.approx(0.25),
                                          "cost": pytest.approx(25.0)}
    assert tsal["labels_to_target"] == {"reached": 1, "of": 2, "censored": 1, "fraction": pytest.approx(0.325),
                                        "cost": pytest.approx(32.5)}
    # paired by seed: (b0 - 0.675, b1 - 0.75); seed 0 above random, seed 1 below
    assert tsal["vs_random"]["mean"] == pytest.approx(((b0 - 0.675) + (b1 - 0.75)) / 2)
    assert (tsal["vs_random"]["wins"], tsal["vs_random"]["losses"]) == (1, 1)
    assert random["vs_random"] is None
    assert tsal["machine_precision"] == pytest.approx(24 / 30)
    assert tsal["machine"] == {"accepted_mean": 15.0, "precision": pytest.approx(24 / 30), "audited": 6,
                               "audit_agreement": pytest.approx(5 / 6)}
    assert random["machine"]["precision"] is None and random["machine"]["accepted_mean"] == 0
    # map at 20% over the full-data map: random (0.7 + 0.8) / 0.8 / 2; tsal (0.7 + 0.5333) / 0.8 / 2
    assert random["map_share_at"]["0.2"] == pytest.approx(0.9375)
    assert tsal["map_share_at"]["0.2"] == pytest.approx((0.7 + 0.4 + 0.2 / 1.5) / 0.8 / 2)
    assert random["final_map"] == pytest.approx(0.8) and tsal["final_map"] == pytest.approx(0.8)
    assert tsal["final_fraction"] == pytest.approx(0.4) and random["full_map"] == pytest.approx(0.8)


def test_band_is_the_bootstrap_percentile_interval_of_the_seed_mean():
    values = np.array([[0.6, 1.0, 0.2], [0.8, 1.0, 0.3], [0.7, 0.9, 0.9]])
    mean, low, high = band(values, n_boot=500, seed=3)
    # slow reference: one resample of the seeds at a time, the same draws
    rng = np.random.default_rng(3)
    draws = rng.integers(0, 3, size=(500, 3))
    means = np.array([[values[row, r].mean() for r in range(3)] for row in draws])
    assert mean.tolist() == pytest.approx(values.mean(axis=0).tolist())
    assert low.tolist() == pytest.approx(np.quantile(means, 0.025, axis=0).tolist())
    assert high.tolist() == pytest.approx(np.quantile(means, 0.975, axis=0).tolist())
    single = band(np.array([[0.5, 0.7]]))
    assert single[1].tolist() == single[2].tolist() == [0.5, 0.7]


def test_bands_never_leave_the_metric_range():
    # two seeds far apart near the top: a t-interval would span about 0.1 to 3.3 here
    values = np.array([[0.95, 0.2, 1.0], [0.30, 0.9, 0.0]])
    _, low, high = band(values)
    assert (low >= 0).all() and (high <= 1).all() and (low <= values.mean(axis=0)).all()
    _, low, high = band(values - values[::-1], low=-1.0, high=1.0)
    assert (low >= -1).all() and (high <= 1).all()


def _curve(maps, fractions=None):
    from ultrasound.al_report import Curve

    maps = np.asarray(maps, float)
    fractions = np.asarray(fractions if fractions is not None else 0.1 * np.arange(1, maps.size + 1), float)
    return Curve("e", "s", 0, "r", np.arange(maps.size), fractions, 100 * fractions, maps, maps)


def test_labels_to_target_waits_for_a_lasting_crossing_and_censors_the_rest():
    from ultrasound.al_report import first_reaching, labels_to_target

    noisy = _curve([0.5, 0.8, 0.6, 0.79, 0.81])  # 0.8 at 0.2 falls back: it lasts from 0.4
    assert first_reaching(noisy, 0.76) == pytest.approx((0.4, 40.0))
    assert first_reaching(_curve([0.5, 0.8, 0.7]), 0.76) is None  # below at the end: never
    assert first_reaching(_curve([0.9, 0.9]), 0.76) == pytest.approx((0.1, 10.0))
    never = _curve([0.3, 0.4, 0.5, 0.6, 0.7])
    out = labels_to_target([noisy, never], [0.76, 0.76])
    # the censored seed counts at its final budget (0.5), not dropped: (0.4 + 0.5) / 2
    assert out == {"reached": 1, "of": 2, "censored": 1, "fraction": pytest.approx(0.45),
                   "cost": pytest.approx(45.0)}
    assert labels_to_target([never], [float("nan")])["censored"] == 1


def test_difference_curves_pair_seeds_against_random(hand_rows):
    diff = mean_curves(curves_from_rows(hand_rows), "map", baseline="random")
    assert set(diff) == {"tsal"}
    # at tsal's fractions 0.1, 0.25 (0.4 is past random's last round, 0.3): random seed 0 is
    # (0.5, 0.75), seed 1 (0.6, 0.8); tsal (0.5, 0.8) and (0.4, 0.6)
    assert diff["tsal"]["mean"].tolist() == pytest.approx([-0.1, -0.075])
    assert diff["tsal"]["fraction"].tolist() == pytest.approx([0.1, 0.25])
    assert (diff["tsal"]["low"] <= diff["tsal"]["mean"] + 1e-12).all()


def test_mean_curves_average_over_seeds(hand_rows):
    curves = mean_curves(curves_from_rows(hand_rows), "map")
    assert curves["random"]["mean"].tolist() == pytest.approx([0.55, 0.75, 0.8])
    assert curves["tsal"]["fraction"].tolist() == pytest.approx([0.1, 0.25, 0.4])


def test_curves_stop_at_the_first_missing_round_and_need_the_fields(hand_rows):
    rows = [r for r in hand_rows if not (r["experiment_id"] == "a0" and r["round"] == 1)]
    curves = {c.experiment_id: c for c in curves_from_rows(rows)}
    assert curves["a0"].rounds.tolist() == [0] and curves["a1"].rounds.tolist() == [0, 1, 2]
    bad = dict(hand_rows[0])
    del bad["fraction"]
    with pytest.raises(ValueError, match="fraction"):
        curves_from_rows([bad])


def test_markdown_table_ranks_by_aulc_and_shows_the_numbers(hand_rows):
    text = markdown_table(summarize(curves_from_rows(hand_rows), REFS))
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| random | 2 | 0.7125 ± 0.0530")
    assert lines[2].startswith("| tsal | 2 |")
    assert ">=0.325 (1/2)" in lines[2] and "15.0 | 0.800 | 0.833" in lines[2]
    assert "| -0.1021 [" in lines[2]  # the paired AULC difference to random


def test_png_is_written(hand_rows):
    curves = curves_from_rows(hand_rows)
    png = learning_curves_png(curves, summarize(curves, REFS), title="hand")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_round_metrics_equal_multilabel_report():
    rng = np.random.default_rng(0)
    names = [f"f{i}" for i in range(5)]
    for trial in range(200):
        n = int(rng.integers(2, 50))
        y = (rng.random((n, 5)) < rng.random(5) * 0.6).astype(int)  # some findings without positives
        scores = np.round(rng.random((n, 5)), 1 + trial % 3)  # ties at 1-3 decimals
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = multilabel_report(y, scores, names)
        got = round_metrics(y, scores, names)
        assert got["excluded"] == expected["excluded"]
        assert got["per_finding_ap"] == pytest.approx(expected["per_finding_ap"], abs=1e-12)
        for key in ("map", "macro_f1", "micro_f1", "hamming_loss"):
            assert got[key] == pytest.approx(expected[key], abs=1e-12, nan_ok=True), key


def test_round_metrics_hand_example():
    # finding 0: scores 0.9 (pos), 0.8 (neg), 0.3 (pos): AP = 1/2 * 1 + 1/2 * 2/3
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2]])
    got = round_metrics(y, s, ["a", "b"])
    assert got["map"] == pytest.approx(0.5 + 1 / 3)
    assert got["excluded"] == ["b"]
    # finding 0 decisions: tp 1, fp 1, fn 1 -> F1 0.5; pooled with b's fp: 2 / (2 + 2 + 1)
    assert got["macro_f1"] == pytest.approx(0.5)
    assert got["micro_f1"] == pytest.approx(2 / 5)
    assert got["hamming_loss"] == pytest.approx(3 / 6)
