"""Labelling-budget simulations: many active-learning experiments in parallel on Ray.

What one experiment does, round by round, is :mod:`ultrasound.active.experiment` (no Ray, no
storage); its settings and the registry of experiment kinds are
:mod:`ultrasound.active.sim_config`. This module puts a run together:

- :func:`simulate` loads the data set and its sample table (embeddings or frames, cached);
- :func:`simulate_table` plans every (kind, seed) experiment, skips finished ones, resumes
  interrupted ones and runs the rest (:mod:`cluster.sim_executors`: Ray tasks sharing one oracle
  actor, or serially in this process), then builds the report (:mod:`cluster.sim_report`).

Persistence and resume: every completed round is written at once
(:mod:`cluster.round_store`: ``<out>/experiments/<experiment_id>/round_<r>.parquet`` through
:class:`Storage`, so ``s3://`` works). A task that dies (worker crash, killed actor, preempted
node) is retried by Ray, and a command that is run again picks up from disk; an experiment whose
rounds are all on disk is skipped.

Experiment ids hash everything that decides their results (sample table, findings, split,
budget schedule, kind and its parameters, model settings, the simulator version; not the number
of rounds, so a longer run extends a shorter one), so runs with different settings never mix in
one folder, and sweeps over TSAL settings reuse the baselines they share.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

from cluster.embeddings import SampleTable, principal_components
from cluster.round_store import completed_rounds, finished as is_finished, progress_files, read_round_meta
from cluster.sim_executors import (
    ORACLE_ACTOR_PREFIX,
    FaultInjection,
    run_experiment,
    run_ray,
    run_serial,
)
from cluster.sim_report import build_report, read_rounds
from cluster.storage import Storage, parse_uri
from ultrasound.active import experiment
from ultrasound.active.experiment import ExperimentSpec, Split
from ultrasound.active.learners import human_positive_weights
from ultrasound.active.sim_config import KINDS, SimulationConfig, register_strategy
from ultrasound.al_report import strategy_entries

__all__ = [
    "FaultInjection", "KINDS", "ORACLE_ACTOR_PREFIX", "SimulationConfig", "SimulationResult", "build_report",
    "completed_rounds", "human_positive_weights", "make_splits", "plan_experiments", "read_round_meta",
    "read_rounds", "register_strategy", "run_experiment", "simulate", "simulate_table",
]


def plan_experiments(table: SampleTable, config: SimulationConfig) -> list[ExperimentSpec]:
    """One spec per (kind, seed) of ``config`` on ``table`` (ids hash its key and findings)."""
    return experiment.plan_experiments(table.key, table.findings, config)


def make_splits(table: SampleTable, config: SimulationConfig) -> dict[int, Split]:
    """Every seed's split of ``table`` by patient (by video when the patient is unknown)."""
    return experiment.make_splits(table.groups, table.video_id, table.labels, config)


@dataclass
class SimulationResult:
    """What a run did. ``rounds``: round files written now; ``resumed_rounds``: rounds found on
    disk and not recomputed (finished experiments included); ``skipped``: finished experiments."""

    out_uri: str
    experiments: int
    rounds: int
    resumed_rounds: int
    skipped: int
    failed: list[dict]
    seconds: float
    experiment_ids: list[str]
    report: dict | None = None

    def as_json(self) -> dict:
        strategies = {}
        if self.report is not None:
            strategies = strategy_entries(self.report["summary"])
        return {"experiments": self.experiments, "rounds": self.rounds, "resumed_rounds": self.resumed_rounds,
                "skipped": self.skipped, "failed": len(self.failed), "seconds": round(self.seconds, 2),
                "rounds_per_s": round(self.rounds / self.seconds, 2) if self.seconds > 0 else None,
                "report": self.report["report_uri"] if self.report else None, "strategies": strategies}



