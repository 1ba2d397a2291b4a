"""ALState: index bookkeeping, costs, round summaries and the round trip through records
(plain dicts and a Parquet file)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ultrasound.active.state import ALState, LabelRecord


def sample_state() -> ALState:
    state = ALState(3).with_labels([0, 4], [[1, 0, 0], [0, 1, 1]], source="initial", round=0, costs=[1.0, 2.0])
    state = state.with_labels([7], [[0, 0, 1]], source="oracle", round=1, costs=1.5)
    return state.with_records([
        LabelRecord(2, 1, "machine", 0.0, (1, 1, 0), (1, 1, 0), "none"),
        LabelRecord(5, 1, "machine", 0.5, (0, 0, 0), (0, 1, 0), "corrected"),
        LabelRecord(9, 2, "machine", 0.5, (1, 0, 1), (1, 0, 1), "agreed"),
    ])


def test_indices_costs_and_labels():
    s = sample_state()
    assert s.labelled_indices().tolist() == [0, 2, 4, 5, 7, 9]
    assert s.machine_indices().tolist() == [2, 5, 9]
    assert s.verified_indices().tolist() == [0, 4, 5, 7, 9]  # unaudited machine label 2 is not
    assert s.unlabelled_indices(11).tolist() == [1, 3, 6, 8, 10]
    assert s.total_cost == pytest.approx(1.0 + 2.0 + 1.5 + 0.5 + 0.5)
    assert s.labels_of([5, 2]).tolist() == [[0, 0, 0], [1, 1, 0]]
    indices, labels, verified = s.training_arrays()
    assert indices.tolist() == [0, 2, 4, 5, 7, 9] and labels.shape == (6, 3)
    assert verified.tolist() == [True, False, True, True, True, True]
    assert (s.last_round, s.next_round) == (2, 3)
    assert ALState(3).next_round == 1


def test_round_summary():
    s = sample_state()
    assert s.round_summary(1) == {
        "round": 1, "oracle": 1, "machine": 2, "audited": 1, "corrected": 1, "cost": 2.0,
        "labelled_total": 5, "cost_total": 5.0,
    }


def test_records_round_trip_through_parquet(tmp_path):
    s = sample_state()
    records = s.to_records()
    assert records[2] == {"index": 4, "round": 0, "source": "initial", "cost": 2.0,
                          "labels": [0, 1, 1], "machine_labels": [], "audit": "none"}
    assert ALState.from_records(records) == s
    path = tmp_path / "state.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    restored = ALState.from_records(pq.read_table(path).to_pylist())
    assert restored == s
    assert restored.total_cost == s.total_cost
    assert ALState.from_records([], num_labels=3) == ALState(3)


def test_updates_do_not_mutate():
    s = ALState(2)
    t = s.with_labels([1], [[1, 0]], source="initial", round=0)
    assert len(s) == 0 and len(t) == 1


def test_invalid_records_are_rejected():
    s = sample_state()
    with pytest.raises(ValueError, match="labelled twice"):
        s.with_labels([4], [[0, 0, 0]], source="oracle", round=3)
    with pytest.raises(ValueError, match="source"):
        LabelRecord(1, 1, "human", 1.0, (1, 0))
    with pytest.raises(ValueError, match="unaudited machine record"):
        LabelRecord(1, 1, "machine", 0.0, (1, 0), (0, 0), "none")
    with pytest.raises(ValueError, match="only machine records"):
        LabelRecord(1, 1, "oracle", 1.0, (1, 0), (1, 0), "none")
    with pytest.raises(ValueError, match="expected 3"):
        s.with_labels([20], [[1, 0]], source="oracle", round=3)
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        ALState.from_records([dict(s.to_records()[0], extra=1)])
    with pytest.raises(ValueError, match="pool_size"):
        s.unlabelled_indices(5)
    with pytest.raises(ValueError, match="human labels"):
        s.with_labels([20], [[1, 0, 0]], source="machine", round=3)
    with pytest.raises(ValueError, match="costs"):
        ALState(2).with_labels([1, 2], [[1, 0], [0, 0]], source="oracle", round=1, costs=[1.0])
    assert np.isfinite(s.total_cost)
