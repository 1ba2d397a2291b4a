"""One active-learning round as two pure functions: plan what to ask, then apply the answers.

TSAL's two streams (docs/tsal.md):

1. the query stream: the strategy scores the unlabelled pool, the top ``budget_k`` go to the
   oracle;
2. the machine stream: among the remaining unlabelled samples, confidence validation accepts
   confident, co-occurrence-consistent machine labels, at most ``max_per_round`` a round (the
   most confident); a share ``audit_fraction`` of them, drawn at random, is shown to the oracle
   to confirm or correct (human-machine interaction). Machine labels nobody audited are
   validated again every round against the current model: one that is no longer confident,
   breaks a rule of the grown labelled set, or would now be a different label vector is revoked
   (the sample returns to the pool).

Queries are video-aware when the caller passes each sample's video (``groups``): at most one
frame per video a round while unqueried videos remain (:func:`select_spread`). With the video as
the query unit (``whole_groups``) the machine stream works on videos too: a video is accepted on
the mean of its frames' probabilities, the cap and the audits count videos, every frame of an
accepted video carries its label vector, and re-validation takes back whole videos.

:func:`tsal_round` returns a :class:`RoundPlan` (nothing is labelled yet); the caller asks the
oracle (a Ray actor in the simulator) for the queries and the audits, then
:func:`apply_answers` returns the next :class:`ALState`. Baselines call the same function with
``confidence=None`` (machine stream off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ultrasound.active.confidence import ConfidenceConfig, confidence_validate
from ultrasound.active.state import ALState, LabelRecord, per_sample_values
from ultrasound.active.strategies import (Strategy, StrategyContext, check_probs, group_means, select_spread,
                                          select_top)


@dataclass(frozen=True, eq=False)
class RoundPlan:
    """What one round asks for. All index arrays hold POOL indices (int64).

    Attributes:
        round: the round number (``state.next_round``).
        queries: ``(k,)`` samples for the oracle, best-scored first.
        query_scores: ``(k,)`` their strategy scores.
        machine_indices: ``(m,)`` samples whose machine labels passed validation, sorted.
        machine_labels: ``(m, L)`` uint8 the machine labels, row-aligned with machine_indices.
        audits: ``(a,)`` the subset of machine_indices the oracle checks, sorted.
        rejected_inconsistent: how many confident candidates broke a co-occurrence rule.
        revoked: ``(r,)`` earlier unaudited machine labels that failed this round's validation,
            sorted: they leave the labelled set and return to the pool.
    """

    round: int
    queries: np.ndarray
    query_scores: np.ndarray
    machine_indices: np.ndarray
    machine_labels: np.ndarray
    audits: np.ndarray
    rejected_inconsistent: int = 0
    revoked: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def machine_labels_of(self, indices: np.ndarray) -> np.ndarray:
        """``(a,)`` pool indices from machine_indices -> ``(a, L)`` their machine labels."""
        position = {int(i): p for p, i in enumerate(self.machine_indices)}
        return self.machine_labels[[position[int(i)] for i in np.asarray(indices).ravel()]]


def round_rng(seed: int, round: int) -> np.random.Generator:
    """The generator for one round of one experiment, derived from ``(seed, round)`` only.

    A resumed experiment (state restored from records after a crash) then draws exactly what an
    uninterrupted one would have drawn in the same round.
    """
    if seed < 0 or round < 0:
        raise ValueError(f"seed and round must be >= 0, got {seed}, {round}")
    return np.random.default_rng([int(seed), int(round)])


def tsal_round(
    probs_unlabelled: np.ndarray,
    unlabelled_idx: np.ndarray,
    state: ALState,
    budget_k: int,
    strategy: Strategy,
    context: StrategyContext,
    confidence: ConfidenceConfig | None,
    audit_fraction: float,
    rng: np.random.Generator,
    *,
    groups: np.ndarray | None = None,
    probs_machine: np.ndarray | None = None,
    whole_groups: bool = False,
    machine_groups: np.ndarray | None = None,
    round: int | None = None,
) -> RoundPlan:
    """Plan one round.

    Args:
        probs_unlabelled: ``(U, L)`` current model probabilities of the unlabelled samples.
        unlabelled_idx: ``(U,)`` their pool indices (none may be labelled in ``state``).
        state: the labelled set so far.
        budget_k: oracle queries this round; more than ``U`` takes the whole pool.
        strategy: any :class:`Strategy`; ``context`` is passed to it unchanged.
        context: labelled labels (human-confirmed; also the co-occurrence source of the
            machine stream) and the generator the strategy may use.
        confidence: machine-stream settings, ``None`` to switch the stream off.
        audit_fraction: share in [0, 1] of accepted machine labels the oracle audits
            (``ceil(fraction * m)``, drawn uniformly with ``rng``).
        rng: tie-breaking, the machine cap and audit draws.
        groups: ``(U,)`` the video of each unlabelled sample; queries then take at most one
            frame per video while unqueried videos remain (``None``: frames are independent).
        probs_machine: ``(M, L)`` current probabilities of ``state.unverified_indices()`` (the
            unaudited machine labels, in that order), re-validated when the machine stream is
            on; ``None`` keeps them all.
        whole_groups: the query unit is the video: ``budget_k`` counts videos, a video scores
            the mean of its unlabelled frames' scores, and every unlabelled frame of a picked
            video is queried (the oracle then charges one video). The machine stream then
            works on videos: a video is accepted on the mean of its remaining frames'
            probabilities, ``confidence.max_per_round`` and ``audit_fraction`` count videos, and
            an audited video is audited in every frame.
        machine_groups: ``(M,)`` the video of each unaudited machine label
            (``state.unverified_indices()`` order); needed with ``whole_groups``, where a video's
            machine labels are re-validated together on their mean probabilities.
        round: the round this plan is for (``None``: ``state.next_round``); a round may follow
            rounds that added no records (a spent pool whose machine labels are re-validated).
            Must not be below ``state.next_round``.

    With no unlabelled sample left (``U = 0``) the plan still re-validates the machine labels:
    the ones it revokes return to the pool for the next round.
    """
    probs = check_probs(probs_unlabelled)
    unlabelled_idx = np.asarray(unlabelled_idx, dtype=np.int64).ravel()
    if unlabelled_idx.shape[0] != probs.shape[0]:
        raise ValueError(f"unlabelled_idx has {unlabelled_idx.shape[0]} entries, probs {probs.shape[0]} rows")
    if probs.shape[1] != state.num_labels:
        raise ValueError(f"probs has {probs.shape[1]} columns, the state {state.num_labels} labels")
    if np.unique(unlabelled_idx).shape[0] != unlabelled_idx.shape[0]:
        raise ValueError("unlabelled_idx has duplicates")
    overlap = np.intersect1d(unlabelled_idx, state.labelled_indices())
    if overlap.size:
        raise ValueError(f"{overlap.size} 'unlabelled' samples are already labelled, e.g. {overlap[:5].tolist()}")
    if budget_k < 0:
        raise ValueError(f"budget_k must be >= 0, got {budget_k}")
    round = state.next_round if round is None else int(round)
    if round < state.next_round:
        raise ValueError(f"round {round} is before the state's next round {state.next_round}")
    if not 0.0 <= audit_fraction <= 1.0:
        raise ValueError(f"audit_fraction must be in [0, 1], got {audit_fraction}")

    if whole_groups and groups is None:
        raise ValueError("whole_groups needs groups (the video of each sample)")
    groups = None if groups is None else _aligned(groups, probs.shape[0])
    k = min(int(budget_k), probs.shape[0])
    if k > 0:
        scores = np.asarray(strategy.score(probs, context), dtype=np.float64)
        if scores.shape != (probs.shape[0],):
            raise ValueError(f"strategy {strategy.name!r} returned shape {scores.shape}, expected ({probs.shape[0]},)")
        picked = _pick_groups(scores, k, groups, rng) if whole_groups else select_spread(scores, k, groups, rng)
    else:
        scores, picked = np.zeros(0), np.zeros(0, dtype=np.int64)
    queries = unlabelled_idx[picked]
    query_scores = scores[picked] if k > 0 else np.zeros(0)

    machine_indices = np.zeros(0, dtype=np.int64)
    machine_labels = np.zeros((0, state.num_labels), dtype=np.uint8)
    audits = np.zeros(0, dtype=np.int64)
    rejected = 0
    revoked = np.zeros(0, dtype=np.int64)
    if whole_groups and confidence is not None and probs_machine is not None and machine_groups is None:
        raise ValueError("whole_groups re-validates machine labels by video: pass machine_groups")
    if confidence is not None and probs_machine is not None:
        revoked = _revalidate(state, probs_machine, context, confidence,
                              _aligned(machine_groups, state.unverified_indices().size) if whole_groups else None)
    if confidence is not None:
        rest = np.ones(probs.shape[0], dtype=bool)
        rest[picked] = False
        positions = np.flatnonzero(rest)
        units = groups[positions] if whole_groups else np.arange(positions.size)
        _, code, unit_probs = group_means(probs[positions], units)
        check = confidence_validate(unit_probs, context.labelled_labels, confidence)
        rejected = int((check.confident & ~check.accepted).sum())
        accepted = np.flatnonzero(check.accepted)  # units
        if confidence.max_per_round is not None and accepted.size > confidence.max_per_round:
            accepted = accepted[select_top(check.confidence[accepted], confidence.max_per_round, rng)]
        # units in the order of their first pool index (frames: the pool index itself)
        first = np.full(unit_probs.shape[0], np.iinfo(np.int64).max)
        np.minimum.at(first, code, unlabelled_idx[positions])
        accepted = accepted[np.argsort(first[accepted], kind="stable")]
        members = np.flatnonzero(np.isin(code, accepted))
        order = np.argsort(unlabelled_idx[positions[members]], kind="stable")
        members = members[order]
        machine_indices = unlabelled_idx[positions[members]]
        machine_labels = check.labels[code[members]]
        n_audit = math.ceil(audit_fraction * accepted.size - 1e-9)
        if n_audit:
            audited_units = accepted[rng.choice(accepted.size, size=n_audit, replace=False)]
            audits = np.sort(machine_indices[np.isin(code[members], audited_units)])
    return RoundPlan(
        round=round,
        queries=queries.astype(np.int64),
        query_scores=query_scores,
        machine_indices=machine_indices.astype(np.int64),
        machine_labels=machine_labels.astype(np.uint8),
        audits=audits.astype(np.int64),
        rejected_inconsistent=rejected,
        revoked=revoked,
    )


def _pick_groups(scores: np.ndarray, k: int, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions of every sample of the ``k`` groups with the highest mean score, best group
    first (within a group, best sample first)."""
    names, code, mean = group_means(scores, groups)
    best = select_top(mean, min(k, names.size), rng)
    rank = np.full(names.size, names.size, dtype=np.int64)
    rank[best] = np.arange(best.size)
    chosen = np.flatnonzero(rank[code] < names.size)
    return chosen[np.lexsort((-scores[chosen], rank[code[chosen]]))].astype(np.int64)


