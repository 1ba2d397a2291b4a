"""Every job reads its settings one way: defaults <- --config YAML <- --set KEY=VALUE <- flags."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cluster.job_config import ConfigError, layered, parse_set_items, read_config_file
from cluster.storage import Storage
from jobs.cli import build_parser
from jobs.output import UserError

REPO = Path(__file__).resolve().parents[2]
FINDINGS = ["a_lines", "b_lines"]


def args_of(*argv: str):
    return build_parser().parse_args(list(argv))


def pretrain_config(*extra: str):
    from jobs.pretrain import resolve_config

    return resolve_config(args_of("pretrain", "--data", "d", "--out", "o", *extra))


def msml_config(*extra: str):
    from jobs.msml import resolve_config

    args = args_of("msml", "--data", "d", "--out", "o", *extra)
    try:
        values = layered(args.config, args.set_items, {})
    except ConfigError as err:
        raise UserError(str(err)) from err
    return resolve_config(FINDINGS, values, {"epochs": args.epochs})


def simulate_config(*extra: str):
    from jobs.simulate import config_from_args

    return config_from_args(args_of("simulate", "--data", "d", "--out", "o", *extra), Storage())


def flag_config(*argv: str):
    """The jobs whose settings are their flags: --config / --set keys are the flag names."""
    from jobs.common import apply_flag_config

    def resolve(*extra: str):
        args = args_of(*argv, *extra)
        apply_flag_config(args)
        return args
    return resolve


JOBS = {"pretrain": (pretrain_config, "lr"), "msml": (msml_config, "lr"), "simulate": (simulate_config, "head_l2"),
        "evaluate": (flag_config("evaluate", "--data", "d", "--checkpoint", "random"), "lr"),
        "predict": (flag_config("predict", "--model", "m", "--data", "d", "--out", "o"), "fps"),
        "query": (flag_config("query", "--data", "d", "--labelled", "l.csv", "--budget", "3", "--out", "o"), "fps")}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_yaml_number_written_as_text_works_for_every_job(job, tmp_path):
    resolve, key = JOBS[job]
    path = tmp_path / "config.yaml"
    path.write_text(f"{key}: 3e-4\n")  # PyYAML reads 3e-4 as the string "3e-4"
    assert getattr(resolve("--config", str(path)), key) == pytest.approx(3e-4)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_set_overrides_the_file_and_flags_override_set(job, tmp_path):
    resolve, key = JOBS[job]
    path = tmp_path / "config.yaml"
    path.write_text(f"{key}: 0.5\n")
    assert getattr(resolve("--config", str(path), "--set", f"{key}=0.25"), key) == pytest.approx(0.25)
    if job == "pretrain":
        assert resolve("--set", "epochs=3", "--epochs", "4").epochs == 4  # the flag comes last
    if job == "evaluate":
        assert resolve("--set", "folds=3", "--folds", "4").folds == 4
        assert resolve("--set", "max-per-video=7").max_per_video == 7  # a flag's own spelling works too


@pytest.mark.parametrize("job", sorted(JOBS))
def test_an_unknown_set_key_names_the_valid_ones_with_a_hint(job):
    resolve, key = JOBS[job]
    with pytest.raises(UserError) as err:
        resolve("--set", f"{key}x=1")
    text = str(err.value)
    assert f"'{key}x'" in text and f"did you mean '{key}'" in text and "valid keys" in text
    assert "\n" not in text


def test_config_errors_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_config_file(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML") as err:
        read_config_file(str(bad))
    assert "\n" not in str(err.value)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        read_config_file(str(bad))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set_items(["lr"])
    assert parse_set_items(["lr=3e-4", "epochs=5", "pairs=image"]) == {"lr": "3e-4", "epochs": 5, "pairs": "image"}


LAYERS = ("jobs", "tuning", "cluster", "ultrasound")


def test_imports_run_one_way_jobs_tuning_cluster_ultrasound():
    """A module may import its own layer and the ones after it: tuning/ nothing from jobs/,
    cluster/ nothing from tuning/ or jobs/, ultrasound/ (the science) nothing of the others."""
    offenders = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((REPO / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(REPO)}: {name}" for name in names
                              if name.split(".")[0] in LAYERS[:rank]]
    assert offenders == []


@pytest.mark.parametrize("job, item, message", [
    ("predict", "fps=abc", "predict config key 'fps' needs a float, got 'abc'"),
    ("predict", "gpu=maybe", "predict config key 'gpu' needs a bool, got 'maybe'"),
    ("query", "seed=2.5", "query config key 'seed' needs an int, got 2.5"),
    ("evaluate", "mode=bogus", "evaluation config key 'mode': expected one of ['linear', 'finetune'], got 'bogus'"),
])
def test_flag_jobs_check_values_through_their_settings_model(job, item, message):
    """evaluate, predict and query have a typed settings model built from their flags (the
    same Settings base as pretrain's, msml's and simulate's): a bad value is one line."""
    with pytest.raises(UserError) as err:
        JOBS[job][0]("--set", item)
    assert str(err.value) == message


def test_a_switch_and_a_list_set_from_a_file(tmp_path):
    path = tmp_path / "evaluate.yaml"
    path.write_text("gpu: true\nfolds: '3'\nmode: finetune\n")
    args = JOBS["evaluate"][0]("--config", str(path))
    assert args.gpu is True and args.folds == 3 and args.mode == "finetune"
