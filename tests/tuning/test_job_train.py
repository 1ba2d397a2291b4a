"""The Ray Train jobs' adapters: SPEC checks, best configs through the jobs' own --config
loaders, and a pretrain sweep whose epochs reach Tune as they happen (Train inside Tune)."""
from __future__ import annotations

import pytest
import yaml

from cluster.storage import parse_uri
from jobs.cli import main
from tests.conftest import run_cli
from tuning.adapters import ADAPTERS
from tuning.spec import SpecError, parse_spec


def pretrain_spec(**fixed):
    return {"job": "pretrain", "fixed": {"data": "s3://b/d", **fixed},
            "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}, "temperature": {"uniform": [0.1, 1.0]}},
            "metric": "loss"}


def test_pretrain_best_config_round_trips_through_pretrain_config(tmp_path):
    adapter = ADAPTERS["pretrain"]
    spec = parse_spec(pretrain_spec(epochs=3, image_size=32, channels=1))
    assert spec.mode == "min" and adapter.max_steps(spec.fixed) == 3
    config = adapter.job_config({**spec.fixed, "lr": 0.002, "temperature": 0.3})
    assert config == {"epochs": 3, "image_size": 32, "channels": 1, "lr": 0.002, "temperature": 0.3}
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = adapter.load_job_config(str(path))  # `sonoray pretrain --config` resolution
    assert (loaded.lr, loaded.temperature, loaded.epochs, loaded.image_size) == (0.002, 0.3, 3, 32)


def test_train_job_checks_name_the_key():
    with pytest.raises(SpecError, match="fixed.data: required"):
        parse_spec({**pretrain_spec(), "fixed": {}})
    with pytest.raises(SpecError, match=r"space.temperature: value 0.0 is refused by pretrain"):
        parse_spec({**pretrain_spec(), "space": {"temperature": {"uniform": [0.0, 1.0]}}})
    bad = {**pretrain_spec(), "job": "evaluate-after-pretrain", "metric": "macro_f1", "scheduler": "none",
           "space": {"ce_weight": {"uniform": [0.1, 0.5]}}}
    with pytest.raises(SpecError, match="space.ce_weight: has no effect when pretraining uses no label"):
        parse_spec(bad)
    bad["fixed"] = {"data": "s3://b/d", "labels": "per_fold"}
    assert parse_spec(bad).job == "evaluate-after-pretrain"
    with pytest.raises(SpecError, match="scheduler: asha needs 'macro_f1' reported every step, but job 'evaluate-after-pretrain' reports it once"):
        parse_spec({**bad, "scheduler": "asha"})


def test_evaluate_after_pretrain_steps_count_every_pretrain_and_the_evaluation():
    adapter = ADAPTERS["evaluate-after-pretrain"]
    assert adapter.max_steps({"epochs": 4, "labels": "per_fold", "folds": 3}) == 3 * 4 + 1
    assert adapter.max_steps({"epochs": 4}) == 4 + 1


def test_msml_conditional_space_and_best_config(tmp_path):
    pytest.importorskip("cluster.msml_train")
    adapter = ADAPTERS["msml"]
    spec = parse_spec({"job": "msml", "fixed": {"data": "s3://b/d", "epochs": 2, "findings": ["a_lines", "b_lines"]},
                       "space": {"loss": {"choice": ["bce", "asymmetric"]},
                                 "pos_weight": {"choice": ["auto", "none"], "when": {"loss": "bce"}}},
                       "metric": "val_map"})
    assert spec.mode == "max" and spec.scheduler.name == "asha"
    config = adapter.job_config({**spec.fixed, "loss": "asymmetric"})
    assert config == {"findings": ["a_lines", "b_lines"], "epochs": 2, "loss": "asymmetric"}
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = adapter.load_job_config(str(path))
    assert loaded.loss == "asymmetric" and loaded.findings == ("a_lines", "b_lines") and loaded.epochs == 2


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_pretrain_sweep_reports_every_epoch_to_tune(ray_cluster, phantom_uri, storage, tmp_path):
    spec = tmp_path / "uscl-tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "job": "pretrain", "fixed": {"data": phantom_uri, "epochs": 2, "image_size": 32, "channels": 1,
                                     "batch_videos": 4, "unlabelled": True},
        "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}}, "metric": "loss", "trials": 2,
        "searcher": "random", "scheduler": "none"}))
    out = tmp_path / "out"
    code, summary = run_cli(main, ["sweep", str(spec), "--out", str(out), "--json"])
    assert code == 0
    assert summary["trials"] == 2 and summary["completed"] == 2
    # each epoch reached Tune as its own result: 2 steps per trial, the loss of each epoch
    assert summary["compute"] == {"unit": "trial-epochs", "spent": 4, "max_per_trial": 2, "full_length_trials": 2.0}
    for trial_id in summary_trials(out):
        ledger = yaml.safe_load((out / "trials" / trial_id / "result.json").read_text())
        assert [row["training_iteration"] for row in ledger["history"]] == [1, 2]
        metrics = yaml.safe_load(storage.read_bytes(parse_uri(str(out / "trials" / trial_id / "job" / "attempt-0"
                                                                   / "metrics.json"))))
        assert [row["loss"] for row in ledger["history"]] == pytest.approx([m["loss"] for m in metrics])
    best = ADAPTERS["pretrain"].load_job_config(summary["best_config_path"])
    assert best.lr == pytest.approx(summary["best_config"]["lr"]) and best.epochs == 2


def summary_trials(out):
    return sorted(p.name for p in (out / "trials").iterdir() if p.is_dir())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_msml_sweep_with_asha_on_validation_map(ray_cluster, phantom_uri, tmp_path):
    spec = tmp_path / "msml-tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "job": "msml", "fixed": {"data": phantom_uri, "epochs": 2, "image_size": 32, "channels": 1,
                                 "batch_size": 8, "fps": 4},
        "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}, "loss": {"choice": ["bce", "asymmetric"]}},
        "metric": "val_map", "trials": 2, "searcher": "random", "scheduler": "asha"}))
    out = tmp_path / "out"
    code, summary = run_cli(main, ["sweep", str(spec), "--out", str(out), "--json"])
    assert code == 0
    assert summary["trials"] == 2 and summary["errored"] == 0
    for trial_id in summary_trials(out):
        ledger = yaml.safe_load((out / "trials" / trial_id / "result.json").read_text())
        steps = [row["training_iteration"] for row in ledger["history"]]
        assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) <= 2
        assert all(0.0 <= row["val_map"] <= 1.0 for row in ledger["history"])
    if summary["completed"]:
        best = ADAPTERS["msml"].load_job_config(summary["best_config_path"])
        assert best.lr == pytest.approx(summary["best_config"]["lr"]) and best.epochs == 2
