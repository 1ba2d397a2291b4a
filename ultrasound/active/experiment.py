"""One simulated active-learning experiment, round by round, against an oracle and a round store.

An experiment = (kind, budget schedule, seed, data set). It splits the samples by patient (by
video when the patient is unknown) with its seed, labels an initial random share of the training
pool through the oracle, then runs ``rounds`` rounds of the two-stream round
(:mod:`ultrasound.active.rounds`): predict the pool with the current learner, plan, ask the
oracle, apply its answers, refit, evaluate on the held-out split, write the round.

An experiment is a generator (:func:`experiment_steps`) that stops whenever it needs a learner
fit or a round's oracle answers; :func:`run_experiments` drives a batch of them in lockstep, one
batched head solve and one oracle call for all that wait (:func:`run_experiment`: a batch of
one). A batch gives the rounds of one-at-a-time runs.

Two protocols keep this free of Ray and storage:

- :class:`Oracle`: the simulated annotator (``cluster.oracle``'s in-process ``OracleBook`` or the
  client of its Ray actor), the only holder of the pool's labels;
- :class:`RoundStore`: where rounds go and come back from after a crash (``cluster`` writes
  them as Parquet through its storage layer, local or ``s3://``).

Resume: the experiment rebuilds its :class:`ALState` from the records of rounds ``0..k`` (with
the machine labels each round revoked), restores the oracle's ledger from them, refits the
(deterministic) learner on round k's labelled set and continues with round ``k + 1``;
:func:`round_rng` makes every later draw identical to an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Mapping, Protocol, Sequence

import numpy as np

from ultrasound.active.learners import FitRequest, fit_models, make_model
from ultrasound.active.rounds import RoundPlan, apply_answers, round_rng, tsal_round
from ultrasound.active.sim_config import ExperimentKind, SimulationConfig
from ultrasound.active.state import ALState
from ultrasound.active.strategies import StrategyContext
from ultrasound.al_report import round_metrics

SPLIT_STREAM = 2_147_483_647  # the split's generator is default_rng([seed, SPLIT_STREAM])


class UnreadableRound(Exception):
    """A stored round that cannot be trusted (torn, truncated, foreign): it and every later round
    are recomputed."""


class Oracle(Protocol):
    """The simulated annotator, as an experiment ("asker") sees it (``cluster/oracle.py``)."""

    def register(self, asker: str, pool: np.ndarray, noise_key: int = 0) -> None: ...
    def restore(self, asker: str, answers: list[dict]) -> None: ...
    def query(self, asker: str, round: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def answer_round(self, asker: str, round: int, queries: np.ndarray, audits: np.ndarray,
                     machine: np.ndarray, machine_labels: np.ndarray) -> dict: ...
    def answer_rounds(self, requests: list[tuple]) -> list[dict | Exception]: ...
    def grade(self, asker: str, indices: np.ndarray, labels: np.ndarray) -> dict: ...
    def log(self, asker: str) -> dict: ...


class RoundStore(Protocol):
    """One experiment's persisted rounds. Records are :meth:`ALState.to_records` rows plus
    ``global_index``; ``meta`` is the round's JSON-able metrics and settings."""

    def completed(self) -> int:
        """How many rounds ``0..k-1`` are stored without a gap."""
        ...

    def read(self, round: int) -> tuple[list[dict], dict]:
        """``(records, meta)`` of a stored round; raises :class:`UnreadableRound`."""
        ...

    def write(self, round: int, records: list[dict], meta: dict) -> None: ...

    def write_log(self, log: dict) -> None:
        """The oracle's log of this experiment (after its last round)."""
        ...


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment of a run. ``rounds`` is the target; the id does not include it."""

    experiment_id: str
    strategy: str
    seed: int
    rounds: int
    reference_id: str
    settings: Mapping[str, Any] = field(hash=False, compare=False, default_factory=dict)
    kind: ExperimentKind | None = field(default=None, hash=False, compare=False)  # travels to the worker



@dataclass(frozen=True, eq=False)
class Split:
    """Global sample indices of one seed's split, and the test labels (the experiment sees
    pool labels only through the oracle). ``pool_groups`` ``(len(train),)`` int: the video of
    each pool sample, numbered ``0..pool_videos-1`` (queries take one frame per video a round)."""

    seed: int
    train: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    pool_videos: int = 0
    pool_groups: np.ndarray | None = None


def split_by_group(groups: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` sorted global indices; whole groups (patients or videos) go to one side.

    ``round(test_fraction * G)`` of the ``G`` groups (at least 1, at most ``G - 1``) are drawn
    with ``default_rng([seed, SPLIT_STREAM])`` for the test split.
    """
    groups = np.asarray(groups).astype(str)
    unique = np.unique(groups)
    if unique.size < 2:
        raise ValueError(f"need at least 2 patients/videos to split, got {unique.size}")
    n_test = min(max(1, int(round(test_fraction * unique.size))), unique.size - 1)
    rng = np.random.default_rng([int(seed), SPLIT_STREAM])
    test_groups = rng.choice(unique, size=n_test, replace=False)
    in_test = np.isin(groups, test_groups)
    return np.flatnonzero(~in_test).astype(np.int64), np.flatnonzero(in_test).astype(np.int64)


