"""How a simulation's experiments run: one after the other in this process, or as Ray tasks.

- :func:`run_experiment` / :func:`run_reference`: one experiment (one reference) with BLAS held
  at one thread (many share the CPUs), its rounds written through a
  :class:`~cluster.round_store.ParquetRoundStore`.
- :func:`run_serial`: every experiment in this process against an in-process ``OracleBook``
  (the benchmark's baseline, and tests that need no cluster).
- :func:`run_ray`: each experiment a Ray task with a fractional CPU, retried after a crash; the
  sample table goes into the object store once and every task reads it zero-copy; the oracle is
  one named actor shared by all experiments. Ray's ActorPool drops dead actors, so no state is
  kept in actors: the files are the state.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

import numpy as np
import ray

from cluster.oracle import Oracle, OracleBook, OracleClient
from cluster.progress import Count
from cluster.round_store import ParquetRoundStore, write_reference
from cluster.storage import Location, Storage, parse_uri
from ultrasound.active import experiment
from ultrasound.active.experiment import ExperimentSpec, Split
from ultrasound.active.sim_config import SimulationConfig

ORACLE_ACTOR_PREFIX = "sonoray-oracle-"


@dataclass(frozen=True)
class FaultInjection:
    """Testing and crash drills: the process running ``experiment_id`` exits abruptly
    (``os._exit``) right after round ``after_round`` is written, once: the first crash writes
    ``marker_uri`` and a later attempt that finds it runs on."""

    experiment_id: str
    after_round: int
    marker_uri: str



def _write_marker_and_exit(storage: Storage, fault: FaultInjection) -> None:
    marker = parse_uri(fault.marker_uri)
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"crashed\n")
    os._exit(17)



def run_experiment(spec: ExperimentSpec, config: SimulationConfig, features: np.ndarray, split: Split,
                   findings: tuple[str, ...], oracle, storage: Storage, out: Location, *,
                   init_backbone: bytes | None = None, fault: FaultInjection | None = None,
                   on_round=lambda: None) -> dict:
    """Run (or resume) one experiment to ``spec.rounds`` into ``out`` (see
    :func:`ultrasound.active.experiment.run_experiment`); ``oracle`` is an :class:`OracleBook` or
    an :class:`OracleClient`, ``on_round()`` runs after each stored round."""
    from threadpoolctl import threadpool_limits

    def after_round(r: int) -> None:
        on_round()
        if fault is not None and fault.experiment_id == spec.experiment_id and fault.after_round == r:
            _write_marker_and_exit(storage, fault)

    with threadpool_limits(limits=1, user_api="blas"):
        return experiment.run_experiment(spec, config, features, split, findings, oracle,
                                         ParquetRoundStore(storage, out, spec.experiment_id),
                                         init_backbone=init_backbone, after_round=after_round)


def run_reference(reference_id: str, seed: int, config: SimulationConfig, features: np.ndarray, split: Split,
                  train_labels: np.ndarray, findings: tuple[str, ...], storage: Storage, out: Location,
                  init_backbone: bytes | None = None) -> dict:
    """The full-data reference of one split, BLAS on one thread, written to
    ``<out>/reference/<reference_id>.parquet``."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        row, meta = experiment.run_reference(reference_id, seed, config, features, split, train_labels, findings,
                                             init_backbone)
    write_reference(storage, out, row, meta)
    return row


