"""Experiment tracking: a run's parameters, per-epoch metrics and final files in MLflow or
TensorBoard, the trackers researchers already compare runs in.

``--tracker mlflow --tracking-uri URI`` (default ``./mlruns``, a local MLflow file store) or
``--tracker tensorboard --tracking-uri DIR`` (default ``./tensorboard``). The driver opens the run
and logs the parameters (:func:`start_run`); Ray Train's rank 0 logs every epoch's metrics as it
reports them (:func:`worker_tracker`, used by :func:`cluster.train.report_epoch`); the driver logs
the final files and closes the run (:func:`finish_run`). Ray Tune sweeps use Tune's own logger
callbacks (:func:`tune_callbacks`). Only numbers are logged as metrics; nothing secret is logged
(parameters are the method's settings, never the storage credentials).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRACKERS = ("mlflow", "tensorboard")
DEFAULT_URIS = {"mlflow": "./mlruns", "tensorboard": "./tensorboard"}


class TrackingError(ValueError):
    """A tracker that cannot be used (not installed, bad URI); the message says what to do."""


@dataclass(frozen=True)
class TrackerSpec:
    """Which tracker, where, and (once started) which run.

    Attributes:
        kind: ``"mlflow"`` or ``"tensorboard"``.
        uri: MLflow tracking URI, or the TensorBoard log folder (local).
        experiment: MLflow experiment / TensorBoard sub-folder (the job's name).
        run_name: the run's display name.
        run_id: MLflow's run id, or the run's TensorBoard folder, once :func:`start_run` ran.
    """

    kind: str
    uri: str
    experiment: str = "sonoray"
    run_name: str | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TRACKERS:
            raise TrackingError(f"--tracker: unknown tracker {self.kind!r}; valid: {', '.join(TRACKERS)}")

    @classmethod
    def of(cls, kind: str | None, uri: str | None, experiment: str, run_name: str | None = None) -> "TrackerSpec | None":
        """The spec of the ``--tracker`` / ``--tracking-uri`` flags, or None without ``--tracker``."""
        if kind is None:
            if uri is not None:
                raise TrackingError("--tracking-uri needs --tracker mlflow|tensorboard")
            return None
        spec = cls(kind, uri or DEFAULT_URIS.get(kind, ""), experiment, run_name)
        if kind == "mlflow":
            _mlflow()  # fails early, with the install hint
            if "://" not in spec.uri:  # a bare folder: a local file store
                spec = dataclasses.replace(spec, uri=Path(spec.uri).resolve().as_uri())
        else:
            _summary_writer()
            if "://" in spec.uri:
                raise TrackingError(f"--tracking-uri {spec.uri}: TensorBoard logs go to a local folder")
            spec = dataclasses.replace(spec, uri=str(Path(spec.uri).resolve()))
        return spec

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _mlflow(uri: str | None = None):
    if uri is not None and uri.startswith("file:"):
        # MLflow 3 keeps the file store in "maintenance mode" behind this switch; a local folder is
        # the store that needs no server and no database, so sonoray opts in for file: URIs only
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("--tracker mlflow: MLflow is not installed (pip install mlflow-skinny)") from None
    return MlflowClient


def _summary_writer():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise TrackingError("--tracker tensorboard: tensorboardX is not installed (pip install tensorboardX)") from None
    return SummaryWriter


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` (booleans and text left out)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[str(key)] = float(value)
    return out


def _flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_params(value, f"{name}."))
        else:
            out[name] = str(list(value) if isinstance(value, tuple) else value)[:500]
    return out


class Tracker:
    """One open run: ``params``, ``metrics(step)``, ``files``, ``close``."""

    def __init__(self, spec: TrackerSpec) -> None:
        self.spec = spec
        if spec.kind == "mlflow":
            self.client = _mlflow(spec.uri)(tracking_uri=spec.uri)
        else:
            self.writer = _summary_writer()(logdir=spec.run_id)

    def params(self, params: Mapping[str, Any]) -> None:
        flat = _flat_params(params)
        if self.spec.kind == "mlflow":
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in sorted(flat.items())]
            for start in range(0, len(items), 100):
                self.client.log_batch(self.spec.run_id, params=items[start:start + 100])
        else:
            self.writer.add_text("params", "\n".join(f"    {k}: {v}" for k, v in sorted(flat.items())), 0)
            self.writer.flush()

    def metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        values = numeric(metrics)
        if self.spec.kind == "mlflow":
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.spec.run_id, metrics=[Metric(k, v, now, int(step)) for k, v in values.items()])
        else:
            for key, value in values.items():
                self.writer.add_scalar(key, value, int(step))
            self.writer.flush()

    def files(self, paths: list[str]) -> None:
        """Attach local files (the final model, metrics, report) to the run."""
        for path in paths:
            if not os.path.isfile(path):
                continue
            if self.spec.kind == "mlflow":
                self.client.log_artifact(self.spec.run_id, path)
            else:
                self.writer.add_text("files", path, 0)

    def close(self, status: str = "FINISHED") -> None:
        """End the run (MLflow: its status; TensorBoard: the event file)."""
        if self.spec.kind == "mlflow":
            self.client.set_terminated(self.spec.run_id, status)
        else:
            self.writer.close()

    def release(self) -> None:
        """Let go of this process's handle, the run staying open (other processes log to it)."""
        if self.spec.kind != "mlflow":
            self.writer.close()


def start_run(spec: TrackerSpec, params: Mapping[str, Any]) -> TrackerSpec:
    """Open the run (driver side) and log ``params``; returns the spec with its ``run_id``."""
    name = spec.run_name or time.strftime("%Y%m%d-%H%M%S")
    if spec.kind == "mlflow":
        client = _mlflow(spec.uri)(tracking_uri=spec.uri)
        found = client.get_experiment_by_name(spec.experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(spec.experiment)
        run = client.create_run(experiment_id, run_name=name, tags={"sonoray.job": spec.experiment})
        started = dataclasses.replace(spec, run_name=name, run_id=run.info.run_id)
    else:
        folder = Path(spec.uri, spec.experiment, name)
        folder.mkdir(parents=True, exist_ok=True)
        started = dataclasses.replace(spec, run_name=name, run_id=str(folder))
    tracker = Tracker(started)
    tracker.params(params)
    tracker.release()
    return started


def finish_run(spec: TrackerSpec, files: list[str] = (), status: str = "FINISHED") -> None:
    """Attach the final local ``files`` and close the run (driver side)."""
    tracker = Tracker(spec)
    tracker.files(list(files))
    tracker.close(status)


class TrackedRun:
    """The driver's side of a tracked training run, as a context manager::

        with TrackedRun(spec_or_None, params) as run:
            result = fit(..., tracking=run.spec)
            ...                      # write the final files
            run.attach(final_files)  # a cluster.completion.FinalFiles

    Opens the run on entry (nothing without a spec), closes it FINISHED with the attached local
    files, or FAILED when the block raises."""

    def __init__(self, spec: TrackerSpec | None, params: Mapping[str, Any]) -> None:
        self.requested, self.params = spec, params
        self.spec: TrackerSpec | None = None
        self.paths: list[str] = []
        self.tracker: Tracker | None = None  # the driver's one client, opened by the first log

    def __enter__(self) -> "TrackedRun":
        if self.requested is not None:
            self.spec = start_run(self.requested, self.params)
        return self

    def log(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Metrics from the driver (e.g. a simulation's per-strategy results)."""
        if self.spec is not None:
            self.tracker = self.tracker or Tracker(self.spec)
            self.tracker.metrics(metrics, step)

    def attach_paths(self, paths: list[str]) -> None:
        self.paths += [p for p in paths if "://" not in p]

    def attach(self, files) -> None:
        """The final files of ``files`` (FinalFiles) that are local, to upload with the run."""
        if not files.out.is_s3:
            self.paths += [str(Path(files.out.key, name)) for name in files.files]

    def __exit__(self, kind, error, trace) -> None:
        if self.spec is None:
            return
        status = "FAILED" if kind is not None else "FINISHED"
        if self.tracker is None:
            finish_run(self.spec, self.paths, status)
        else:
            self.tracker.files(list(self.paths))
            self.tracker.close(status)


_WORKER: dict[str, Tracker | None] = {"tracker": None}


def worker_tracker(config: Mapping[str, Any] | None, rank: int) -> None:
    """Inside a Ray Train worker: rank 0 opens the driver's run (``config`` is
    ``TrackerSpec.as_dict()`` or None) for :func:`log_epoch`."""
    _WORKER["tracker"] = Tracker(TrackerSpec(**config)) if config and rank == 0 else None


def log_epoch(metrics: Mapping[str, Any]) -> None:
    """Rank 0's epoch metrics to the open run (a no-op without ``--tracker``); the step is the
    epoch. A tracker that fails is reported once and switched off: it must not stop training."""
    tracker = _WORKER["tracker"]
    if tracker is None:
        return
    try:
        tracker.metrics(metrics, step=int(metrics.get("epoch", 0)))
    except Exception as err:  # noqa: BLE001 - the tracker is an observer of the run
        import sys

        print(f"sonoray: tracker {tracker.spec.kind} failed ({type(err).__name__}: {err}); "
              f"training goes on without it", file=sys.stderr)
        _WORKER["tracker"] = None


def tune_callbacks(spec: TrackerSpec | None) -> list:
    """Ray Tune's own logger callback for ``spec`` (one tracked run per trial), or none."""
    if spec is None:
        return []
    if spec.kind == "mlflow":
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        return [MLflowLoggerCallback(tracking_uri=spec.uri, experiment_name=spec.experiment, save_artifact=False)]
    from ray.tune.logger import TBXLoggerCallback

    return [TBXLoggerCallback()]
