"""Searchers (OptunaSearch over the SPEC's space) driven by hand, without a Tune run."""
from __future__ import annotations

import json

import optuna
import pytest

from tests.tuning.toy_job import ToyJob
from tuning import searchers
from tuning.spec import TrialResources, parse_spec
from tuning.sweep import derive_concurrency

ADAPTERS = {"toy": ToyJob()}


def spec_of(**overrides):
    raw = {"job": "toy", "name": "s", "space": {"x": {"uniform": [0, 1]}}, "metric": "score"}
    raw.update(overrides)
    return parse_spec(raw, adapters=ADAPTERS)


def storage(tmp_path):
    return searchers.open_storage(f"sqlite:///{tmp_path / 'study.db'}")


def test_asha_stopped_trial_is_pruned_a_full_one_complete(tmp_path):
    store = storage(tmp_path)
    search = searchers.make_searcher(spec_of(), trials=4, storage=store, max_steps=4)
    for tid in ("t0", "t1"):
        config = search.suggest(tid)
        assert 0 <= config["x"] <= 1
    for step in (1, 2):
        search.on_trial_result("t0", {"score": 0.1 * step, "training_iteration": step})
    search.on_trial_complete("t0", {"score": 0.2, "training_iteration": 2})  # stopped at step 2 of 4
    search.on_trial_complete("t1", {"score": 0.5, "training_iteration": 4})
    study = optuna.load_study(study_name="s", storage=store)
    states = {t.user_attrs[searchers.TUNE_TRIAL_ATTR]: t for t in study.trials}
    assert states["t0"].state == optuna.trial.TrialState.PRUNED
    assert states["t0"].intermediate_values == {1: pytest.approx(0.1), 2: pytest.approx(0.2)}
    assert states["t1"].state == optuna.trial.TrialState.COMPLETE and states["t1"].value == 0.5
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_saved_state_has_no_storage_and_resumes_into_the_same_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search = searchers.make_searcher(spec_of(), trials=4, storage=searchers.open_storage(url), max_steps=2)
    config = search.suggest("t0")
    path = tmp_path / "searcher.json"
    search.save(str(path))
    assert url.encode() not in path.read_bytes()  # a database URL may hold a password
    assert list(json.loads(path.read_text())["ot_trials"]) == ["t0"]  # JSON, not a pickle

    searchers.attach_storage("s", searchers.open_storage(url))  # a new driver re-attaches it
    restored = searchers.make_searcher(spec_of(), trials=4, storage=searchers.open_storage(url), max_steps=2)
    restored.restore(str(path))
    restored.on_trial_complete("t0", {"score": 0.7, "training_iteration": 2})
    study = optuna.load_study(study_name="s", storage=searchers.open_storage(url))
    assert [(t.params["x"], t.value) for t in study.trials] == [(config["x"], 0.7)]


def test_grid_enqueues_every_point_in_order(tmp_path):
    spec = spec_of(searcher="grid", space={"kind": {"choice": ["a", "b"]},
                                           "gamma": {"uniform": [0, 1], "when": {"kind": "b"}, "grid": 2}})
    points = searchers.grid_points(spec)
    assert points == [{"kind": "a"}, {"kind": "b", "gamma": 0.0}, {"kind": "b", "gamma": 1.0}]
    search = searchers.make_searcher(spec, trials=len(points), storage=storage(tmp_path), max_steps=4)
    drawn = [search.suggest(f"t{i}") for i in range(len(points))]
    assert drawn == points


def test_two_metrics_make_a_multi_objective_study(tmp_path):
    store = storage(tmp_path)
    search = searchers.make_searcher(spec_of(metric=["score", "cost"]), trials=4, storage=store, max_steps=2)
    search.suggest("t0")
    search.on_trial_complete("t0", {"score": 0.3, "cost": 0.2, "training_iteration": 2})
    study = optuna.load_study(study_name="s", storage=store)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.trials[0].values == [0.3, 0.2]


