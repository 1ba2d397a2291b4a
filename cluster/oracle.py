"""The simulated annotator: a Ray actor that holds the ground truth and answers label queries.

Every experiment ("asker") talks to the oracle only through:

- ``register(asker, pool, noise_key)``: the global sample indices the asker may ask about (its
  training pool) and which annotator-error stream it sees;
- ``query(asker, round, indices)``: labels for exactly those samples, and what each answer cost;
- ``audit(asker, round, indices)``: the oracle checks machine labels of those samples (it
  answers with its labels, the caller compares), at ``audit_cost`` per sample (per video with
  ``cost_unit="video"``);
- ``grade(asker, indices, labels)``: how many proposed label vectors are right, as counts only
  (the simulator's measure of machine-label precision; it never returns labels);
- ``answer_round(...)``: the three above for one planned round in a single call. On a busy
  machine every synchronous call waits for the actor's process to be scheduled, so one round
  trip per round instead of three matters.

No method returns the truth wholesale: labels leave the actor only as answers to a query or an
audit of given indices inside the asker's pool, and each answer is logged (asker, round, kind,
index, labels given, cost).

Costs (``cost_unit``):

- ``"frame"``: each queried frame costs 1;
- ``"video"``: the first frame of a video an asker queries costs 1 video unit, every later frame
  of the same video (same or later round) costs 0: an annotator who watched a clip labels its
  frames at no extra cost. Within one query the first index of a video in query order pays.
- audits cost ``audit_cost`` per audited frame with ``"frame"`` (confirming a shown label vector),
  and per audited video with ``"video"``: within one audit call the first frame of a video in
  the order given pays and its other frames cost 0 (the reviewer watches the clip once and confirms
  its label; the video-unit machine stream audits whole videos).

Annotator error (``noise``): each (sample, finding) answer is flipped with probability
``noise``. The flips are drawn once per ``noise_key`` (seeded with ``noise_seed``), so asking
the same sample twice gives the same answer, all strategies run with the same experiment seed
see the same annotator, and a resumed experiment gets exactly the answers it got before.

Crash recovery: an experiment that resumes from its persisted rounds calls ``restore`` with the
answers recorded there; the oracle re-derives each answer, checks it matches, and rebuilds the
asker's ledger (paid videos, log) from them. Answers of a round that never completed are void:
``restore`` drops them and the rerun of that round asks again.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import ray

COST_UNITS = ("frame", "video")
KINDS = ("query", "audit")


class OracleError(ValueError):
    """A query the oracle refuses (unknown asker, index outside the pool, bad labels)."""


class UnknownAsker(OracleError):
    """The asker has not registered (or the oracle restarted and lost its ledgers): the
    experiment should start again, which registers and restores its ledger from disk."""


@dataclass
class _Ledger:
    pool: np.ndarray | None  # bool mask over global indices, None = any index
    noise_key: int
    paid_videos: set = field(default_factory=set)
    log: list = field(default_factory=list)  # (round, kind, indices, labels, costs) chunks


class OracleBook:
    """The oracle's logic as a plain class (the Ray actor :class:`Oracle` wraps it; serial
    benchmark runs use it in-process).

    Args:
        truth: ``(N, L)`` 0/1 ground truth of every sample (global indices ``0..N-1``).
        video_ids: ``(N,)`` the video of each sample (for per-video costs).
        cost_unit: ``"frame"`` or ``"video"``.
        audit_cost: cost of auditing one machine label (>= 0).
        noise: per-(sample, finding) flip probability in [0, 0.5].
        noise_seed: seed of the flips.

    Example:
        >>> book = OracleBook(np.array([[1, 0], [0, 1], [1, 1]]), np.array(["a", "a", "b"]), cost_unit="video")
        >>> book.register("exp", None, noise_key=0)
        >>> labels, costs = book.query("exp", 1, [1, 0, 2])
        >>> labels.tolist(), costs.tolist()
        ([[0, 1], [1, 0], [1, 1]], [1.0, 0.0, 1.0])
    """

    def __init__(self, truth: np.ndarray, video_ids: np.ndarray, *, cost_unit: str = "frame",
                 audit_cost: float = 1.0, noise: float = 0.0, noise_seed: int = 0) -> None:
        truth = np.asarray(truth)
        if truth.ndim != 2 or truth.shape[0] == 0 or not np.isin(truth, (0, 1)).all():
            raise OracleError(f"truth must be a non-empty (N, L) 0/1 matrix, got shape {truth.shape}")
        video_ids = np.asarray(video_ids).astype(str)
        if video_ids.shape != (truth.shape[0],):
            raise OracleError(f"video_ids must be ({truth.shape[0]},), got {video_ids.shape}")
        if cost_unit not in COST_UNITS:
            raise OracleError(f"cost_unit must be one of {COST_UNITS}, got {cost_unit!r}")
        if not np.isfinite(audit_cost) or audit_cost < 0:
            raise OracleError(f"audit_cost must be finite and >= 0, got {audit_cost}")
        if not 0.0 <= noise <= 0.5:
            raise OracleError(f"noise must be in [0, 0.5], got {noise}")
        self._truth = truth.astype(np.uint8)
        self._truth.setflags(write=False)
        self._videos = video_ids
        self.cost_unit, self.audit_cost = cost_unit, float(audit_cost)
        self.noise, self.noise_seed = float(noise), int(noise_seed)
        self._ledgers: dict[str, _Ledger] = {}
        self._flips: dict[int, np.ndarray] = {}

    # -- setup ------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self._truth.shape[0])

    @property
    def num_labels(self) -> int:
        return int(self._truth.shape[1])

    def register(self, asker: str, pool: Iterable[int] | np.ndarray | None, noise_key: int = 0) -> None:
        """Open (or reset) ``asker``'s ledger; it may ask only about ``pool`` (``None``: any index)."""
        mask = None
        if pool is not None:
            idx = self._indices(pool)
            mask = np.zeros(self.num_samples, dtype=bool)
            mask[idx] = True
        self._ledgers[str(asker)] = _Ledger(pool=mask, noise_key=int(noise_key))

    # -- answers ----------------------------------------------------------------------------
    def query(self, asker: str, round: int, indices: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(k, L)`` uint8 labels and ``(k,)`` float64 costs for ``indices`` (global), logged."""
        ledger, idx = self._check(asker, indices)
        labels = self._answers(ledger, idx)
        costs = np.ones(idx.size, dtype=np.float64)
        if self.cost_unit == "video":
            for position, video in enumerate(self._videos[idx]):
                if video in ledger.paid_videos:
                    costs[position] = 0.0
                else:
                    ledger.paid_videos.add(video)
        ledger.log.append((int(round), "query", idx, labels, costs))
        return labels.copy(), costs.copy()

    def audit(self, asker: str, round: int, indices: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The oracle's labels for machine-labelled ``indices`` (the caller compares them with its
        proposals) and their costs: ``audit_cost`` per sample, or per video with ``cost_unit="video"``
        (the first of its frames in ``indices`` pays), logged."""
        ledger, idx = self._check(asker, indices)
        labels = self._answers(ledger, idx)
        costs = np.full(idx.size, self.audit_cost, dtype=np.float64)
        if self.cost_unit == "video":
            _, first = np.unique(self._videos[idx], return_index=True)
            costs[np.setdiff1d(np.arange(idx.size), first)] = 0.0
        ledger.log.append((int(round), "audit", idx, labels, costs))
        return labels.copy(), costs.copy()

    def grade(self, asker: str, indices: Iterable[int] | np.ndarray, labels: np.ndarray) -> dict:
        """Counts of proposed label vectors that equal the noise-free truth: ``{"n", "vectors_correct",
        "labels_correct", "labels_total"}``. No label is returned and nothing is charged."""
        _, idx = self._check(asker, indices)
        labels = np.asarray(labels)
        if labels.shape != (idx.size, self.num_labels) or (labels.size and not np.isin(labels, (0, 1)).all()):
            raise OracleError(f"labels must be ({idx.size}, {self.num_labels}) 0/1, got {labels.shape}")
        equal = labels.astype(np.uint8) == self._truth[idx]
        return {"n": int(idx.size), "vectors_correct": int(equal.all(axis=1).sum()),
                "labels_correct": int(equal.sum()), "labels_total": int(equal.size)}

    def answer_round(self, asker: str, round: int, queries: Iterable[int] | np.ndarray,
                     audits: Iterable[int] | np.ndarray, proposed: Iterable[int] | np.ndarray,
                     proposed_labels: np.ndarray) -> dict:
        """One round's :meth:`query`, :meth:`audit` and :meth:`grade` in one call (one round trip
        to the actor instead of three): ``{"labels", "costs", "audit_labels", "audit_costs",
        "grade"}``. All three are known once the round is planned."""
        labels, costs = self.query(asker, round, queries)
        audits = np.asarray(audits, dtype=np.int64).ravel()
        audit_labels, audit_costs = self.audit(asker, round, audits) if audits.size else (None, None)
        proposed = np.asarray(proposed, dtype=np.int64).ravel()
        grade = self.grade(asker, proposed, proposed_labels) if proposed.size else None
        return {"labels": labels, "costs": costs, "audit_labels": audit_labels, "audit_costs": audit_costs,
                "grade": grade}

    def answer_rounds(self, requests: Iterable[tuple]) -> list[dict | OracleError]:
        """Many :meth:`answer_round` calls in one (a batch of experiments, one actor round trip):
        each request's ``(asker, round, queries, audits, proposed, proposed_labels)`` answer, or
        the :class:`OracleError` it raised (that experiment fails, the others go on), in order."""
        out: list[dict | OracleError] = []
        for args in requests:
            try:
                out.append(self.answer_round(*args))
            except OracleError as err:
                out.append(err)
        return out

    # -- recovery ---------------------------------------------------------------------------
    def restore(self, asker: str, answers: Iterable[Mapping]) -> None:
        """Rebuild ``asker``'s ledger from persisted answers ``{"index", "round", "kind",
        "labels", "cost"}`` (global index). Each answer is re-derived and must match; anything
        the ledger held before (e.g. a round that never completed) is dropped."""
        ledger = self._ledger(asker)
        ledger.paid_videos, ledger.log = set(), []
        rows = sorted(answers, key=lambda a: (int(a["round"]), a["kind"] != "query", int(a["index"])))
        chunks: dict[tuple[int, str], list] = {}
        for answer in rows:
            if answer["kind"] not in KINDS:
                raise OracleError(f"answer kind must be one of {KINDS}, got {answer['kind']!r}")
            chunks.setdefault((int(answer["round"]), answer["kind"]), []).append(answer)
        for (round, kind), items in chunks.items():
            _, idx = self._check(asker, [a["index"] for a in items])
            expected = self._answers(ledger, idx)
            given = np.asarray([a["labels"] for a in items], dtype=np.uint8).reshape(idx.size, self.num_labels)
            if not np.array_equal(expected, given):
                bad = idx[(expected != given).any(axis=1)]
                raise OracleError(f"{asker}: persisted answers for samples {bad[:5].tolist()} (round {round}) "
                                  "are not what this oracle answers (different data, noise or seed?)")
            if kind == "query":
                ledger.paid_videos.update(self._videos[idx].tolist())
            ledger.log.append((round, kind, idx, expected, np.asarray([a["cost"] for a in items], np.float64)))

    # -- accounting -------------------------------------------------------------------------
    def costs(self, asker: str | None = None) -> dict:
        """``{"query": total, "audit": total, "total": total, "answers": count}`` for one asker
        or all of them."""
        askers = [str(asker)] if asker is not None else list(self._ledgers)
        out = {"query": 0.0, "audit": 0.0, "answers": 0}
        for name in askers:
            for _, kind, idx, _, costs in self._ledger(name).log:
                out[kind] += float(costs.sum())
                out["answers"] += int(idx.size)
        out["total"] = out["query"] + out["audit"]
        return out

    def log(self, asker: str | None = None) -> dict[str, np.ndarray]:
        """Every answer given (asker, round, kind, index, labels, cost) as column arrays."""
        askers = [str(asker)] if asker is not None else sorted(self._ledgers)
        cols: dict[str, list] = {"asker": [], "round": [], "kind": [], "index": [], "labels": [], "cost": []}
        for name in askers:
            for round, kind, idx, labels, costs in self._ledger(name).log:
                cols["asker"] += [name] * idx.size
                cols["round"] += [round] * idx.size
                cols["kind"] += [kind] * idx.size
                cols["index"].append(idx)
                cols["labels"].append(labels)
                cols["cost"].append(costs)
        return {
            "asker": np.array(cols["asker"], dtype=str), "round": np.array(cols["round"], dtype=np.int64),
            "kind": np.array(cols["kind"], dtype=str),
            "index": np.concatenate(cols["index"]) if cols["index"] else np.zeros(0, np.int64),
            "labels": (np.concatenate(cols["labels"]) if cols["labels"]
                       else np.zeros((0, self.num_labels), np.uint8)),
            "cost": np.concatenate(cols["cost"]) if cols["cost"] else np.zeros(0),
        }

    def askers(self) -> list[str]:
        return sorted(self._ledgers)

    # -- internals --------------------------------------------------------------------------
    def _ledger(self, asker: str) -> _Ledger:
        try:
            return self._ledgers[str(asker)]
        except KeyError:
            raise UnknownAsker(f"unknown asker {asker!r}: register it first") from None

    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices).ravel()
        if idx.size and (not np.issubdtype(idx.dtype, np.integer)):
            if not np.all(np.mod(idx, 1) == 0):
                raise OracleError("indices must be integers")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise OracleError(f"indices must be in [0, {self.num_samples}), got {idx.min()}..{idx.max()}")
        return idx

    def _check(self, asker: str, indices) -> tuple[_Ledger, np.ndarray]:
        ledger = self._ledger(asker)
        idx = self._indices(indices)
        if np.unique(idx).size != idx.size:
            raise OracleError("indices contain duplicates")
        if ledger.pool is not None and idx.size and not ledger.pool[idx].all():
            outside = idx[~ledger.pool[idx]]
            raise OracleError(f"{asker}: samples {outside[:5].tolist()} are outside its pool")
        return ledger, idx

    def _answers(self, ledger: _Ledger, idx: np.ndarray) -> np.ndarray:
        labels = self._truth[idx]
        if self.noise > 0:
            labels = labels ^ self._flip_mask(ledger.noise_key)[idx]
        return labels.astype(np.uint8)

    def _flip_mask(self, noise_key: int) -> np.ndarray:
        mask = self._flips.get(noise_key)
        if mask is None:
            rng = np.random.default_rng([self.noise_seed, zlib.crc32(str(noise_key).encode())])
            mask = (rng.random(self._truth.shape) < self.noise).astype(np.uint8)
            self._flips[noise_key] = mask
        return mask


@ray.remote(num_cpus=0, max_restarts=3)
class Oracle(OracleBook):
    """:class:`OracleBook` as a Ray actor (one per simulation, shared by its experiments).

    After a restart its ledgers are empty: an experiment's next call then fails on its unknown
    asker, the experiment is retried and restores its ledger from its persisted rounds.
    """


class OracleClient:
    """Blocking calls to an :class:`Oracle` actor with the same methods as :class:`OracleBook`."""

    def __init__(self, handle: ray.actor.ActorHandle) -> None:
        self.handle = handle

    def __getattr__(self, name: str):
        method = getattr(self.handle, name)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))
