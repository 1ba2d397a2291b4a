"""Search-space parsing, grids and the define-by-run function against real Optuna trials."""
from __future__ import annotations

import math

import optuna
import pytest

from tuning.space import SpaceError, parse_space


def test_kinds_bounds_and_options():
    space = parse_space({
        "lr": {"loguniform": ["1e-5", 1.0e-2]},  # PyYAML reads 1e-5 (no dot) as a string
        "t": {"uniform": [0.1, 1]},
        "batch": {"int": [8, 64], "step": 8},
        "loss": {"choice": ["bce", "asymmetric"]},
    })
    assert space.names == ("lr", "t", "batch", "loss")
    assert (space["lr"].low, space["lr"].high) == (1e-5, 1e-2)
    assert space["batch"].step == 8
    assert space["loss"].choices == ("bce", "asymmetric")


def test_grid_expands_conditionals_only_where_they_apply():
    space = parse_space({
        "gamma": {"uniform": [1, 3], "when": {"loss": "asymmetric"}, "grid": 3},
        "loss": {"choice": ["bce", "asymmetric"]},
        "batch": {"int": [8, 24], "step": 8},
    })
    # parents are placed before their dependants whatever the YAML order
    assert space.names == ("loss", "batch", "gamma")
    grid = space.grid()
    expected = [{"loss": "bce", "batch": b} for b in (8, 16, 24)] + [
        {"loss": "asymmetric", "batch": b, "gamma": g} for b in (8, 16, 24) for g in (1.0, 2.0, 3.0)]
    assert sorted(map(repr, grid)) == sorted(map(repr, expected))
    assert len(grid) == 12


def test_log_grid_points_are_geometric():
    space = parse_space({"lr": {"loguniform": [1.0e-4, 1.0e-2], "grid": 3}})
    values = [p["lr"] for p in space.grid()]
    assert values == pytest.approx([1e-4, 1e-3, 1e-2])


def test_define_by_run_draws_conditionals_only_when_active():
    space = parse_space({
        "loss": {"choice": ["bce", "asymmetric"]},
        "gamma": {"uniform": [1, 4], "when": {"loss": "asymmetric"}},
        "batch": {"int": [8, 64], "step": 8},
        "lr": {"loguniform": [1.0e-5, 1.0e-2]},
    })
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: space.suggest(trial) or 0.0, n_trials=40)
    seen = set()
    for trial in study.trials:
        params = trial.params
        seen.add(params["loss"])
        assert ("gamma" in params) == (params["loss"] == "asymmetric")
        assert params["batch"] in range(8, 65, 8)
        assert 1e-5 <= params["lr"] <= 1e-2
        if "gamma" in params:
            assert 1 <= params["gamma"] <= 4
    assert seen == {"bce", "asymmetric"}
    # log-uniform: about half the draws below the geometric mean of the bounds
    below = sum(t.params["lr"] < math.sqrt(1e-5 * 1e-2) for t in study.trials)
    assert 10 <= below <= 30


@pytest.mark.parametrize("raw, key", [
    ({"lr": {"uniform": [0.5, 0.5]}}, "space.lr.uniform: empty range"),
    ({"lr": {"uniform": [0.9, 0.1]}}, "space.lr.uniform: empty range"),
    ({"lr": {"loguniform": [0, 1]}}, "space.lr.loguniform: needs low > 0"),
    ({"lr": {"uniform": [0, 1], "stepp": 2}}, "space.lr.stepp: unknown key"),
    ({"lr": {"gaussian": [0, 1]}}, "space.lr.gaussian: unknown key"),
    ({"lr": {"uniform": [0, 1], "choice": [1]}}, "space.lr: needs exactly one distribution"),
    ({"loss": {"choice": []}}, "space.loss.choice: empty"),
    ({"b": {"int": [8, 60], "step": 8}}, "space.b.step: 8 does not divide"),
    ({"g": {"uniform": [0, 1], "when": {"loss": "x"}}}, "space.g.when.loss: unknown parameter"),
    ({"a": {"uniform": [0, 1]}, "g": {"uniform": [0, 1], "when": {"a": 0.5}}}, "must name a choice parameter"),
    ({"l": {"choice": ["x"]}, "g": {"uniform": [0, 1], "when": {"l": "y"}}}, "space.g.when.l: 'y' is not one of"),
    ({}, "space: must be a non-empty mapping"),
])
def test_malformed_entries_name_the_key(raw, key):
    with pytest.raises(SpaceError) as err:
        parse_space(raw)
    assert key in str(err.value)
    if "unknown key" in key:
        assert "valid keys: uniform, loguniform, int, choice" in str(err.value)


def test_contains_and_check_config():
    space = parse_space({"b": {"int": [1, 5]}, "c": {"choice": ["x", "y"]}})
    space.check_config({"b": 3, "c": "y"})
    with pytest.raises(SpaceError, match="space.b: value 7"):
        space.check_config({"b": 7})
    assert not space["b"].contains(2.5)
    assert not space["c"].contains("z")