def _digest(payload: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:n]


def plan_experiments(table_key: str, findings: tuple[str, ...], config: SimulationConfig) -> list[ExperimentSpec]:
    """One spec per (kind, seed), in seed-major order; ids hash the sample table's key, the
    findings and every setting that decides the result."""
    specs = []
    for seed in range(config.seeds):
        ref = f"ref-seed{seed}-{_digest([table_key, findings, config.reference_settings(), seed])}"
        for strategy in config.strategies:
            settings = config.experiment_settings(strategy)
            digest = _digest([table_key, findings, settings])
            specs.append(ExperimentSpec(f"{strategy}-seed{seed}-{digest}", strategy, seed, config.rounds, ref,
                                        settings, config.kind(strategy)))
    return specs



def make_splits(groups: np.ndarray, video_id: np.ndarray, labels: np.ndarray,
                config: SimulationConfig) -> dict[int, Split]:
    """Every seed's split of samples with split unit ``groups`` ``(N,)`` (patient, else video),
    ``video_id`` ``(N,)`` and ``labels`` ``(N, L)``."""
    splits = {}
    for seed in range(config.seeds):
        train, test = split_by_group(groups, config.test_fraction, seed)
        videos, pool_groups = np.unique(np.asarray(video_id)[train], return_inverse=True)
        splits[seed] = Split(seed, train, test, labels[test], int(videos.size), pool_groups.astype(np.int64))
    return splits


@dataclass(frozen=True)
class Budget:
    """One experiment's labelling budget. ``initial`` and ``per_round`` count the query unit
    (frames, or videos with ``query_unit: video``); ``machine_cap`` caps a round's new machine
    labels in the same unit (None: no cap); ``cost_scale`` is the cost of labelling the whole pool."""

    initial: int
    per_round: int
    machine_cap: int | None
    cost_scale: float
    by_video: bool


def budget_of(config: SimulationConfig, split: Split) -> Budget:
    pool = split.train.size
    by_video = config.query_unit == "video"
    if by_video and split.pool_groups is None:
        raise ValueError("query_unit video needs the video of every pool sample (Split.pool_groups)")
    units = split.pool_videos if by_video else pool  # what the budget shares count
    per_round = max(1, int(round(config.per_round * units)))
    return Budget(initial=min(units, max(1, int(round(config.initial * units)))), per_round=per_round,
                  machine_cap=config.confidence_config(per_round).max_per_round,
                  cost_scale=float(split.pool_videos if config.cost_unit == "video" else pool), by_video=by_video)


_TOTALS = ("machine_accepted_total", "machine_vectors_correct", "machine_labels_correct", "machine_labels_total")


@dataclass(frozen=True, eq=False)
class AnswerRequest:
    """A round's oracle call an experiment waits on (:meth:`Oracle.answer_round`'s arguments):
    the driver sends the answers of a batch of experiments in one call."""

    asker: str
    round: int
    queries: np.ndarray
    audits: np.ndarray
    machine: np.ndarray
    machine_labels: np.ndarray

    def args(self) -> tuple:
        return self.asker, self.round, self.queries, self.audits, self.machine, self.machine_labels


Step = Generator["FitRequest | AnswerRequest", Any, dict]


def run_experiment(spec: ExperimentSpec, config: SimulationConfig, features: np.ndarray, split: Split,
                   findings: tuple[str, ...], oracle: Oracle, store: RoundStore, *,
                   init_backbone: bytes | None = None, after_round: Callable[[int], None] = lambda round: None) -> dict:
    """Run (or resume) one experiment: :func:`experiment_steps` driven alone; raises its error."""
    steps = experiment_steps(spec, config, features, split, findings, oracle, store,
                             init_backbone=init_backbone, after_round=after_round)
    (result,) = run_experiments([steps], oracle)
    if isinstance(result, BaseException):
        raise result
    return result