def simulate_table(
    table: SampleTable,
    config: SimulationConfig,
    out_uri: str,
    storage: Storage,
    *,
    executor: str = "ray",
    cpus_per_task: float = 1.0,
    gpus_per_task: float = 0.0,
    max_retries: int = 3,
    fault: FaultInjection | None = None,
    init_backbone: bytes | None = None,
    on_progress: Callable[[str], None] = lambda message: None,
    progress_every_s: float = 5.0,
    report: bool = True,
    batch_size: int | None = None,
) -> SimulationResult:
    """Run every (strategy, seed) experiment of ``config`` on ``table`` into ``out_uri``.

    ``executor="ray"`` runs them as Ray tasks (one batch each, ``cpus_per_task``, retried up to
    ``max_retries`` times after a crash) with one :class:`Oracle` actor; ``"serial"`` runs them
    one after the other in this process with an in-process :class:`OracleBook` (the benchmark's
    baseline). Either way experiments run in batches of ``batch_size``
    (:func:`cluster.sim_executors.batch_size` picks one when None): a batch shares one batched
    head solve and one oracle call per step, and gives the rounds of one-at-a-time runs.
    Finished experiments are skipped; interrupted ones resume. Failed experiments are listed in
    the result, not raised.
    """
    if executor not in ("ray", "serial"):
        raise ValueError(f"executor must be ray or serial, got {executor!r}")
    if cpus_per_task <= 0 or gpus_per_task < 0 or max_retries < 0:
        raise ValueError("need cpus_per_task > 0, gpus_per_task >= 0, max_retries >= 0")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None: chosen for the run), got {batch_size}")
    if config.mode == "embeddings" and table.kind != "embeddings":
        raise ValueError("embeddings mode needs a table of embeddings (SampleSpec(kind='embeddings'))")
    if config.mode == "finetune" and table.kind != "images":
        raise ValueError("finetune mode needs a table of frames (SampleSpec(kind='images'))")
    table = table.select_findings(list(config.labels)) if config.labels else table
    started = time.perf_counter()
    if config.mode == "embeddings" and config.embedding_dims is not None:
        table = dataclasses.replace(table, features=principal_components(table.features, config.embedding_dims))
    out = parse_uri(out_uri)
    storage.check(out, create_bucket=True)
    specs = plan_experiments(table, config)
    splits = make_splits(table, config)
    files = progress_files(storage, out)
    on_disk = {s.experiment_id: completed_rounds(files.get(s.experiment_id, [])) for s in specs}
    finished = {s.experiment_id for s in specs
                if is_finished(storage, out, s.experiment_id, s.rounds, files.get(s.experiment_id, []))}
    todo = [s for s in specs if s.experiment_id not in finished]
    references = {s.reference_id: s.seed for s in specs}
    have_refs = set(storage.list_files(out.join("reference")))
    todo_refs = {ref: seed for ref, seed in references.items() if f"{ref}.parquet" not in have_refs}
    on_progress(f"simulate: {len(specs)} experiments ({len(finished)} finished already, "
                f"{sum(1 for s in todo if on_disk[s.experiment_id])} to resume), "
                f"{len(table)} samples, {len(table.findings)} findings, {config.rounds} rounds, out {out.uri}")
    results: list[dict] = []
    failed: list[dict] = []
    if executor == "serial":
        results, failed = run_serial(table, config, todo, todo_refs, splits, storage, out, fault, init_backbone,
                                     on_progress, progress_every_s, len(specs), len(finished), batch_size)
    else:
        results, failed = run_ray(table, config, todo, todo_refs, splits, storage, out, fault, init_backbone,
                                  on_progress, progress_every_s, len(specs), len(finished),
                                  cpus_per_task, gpus_per_task, max_retries, batch_size)
    computed = sum(r["computed"] for r in results)
    resumed = sum(r["resumed"] for r in results) + sum(on_disk[e] for e in finished)
    seconds = time.perf_counter() - started
    on_progress(f"simulate: done, {computed} rounds computed, {resumed} resumed, {len(failed)} failed, "
                f"{seconds:.1f} s")
    result = SimulationResult(out.uri, len(specs), computed, resumed, len(finished), failed, seconds,
                              [s.experiment_id for s in specs])
    if report:
        result.report = build_report(storage, out, [s.experiment_id for s in specs], on_progress=on_progress)
    return result



def simulate(
    data_uri: str,
    config: SimulationConfig,
    out_uri: str,
    storage: Storage,
    sample_spec=None,
    *,
    cache_uri: str | None = None,
    on_progress: Callable[[str], None] = lambda message: None,
    **kwargs: Any,
) -> SimulationResult:
    """Load the data set, build or reuse its sample table (embeddings or frames, cached at
    ``cache_uri``, default ``<out>/cache``), then :func:`simulate_table`. Needs a connected Ray."""
    from cluster.dataset import load_dataset
    from cluster.embeddings import SampleSpec, load_samples

    data = load_dataset(data_uri, storage)
    if config.labels:
        unknown = [name for name in config.labels if name not in data.findings]
        if unknown:
            raise ValueError(f"unknown finding column(s) {unknown}; the data set has {list(data.findings)}")
    spec = sample_spec or SampleSpec()
    spec = dataclasses.replace(spec, kind="embeddings" if config.mode == "embeddings" else "images")
    cache = parse_uri(cache_uri) if cache_uri else parse_uri(out_uri).join("cache")
    table, _ = load_samples(data, spec, cache, storage, on_progress)
    init_backbone = None
    if config.mode == "finetune" and spec.init:
        init_backbone = storage.read_bytes(parse_uri(spec.init))
    return simulate_table(table, config, out_uri, storage, init_backbone=init_backbone, on_progress=on_progress,
                          **kwargs)
