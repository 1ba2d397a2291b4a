"""What a sweep leaves under ``<out>/results``: the trials table, the best config, the plots.

- ``trials.parquet`` / ``trials.csv``: one row per trial: id, status (``completed``: ran every
  epoch/round; ``stopped``: stopped early by ASHA; ``error``), steps run, seconds, every searched
  parameter (``param.<name>``) and the job's metrics at the trial's last step.
- ``best_config.yaml``: the best completed trial's config (fixed arguments + its parameters) as
  the YAML ``sonoray <job> --config`` accepts as is.
- ``metric_over_trials.png``: the primary metric of every trial in start order, and the best so far.
- ``param_importances.png``: Optuna's parameter importances (fANOVA) over the study's complete trials.
- ``summary.json``: the numbers ``sonoray sweep --json`` prints.

"Best" is taken among completed trials (full length): a trial stopped after one epoch reports a
one-epoch score, which is not comparable with a final one. Compute spent is counted in
trial-steps (trial-epochs / trial-rounds): the sum over trials of the steps each one ran.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from cluster.storage import Location, Storage
from tuning.spec import SweepSpec

STATUSES = ("completed", "stopped", "error")


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the results see it (built from Tune's ResultGrid)."""

    trial_id: str
    params: dict[str, Any]
    metrics: dict[str, float]
    steps: int
    status: str
    seconds: float = 0.0
    history: tuple[dict[str, float], ...] = ()
    error: str | None = None

    def value(self, metric: str) -> float | None:
        value = self.metrics.get(metric)
        if value is None or not isinstance(value, (int, float)) or math.isnan(float(value)):
            return None
        return float(value)


@dataclass(frozen=True)
class SweepResults:
    """Paths written and the headline numbers."""

    records: tuple[TrialRecord, ...]
    best: TrialRecord | None
    best_config: dict[str, Any]
    best_config_path: str | None
    table_path: str
    csv_path: str
    plots: tuple[str, ...]
    importances: dict[str, float]
    importances_note: str | None
    pareto: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def study_order(study) -> dict[str, int]:
    """Tune trial id -> Optuna trial number (the order trials were asked for)."""
    from tuning.searchers import TUNE_TRIAL_ATTR

    order = {}
    for trial in study.get_trials(deepcopy=False):
        tune_id = trial.user_attrs.get(TUNE_TRIAL_ATTR)
        if tune_id is not None:
            order.setdefault(tune_id, trial.number)
    return order


def records_from_results(results: Sequence[Any], spec: SweepSpec, metric_names: Sequence[str], max_steps: int,
                         order: Mapping[str, int] | None = None) -> list[TrialRecord]:
    """Turn Tune's ``Result`` objects into :class:`TrialRecord` s, in start order (``order``:
    trial id -> position, e.g. :func:`study_order`)."""
    order = order or {}
    records = []
    for result in results:
        metrics = dict(result.metrics or {})
        trial_id = str(metrics.get("trial_id") or result.path.rstrip("/").split("/")[-1])
        steps = int(metrics.get("training_iteration") or 0)
        history: list[dict[str, float]] = []
        frame = getattr(result, "metrics_dataframe", None)
        if frame is not None and len(frame):
            keep = [c for c in metric_names if c in frame.columns]
            history = [{k: _number(v) for k, v in row.items()} for row in frame[keep].to_dict("records")]
        if result.error is not None:
            status = "error"
        elif steps >= max_steps:
            status = "completed"
        else:
            status = "stopped"
        params = {p.name: result.config[p.name] for p in spec.space.params if p.name in (result.config or {})}
        records.append(TrialRecord(
            trial_id=trial_id,
            params=params,
            metrics={k: _number(metrics[k]) for k in metric_names if k in metrics},
            steps=steps,
            status=status,
            seconds=float(metrics.get("time_total_s") or 0.0),
            history=tuple(history),
            error=None if result.error is None else str(result.error).splitlines()[0][:300],
        ))
    return sorted(records, key=lambda r: (order.get(r.trial_id, math.inf), r.trial_id))


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def best_record(records: Sequence[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    """The best completed trial on ``metric`` (ties: the earlier trial in ``records``)."""
    candidates = [r for r in records if r.status == "completed" and r.value(metric) is not None]
    if not candidates:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(candidates, key=lambda r: (sign * r.value(metric), -records.index(r)))


def pareto_front(records: Sequence[TrialRecord], metrics: Sequence[str], modes: Sequence[str]) -> list[TrialRecord]:
    """Completed trials no other completed trial beats on every metric (and strictly on one)."""
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    points = [(r, [s * r.value(m) for s, m in zip(signs, metrics)]) for r in records
              if r.status == "completed" and all(r.value(m) is not None for m in metrics)]
    front = []
    for record, p in points:
        dominated = any(all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p)) for _, q in points)
        if not dominated:
            front.append(record)
    return front