def run_experiments(steps: Sequence[Step], oracle: Oracle) -> list[dict | Exception]:
    """Drive experiments in lockstep: each runs until it waits on a learner fit or an oracle
    round; then every waiting fit is solved in one batch (:func:`fit_models`: one batched head
    solve) and every waiting oracle round answered in one call (``oracle.answer_rounds``), and
    each experiment continues with its own answer.

    An experiment's own computation does not depend on its companions (a batched head fit equals
    the fit alone), so a batch gives the rounds of one-at-a-time runs. Returns each experiment's
    result (:func:`experiment_steps`'s return value) or the exception that ended it; one failed
    experiment does not stop the others.
    """
    results: list[dict | Exception | None] = [None] * len(steps)
    waiting: dict[int, Any] = {}

    def advance(i: int, value: Any = None) -> None:
        try:
            request = steps[i].throw(value) if isinstance(value, Exception) else steps[i].send(value)
        except StopIteration as stop:
            results[i] = stop.value
        except Exception as err:  # noqa: BLE001 - the experiment's failure is its result
            results[i] = err
        else:
            waiting[i] = request

    for i in range(len(steps)):
        advance(i)
    while waiting:
        batch = dict(waiting)
        waiting.clear()
        fits = [i for i, request in batch.items() if isinstance(request, FitRequest)]
        asks = [i for i, request in batch.items() if isinstance(request, AnswerRequest)]
        if fits:
            for i, fitted in zip(fits, fit_models([batch[i] for i in fits])):
                advance(i, fitted)
        if asks:
            for i, answer in zip(asks, oracle.answer_rounds([batch[i].args() for i in asks])):
                advance(i, answer)
    return results  # type: ignore[return-value]


