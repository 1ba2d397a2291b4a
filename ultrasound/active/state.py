"""Serialisable active-learning state: who labelled which sample, in which round, at what cost.

One :class:`LabelRecord` per labelled pool sample (pool indices are positions ``0..n-1`` of the
experiment's sample table). :class:`ALState` is immutable: every update returns a new state, so a
round can be computed, checked and then written (``to_records`` -> Parquet rows) before it
replaces the previous one; ``from_records`` restores it after a crash.

Sources: ``"initial"`` (the seed set, labelled by the oracle before round 1), ``"oracle"`` (queried
by the strategy), ``"machine"`` (accepted by confidence validation). A machine record may have
been audited: ``audit="agreed"`` (the oracle confirmed it) or ``"corrected"`` (the oracle's labels
replaced the machine's; the machine's are kept in ``machine_labels``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

SOURCES = ("initial", "oracle", "machine")
AUDITS = ("none", "agreed", "corrected")
RECORD_KEYS = ("index", "round", "source", "cost", "labels", "machine_labels", "audit")


@dataclass(frozen=True)
class LabelRecord:
    """One labelled sample.

    Attributes:
        index: pool index.
        round: 0 for the initial set, then 1, 2, ...
        source: ``"initial" | "oracle" | "machine"``.
        cost: what obtaining this label cost (oracle query or audit; 0 for an unaudited machine
            label).
        labels: the ``L`` 0/1 labels training uses.
        machine_labels: the machine's proposal for a machine record, else ``()``.
        audit: ``"none" | "agreed" | "corrected"`` (only machine records are audited).
    """

    index: int
    round: int
    source: str
    cost: float
    labels: tuple[int, ...]
    machine_labels: tuple[int, ...] = ()
    audit: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", int(self.index))
        object.__setattr__(self, "round", int(self.round))
        object.__setattr__(self, "cost", float(self.cost))
        object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
        object.__setattr__(self, "machine_labels", tuple(int(v) for v in self.machine_labels))
        if self.index < 0 or self.round < 0:
            raise ValueError(f"index and round must be >= 0, got {self.index}, {self.round}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.audit not in AUDITS:
            raise ValueError(f"audit must be one of {AUDITS}, got {self.audit!r}")
        if not np.isfinite(self.cost) or self.cost < 0:
            raise ValueError(f"cost must be finite and >= 0, got {self.cost}")
        if not self.labels or any(v not in (0, 1) for v in self.labels + self.machine_labels):
            raise ValueError(f"labels must be a non-empty 0/1 vector, got {self.labels}")
        if self.source == "machine":
            if len(self.machine_labels) != len(self.labels):
                raise ValueError("a machine record keeps the machine's labels (same length)")
            if self.audit == "none" and self.machine_labels != self.labels:
                raise ValueError("an unaudited machine record trains on the machine's labels")
            if self.audit == "agreed" and self.machine_labels != self.labels:
                raise ValueError("an audit that agreed cannot change the labels")
            if self.audit == "corrected" and self.machine_labels == self.labels:
                raise ValueError("an audit that corrected must change the labels")
        elif self.machine_labels or self.audit != "none":
            raise ValueError(f"only machine records carry machine_labels/audit, got {self.source}")

    @property
    def verified(self) -> bool:
        """A human stands behind the labels: initial, oracle, or an audited machine label."""
        return self.source != "machine" or self.audit != "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "round": self.round,
            "source": self.source,
            "cost": self.cost,
            "labels": list(self.labels),
            "machine_labels": list(self.machine_labels),
            "audit": self.audit,
        }


class ALState:
    """The labelled part of one experiment's pool.

    Example:
        >>> s = ALState(2).with_labels([3, 5], [[1, 0], [0, 0]], source="initial", round=0)
        >>> s.labelled_indices().tolist(), s.unlabelled_indices(6).tolist(), s.total_cost
        ([3, 5], [0, 1, 2, 4], 2.0)
    """

    def __init__(self, num_labels: int, records: Iterable[LabelRecord] = ()) -> None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = int(num_labels)
        by_index: dict[int, LabelRecord] = {}
        for record in records:
            if len(record.labels) != self.num_labels:
                raise ValueError(f"record {record.index} has {len(record.labels)} labels, expected {self.num_labels}")
            if record.index in by_index:
                raise ValueError(f"sample {record.index} is labelled twice")
            by_index[record.index] = record
        self._records = dict(sorted(by_index.items()))

    def __len__(self) -> int:
        return len(self._records)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ALState) and (self.num_labels, self._records) == (other.num_labels, other._records)

    def __repr__(self) -> str:
        return f"ALState(num_labels={self.num_labels}, labelled={len(self)}, rounds={self.last_round})"

    @property
    def records(self) -> tuple[LabelRecord, ...]:
        return tuple(self._records.values())

    def record(self, index: int) -> LabelRecord:
        return self._records[int(index)]

    def __contains__(self, index: object) -> bool:
        return index in self._records

    @property
    def last_round(self) -> int:
        """The highest round with a record (-1 when empty)."""
        return max((r.round for r in self._records.values()), default=-1)

    @property
    def next_round(self) -> int:
        """The round the next plan belongs to (>= 1: round 0 is the initial set)."""
        return max(self.last_round + 1, 1)

    @property
    def total_cost(self) -> float:
        return float(sum(r.cost for r in self._records.values()))

    @cached_property
    def _columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(indices, machine, verified)`` of the records, sorted by index; computed once (the
        state is immutable), because every round asks for these sets several times."""
        records = self._records.values()
        return (np.fromiter(self._records, dtype=np.int64, count=len(self._records)),
                np.fromiter((r.source == "machine" for r in records), dtype=bool, count=len(self._records)),
                np.fromiter((r.verified for r in records), dtype=bool, count=len(self._records)))

    def labelled_indices(self) -> np.ndarray:
        """Every sample with a training label (any source), sorted."""
        return self._columns[0].copy()

    def machine_indices(self) -> np.ndarray:
        """Samples that entered through the machine stream (audited or not), sorted."""
        indices, machine, _ = self._columns
        return indices[machine]

    def verified_indices(self) -> np.ndarray:
        """Samples whose labels a human gave or confirmed, sorted."""
        indices, _, verified = self._columns
        return indices[verified]

    def unverified_indices(self) -> np.ndarray:
        """Machine labels no human has seen (unaudited), sorted: the ones re-validated every round."""
        indices, _, verified = self._columns
        return indices[~verified]

    def unlabelled_indices(self, pool_size: int) -> np.ndarray:
        """``0..pool_size-1`` minus the labelled samples."""
        if self._records and max(self._records) >= pool_size:
            raise ValueError(f"pool_size {pool_size} is smaller than a labelled index {max(self._records)}")
        mask = np.ones(pool_size, dtype=bool)
        mask[self.labelled_indices()] = False
        return np.flatnonzero(mask).astype(np.int64)

    def labels_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(k,)`` pool indices -> ``(k, L)`` uint8 training labels."""
        wanted = np.asarray(indices, dtype=np.int64).ravel()
        keys = self._columns[0]
        position = np.minimum(np.searchsorted(keys, wanted), max(keys.size - 1, 0))
        missing = wanted[(keys[position] != wanted) if keys.size else np.ones(wanted.size, bool)]
        if missing.size:
            raise KeyError(int(missing[0]))
        return self._label_matrix[position].copy()

    @cached_property
    def _label_matrix(self) -> np.ndarray:
        """``(len(self), L)`` uint8 training labels, row-aligned with ``labelled_indices()``."""
        return np.array([r.labels for r in self._records.values()], dtype=np.uint8).reshape(len(self),
                                                                                            self.num_labels)

    def training_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(indices (M,), labels (M, L) uint8, verified (M,) bool)`` of every labelled sample."""
        indices, _, verified = self._columns
        return indices.copy(), self._label_matrix.copy(), verified.copy()

    def with_labels(
        self,
        indices: Sequence[int] | np.ndarray,
        labels: np.ndarray | Sequence[Sequence[int]],
        *,
        source: str,
        round: int,
        costs: float | Sequence[float] | np.ndarray = 1.0,
    ) -> "ALState":
        """A new state with human labels added (``source`` ``"initial"`` or ``"oracle"``)."""
        if source not in ("initial", "oracle"):
            raise ValueError(f"with_labels adds human labels: source 'initial' or 'oracle', got {source!r}")
        indices = np.asarray(indices, dtype=np.int64).ravel()
        labels = np.asarray(labels).reshape(len(indices), -1) if len(indices) else np.zeros((0, self.num_labels))
        costs = per_sample_values(costs, len(indices), "costs")
        new = [LabelRecord(int(i), round, source, c, tuple(y)) for i, y, c in zip(indices, labels, costs)]
        return ALState(self.num_labels, list(self._records.values()) + new)

    def without(self, indices: Sequence[int] | np.ndarray) -> "ALState":
        """A new state with these unaudited machine labels revoked (the samples are unlabelled
        again). A human label is never revoked."""
        drop = {int(i) for i in np.asarray(indices, dtype=np.int64).ravel()}
        if not drop:
            return self
        bad = sorted(i for i in drop if i not in self._records or self._records[i].verified)
        if bad:
            raise ValueError(f"only unaudited machine labels can be revoked, not samples {bad[:5]}")
        return ALState(self.num_labels, [r for i, r in self._records.items() if i not in drop])

    def with_records(self, records: Iterable[LabelRecord]) -> "ALState":
        """A new state with more records (each index must be new)."""
        return ALState(self.num_labels, list(self._records.values()) + list(records))

    def round_summary(self, round: int) -> dict[str, Any]:
        """Counts and cost of one round: what a per-round results row needs."""
        rows = [r for r in self._records.values() if r.round == round]
        machine = [r for r in rows if r.source == "machine"]
        return {
            "round": int(round),
            "oracle": sum(r.source in ("initial", "oracle") for r in rows),
            "machine": len(machine),
            "audited": sum(r.audit != "none" for r in machine),
            "corrected": sum(r.audit == "corrected" for r in machine),
            "cost": float(sum(r.cost for r in rows)),
            "labelled_total": sum(r.round <= round for r in self._records.values()),
            "cost_total": float(sum(r.cost for r in self._records.values() if r.round <= round)),
        }

    def to_records(self) -> list[dict[str, Any]]:
        """Plain dicts (keys :data:`RECORD_KEYS`), sorted by index: Parquet/JSON friendly."""
        return [r.to_dict() for r in self._records.values()]

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], num_labels: int | None = None) -> "ALState":
        """Inverse of :meth:`to_records`; ``num_labels`` is needed only for an empty list."""
        parsed = []
        for row in records:
            missing = sorted(set(RECORD_KEYS) - set(row))
            extra = sorted(set(row) - set(RECORD_KEYS))
            if missing or extra:
                raise ValueError(f"bad AL record: missing {missing}, unknown {extra}; keys are {list(RECORD_KEYS)}")
            machine = row["machine_labels"]
            parsed.append(LabelRecord(
                index=row["index"], round=row["round"], source=str(row["source"]), cost=row["cost"],
                labels=tuple(row["labels"]), machine_labels=tuple(machine) if machine is not None else (),
                audit=str(row["audit"]),
            ))
        if num_labels is None:
            if not parsed:
                raise ValueError("an empty record list needs num_labels")
            num_labels = len(parsed[0].labels)
        return cls(num_labels, parsed)


def per_sample_values(values: float | Sequence[float] | np.ndarray, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    arr = arr.ravel()
    if arr.shape[0] != n:
        raise ValueError(f"{name} must be a scalar or have {n} entries, got {arr.shape[0]}")
    return arr