def test_tpe_startup_and_samplers():
    assert searchers.startup_trials(spec_of(), 30) == 10
    assert searchers.startup_trials(spec_of(), 9) == 3
    assert searchers.startup_trials(spec_of(searcher={"name": "tpe", "startup_trials": 5}), 9) == 5
    assert isinstance(searchers.make_sampler(spec_of(searcher="random"), 8), optuna.samplers.RandomSampler)
    tpe = searchers.make_sampler(spec_of(), 8)
    assert isinstance(tpe, optuna.samplers.TPESampler)


def test_asha_rungs_follow_the_spec():
    halving = spec_of(scheduler={"name": "asha", "grace_period": 2, "reduction_factor": 2})
    asha = searchers.make_scheduler(halving, 9)
    # rungs at 2, 4, 8: every one before the last step (9); Ray internals
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [8, 4, 2]
    assert asha._stop_last_trials is False  # a full-length trial ends by itself
    asha = searchers.make_scheduler(halving, 8)
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [4, 2]  # not 8: the last step
    assert searchers.make_scheduler(halving, 2) is None  # nothing before the last step to stop at
    assert searchers.make_scheduler(spec_of(scheduler="none"), 8) is None


@pytest.mark.parametrize("per_trial, beside, cluster, trials, expected", [
    (TrialResources(1, 0), TrialResources(0, 0), {"CPU": 2}, 10, 2),
    (TrialResources(0.5, 0), TrialResources(0, 0), {"CPU": 2}, 10, 4),
    (TrialResources(0.5, 0), TrialResources(0, 0), {"CPU": 2}, 3, 3),
    (TrialResources(1, 0.25), TrialResources(0, 0), {"CPU": 16, "GPU": 1}, 10, 4),
    (TrialResources(0.25, 0), TrialResources(1, 1), {"CPU": 16, "GPU": 4}, 10, 4),
    (TrialResources(4, 0), TrialResources(0, 0), {"CPU": 2}, 10, 1),
])
def test_concurrency_from_resources(per_trial, beside, cluster, trials, expected):
    assert derive_concurrency(per_trial, beside, cluster, trials) == expected


def test_a_restarted_trial_reporting_its_steps_again_keeps_the_first_values(tmp_path):
    store = storage(tmp_path)
    search = searchers.make_searcher(spec_of(), trials=2, storage=store, max_steps=3)
    search.suggest("t0")
    search.on_trial_result("t0", {"score": 0.1, "training_iteration": 1})
    search.on_trial_result("t0", {"score": 0.9, "training_iteration": 1})  # after a resume
    search.on_trial_result("t0", {"score": 0.2, "training_iteration": 2})
    trial = optuna.load_study(study_name="s", storage=store).trials[0]
    assert trial.intermediate_values == {1: 0.1, 2: 0.2}


def test_results_without_the_metric_are_skipped(tmp_path):
    store = storage(tmp_path)
    search = searchers.make_searcher(spec_of(), trials=1, storage=store, max_steps=3)
    search.suggest("t0")
    search.on_trial_result("t0", {"loss": 0.5, "training_iteration": 1})  # an epoch before the evaluation
    search.on_trial_complete("t0", {"score": 0.4, "training_iteration": 3})
    trial = optuna.load_study(study_name="s", storage=store).trials[0]
    assert trial.intermediate_values == {} and trial.value == 0.4


def test_restored_searcher_draws_what_the_saved_one_would_have(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search = searchers.make_searcher(spec_of(searcher="random"), trials=4, storage=searchers.open_storage(url),
                                     max_steps=2)
    search.suggest("t0")
    path = tmp_path / "searcher.json"
    search.save(str(path))
    restored = searchers.make_searcher(spec_of(searcher="random"), trials=4, storage=searchers.open_storage(url),
                                       max_steps=2)
    restored.restore(str(path))
    assert restored.suggest("t1") == search.suggest("t1")  # the sampler's RNG state came back


def test_a_pickled_searcher_state_is_refused(tmp_path):
    import pickle

    path = tmp_path / "searcher.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    search = searchers.make_searcher(spec_of(), trials=4, storage=storage(tmp_path), max_steps=2)
    with pytest.raises(ValueError, match=r"searcher\.pkl: not a sonoray searcher state \(JSON\)"):
        search.restore(str(path))
