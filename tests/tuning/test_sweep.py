"""`sonoray sweep` on real Ray: a TSAL sweep in embeddings mode, its best config back into
`sonoray simulate`, a killed driver resumed, and malformed SPECs refused before any trial."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from cluster.simulate import read_rounds
from cluster.storage import parse_uri
from jobs.cli import main
from tests.conftest import REPO_ROOT, run_cli
from tuning.adapters import ADAPTERS

TINY = {"strategies": "tsal", "seeds": 1, "initial": 0.1, "per_round": 0.1, "rounds": 3,
        "size": 32, "channels": 1, "fps": 0, "max_per_video": 8}


def write_spec(path: Path, data_uri: str, **overrides) -> Path:
    spec = {"job": "simulate", "name": path.stem, "fixed": {"data": data_uri, **TINY},
            "space": {"confidence": {"uniform": [0.6, 0.99]}}, "metric": "aulc", "trials": 3,
            "searcher": {"name": "tpe", "startup_trials": 2}, "seed": 0}
    spec.update(overrides)
    path.write_text(yaml.safe_dump(spec))
    return path


def area(x, y, lo, hi):
    """Trapezoids under the piecewise-linear curve through (x, y) from lo to hi, over hi - lo
    (flat after the last point: a pool labelled to the end stays where it is)."""
    points = [lo] + [v for v in x if lo < v < hi] + [hi]
    values = [float(np.interp(p, x, y)) for p in points]
    total = sum((points[i + 1] - points[i]) * (values[i + 1] + values[i]) / 2 for i in range(len(points) - 1))
    return total / (hi - lo)


@pytest.fixture(scope="module")
def tsal_sweep(ray_cluster, phantom_uri, storage, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    spec = write_spec(folder / "tsal-tiny.yaml", phantom_uri)
    out = "s3://sonoray-test/sweeps/tsal-tiny"
    code, summary = run_cli(main, ["sweep", str(spec), "--out", out, "--work-dir", str(folder / "work"), "--json"])
    assert code == 0
    return summary, out


@pytest.mark.timeout(900)
def test_tsal_sweep_writes_results_and_best_config(tsal_sweep, storage, tmp_path):
    summary, out = tsal_sweep
    assert summary["trials"] == 3
    assert summary["completed"] >= 1 and summary["completed"] + summary["stopped"] == 3
    table = storage.read_parquet(parse_uri(summary["results"])).to_pandas()
    assert len(table) == 3 and table["param.confidence"].between(0.6, 0.99).all()
    completed = table[table["status"] == "completed"]
    assert summary["best_metric"] == pytest.approx(completed["aulc"].max())
    best_row = completed.loc[completed["aulc"].idxmax()]
    assert summary["best_trial"] == best_row["trial_id"]
    assert summary["best_config"] == {"confidence": pytest.approx(best_row["param.confidence"])}
    # compute is counted in rounds: at most 3 per trial (budget 0.4 = 0.1 + 3 x 0.1)
    assert summary["compute"]["unit"] == "trial-rounds"
    assert summary["compute"]["spent"] == pytest.approx(table["rounds"].sum())
    assert table["rounds"].between(1, 3).all()

    # the reported AULC is the area under the trial's own mAP-vs-labelled-share curve on disk
    job = parse_uri(out).join("trials", best_row["trial_id"], "job")
    rounds = sorted(read_rounds(storage, job), key=lambda m: m["round"])
    assert [m["round"] for m in rounds] == list(range(int(best_row["rounds"]) + 1))
    assert rounds[-1]["fraction"] >= 0.4 or rounds[-1]["labelled"] == rounds[-1]["pool_size"]
    x = [m["fraction"] for m in rounds]
    y = [m["map"] for m in rounds]
    assert summary["best_metric"] == pytest.approx(area(x, y, x[0], 0.1 + 3 * 0.1), abs=1e-9)
    assert summary["best_metrics"]["map"] == pytest.approx(float(np.interp(0.4, x, y)))

    for uri in summary["plots"]:
        assert storage.read_bytes(parse_uri(uri))[:8] == b"\x89PNG\r\n\x1a\n"
    # the Optuna study (SQLite, copied next to the results) holds the same trials
    local = tmp_path / "optuna.db"
    local.write_bytes(storage.read_bytes(parse_uri(out).join("optuna.db")))
    study = optuna.load_study(study_name="tsal-tiny", storage=f"sqlite:///{local}")
    assert sorted(t.params["confidence"] for t in study.trials) == pytest.approx(sorted(table["param.confidence"]))
    states = {t.user_attrs["tune_trial_id"]: t.state.name for t in study.trials}
    assert states == {r.trial_id: ("COMPLETE" if r.status == "completed" else "PRUNED") for r in table.itertuples()}


@pytest.mark.timeout(900)
def test_best_config_round_trips_into_simulate(tsal_sweep, storage):
    summary, out = tsal_sweep
    best_uri = summary["best_config_path"]
    assert best_uri == f"{out}/results/best_config.yaml"
    text = storage.read_bytes(parse_uri(best_uri)).decode()
    assert "sonoray simulate --data" in text  # the command that uses it, as a comment
    config = ADAPTERS["simulate"].load_job_config(best_uri)  # simulate's own --config path
    assert config.confidence == pytest.approx(summary["best_config"]["confidence"])
    assert config.strategies == ("tsal",)
    assert (config.seeds, config.initial, config.per_round, config.rounds) == (1, 0.1, 0.1, 3)
    assert config.mode == "embeddings"


def _trial_state(out: Path) -> tuple[set[str], dict[str, int]]:
    finished = {p.parent.name for p in out.glob("trials/*/result.json")}
    starts = {p.name: len(list((p / "starts").glob("*.json"))) for p in out.glob("trials/*") if p.is_dir()}
    return finished, starts


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_driver_resumes_without_rerunning_finished_trials(ray_cluster, phantom_uri, tmp_path):
    spec = write_spec(tmp_path / "tsal-resume.yaml", phantom_uri, trials=4, scheduler="none")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # keeps the S3 server's variables
    env["PYTHONPATH"] = str(REPO_ROOT)
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "sweep", str(spec), "--out", str(out), "--concurrency", "1",
         "--num-cpus", "2"],
        cwd=REPO_ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not _trial_state(out)[0]:
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no trial finished within 10 minutes"
            time.sleep(0.5)
        time.sleep(5)  # Tune saves its state every 2 s
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, nothing else
        driver.wait(timeout=60)
        for _ in range(20):
            left = _group_members(driver.pid)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):  # it may exit between the listing and the kill
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
    finished_before, starts_before = _trial_state(out)
    assert 1 <= len(finished_before) < 4

    code, summary = run_cli(main, ["sweep", str(spec), "--out", str(out), "--resume", "--json"])
    assert code == 0
    finished_after, starts_after = _trial_state(out)
    assert summary["trials"] == 4 and summary["completed"] == 4
    assert len(finished_after) == 4 and finished_before <= finished_after
    for trial_id in finished_before:
        assert starts_after[trial_id] == 1, f"finished trial {trial_id} ran again"
    # at most the one trial that was running at the kill starts twice (concurrency 1)
    assert sum(starts_after.values()) <= 5
    study = optuna.load_study(study_name="tsal-resume", storage=f"sqlite:///{out / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["tune_trial_id"] for t in complete) == sorted(finished_after)
    table = pd.read_parquet(summary["results"])
    assert sorted(table["trial_id"]) == sorted(finished_after)


@pytest.mark.parametrize("change, message", [
    ({"trails": 3}, "trails: unknown key (did you mean 'trials'?); valid: job, name, fixed, space"),
    ({"space": {"confidence": {"uniform": [0.9, 0.9]}}}, "space.confidence.uniform: empty range [0.9, 0.9]"),
    ({"job": "simulation"}, "job: unknown job 'simulation' (did you mean 'simulate'?); valid: "),
    ({"metric": "accuracy"}, "metric: 'accuracy' is not a metric of job 'simulate'; valid: aulc, map, macro_f1"),
    ({"space": {"confidence": {"uniform": [0.6, 1.5]}}}, "space.confidence: value 1.5 is refused by simulate"),
])
def test_malformed_spec_fails_before_any_trial(tmp_path, capsys, change, message):
    spec = write_spec(tmp_path / "bad.yaml", "s3://sonoray-test/phantom", **change)
    out = tmp_path / "out"
    code, _ = run_cli(main, ["sweep", str(spec), "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert message in error
    assert not out.exists()  # nothing ran, nothing was written


def test_ready_made_specs_parse_with_their_data():
    from jobs.sweep import SPECS_DIR, load_sweep_spec

    specs = sorted(SPECS_DIR.glob("*.yaml"))
    assert {p.stem for p in specs} >= {"tsal"}
    for path in specs:
        spec = load_sweep_spec(path, data="s3://bucket/data")
        assert spec.fixed["data"] == "s3://bucket/data"


@pytest.mark.timeout(900)
def test_grid_two_metrics_sweep_of_a_known_objective(ray_cluster, tmp_path):
    """Grid searcher through Tune, two metrics (Optuna multi-objective), Pareto front by hand."""
    from tests.tuning.toy_job import ToyJob, toy_score
    from tuning.spec import parse_spec
    from tuning.sweep import run_sweep

    toy = ToyJob()
    spec = parse_spec({"job": "toy", "name": "grid-mo", "fixed": {"steps": 2},
                       "space": {"x": {"uniform": [0.0, 0.6], "grid": 3}, "kind": {"choice": ["a", "b"]}},
                       "metric": ["score", "cost"], "searcher": "grid", "trials": 10}, adapters={"toy": toy})
    summary = run_sweep(spec, str(tmp_path / "out"), adapter=toy).summary
    assert summary["trials"] == 6 and summary["completed"] == 6  # the grid has 6 points, fewer than 10
    table = pd.read_parquet(summary["results"])
    assert sorted(zip(table["param.x"], table["param.kind"])) == sorted(
        (x, k) for x in (0.0, 0.3, 0.6) for k in ("a", "b"))
    for _, row in table.iterrows():
        assert row["score"] == pytest.approx(toy_score(row["param.x"], row["param.kind"], 2))
    # by hand: kind b only loses 0.1; cost = x; score peaks at x = 0.3
    # (x, kind) -> (score, cost): (0, a) (-0.07, 0) (0.3, a) (0.02, 0.3) (0.6, a) (-0.07, 0.6) ...
    assert summary["best_config"] == {"x": 0.3, "kind": "a"}
    assert sorted((p["params"]["x"], p["params"]["kind"]) for p in summary["pareto"]) == [(0.0, "a"), (0.3, "a")]
    study = optuna.load_study(study_name="grid-mo", storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
    assert len(study.directions) == 2 and len(study.trials) == 6
