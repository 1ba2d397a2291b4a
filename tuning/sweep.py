"""The sweep driver: a SPEC -> Ray Tune trials (Optuna searcher, ASHA) -> results under --out.

Layout under ``--out`` (a local path or ``s3://bucket/prefix``)::

    sweep.json            what the sweep is (resolved SPEC, budget, study) - resume reads it
    optuna.db             the Optuna study (SQLite), unless --storage names another database
    tune/<name>/          Ray Tune's experiment state (Tuner.restore reads it)
    trials/<trial_id>/    per trial: starts/ (one marker per start of the job), job/ (the job's
                          own output), result.json (written when the trial finishes)
    results/              trials.parquet/.csv, best_config.yaml, PNGs, summary.json

With an ``s3://`` --out, SQLite cannot live in the bucket: the study is kept in a local working
directory (``--work-dir``, default ``$SONORAY_SWEEP_WORKDIR`` or
``~/.cache/sonoray/sweeps/<bucket>/<prefix>``) and copied to ``<out>/optuna.db`` after every
finished trial; a resume on another machine starts from that copy. Tune's state and every
trial's output go to the bucket directly.

Trials are Tune *function trainables* (:func:`trial_function`): one call runs one job through
its adapter and reports after every epoch / round. Jobs that are Ray Train runs launch their own
TorchTrainer inside the function (the pattern Ray documents for Train V2 under Tune), so a trial
holds little itself and its workers hold the rest; the driver counts both when it derives how
many trials fit at once.

Resume: ``Tuner.restore`` continues the Tune experiment (finished trials are not run again,
unfinished ones restart and their job resumes its own output), and the Optuna searcher is
re-attached to its storage. A trial that finished but whose completion had not yet reached
Tune's saved state when the driver died is recognised by its ``result.json`` and replays its
reported metrics instead of running again.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from cluster.redact import redact, redact_mapping
from cluster.storage import Location, Storage, StorageConfig, parse_uri
from cluster.tracking import TrackerSpec, tune_callbacks
from tuning import searchers
from tuning.adapters import ADAPTERS, JobAdapter
from tuning.results import records_from_results, study_order, summary_dict, write_results, write_summary
from tuning.spec import SweepSpec, TrialResources

MANIFEST = "sweep.json"
EXPERIMENT = "tune"
STUDY_FILE = "optuna.db"
# Tune saves its experiment state at most this often (seconds); short, so that a killed driver
# loses at most this much bookkeeping. Override with TUNE_GLOBAL_CHECKPOINT_S.
STATE_PERIOD_S = "2"

Progress = Callable[[str], None]


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says why and what to do."""


