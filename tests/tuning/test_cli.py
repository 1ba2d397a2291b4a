"""`sonoray sweep` flags that act before Ray starts: ready-made SPEC names, --data, --set."""
from __future__ import annotations

import pytest

from jobs.cli import main
from jobs.output import UserError
from cluster.job_config import ConfigError
from jobs.sweep import SPECS_DIR, load_sweep_spec, resolve_spec_path
from tests.conftest import run_cli


def test_ready_made_spec_by_name_with_data_and_overrides():
    path = resolve_spec_path("tsal")
    assert path == SPECS_DIR / "tsal.yaml"
    spec = load_sweep_spec(path, "s3://b/pocus", ["size=32", "labels=[B-lines, A-lines]", "seeds=1"])
    assert spec.fixed["data"] == "s3://b/pocus"
    assert spec.fixed["size"] == 32 and spec.fixed["seeds"] == 1
    assert spec.fixed["labels"] == ["B-lines", "A-lines"]
    assert spec.fixed["budget"] == 0.30  # the SPEC's own values stay


def test_bad_flags_fail_with_a_message(tmp_path, capsys):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_sweep_spec(resolve_spec_path("tsal"), None, ["size"])
    with pytest.raises(UserError, match="ready-made SPEC: msml, tsal, uscl"):
        resolve_spec_path("nope")
    code, _ = run_cli(main, ["sweep", "tsal", "--out", str(tmp_path / "o")])  # no --data
    assert code == 2
    assert "fixed.data: required" in capsys.readouterr().err
    code, _ = run_cli(main, ["sweep", "tsal", "--data", "s3://b/d", "--set", "sizee=3", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "fixed.sizee: unknown argument of job 'simulate' (did you mean 'size'?)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_study_database_comes_from_the_environment_when_no_flag(monkeypatch):
    from jobs.cli import build_parser

    monkeypatch.setenv("SONORAY_OPTUNA_STORAGE", "postgresql://sweeper@db.internal/optuna")
    args = build_parser().parse_args(["sweep", "tsal"])
    assert args.storage == "postgresql://sweeper@db.internal/optuna"
    args = build_parser().parse_args(["sweep", "tsal", "--storage", "sqlite:///x.db"])
    assert args.storage == "sqlite:///x.db"  # the flag wins
    monkeypatch.delenv("SONORAY_OPTUNA_STORAGE")
    assert build_parser().parse_args(["sweep", "tsal"]).storage is None