def _aligned(groups: np.ndarray, n: int) -> np.ndarray:
    groups = np.asarray(groups).ravel()
    if groups.shape[0] != n:
        raise ValueError(f"groups has {groups.shape[0]} entries, probs {n} rows")
    return groups


def _revalidate(state: ALState, probs_machine: np.ndarray, context: StrategyContext,
                confidence: ConfidenceConfig, groups: np.ndarray | None = None) -> np.ndarray:
    """Sorted pool indices of the unaudited machine labels that this round's validation rejects
    or would label differently; with ``groups`` (their videos) a video is validated on its mean
    probabilities and taken back whole."""
    held = state.unverified_indices()
    probs = check_probs(probs_machine)
    if probs.shape != (held.size, state.num_labels):
        raise ValueError(f"probs_machine must be ({held.size}, {state.num_labels}) for the unaudited machine "
                         f"labels, got {probs.shape}")
    if held.size == 0:
        return held
    _, code, unit_probs = group_means(probs, groups if groups is not None else np.arange(held.size))
    check = confidence_validate(unit_probs, context.labelled_labels, confidence)
    changed = (check.labels[code] != state.labels_of(held)).any(axis=1)
    failed = ~check.accepted
    failed[code[changed]] = True
    return held[failed[code]]


def apply_answers(
    state: ALState,
    plan: RoundPlan,
    oracle_labels: np.ndarray,
    audit_labels: np.ndarray | None = None,
    *,
    query_costs: float | np.ndarray = 1.0,
    audit_costs: float | np.ndarray = 1.0,
    audit_gate: float | None = None,
) -> ALState:
    """The next state after the oracle answered a plan.

    Args:
        oracle_labels: ``(k, L)`` 0/1 answers, row-aligned with ``plan.queries``.
        audit_labels: ``(a, L)`` 0/1 answers, row-aligned with ``plan.audits`` (``None`` when
            there are no audits).
        query_costs, audit_costs: scalar or per-sample costs the oracle charged.
        audit_gate: if set and the audited machine labels' error rate (share of audited vectors
            the oracle changed) exceeds it, this round's unaudited machine labels are dropped
            (they return to the pool); audited samples keep the oracle's labels either way.

    Audited machine labels take the oracle's labels; one the oracle changed is recorded with
    ``audit="corrected"`` and the machine's proposal in ``machine_labels``.
    """
    if plan.round < state.next_round:
        raise ValueError(f"plan is for round {plan.round} but the state is at round {state.next_round} "
                         "(already applied?)")
    L = state.num_labels
    oracle_labels = _answers(oracle_labels, plan.queries.size, L, "oracle_labels")
    audit_labels = _answers(audit_labels, plan.audits.size, L, "audit_labels")
    query_costs = per_sample_values(query_costs, plan.queries.size, "query_costs")
    audit_costs = per_sample_values(audit_costs, plan.audits.size, "audit_costs")
    if np.intersect1d(plan.queries, plan.machine_indices).size:
        raise ValueError("a sample is both queried and machine-labelled")
    if np.setdiff1d(plan.audits, plan.machine_indices).size:
        raise ValueError("audits must be a subset of the machine-labelled samples")
    state = state.without(plan.revoked)

    records = [LabelRecord(int(i), plan.round, "oracle", c, tuple(y))
               for i, y, c in zip(plan.queries, oracle_labels, query_costs)]
    audited = {int(i): (y, c) for i, y, c in zip(plan.audits, audit_labels, audit_costs)}
    proposed = plan.machine_labels_of(plan.audits) if plan.audits.size else np.zeros((0, L), np.uint8)
    wrong = int((proposed != audit_labels).any(axis=1).sum()) if plan.audits.size else 0
    drop_unaudited = audit_gate is not None and plan.audits.size > 0 and wrong / plan.audits.size > audit_gate
    for i, machine in zip(plan.machine_indices, plan.machine_labels):
        i, machine = int(i), tuple(int(v) for v in machine)
        if i in audited:
            answer, cost = audited[i]
            answer = tuple(int(v) for v in answer)
            audit = "agreed" if answer == machine else "corrected"
            records.append(LabelRecord(i, plan.round, "machine", cost, answer, machine, audit))
        elif not drop_unaudited:
            records.append(LabelRecord(i, plan.round, "machine", 0.0, machine, machine, "none"))
    return state.with_records(records)


def _answers(labels: np.ndarray | None, n: int, num_labels: int, name: str) -> np.ndarray:
    if labels is None:
        labels = np.zeros((0, num_labels), dtype=np.uint8)
    labels = np.asarray(labels)
    if labels.shape != (n, num_labels):
        raise ValueError(f"{name} must be ({n}, {num_labels}), got {labels.shape}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 values")
    return labels.astype(np.uint8)
