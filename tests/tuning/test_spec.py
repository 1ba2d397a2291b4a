"""SPEC parsing: every malformed SPEC fails with the key and the valid choices."""
from __future__ import annotations

import pytest
import yaml

from tests.tuning.toy_job import ToyJob
from tuning.spec import SpecError, load_spec, parse_spec

ADAPTERS = {"toy": ToyJob()}


def base(**overrides):
    raw = {"job": "toy", "space": {"x": {"uniform": [0, 1]}}, "metric": "score"}
    raw.update(overrides)
    return raw


def test_defaults_and_resolution(tmp_path):
    path = tmp_path / "toy-sweep.yaml"
    path.write_text(yaml.safe_dump(base(fixed={"steps": 3}, metric=["score", "cost"])))
    spec = load_spec(path, adapters=ADAPTERS)
    assert spec.name == "toy-sweep"
    assert spec.metrics == ("score", "cost")
    assert spec.modes == ("max", "min")  # the job's natural directions
    assert spec.multi_objective
    assert spec.searcher.name == "tpe" and spec.scheduler.name == "asha"
    assert spec.fixed == {"steps": 3}
    again = parse_spec(spec.to_dict(), adapters=ADAPTERS)
    assert again.to_dict() == spec.to_dict()


def test_grid_defaults_to_no_early_stopping():
    spec = parse_spec(base(searcher="grid"), adapters=ADAPTERS)
    assert spec.scheduler.name == "none"


@pytest.mark.parametrize("raw, message", [
    (base(trails=4), "trails: unknown key (did you mean 'trials'?); valid: job, name, fixed, space"),
    (base(job="pretrian"), "job: unknown job 'pretrian'"),
    (base(metric="accuracy"), "metric: 'accuracy' is not a metric of job 'toy'; valid: score, cost, final_only"),
    (base(metric=["score", "score"]), "metric: the two metrics must differ"),
    (base(mode="maximize"), "mode: 'maximize' is not a mode; valid: max, min"),
    (base(space={"x": {"uniform": [1, 1]}}), "space.x.uniform: empty range [1, 1]"),
    (base(space={"y": {"uniform": [0, 1]}}), "space.y: not a tunable parameter of job 'toy'; valid: x, kind, gamma"),
    (base(fixed={"stepz": 2}), "fixed.stepz: unknown argument of job 'toy' (did you mean 'steps'?)"),
    (base(fixed={"x": 0.1}), "space.x: also given in fixed"),
    (base(fixed={"steps": 0}), "fixed.steps: must be a positive integer"),
    (base(searcher="bayes"), "searcher: unknown searcher 'bayes'; valid: tpe, random, grid"),
    (base(searcher={"name": "tpe", "warmup": 3}), "searcher.warmup: unknown key; valid: name, startup_trials"),
    (base(scheduler="hyperband"), "scheduler: unknown scheduler 'hyperband'; valid: asha, none"),
    (base(scheduler={"name": "asha", "reduction_factor": 1}), "scheduler.reduction_factor: must be a number > 1"),
    (base(metric="final_only"), "scheduler: asha needs 'final_only' reported every step"),
    (base(trials=0), "trials: must be a positive integer"),
    (base(resources={"cpus": 1}), "resources.cpus: unknown key (did you mean 'cpu'?); valid: cpu, gpu"),
    (base(resources={"gpu": 1.5}), "resources.gpu: above 1 it must be a whole number"),
    ({"job": "toy", "space": {"x": {"uniform": [0, 1]}}}, "SPEC key 'metric' is missing"),
])
def test_malformed_spec_names_the_key(raw, message):
    with pytest.raises(SpecError) as err:
        parse_spec(raw, adapters=ADAPTERS)
    assert message in str(err.value)


def test_unknown_job_lists_the_valid_jobs():
    with pytest.raises(SpecError) as err:
        parse_spec(base(job="train"), adapters={"toy": ToyJob(), "simulate": ToyJob()})
    assert "valid: toy, simulate" in str(err.value)


def test_final_only_metric_runs_without_a_scheduler():
    spec = parse_spec(base(metric="final_only", scheduler="none"), adapters=ADAPTERS)
    assert spec.scheduler.name == "none"


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml", adapters=ADAPTERS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: [toy\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad, adapters=ADAPTERS)