def experiment_steps(
    spec: ExperimentSpec,
    config: SimulationConfig,
    features: np.ndarray,
    split: Split,
    findings: tuple[str, ...],
    oracle: Oracle,
    store: RoundStore,
    *,
    init_backbone: bytes | None = None,
    after_round: Callable[[int], None] = lambda round: None,
) -> Step:
    """One experiment, run (or resumed) to ``spec.rounds``, as a generator: it yields a
    :class:`FitRequest` or an :class:`AnswerRequest` whenever it needs a refit or a round's
    answers and is sent the fitted learner or the answer dict back (:func:`run_experiments`);
    returns counts of computed and resumed rounds and the final metrics.

    Shape: ``features`` ``(N, D)`` embeddings or ``(N, S, S, C)`` frames of every sample;
    ``split.train`` / ``split.test`` index them. ``after_round(r)`` runs once round r is stored.
    """
    pool, asker = split.train, spec.experiment_id
    budget = budget_of(config, split)
    kind = spec.kind or config.kind(spec.strategy)
    strategy = kind.build(config)
    confidence = (dataclasses.replace(config.confidence_config(), max_per_round=budget.machine_cap)
                  if kind.machine_stream else None)
    audit_fraction = config.audit if kind.machine_stream else 0.0
    model = make_model(config, features, spec.seed, findings, init_backbone)
    base = {"experiment_id": spec.experiment_id, "strategy": spec.strategy, "seed": spec.seed,
            "reference_id": spec.reference_id, "findings": list(findings), "settings": dict(spec.settings),
            "pool_size": int(pool.size), "test_size": int(split.test.size), "cost_scale": budget.cost_scale,
            "budget_initial": budget.initial, "budget_per_round": budget.per_round, "rounds_target": spec.rounds}

    oracle.register(asker, pool, noise_key=spec.seed)
    state, meta, done = restore_rounds(store, len(findings))
    resumed = done
    if state is not None:
        oracle.restore(asker, _answers_of(state, pool))
    totals = {k: 0 if meta is None else int(meta.get(k, 0)) for k in _TOTALS}

    def finish_round(r: int, state: ALState, plan: RoundPlan | None, grade: dict | None, started: float):
        """Fit (yielded), evaluate and store round r; returns (fitted model, meta). In a batch
        the fit's wall time is the batch's."""
        fit_started = time.perf_counter()
        fitted = yield _fit_request(model, state, pool, config.machine_weight)
        fit_seconds = time.perf_counter() - fit_started
        metrics = round_metrics(split.test_labels, model.predict(fitted, split.test), list(findings))
        solve = ({"head_iterations": int(fitted.iterations), "head_converged": bool(fitted.converged)}
                 if hasattr(fitted, "converged") else {})
        meta = {**base, **round_counts(state, r, plan, budget.cost_scale, pool.size), **totals, **_metrics_of(metrics),
                **solve, "fit_seconds": round(fit_seconds, 4), "round_seconds": round(time.perf_counter() - started, 4)}
        store.write(r, [{**rec.to_dict(), "global_index": int(pool[rec.index])} for rec in state.records
                        if rec.round == r], meta)
        after_round(r)
        return fitted, meta

    computed = 0
    fitted = None
    if state is None:
        started = time.perf_counter()
        picks = _initial_picks(split, budget, round_rng(spec.seed, 0))
        labels, costs = oracle.query(asker, 0, pool[picks])
        state = ALState(len(findings)).with_labels(picks, labels, source="initial", round=0, costs=costs)
        fitted, meta = yield from finish_round(0, state, None, None, started)
        computed, done = 1, 1
    elif done <= spec.rounds:
        fitted = yield _fit_request(model, state, pool, config.machine_weight)

    for r in range(done, spec.rounds + 1):
        started = time.perf_counter()
        rng = round_rng(spec.seed, r)
        unlabelled = state.unlabelled_indices(pool.size)
        held = state.unverified_indices()
        plan, grade = None, None
        # a round plans while the pool has samples, or machine labels to re-validate
        if unlabelled.size or (confidence is not None and held.size):
            context = StrategyContext(labelled_labels=state.labels_of(state.verified_indices()), rng=rng)
            plan = tsal_round(model.predict(fitted, pool[unlabelled]), unlabelled, state, budget.per_round, strategy,
                              context, confidence, audit_fraction, rng,
                              groups=split.pool_groups[unlabelled] if split.pool_groups is not None else None,
                              probs_machine=model.predict(fitted, pool[held]) if confidence is not None else None,
                              whole_groups=budget.by_video,
                              machine_groups=split.pool_groups[held] if budget.by_video else None, round=r)
            # one round trip: the queries, the audits, and the grading of the machine proposals
            answer = yield AnswerRequest(asker, r, pool[plan.queries], pool[plan.audits],
                                         pool[plan.machine_indices], plan.machine_labels)
            state = apply_answers(state, plan, answer["labels"], answer["audit_labels"],
                                  query_costs=answer["costs"],
                                  audit_costs=answer["audit_costs"] if plan.audits.size else 1.0,
                                  audit_gate=config.audit_gate)
            grade = answer["grade"]
            totals = _graded_totals(totals, state, plan, r, grade, lambda idx, labels: oracle.grade(asker, idx, labels),
                                    pool)
        # with nothing to plan the round is still evaluated and written (no records)
        fitted, meta = yield from finish_round(r, state, plan, grade, started)
        computed += 1

    store.write_log(oracle.log(asker))
    return {"experiment_id": spec.experiment_id, "computed": computed, "resumed": resumed,
            "map": meta["map"], "macro_f1": meta["macro_f1"], "cost_total": meta["cost_total"]}


def restore_rounds(store: RoundStore, num_labels: int) -> tuple[ALState | None, dict | None, int]:
    """``(state, last round's meta, rounds)`` rebuilt from the stored rounds ``0..k-1`` (each
    round's revoked machine labels taken back); ``(None, None, 0)`` when none is stored. An
    unreadable round ends the restore there: it and every later round are recomputed."""
    by_index: dict[int, dict] = {}
    meta, done = None, 0
    for r in range(store.completed()):
        try:
            rows, round_meta = store.read(r)
        except UnreadableRound:
            break
        for index in round_meta.get("revoked", []):
            by_index.pop(int(index), None)
        by_index.update({int(row["index"]): row for row in rows})
        meta, done = round_meta, r + 1
    if not done:
        return None, None, 0
    state = ALState.from_records([{k: v for k, v in row.items() if k != "global_index"} for row in by_index.values()],
                                 num_labels=num_labels)
    return state, meta, done


def _initial_picks(split: Split, budget: Budget, rng: np.random.Generator) -> np.ndarray:
    """Round 0: ``budget.initial`` random frames, or every frame of that many random videos."""
    if budget.by_video:
        videos = rng.choice(split.pool_videos, size=budget.initial, replace=False)
        return np.flatnonzero(np.isin(split.pool_groups, videos)).astype(np.int64)
    return np.sort(rng.choice(split.train.size, size=budget.initial, replace=False)).astype(np.int64)