# -- running many experiments ----------------------------------------------------------------------
@ray.remote(num_cpus=0)
class RoundCounter:
    """Counts completed rounds across experiments (progress lines: rounds per second)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int = 1) -> None:
        self.count += n

    def total(self) -> int:
        return self.count


class ThrottledCount:
    """Adds completed rounds to the :class:`RoundCounter` at most every ``every_s`` seconds (one
    actor call per round cost about as much CPU as the oracle's answers)."""

    def __init__(self, counter, every_s: float = 2.0) -> None:
        self.counter, self.every_s = counter, every_s
        self.pending, self.last = 0, time.monotonic()

    def __call__(self) -> None:
        self.pending += 1
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.counter.add.remote(self.pending)
        self.pending, self.last = 0, time.monotonic()


def _experiment_task(spec, config, features, split, findings, oracle_handle, out_uri, storage_config,
                     init_backbone, fault, counter):
    count = ThrottledCount(counter)
    try:
        return run_experiment(spec, config, features, split, findings, OracleClient(oracle_handle),
                              Storage(storage_config), parse_uri(out_uri), init_backbone=init_backbone,
                              fault=fault, on_round=count)
    finally:
        count.flush()


def _reference_task(reference_id, seed, config, features, split, train_labels, findings, out_uri, storage_config,
                    init_backbone):
    return run_reference(reference_id, seed, config, features, split, train_labels, findings,
                         Storage(storage_config), parse_uri(out_uri), init_backbone)


_experiment_remote = ray.remote(_experiment_task)
_reference_remote = ray.remote(_reference_task)


def describe_error(err: BaseException) -> str:
    """One line: the original exception of a Ray task error (type and message)."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]



def run_serial(table, config, todo, todo_refs, splits, storage, out, fault, init_backbone, on_progress,
                progress_every_s, total, finished):
    book = OracleBook(table.labels, table.video_id, cost_unit=config.cost_unit, audit_cost=config.audit_cost,
                      noise=config.noise)
    for ref, seed in todo_refs.items():
        split = splits[seed]
        run_reference(ref, seed, config, table.features, split, table.labels[split.train], table.findings,
                      storage, out, init_backbone)
    results, failed, rounds = [], [], [0]
    start, last = time.perf_counter(), time.perf_counter()
    for spec in todo:
        def bump() -> None:
            rounds[0] += 1
        try:
            results.append(run_experiment(spec, config, table.features, splits[spec.seed], table.findings, book,
                                          storage, out, init_backbone=init_backbone, fault=fault, on_round=bump))
        except Exception as err:  # noqa: BLE001 - one failed experiment must not stop the others
            failed.append({"experiment_id": spec.experiment_id, "error": describe_error(err)})
        if time.perf_counter() - last > progress_every_s:
            last = time.perf_counter()
            elapsed = last - start
            on_progress(Count("simulate", finished + len(results) + len(failed), total, "experiments",
                              f"{rounds[0] / elapsed:.1f} rounds/s", started=start))
    return results, failed


def run_ray(table, config, todo, todo_refs, splits, storage, out, fault, init_backbone, on_progress,
             progress_every_s, total, finished, cpus, gpus, max_retries):
    from cluster.oracle import UnknownAsker

    if not todo and not todo_refs:
        return [], []
    # named, so that it can be found (dashboard, `ray list actors`, fault tests) and killed
    oracle = Oracle.options(name=f"{ORACLE_ACTOR_PREFIX}{uuid.uuid4().hex[:12]}").remote(
        table.labels, table.video_id, cost_unit=config.cost_unit, audit_cost=config.audit_cost, noise=config.noise)
    counter = RoundCounter.remote()
    features = ray.put(table.features)
    split_refs = {seed: ray.put(split) for seed, split in splits.items()}
    options = dict(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries,
                   retry_exceptions=[UnknownAsker, ray.exceptions.RayActorError])
    pending: dict = {}
    for ref, seed in todo_refs.items():
        split = splits[seed]
        task = _reference_remote.options(**options).remote(
            ref, seed, config, features, split_refs[seed], table.labels[split.train], table.findings, out.uri,
            storage.config, init_backbone)
        pending[task] = ("reference", ref)
    for spec in todo:
        task = _experiment_remote.options(**options).remote(
            spec, config, features, split_refs[spec.seed], table.findings, oracle, out.uri, storage.config,
            init_backbone, fault, counter)
        pending[task] = ("experiment", spec.experiment_id)
    results, failed = [], []
    start = last = time.perf_counter()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for task in ready:
                kind, name = pending.pop(task)
                try:
                    value = ray.get(task)
                    if kind == "experiment":
                        results.append(value)
                except ray.exceptions.RayError as err:
                    failed.append({"experiment_id": name, "error": describe_error(err)})
            now = time.perf_counter()
            if now - last > progress_every_s or not pending:
                last = now
                rounds = ray.get(counter.total.remote())
                on_progress(Count("simulate", finished + len(results) + len(failed), total, "experiments",
                                  f"{rounds} rounds, {rounds / (now - start):.1f} rounds/s", started=start))
    finally:
        for task in pending:
            ray.cancel(task, force=True)
        ray.kill(oracle)
        ray.kill(counter)
    return results, failed

