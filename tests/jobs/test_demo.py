"""`sonoray demo` end to end, as the README's first command runs it: the console script in a
fresh process with its own loopback S3 server and local Ray, every stage, the printed table and
the JSON summary."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.demo import STAGES


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_runs_every_stage_and_prints_its_table(tmp_path):
    script = shutil.which("sonoray", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "jobs.cli"]
    # a newcomer's shell: no Ray cluster or S3 endpoint of this test session
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    done = subprocess.run([*command, "demo", "--out", str(tmp_path / "demo"), "--json"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=1440)
    assert done.returncode == 0, done.stderr[-4000:]
    table = done.stderr[done.stderr.index("sonoray demo: results"):]  # with --json, humans read stderr
    for row in ("ingest", "frames", "pretrain", "evaluate", "msml", "simulate", "sweep", "predict", "query", "total"):
        assert f"  {row}" in table, row
    summary = json.loads(done.stdout)  # and stdout is the one JSON object, whole
    stages = summary["stages"]
    assert list(stages) == list(STAGES)
    assert summary["ingest"]["ingested"] == 24
    assert stages["frames"]["videos"] == 24 and stages["frames"]["failed"] == []
    pretrain = stages["pretrain"]["pretrain"]
    assert pretrain["loss_last"] < pretrain["loss_first"]
    assert 0 <= stages["pretrain"]["uscl"]["accuracy"] <= 1
    msml = stages["msml"]
    assert msml["loss"][-1] < msml["loss"][0] and 0 < msml["map"] <= 1
    predicted = stages["predict"]
    assert predicted["videos"] == 8 and Path(predicted["files"]["videos.csv"]).is_file()
    assert len(predicted["files"]["gradcam"]) == 3 and all(Path(p).is_file() for p in predicted["files"]["gradcam"])
    query = stages["query"]
    assert len(query["next"]) == 4 == len(set(query["next"])) and Path(query["out"]).is_file()
    assert Path(stages["simulate"]["report"]).is_file()
    assert set(stages["simulate"]["strategies"]) >= {"tsal", "random"}
    sweep = stages["sweep"]
    assert sweep["completed"] >= 1 and sweep["best_config"] and Path(sweep["best_config_path"]).is_file()
    assert "best" in table.split("  sweep", 1)[1].splitlines()[0]