def _stderr_progress(message: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SweepLayout:
    """Where a sweep keeps things (see the module docstring)."""

    out: Location
    work: Path  # local: the SQLite study (and nothing else) when --out is on S3

    @property
    def manifest(self) -> Location:
        return self.out.join(MANIFEST)

    @property
    def tune_root(self) -> Location:
        return self.out.join(EXPERIMENT)

    def trial(self, trial_id: str) -> Location:
        return self.out.join("trials", trial_id)

    @property
    def local_study(self) -> Path:
        return self.work / STUDY_FILE

    @property
    def default_storage_url(self) -> str:
        return f"sqlite:///{self.local_study}"


def make_layout(out_uri: str, work_dir: str | None = None) -> SweepLayout:
    out = parse_uri(out_uri)
    if not out.is_s3:
        return SweepLayout(out, Path(out.key))
    if work_dir:
        work = Path(work_dir).expanduser().resolve()
    elif os.environ.get("SONORAY_SWEEP_WORKDIR"):
        work = Path(os.environ["SONORAY_SWEEP_WORKDIR"]).expanduser().resolve()
    else:
        work = Path.home() / ".cache" / "sonoray" / "sweeps" / out.bucket / (out.key or "_")
    return SweepLayout(out, work)


@dataclass(frozen=True)
class TrialContext:
    """What every trial function receives besides its sampled parameters."""

    adapter: JobAdapter
    fixed: dict[str, Any]
    out_uri: str
    storage_config: StorageConfig


@dataclass(frozen=True)
class SweepOutcome:
    summary: dict[str, Any]
    resumed: bool
    layout: SweepLayout


# -- inside a trial (a Ray Tune function trainable) ---------------------------------------
def trial_function(config: dict, context: TrialContext) -> None:
    """Run one trial: the job with fixed + sampled parameters, reporting every epoch/round."""
    trial_id = tune.get_context().get_trial_id()
    storage = Storage(context.storage_config)
    trial_dir = parse_uri(context.out_uri).join("trials", trial_id)
    ledger = trial_dir.join("result.json")
    if storage.exists(ledger):
        finished = json.loads(storage.read_bytes(ledger))
        if finished.get("status") in ("completed", "stopped") and finished.get("history"):
            for row in finished["history"]:  # finished before the driver died: no second run
                tune.report({k: v for k, v in row.items() if v is not None and k != "training_iteration"})
            return
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    storage.write_bytes(trial_dir.join("starts", f"{stamp}.json"),
                        json.dumps({"trial_id": trial_id, "config": config}, default=str).encode())
    context.adapter.run_trial({**context.fixed, **config}, trial_dir.join("job").uri, _report, storage)


def _report(metrics: Mapping[str, float]) -> None:
    tune.report({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


# -- in the driver ----------------------------------------------------------------------
class TrialLedger(tune.Callback):
    """Driver-side record of every finished trial (``trials/<id>/result.json``), progress
    lines, and the copy of a local study to an S3 --out."""

    def __init__(self, out_uri: str, storage_config: StorageConfig, metric: str, mode: str, max_steps: int,
                 metric_names: tuple[str, ...], step_name: str, total: int, study_copy: tuple[str, str] | None,
                 progress: Progress = _stderr_progress) -> None:
        self.out_uri = out_uri
        self.storage_config = storage_config
        self.metric = metric
        self.mode = mode
        self.max_steps = max_steps
        self.metric_names = metric_names
        self.step_name = step_name
        self.total = total
        self.study_copy = study_copy
        self.progress = progress
        self.history: dict[str, list[dict]] = {}
        self.finished = 0
        self.best: float | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = {k: result[k] for k in (*self.metric_names, "training_iteration") if k in result}
        self.history.setdefault(trial.trial_id, []).append(row)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, "completed")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "error")

    def _finish(self, trial, outcome: str) -> None:
        last = dict(trial.last_result or {})
        steps = int(last.get("training_iteration") or 0)
        status = "error" if outcome == "error" else ("completed" if steps >= self.max_steps else "stopped")
        history = self.history.pop(trial.trial_id, [])
        if len(history) != steps:  # restarted after a resume: the history restarts too
            history = history[-steps:] if steps else []
        storage = Storage(self.storage_config)
        record = {"trial_id": trial.trial_id, "status": status, "steps": steps, "config": trial.config,
                  "metrics": {k: last[k] for k in self.metric_names if k in last},
                  "history": history if len(history) == steps else []}
        storage.write_bytes(parse_uri(self.out_uri).join("trials", trial.trial_id, "result.json"),
                            json.dumps(record, default=str).encode())
        self.finished += 1
        value = last.get(self.metric)
        if status == "completed" and isinstance(value, (int, float)):
            if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
                self.best = float(value)
        shown = f"{self.metric}={value:.4g}" if isinstance(value, (int, float)) else "no metric"
        best = f", best {self.best:.4g}" if self.best is not None else ""
        self.progress(f"trial {trial.trial_id} {status} after {steps} {self.step_name}(s): {shown}{best} "
                      f"[{self.finished} finished this run, budget {self.total}]")
        if self.study_copy:
            source, target = self.study_copy
            storage.write_bytes(parse_uri(target), Path(source).read_bytes())

    def get_state(self) -> dict:
        return {"best": self.best}

    def set_state(self, state: dict) -> None:
        self.best = state.get("best")


def derive_concurrency(per_trial: TrialResources, beside: TrialResources, cluster: Mapping[str, float], trials: int) -> int:
    """How many trials fit at once: the cluster's CPUs (GPUs) over what one trial and the
    workers it starts hold together; at least 1, at most the budget."""
    fits = []
    cpu = per_trial.cpu + beside.cpu
    gpu = per_trial.gpu + beside.gpu
    if cpu > 0:
        fits.append(math.floor(float(cluster.get("CPU", 0)) / cpu + 1e-9))
    if gpu > 0:
        fits.append(math.floor(float(cluster.get("GPU", 0)) / gpu + 1e-9))
    return max(1, min([trials, *fits]))


def _load_manifest(storage: Storage, layout: SweepLayout) -> dict | None:
    if not storage.exists(layout.manifest):
        return None
    return json.loads(storage.read_bytes(layout.manifest))


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            diff = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if diff:
                return diff
        return None
    return None if a == b else (path or "(root)")


def run_sweep(
    spec: SweepSpec,
    out_uri: str,
    *,
    trials: int | None = None,
    concurrency: int | None = None,
    resume: bool = False,
    storage_url: str | None = None,
    work_dir: str | None = None,
    storage: Storage | None = None,
    adapter: JobAdapter | None = None,
    progress: Progress = _stderr_progress,
    tracker: TrackerSpec | None = None,
) -> SweepOutcome:
    """Run (or with ``resume`` continue) the sweep of ``spec``; Ray must be connected.

    Returns the summary (:func:`tuning.results.summary_dict`) with the results written under
    ``out_uri``. Raises :class:`SweepError` for an --out that already holds another sweep, a
    resume with nothing to resume, or a SPEC that differs from the one being resumed.
    """
    storage = storage or Storage()
    adapter = adapter or ADAPTERS[spec.job]
    layout = make_layout(out_uri, work_dir)
    storage.check(layout.out, create_bucket=True)
    manifest = _load_manifest(storage, layout)
    if manifest and not resume:
        raise SweepError(f"{layout.out.uri} already holds sweep {manifest['spec']['name']!r}: pass --resume "
                         f"to continue it, or choose another --out")
    if resume and not manifest:
        raise SweepError(f"--resume: no sweep under {layout.out.uri} (no {MANIFEST})")

    if manifest:
        diff = _first_difference(manifest["spec"], _plain(spec.to_dict()))
        if diff:
            raise SweepError(f"--resume: the SPEC differs from the one the sweep under {layout.out.uri} started "
                             f"with, at key {diff!r}; resume with the same SPEC")
        if trials is not None and trials != manifest["trials"]:
            raise SweepError(f"--resume: --trials {trials} differs from the sweep's budget {manifest['trials']}; "
                             f"a resumed sweep keeps its budget")
        budget = int(manifest["trials"])
        saved_url = manifest.get("storage_url")
        if storage_url is None and saved_url is None:
            raise SweepError("--resume: this sweep's study is in a database whose URL holds a password; pass "
                             "--storage again")
        storage_url = storage_url or saved_url
    else:
        budget = trials or spec.trials
        if spec.searcher.name == "grid":
            budget = min(budget, len(searchers.grid_points(spec)))

    layout.work.mkdir(parents=True, exist_ok=True)
    study_copy = None
    if storage_url is None or storage_url == layout.default_storage_url:
        storage_url = layout.default_storage_url
        if layout.out.is_s3:
            remote = layout.out.join(STUDY_FILE)
            if resume and not layout.local_study.exists() and storage.exists(remote):
                layout.local_study.write_bytes(storage.read_bytes(remote))
                progress(f"study copied from {remote.uri} to {layout.local_study}")
            study_copy = (str(layout.local_study), remote.uri)
    optuna_storage = searchers.open_storage(storage_url)
    if not manifest and searchers.study_exists(optuna_storage, spec.name):
        raise SweepError(f"study {spec.name!r} already exists in {redact(storage_url)}: pass --resume with the "
                         f"--out it used, or give the SPEC another name")
    searchers.attach_storage(spec.name, optuna_storage)

    fixed = {**spec.fixed, **adapter.prepare(spec.fixed, layout.out.join("shared").uri, storage)}
    max_steps = adapter.max_steps(fixed)
    per_trial = spec.resources or adapter.resources(fixed)
    beside = adapter.extra_resources(fixed)
    cluster = ray.cluster_resources()
    derived = derive_concurrency(per_trial, beside, cluster, budget)
    parallel = concurrency or (manifest or {}).get("concurrency") or spec.concurrency or derived

    if not manifest:
        manifest = {
            "spec": _plain(spec.to_dict()),
            "trials": budget,
            "concurrency": concurrency or spec.concurrency,
            "storage_url": None if redact(storage_url) != storage_url else storage_url,
            "study_name": spec.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        storage.write_bytes(layout.manifest, json.dumps(redact_mapping(manifest), indent=1).encode())

    context = TrialContext(adapter=adapter, fixed=fixed, out_uri=layout.out.uri, storage_config=storage.config)
    trainable = tune.with_resources(tune.with_parameters(trial_function, context=context), per_trial.as_tune())
    metric_names = tuple(adapter.metrics)
    ledger = TrialLedger(layout.out.uri, storage.config, spec.metric, spec.mode, max_steps, metric_names,
                         adapter.step_name, budget, study_copy, progress)
    tune_fs = storage.filesystem(layout.tune_root)
    experiment = layout.tune_root.join(spec.name)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_PERIOD_S)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables on stdout
    if not all(adapter.reports_every_step(m) for m in spec.metrics):
        # the job reports per epoch without the sweep's metric, which comes once at the end
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not layout.out.is_s3:
        Path(layout.tune_root.key).mkdir(parents=True, exist_ok=True)

    restore_fs = tune_fs if layout.out.is_s3 else None
    restored = resume and tune.Tuner.can_restore(experiment.fs_path, storage_filesystem=restore_fs)
    progress(f"sweep {spec.name!r}: job {spec.job}, {budget} trials, {parallel} at a time "
             f"({per_trial.cpu:g} CPU {per_trial.gpu:g} GPU per trial"
             f"{f' + {beside.cpu:g} CPU {beside.gpu:g} GPU of workers' if beside.cpu or beside.gpu else ''}), "
             f"{spec.searcher.name} + {spec.scheduler.name}, up to {max_steps} {adapter.step_name}(s) each; "
             f"study {spec.name!r} in {redact(storage_url)}" + (" - resuming" if resume else ""))
    if restored:
        tuner = tune.Tuner.restore(experiment.fs_path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, storage_filesystem=restore_fs)
    else:
        if resume:
            progress("no saved Tune state yet: the trials start again, in the same Optuna study")
            _fail_orphans(optuna_storage, spec.name)
        searcher = searchers.make_searcher(spec, budget, optuna_storage, max_steps)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=searchers.make_scheduler(spec, max_steps),
                num_samples=budget,
                max_concurrent_trials=parallel,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=layout.tune_root.fs_path,
                storage_filesystem=restore_fs,
                callbacks=[ledger, *tune_callbacks(tracker)],  # --tracker: one tracked run per trial
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=0,
            ),
        )
    grid = tuner.fit()
    _fail_orphans(optuna_storage, spec.name)
    study = _load_study(optuna_storage, spec.name)
    records = records_from_results(list(grid), spec, metric_names, max_steps, order=study_order(study))
    results = write_results(records, spec, adapter, layout.out, storage, study=study, metric_names=metric_names,
                            fixed=fixed)
    if study_copy:
        storage.write_bytes(parse_uri(study_copy[1]), Path(study_copy[0]).read_bytes())
    compute = (adapter.compute_metric, adapter.compute_unit) if adapter.compute_metric else None
    summary = summary_dict(results, spec, adapter.step_name, max_steps, compute=compute)
    summary["study"] = {"name": spec.name, "storage": redact(storage_url)}
    summary["out"] = layout.out.uri
    summary["resumed"] = bool(resume)
    summary["summary_path"] = write_summary(storage, layout.out, summary)
    if results.best is not None:
        progress(f"best trial {results.best.trial_id}: {spec.metric}={results.best.value(spec.metric):.4g} "
                 f"with {results.best.params}; config in {results.best_config_path}")
    else:
        progress("no trial completed: no best config written")
    return SweepOutcome(summary=summary, resumed=resume, layout=layout)


def _load_study(storage, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def _fail_orphans(storage, name: str) -> int:
    """Mark Optuna trials left RUNNING as FAIL (asked by a driver that died before Tune saved
    them: no Tune trial will ever tell them); call only while no trial runs. Returns how many."""
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        count += 1
    return count


def _plain(data: Any) -> Any:
    """JSON round trip: the form the manifest stores, so comparisons see the same types."""
    return json.loads(json.dumps(data, default=str))

