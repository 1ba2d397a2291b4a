"""The driver's side of a tracked run (``TrackedRun``): one MLflow client for every metric it
logs, the run closed FINISHED with its files, or FAILED when the block raises."""
from __future__ import annotations

import pytest

from cluster import tracking
from cluster.tracking import TrackedRun, TrackerSpec


def test_driver_metrics_go_through_one_client_and_the_run_ends_with_its_status(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    opened = []
    real = tracking.Tracker

    class Counting(real):
        def __init__(self, spec):
            opened.append(spec.run_id)
            super().__init__(spec)

    monkeypatch.setattr(tracking, "Tracker", Counting)
    uri = f"file:{tmp_path / 'mlruns'}"
    report = tmp_path / "report.md"
    report.write_text("table\n")
    with TrackedRun(TrackerSpec("mlflow", uri, "simulate"), {"seeds": 3}) as run:
        for step, name in enumerate(("tsal", "random", "mlm")):
            run.log({f"{name}.aulc": 0.5 + step / 10, f"{name}.label": "not a number"}, step)
        run.attach_paths([str(report), "s3://bucket/remote.png"])
    assert opened == [run.spec.run_id] * 2  # start_run's, then the one driver client: not one per log
    client = MlflowClient(tracking_uri=uri)
    finished = client.get_run(run.spec.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.metrics == {"tsal.aulc": 0.5, "random.aulc": 0.6, "mlm.aulc": 0.7}
    assert finished.data.params == {"seeds": "3"}
    assert [a.path for a in client.list_artifacts(run.spec.run_id)] == ["report.md"]

    with pytest.raises(RuntimeError):
        with TrackedRun(TrackerSpec("mlflow", uri, "simulate"), {}) as failed:
            failed.log({"x": 1.0})
            raise RuntimeError("boom")
    assert client.get_run(failed.spec.run_id).info.status == "FAILED"