def compute_spent(records: Sequence[TrialRecord], metric: str | None = None) -> float:
    """Compute spent by all trials: the steps each ran (trial-epochs), or with ``metric`` the sum
    of each trial's last value of that running count (e.g. ``rounds``: trial-rounds)."""
    if metric is None:
        return int(sum(r.steps for r in records))
    return float(sum(r.value(metric) or 0.0 for r in records))


def trials_frame(records: Sequence[TrialRecord], spec: SweepSpec, metric_names: Sequence[str]):
    import pandas as pd

    rows = []
    for r in records:
        row: dict[str, Any] = {"trial_id": r.trial_id, "status": r.status, "steps": r.steps, "seconds": r.seconds}
        for p in spec.space.params:
            row[f"param.{p.name}"] = r.params.get(p.name)
        for m in metric_names:
            row[m] = r.metrics.get(m, float("nan"))
        row["error"] = r.error or ""
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["trial_id", "status", "steps", "seconds",
                                        *[f"param.{p.name}" for p in spec.space.params], *metric_names, "error"])
    for p in spec.space.params:
        column = f"param.{p.name}"
        if p.kind == "choice" and frame[column].map(type).nunique() > 1:
            frame[column] = frame[column].astype(str)  # parquet wants one type per column
    return frame


def write_results(
    records: Sequence[TrialRecord],
    spec: SweepSpec,
    adapter,
    out: Location,
    storage: Storage,
    study=None,
    metric_names: Sequence[str] | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> SweepResults:
    """Write everything under ``out/results``; returns the paths and the best trial. ``fixed``:
    the fixed values trials ran with (default: the SPEC's)."""
    metric_names = list(metric_names or adapter.metrics)
    results_dir = out.join("results")
    frame = trials_frame(records, spec, metric_names)
    table = results_dir.join("trials.parquet")
    csv = results_dir.join("trials.csv")
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_bytes(table, buffer.getvalue())
    storage.write_bytes(csv, frame.to_csv(index=False).encode())

    best = best_record(records, spec.metric, spec.mode)
    best_config: dict[str, Any] = {}
    best_path = None
    if best is not None:
        run_config = {**(spec.fixed if fixed is None else fixed), **best.params}
        best_config = adapter.job_config(run_config)
        best_path = results_dir.join("best_config.yaml")
        header = (f"# best trial {best.trial_id} of sweep {spec.name!r}: "
                  f"{spec.metric} = {best.value(spec.metric):.6g} ({spec.mode})\n")
        hint = adapter.command_hint(run_config)
        if hint:
            header += f"# use: {hint}\n"
        storage.write_bytes(best_path, (header + yaml.safe_dump(best_config, sort_keys=False)).encode())

    importances, note = parameter_importances(study, spec) if study is not None else ({}, "no Optuna study")
    plots = [
        _write_png(storage, results_dir.join("metric_over_trials.png"), plot_metric_over_trials(records, spec)),
        _write_png(storage, results_dir.join("param_importances.png"), plot_importances(importances, note, spec)),
    ]
    pareto = tuple(r.trial_id for r in pareto_front(records, spec.metrics, spec.modes)) if spec.multi_objective else ()
    return SweepResults(
        records=tuple(records), best=best, best_config=best_config,
        best_config_path=best_path.uri if best_path else None, table_path=table.uri, csv_path=csv.uri,
        plots=tuple(plots), importances=importances, importances_note=note, pareto=pareto,
    )


def parameter_importances(study, spec: SweepSpec) -> tuple[dict[str, float], str | None]:
    """Optuna's fANOVA importances of the searched parameters on the primary metric, over the
    study's complete trials; ``({}, reason)`` when they cannot be computed."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}, f"{len(complete)} complete trial(s) in the study: importances need at least 2"
    target = (lambda t: t.values[0]) if spec.multi_objective else None
    try:
        values = optuna.importance.get_param_importances(
            study, target=target, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=spec.seed))
    except (RuntimeError, ValueError) as err:
        return {}, f"importances not computable: {err}"
    if not values:
        return {}, "no parameter common to every complete trial"
    return {k: float(v) for k, v in values.items()}, None


def plot_metric_over_trials(records: Sequence[TrialRecord], spec: SweepSpec):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    colours = {"completed": "tab:blue", "stopped": "tab:gray", "error": "tab:red"}
    for status in STATUSES:
        xs = [i for i, r in enumerate(records) if r.status == status and r.value(spec.metric) is not None]
        ys = [records[i].value(spec.metric) for i in xs]
        if xs:
            label = {"stopped": "stopped early (last value)"}.get(status, status)
            ax.scatter(xs, ys, c=colours[status], label=label, s=28, zorder=3)
    best, xs, ys = None, [], []
    for i, r in enumerate(records):
        v = r.value(spec.metric) if r.status == "completed" else None
        if v is not None and (best is None or (v > best if spec.mode == "max" else v < best)):
            best = v
        if best is not None:
            xs.append(i)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:orange", label="best completed so far", zorder=2)
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel(f"{spec.metric} ({spec.mode})")
    ax.set_title(f"sweep {spec.name}: {spec.job}, {spec.searcher.name} + {spec.scheduler.name}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_importances(importances: Mapping[str, float], note: str | None, spec: SweepSpec):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.45 * max(1, len(importances))), dpi=110)
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel(f"importance for {spec.metric} (Optuna fANOVA)")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, f"parameter importances unavailable:\n{note}", ha="center", va="center", wrap=True)
    ax.set_title(f"sweep {spec.name}: parameter importances")
    fig.tight_layout()
    return fig


def _write_png(storage: Storage, location: Location, fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.write_bytes(location, buffer.getvalue())
    return location.uri


def summary_dict(results: SweepResults, spec: SweepSpec, step_name: str, max_steps: int,
                 compute: tuple[str, str] | None = None) -> dict[str, Any]:
    """The JSON object ``sonoray sweep --json`` prints (also saved as summary.json).
    ``compute``: (metric, unit) when the job counts its compute in a metric (see
    :attr:`tuning.adapters.JobAdapter.compute_metric`); else trial-steps."""
    records = results.records
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    best = results.best
    steps = compute_spent(records)
    out = {
        "trials": len(records),
        "completed": counts["completed"],
        "stopped": counts["stopped"],
        "errored": counts["error"],
        "metric": spec.metric,
        "mode": spec.mode,
        "best_trial": best.trial_id if best else None,
        "best_metric": best.value(spec.metric) if best else None,
        "best_metrics": dict(best.metrics) if best else {},
        "best_config": dict(best.params) if best else {},
        "best_config_path": results.best_config_path,
        "results": results.table_path,
        "csv": results.csv_path,
        "plots": list(results.plots),
        "importances": results.importances,
        "compute": {"unit": f"trial-{step_name}s", "spent": steps, "max_per_trial": max_steps,
                    "full_length_trials": round(steps / max_steps, 3) if max_steps else None},
    }
    if compute is not None:
        metric, unit = compute
        out["compute"].update({"unit": f"trial-{unit}s", "spent": compute_spent(records, metric),
                               "steps": steps, "step_unit": f"trial-{step_name}s"})
    if spec.multi_objective:
        out["metrics"] = list(spec.metrics)
        out["modes"] = list(spec.modes)
        out["pareto"] = [{"trial_id": r.trial_id, "params": r.params,
                          "metrics": {m: r.value(m) for m in spec.metrics}}
                         for r in records if r.trial_id in results.pareto]
    out.update(results.extra)
    return out


def write_summary(storage: Storage, out: Location, summary: Mapping[str, Any]) -> str:
    location = out.join("results", "summary.json")
    storage.write_bytes(location, json.dumps(summary, indent=1, default=str).encode())
    return location.uri
