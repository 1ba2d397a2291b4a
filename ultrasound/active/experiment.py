"""One simulated active-learning experiment, round by round, against an oracle and a round store.

An experiment = (kind, budget schedule, seed, data set). It splits the samples by patient (by
video when the patient is unknown) with its seed, labels an initial random share of the training
pool through the oracle, then runs ``rounds`` rounds of the two-stream round
(:mod:`ultrasound.active.rounds`): predict the pool with the current learner, plan, ask the
oracle, apply its answers, refit, evaluate on the held-out split, write the round.

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

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from ultrasound.active.learners import make_model
from ultrasound.active.rounds import RoundPlan, apply_answers, round_rng, tsal_round
from ultrasound.active.sim_config import SimulationConfig
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
                                        settings))
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


def run_experiment(
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
) -> dict:
    """Run (or resume) one experiment to ``spec.rounds``; returns counts of computed and resumed
    rounds and the final metrics.

    Shape: ``features`` ``(N, D)`` embeddings or ``(N, S, S, C)`` frames of every sample;
    ``split.train`` / ``split.test`` index them. ``after_round(r)`` runs once round r is stored.
    """
    pool = split.train
    num_labels = len(findings)
    asker = spec.experiment_id
    cost_scale = float(split.pool_videos if config.cost_unit == "video" else pool.size)
    by_video = config.query_unit == "video"
    if by_video and split.pool_groups is None:
        raise ValueError("query_unit video needs the video of every pool sample (Split.pool_groups)")
    units = split.pool_videos if by_video else pool.size  # what the budget shares count
    k_initial = min(units, max(1, int(round(config.initial * units))))
    k_round = max(1, int(round(config.per_round * units)))
    frames_per_unit = pool.size / units if by_video else 1.0
    strategy = config.strategy(spec.strategy)
    machine_stream = config.kind(spec.strategy).machine_stream
    confidence = config.confidence_config(int(round(k_round * frames_per_unit))) if machine_stream else None
    audit_fraction = config.audit if machine_stream else 0.0
    model = make_model(config, features, spec.seed, findings, init_backbone)

    oracle.register(asker, pool, noise_key=spec.seed)
    on_disk = store.completed()
    done = on_disk
    state, meta = None, None
    if done:
        by_index: dict[int, dict] = {}
        for r in range(done):
            try:
                rows, meta = store.read(r)
            except UnreadableRound:  # torn or corrupt: recompute it and every later round
                done = on_disk = r
                break
            for index in meta.get("revoked", []):  # machine labels this round took back
                by_index.pop(int(index), None)
            by_index.update({int(row["index"]): row for row in rows})
        records = list(by_index.values())
    if done:
        globals_ = {row["index"]: row["global_index"] for row in records}
        state = ALState.from_records([{k: v for k, v in row.items() if k != "global_index"} for row in records],
                                     num_labels=num_labels)
        oracle.restore(asker, _answers_of(state, globals_))
    base = {"experiment_id": spec.experiment_id, "strategy": spec.strategy, "seed": spec.seed,
            "reference_id": spec.reference_id, "findings": list(findings), "settings": dict(spec.settings),
            "pool_size": int(pool.size), "test_size": int(split.test.size), "cost_scale": cost_scale,
            "budget_initial": k_initial, "budget_per_round": k_round}
    computed = 0
    fitted = None
    total_keys = ("machine_accepted_total", "machine_vectors_correct", "machine_labels_correct", "machine_labels_total")
    totals = {k: 0 if meta is None else int(meta.get(k, 0)) for k in total_keys}

    def fit_and_write(r: int, state: ALState, started: float, plan: RoundPlan | None,
                      grade: dict | None = None) -> dict:
        nonlocal fitted, totals
        if plan is not None and plan.machine_indices.size:
            kept = [i for i in plan.machine_indices if i in state and state.record(i).source == "machine"
                    and state.record(i).round == r]
            if kept and len(kept) != plan.machine_indices.size:  # the audit gate dropped some: regrade
                proposals = np.array([state.record(i).machine_labels for i in kept], dtype=np.uint8)
                grade = oracle.grade(asker, pool[np.asarray(kept)], proposals)
            if kept and grade is not None:
                totals = {"machine_accepted_total": totals["machine_accepted_total"] + len(kept),
                          "machine_vectors_correct": totals["machine_vectors_correct"] + grade["vectors_correct"],
                          "machine_labels_correct": totals["machine_labels_correct"] + grade["labels_correct"],
                          "machine_labels_total": totals["machine_labels_total"] + grade["labels_total"]}
        fit_started = time.perf_counter()
        fitted = _fit(model, state, pool, config.machine_weight)
        fit_seconds = time.perf_counter() - fit_started
        metrics = round_metrics(split.test_labels, model.predict(fitted, split.test), list(findings))
        summary = state.round_summary(r)
        machine = [rec for rec in state.records if rec.source == "machine"]
        meta = {**base, "round": r, "rounds_target": spec.rounds,
                "labelled": len(state), "human": int(state.verified_indices().size),
                "machine": len(machine), "machine_new": summary["machine"],
                "audited": sum(rec.audit != "none" for rec in machine),
                "audit_agreed": sum(rec.audit == "agreed" for rec in machine),
                "queried_new": summary["oracle"], "cost_round": summary["cost"],
                "cost_total": state.total_cost, "fraction": state.total_cost / cost_scale,
                "human_fraction": state.verified_indices().size / pool.size,
                **totals,
                "map": metrics["map"], "macro_f1": metrics["macro_f1"], "micro_f1": metrics["micro_f1"],
                "hamming_loss": metrics["hamming_loss"], "per_finding_ap": metrics["per_finding_ap"],
                "excluded": metrics["excluded"],
                "rejected_inconsistent": plan.rejected_inconsistent if plan is not None else 0,
                "revoked": plan.revoked.tolist() if plan is not None else [],
                "machine_revoked": int(plan.revoked.size) if plan is not None else 0,
                "fit_seconds": round(fit_seconds, 4), "round_seconds": round(time.perf_counter() - started, 4)}
        new = [{**rec.to_dict(), "global_index": int(pool[rec.index])} for rec in state.records if rec.round == r]
        store.write(r, new, meta)
        after_round(r)
        return meta

    if state is None:
        started = time.perf_counter()
        rng = round_rng(spec.seed, 0)
        if by_video:  # every frame of k_initial random videos
            videos = rng.choice(split.pool_videos, size=k_initial, replace=False)
            picks = np.flatnonzero(np.isin(split.pool_groups, videos)).astype(np.int64)
        else:
            picks = np.sort(rng.choice(pool.size, size=k_initial, replace=False)).astype(np.int64)
        labels, costs = oracle.query(asker, 0, pool[picks])
        state = ALState(num_labels).with_labels(picks, labels, source="initial", round=0, costs=costs)
        meta = fit_and_write(0, state, started, None)
        computed += 1
        done = 1
    elif done <= spec.rounds:
        fitted = _fit(model, state, pool, config.machine_weight)

    for r in range(done, spec.rounds + 1):
        started = time.perf_counter()
        rng = round_rng(spec.seed, r)
        unlabelled = state.unlabelled_indices(pool.size)
        verified = state.verified_indices()
        context = StrategyContext(labelled_labels=state.labels_of(verified), rng=rng)
        plan = None
        if unlabelled.size:  # every round with a pool queries >= 1 sample, so it adds records
            probs = model.predict(fitted, pool[unlabelled])
            groups = split.pool_groups[unlabelled] if split.pool_groups is not None else None
            held = state.unverified_indices()
            probs_held = model.predict(fitted, pool[held]) if confidence is not None else None
            plan = tsal_round(probs, unlabelled, state, k_round, strategy, context, confidence, audit_fraction, rng,
                              groups=groups, probs_machine=probs_held, whole_groups=by_video)
            if plan.round != r:
                raise RuntimeError(f"{asker}: round {r} planned as round {plan.round} (a round without records?)")
            # one round trip: the queries, the audits, and the grading of the machine proposals
            answer = oracle.answer_round(asker, r, pool[plan.queries], pool[plan.audits],
                                         pool[plan.machine_indices], plan.machine_labels)
            state = apply_answers(state, plan, answer["labels"], answer["audit_labels"],
                                  query_costs=answer["costs"],
                                  audit_costs=answer["audit_costs"] if plan.audits.size else 1.0,
                                  audit_gate=config.audit_gate)
            grade = answer["grade"]
        else:  # the whole pool is labelled; the round is still evaluated and written (no records)
            grade = None
        meta = fit_and_write(r, state, started, plan, grade)
        computed += 1

    store.write_log(oracle.log(asker))
    return {"experiment_id": spec.experiment_id, "computed": computed,
            "resumed": on_disk,
            "map": meta["map"], "macro_f1": meta["macro_f1"], "cost_total": meta["cost_total"]}


def _fit(model, state: ALState, pool: np.ndarray, machine_weight: float):
    idx, labels, verified = state.training_arrays()
    weights = np.where(verified, 1.0, machine_weight).astype(np.float32)
    if weights.sum() <= 0:  # only unweighted machine labels: fall back to the human ones
        weights = verified.astype(np.float32)
    return model.fit(pool[idx], labels, weights, verified)


def _answers_of(state: ALState, global_index: Mapping[int, int]) -> list[dict]:
    """The oracle answers recorded in a state: queries (initial + oracle) and audits."""
    out = []
    for rec in state.records:
        if rec.source in ("initial", "oracle"):
            out.append({"index": global_index[rec.index], "round": rec.round, "kind": "query",
                        "labels": rec.labels, "cost": rec.cost})
        elif rec.audit != "none":
            out.append({"index": global_index[rec.index], "round": rec.round, "kind": "audit",
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
