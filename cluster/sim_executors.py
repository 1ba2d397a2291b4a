"""How a simulation's experiments run: one after the other in this process, or as Ray tasks.

- :func:`run_batch` / :func:`run_reference`: a batch of experiments in lockstep
  (:func:`ultrasound.active.experiment.run_experiments`: one batched head solve and one oracle
  call per step) or one reference, with BLAS and torch held at one thread (many share the
  CPUs), rounds written through a :class:`~cluster.round_store.ParquetRoundStore`;
  :func:`run_experiment` is the batch of one.
- :func:`run_serial`: every batch in this process against an in-process ``OracleBook`` (the
  benchmark's baseline, and tests that need no cluster).
- :func:`run_ray`: each batch a Ray task with a fractional CPU, retried after a crash; the
  sample table goes into the object store once and every task reads it zero-copy; the oracle is
  one named actor shared by all experiments. Ray's ActorPool drops dead actors, so no state is
  kept in actors: the files are the state.

:func:`batch_size` picks how many experiments a task runs together.
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
    :func:`ultrasound.active.experiment.experiment_steps`); raises its error."""
    (result,) = run_batch([spec], config, features, {spec.seed: split}, findings, oracle, storage, out,
                          init_backbone=init_backbone, fault=fault, on_round=on_round)
    if isinstance(result, BaseException):
        raise result
    return result


def run_batch(specs: list[ExperimentSpec], config: SimulationConfig, features: np.ndarray, splits: dict[int, Split],
              findings: tuple[str, ...], oracle, storage: Storage, out: Location, *,
              init_backbone: bytes | None = None, fault: FaultInjection | None = None,
              on_round=lambda: None) -> list[dict | Exception]:
    """Run (or resume) experiments together into ``out`` (``oracle``: an :class:`OracleBook` or
    an :class:`OracleClient`); each one's result or the exception that ended it, in order.
    ``on_round()`` runs after each stored round of any of them."""
    from threadpoolctl import threadpool_limits

    from ultrasound.active.head import torch_threads

    def hook(spec: ExperimentSpec):
        def after_round(r: int) -> None:
            on_round()
            if fault is not None and fault.experiment_id == spec.experiment_id and fault.after_round == r:
                _write_marker_and_exit(storage, fault)
        return after_round

    steps = [experiment.experiment_steps(spec, config, features, splits[spec.seed], findings, oracle,
                                         ParquetRoundStore(storage, out, spec.experiment_id),
                                         init_backbone=init_backbone, after_round=hook(spec))
             for spec in specs]
    with threadpool_limits(limits=1, user_api="blas"), torch_threads(1):
        return experiment.run_experiments(steps, oracle)


def batch_size(config: SimulationConfig, experiments: int, slots: int, requested: int | None = None) -> int:
    """Experiments per task: ``requested``, else 1 in finetune mode (a network each) and in
    embeddings mode enough to give each of ``slots`` parallel tasks about four batches (so the
    last ones finish together), at most 64 (a 64-problem head solve is already in the regime
    where a larger batch stops paying; see ``train_heads``)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"batch size must be >= 1, got {requested}")
        return requested
    if config.mode != "embeddings" or experiments <= 0:
        return 1
    return max(1, min(64, -(-experiments // (4 * max(1, slots)))))


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_reference(reference_id: str, seed: int, config: SimulationConfig, features: np.ndarray, split: Split,
                  train_labels: np.ndarray, findings: tuple[str, ...], storage: Storage, out: Location,
                  init_backbone: bytes | None = None) -> dict:
    """The full-data reference of one split, BLAS on one thread, written to
    ``<out>/reference/<reference_id>.parquet``."""
    from threadpoolctl import threadpool_limits

    from ultrasound.active.head import torch_threads

    with threadpool_limits(limits=1, user_api="blas"), torch_threads(1):
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


def _batch_task(specs, config, features, splits, findings, oracle_handle, out_uri, storage_config,
                init_backbone, fault, counter):
    """One batch in a Ray task. A lost oracle (the actor died or restarted and forgot its askers)
    fails the task, so that Ray retries the whole batch and each experiment resumes from its
    files; any other error is that experiment's result."""
    from cluster.oracle import UnknownAsker

    count = ThrottledCount(counter)
    try:
        results = run_batch(specs, config, features, splits, findings, OracleClient(oracle_handle),
                            Storage(storage_config), parse_uri(out_uri), init_backbone=init_backbone,
                            fault=fault, on_round=count)
    finally:
        count.flush()
    for result in results:
        if isinstance(result, (UnknownAsker, ray.exceptions.RayActorError)):
            raise result
    return results


def _reference_task(reference_id, seed, config, features, split, train_labels, findings, out_uri, storage_config,
                    init_backbone):
    return run_reference(reference_id, seed, config, features, split, train_labels, findings,
                         Storage(storage_config), parse_uri(out_uri), init_backbone)


_batch_remote = ray.remote(_batch_task)
_reference_remote = ray.remote(_reference_task)


def describe_error(err: BaseException) -> str:
    """One line: the original exception of a Ray task error (type and message)."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]



def run_serial(table, config, todo, todo_refs, splits, storage, out, fault, init_backbone, on_progress,
               progress_every_s, total, finished, batch=None):
    book = OracleBook(table.labels, table.video_id, cost_unit=config.cost_unit, audit_cost=config.audit_cost,
                      noise=config.noise)
    for ref, seed in todo_refs.items():
        split = splits[seed]
        run_reference(ref, seed, config, table.features, split, table.labels[split.train], table.findings,
                      storage, out, init_backbone)
    results, failed, rounds = [], [], [0]
    start, last = time.perf_counter(), time.perf_counter()

    def bump() -> None:
        rounds[0] += 1

    for part in batches(todo, batch_size(config, len(todo), 1, batch)):
        outcome = run_batch(part, config, table.features, splits, table.findings, book, storage, out,
                            init_backbone=init_backbone, fault=fault, on_round=bump)
        collect(part, outcome, results, failed)
        if time.perf_counter() - last > progress_every_s:
            last = time.perf_counter()
            elapsed = last - start
            on_progress(Count("simulate", finished + len(results) + len(failed), total, "experiments",
                              f"{rounds[0] / elapsed:.1f} rounds/s", started=start))
    return results, failed


def collect(specs: list[ExperimentSpec], outcome: list, results: list, failed: list) -> None:
    """Sort a batch's outcome into results and failures (``{"experiment_id", "error"}``)."""
    for spec, value in zip(specs, outcome):
        if isinstance(value, BaseException):
            failed.append({"experiment_id": spec.experiment_id, "error": describe_error(value)})
        else:
            results.append(value)


def run_ray(table, config, todo, todo_refs, splits, storage, out, fault, init_backbone, on_progress,
            progress_every_s, total, finished, cpus, gpus, max_retries, batch=None):
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
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) / cpus))
    for part in batches(todo, batch_size(config, len(todo), slots, batch)):
        part_splits = {seed: splits[seed] for seed in {spec.seed for spec in part}}
        task = _batch_remote.options(**options).remote(
            part, config, features, part_splits, table.findings, oracle, out.uri, storage.config,
            init_backbone, fault, counter)
        pending[task] = ("batch", part)
    results, failed = [], []
    start = last = time.perf_counter()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for task in ready:
                kind, what = pending.pop(task)
                try:
                    value = ray.get(task)
                    if kind == "batch":
                        collect(what, value, results, failed)
                except ray.exceptions.RayError as err:
                    names = [s.experiment_id for s in what] if kind == "batch" else [what]
                    failed.extend({"experiment_id": name, "error": describe_error(err)} for name in names)
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

