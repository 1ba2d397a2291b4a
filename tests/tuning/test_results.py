"""Results: best trial, Pareto front, compute, and the files under <out>/results."""
from __future__ import annotations

import optuna
import pandas as pd
import pytest
import yaml

from cluster.storage import Storage, parse_uri
from tests.tuning.toy_job import ToyJob
from tuning.results import (
    TrialRecord,
    best_record,
    compute_spent,
    pareto_front,
    summary_dict,
    write_results,
)
from tuning.spec import parse_spec

ADAPTERS = {"toy": ToyJob()}


def spec_of(**overrides):
    raw = {"job": "toy", "name": "r", "fixed": {"steps": 4}, "space": {"x": {"uniform": [0, 1]}, "kind": {"choice": ["a", "b"]}},
           "metric": "score"}
    raw.update(overrides)
    return parse_spec(raw, adapters=ADAPTERS)


def rec(tid, x, score, cost, steps=4, status="completed", kind="a"):
    return TrialRecord(tid, {"x": x, "kind": kind}, {"score": score, "cost": cost}, steps, status)


RECORDS = [
    rec("t0", 0.9, 0.10, 0.9),
    rec("t1", 0.3, 0.80, 0.3, steps=1, status="stopped"),  # best value, but one step only
    rec("t2", 0.4, 0.50, 0.4),
    rec("t3", 0.1, 0.40, 0.1),
    rec("t4", 0.5, 0.50, 0.5),  # ties t2 on score: the earlier trial wins
    rec("t5", 0.2, float("nan"), 0.2, status="error", steps=2),
]


def test_best_is_the_best_completed_trial_ties_to_the_earlier():
    assert best_record(RECORDS, "score", "max").trial_id == "t2"
    assert best_record(RECORDS, "score", "min").trial_id == "t0"
    assert best_record(RECORDS, "cost", "min").trial_id == "t3"
    assert best_record([RECORDS[1]], "score", "max") is None


def test_pareto_front_by_hand():
    # completed (score max, cost min): t0 (0.1, 0.9) t2 (0.5, 0.4) t3 (0.4, 0.1) t4 (0.5, 0.5)
    # t0 is beaten by t2 on both; t4 by t2 (equal score, higher cost); t2 and t3 trade off
    front = pareto_front(RECORDS, ["score", "cost"], ["max", "min"])
    assert sorted(r.trial_id for r in front) == ["t2", "t3"]


def test_compute_counts_every_step_run():
    assert compute_spent(RECORDS) == 4 + 1 + 4 + 4 + 4 + 2


def test_files_under_results(tmp_path):
    spec = spec_of()
    storage = Storage()
    out = parse_uri(str(tmp_path / "sweep"))
    study = optuna.create_study(direction="maximize", study_name="r")
    for r in RECORDS:
        if r.status == "completed":
            study.add_trial(optuna.trial.create_trial(
                params=r.params, value=r.metrics["score"],
                distributions={"x": optuna.distributions.FloatDistribution(0, 1),
                               "kind": optuna.distributions.CategoricalDistribution(["a", "b"])}))
    results = write_results(RECORDS, spec, ADAPTERS["toy"], out, storage, study=study)
    table = pd.read_parquet(results.table_path)
    assert list(table["trial_id"]) == [r.trial_id for r in RECORDS]
    assert list(table["status"]) == ["completed", "stopped", "completed", "completed", "completed", "error"]
    assert table.loc[2, "param.x"] == 0.4 and table.loc[2, "score"] == 0.5
    assert pd.read_csv(results.csv_path).shape == table.shape
    best = yaml.safe_load(open(results.best_config_path).read())
    assert best == {"x": 0.4, "kind": "a", "steps": 4}  # fixed + the best trial's parameters
    assert set(results.importances) == {"x", "kind"}
    assert sum(results.importances.values()) == pytest.approx(1.0)
    for png in results.plots:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    summary = summary_dict(results, spec, "step", 4)
    assert summary["trials"] == 6 and summary["completed"] == 4
    assert summary["stopped"] == 1 and summary["errored"] == 1
    assert summary["best_metric"] == 0.5 and summary["best_config"] == {"x": 0.4, "kind": "a"}
    assert summary["compute"] == {"unit": "trial-steps", "spent": 19, "max_per_trial": 4, "full_length_trials": 4.75}


def test_importances_need_two_complete_trials(tmp_path):
    study = optuna.create_study(direction="maximize")
    results = write_results(RECORDS[:1], spec_of(), ADAPTERS["toy"], parse_uri(str(tmp_path)), Storage(), study=study)
    assert results.importances == {}
    assert "need at least 2" in results.importances_note
