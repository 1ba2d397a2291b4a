"""multilabel_report on a hand-worked example: AP by hand, F1 from counted TP/FP/FN, a finding
with no positive excluded from mAP and macro F1."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ultrasound.multilabel_metrics import multilabel_report, predict_labels

Y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
S = np.array([[0.9, 0.3, 0.1], [0.2, 0.8, 0.6], [0.6, 0.4, 0.2], [0.7, 0.1, 0.3]])
NAMES = ["b_lines", "a_lines", "effusion"]


def test_report_matches_hand_computation():
    r = multilabel_report(Y, S, NAMES)
    # b_lines ranking .9+ .7- .6+ .2-: AP = (1/1 + 2/3) / 2; a_lines ranking .8+ .4+: AP = 1
    assert r["per_finding_ap"] == pytest.approx({"b_lines": 5 / 6, "a_lines": 1.0})
    assert r["map"] == pytest.approx((5 / 6 + 1.0) / 2)
    assert r["excluded"] == ["effusion"]
    # b_lines TP 2 FP 1 FN 0 -> 0.8; a_lines TP 1 FP 0 FN 1 -> 2/3
    assert r["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # all findings pooled: TP 3, FP 1 + 0 + 1 (effusion row 1), FN 1 -> 6 / 9
    assert r["micro_f1"] == pytest.approx(6 / 9)
    # wrong decisions: b_lines row 3, a_lines row 2, effusion row 1 -> 3 of 12
    assert r["hamming_loss"] == pytest.approx(0.25)
    assert r["n_samples"] == 4


def test_threshold_and_all_excluded():
    assert predict_labels(np.array([[0.5, 0.49]])).tolist() == [[1, 0]]
    r = multilabel_report(np.zeros((2, 2), int), np.full((2, 2), 0.2), ["a", "b"])
    assert math.isnan(r["map"]) and math.isnan(r["macro_f1"])
    assert r["excluded"] == ["a", "b"] and r["hamming_loss"] == 0.0
    strict = multilabel_report(Y, S, NAMES, threshold=0.85)  # only 0.9 is positive now
    assert strict["hamming_loss"] == pytest.approx(3 / 12)  # FN b_lines row 2, a_lines rows 1, 2


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="names"):
        multilabel_report(Y, S, NAMES[:2])
    with pytest.raises(ValueError, match="probabilities"):
        multilabel_report(Y, S * 2, NAMES)
    with pytest.raises(ValueError, match="0/1"):
        multilabel_report(Y * 2, S, NAMES)