def _graded_totals(totals: dict, state: ALState, plan: RoundPlan, r: int, grade: dict, regrade, pool) -> dict:
    """Cumulative machine-label counts after round r: how many were accepted and, per the
    oracle's grade (counts only), how many vectors and labels were right. When the audit gate
    dropped some of the plan's machine labels, the kept ones are graded again (``regrade``)."""
    if not plan.machine_indices.size:
        return totals
    kept = [i for i in plan.machine_indices
            if i in state and state.record(i).source == "machine" and state.record(i).round == r]
    if not kept:
        return totals
    if len(kept) != plan.machine_indices.size:
        proposals = np.array([state.record(i).machine_labels for i in kept], dtype=np.uint8)
        grade = regrade(pool[np.asarray(kept)], proposals)
    return {"machine_accepted_total": totals["machine_accepted_total"] + len(kept),
            "machine_vectors_correct": totals["machine_vectors_correct"] + grade["vectors_correct"],
            "machine_labels_correct": totals["machine_labels_correct"] + grade["labels_correct"],
            "machine_labels_total": totals["machine_labels_total"] + grade["labels_total"]}


def round_counts(state: ALState, r: int, plan: RoundPlan | None, cost_scale: float, pool_size: int) -> dict:
    """The labelled set after round r, as the round's metadata counts it."""
    summary = state.round_summary(r)
    machine = [rec for rec in state.records if rec.source == "machine"]
    return {"round": r, "labelled": len(state), "human": int(state.verified_indices().size),
            "machine": len(machine), "machine_new": summary["machine"],
            "audited": sum(rec.audit != "none" for rec in machine),
            "audit_agreed": sum(rec.audit == "agreed" for rec in machine),
            "queried_new": summary["oracle"], "cost_round": summary["cost"],
            "cost_total": state.total_cost, "fraction": state.total_cost / cost_scale,
            "human_fraction": state.verified_indices().size / pool_size,
            "rejected_inconsistent": plan.rejected_inconsistent if plan is not None else 0,
            "revoked": plan.revoked.tolist() if plan is not None else [],
            "machine_revoked": int(plan.revoked.size) if plan is not None else 0}


def _metrics_of(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("map", "macro_f1", "micro_f1", "hamming_loss", "per_finding_ap", "excluded")}


def _fit_request(model, state: ALState, pool: np.ndarray, machine_weight: float) -> FitRequest:
    idx, labels, verified = state.training_arrays()
    weights = np.where(verified, 1.0, machine_weight).astype(np.float32)
    if weights.sum() <= 0:  # only unweighted machine labels: fall back to the human ones
        weights = verified.astype(np.float32)
    return FitRequest(model, pool[idx], labels, weights, verified)


def _answers_of(state: ALState, pool: np.ndarray) -> list[dict]:
    """The oracle answers recorded in a state: queries (initial + oracle) and audits, by global
    sample index (``pool[index]``)."""
    out = []
    for rec in state.records:
        if rec.source in ("initial", "oracle"):
            out.append({"index": int(pool[rec.index]), "round": rec.round, "kind": "query",
                        "labels": rec.labels, "cost": rec.cost})
        elif rec.audit != "none":
            out.append({"index": int(pool[rec.index]), "round": rec.round, "kind": "audit",
                        "labels": rec.labels, "cost": rec.cost})
    return out



def run_reference(reference_id: str, seed: int, config: SimulationConfig, features: np.ndarray, split: Split,
                  train_labels: np.ndarray, findings: tuple[str, ...],
                  init_backbone: bytes | None = None) -> tuple[dict, dict]:
    """The same learner fitted on every training label of the split (the full-data reference):
    ``(row, meta)``, the table row and its metadata (per-finding AP, settings, findings)."""
    model = make_model(config, features, seed, findings, init_backbone)
    started = time.perf_counter()
    fitted = model.fit(split.train, train_labels, np.ones(split.train.size, np.float32))
    metrics = round_metrics(split.test_labels, model.predict(fitted, split.test), list(findings))
    row = {"reference_id": reference_id, "seed": seed, "map": metrics["map"], "macro_f1": metrics["macro_f1"],
           "micro_f1": metrics["micro_f1"], "hamming_loss": metrics["hamming_loss"],
           "train_size": int(split.train.size), "test_size": int(split.test.size),
           "seconds": round(time.perf_counter() - started, 3)}
    meta = {**row, "per_finding_ap": metrics["per_finding_ap"], "settings": config.reference_settings(),
            "findings": list(findings)}
    return row, meta
