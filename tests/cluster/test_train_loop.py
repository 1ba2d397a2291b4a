"""The shared epoch loop (cluster.train.run_epochs) on one in-process worker.

Ray Train's reporting and the dataset shard are replaced by recorders here, so the loop's own
rules are checked exactly and fast: a toy method (a scalar fitted by gradient steps) trains,
epochs are counted from 1, a resumed run continues where its checkpoint left, a finished one
reports its state again, small batches are skipped, and a broken stream stops the run. The
real runs (pretrain, msml) go through the same loop in test_pretrain.py and test_msml_train.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cluster.train as train
from cluster.train import Method, Resumed, WorkerContext, run_epochs

CTX = WorkerContext(rank=0, world_size=1, device=torch.device("cpu"))


class Shard:
    """Ray Data's ``iter_batches`` over fixed rows: ``x`` of 10 rows, batches in order."""

    def __init__(self, rows: int = 10):
        self.x = np.arange(rows, dtype=np.float64)

    def iter_batches(self, batch_size, **_):
        for start in range(0, len(self.x), batch_size):
            yield {"x": self.x[start:start + batch_size]}


@pytest.fixture
def reports(monkeypatch):
    """Every ``report_epoch`` call (metrics, state) of the loop, and the shard it reads."""
    calls: list[tuple[dict, dict]] = []
    monkeypatch.setattr(train, "report_epoch", lambda metrics, state, rank: calls.append((metrics, state)))
    monkeypatch.setattr(train, "dataset_shard", lambda name: Shard())
    return calls


def mean_method(epochs: int, w: list[float], steps: list[tuple[int, int]] | None = None, **kwargs) -> Method:
    """Fits ``w[0]`` to the rows' mean (4.5) with squared loss and step 0.5."""

    def step(batch, epoch):
        x = batch["x"]
        if steps is not None:
            steps.append((epoch, len(x)))
        loss = float(np.mean((x - w[0]) ** 2))
        w[0] += 0.5 * float(np.mean(x - w[0]))
        return loss * len(x), float(len(x))

    return Method(job="toy", epochs=epochs, seed=0, batch_rows=4, shuffle_rows=4, step=step,
                  checkpoint=lambda done, history: {"w": w[0], "epoch": done, "history": list(history)},
                  **kwargs)


def test_epochs_count_from_one_and_the_loss_is_the_weighted_mean_over_steps(reports, capsys):
    w = [0.0]
    run_epochs(mean_method(3, w, begin_epoch=lambda e: {"lr": 0.1 * (e + 1)},
                           describe=lambda m: f" lr {m['lr']:.1f}"), CTX, {"_run_id": "r1"}, Resumed())
    metrics = [m for m, _ in reports]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["images"] for m in metrics] == [10, 10, 10]
    assert [m["lr"] for m in metrics] == pytest.approx([0.1, 0.2, 0.3])
    # epoch 1 by hand: batches [0..3], [4..7], [8, 9] from w = 0, then 2.25 ... (weights 4, 4, 2)
    x, v, total = np.arange(10.0), 0.0, 0.0
    for batch in (x[:4], x[4:8], x[8:]):
        total += np.mean((batch - v) ** 2) * len(batch)
        v += 0.5 * np.mean(batch - v)
    assert metrics[0]["loss"] == pytest.approx(total / 10, rel=1e-12)
    assert metrics[2]["loss"] < metrics[0]["loss"]
    state = reports[-1][1]
    assert state["epoch"] == 3 and [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert all(h["run_id"] == "r1" and h["session_start"] == 0 for h in state["history"])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("toy: epoch 1/3 loss ") and " lr 0.1, " in lines[0] and "ETA" in lines[0]
    assert lines[2].startswith("toy: epoch 3/3 ") and "ETA" not in lines[2]


def test_a_resumed_run_continues_after_its_checkpoint_and_a_finished_one_reports_it_again(reports):
    w, steps = [0.0], []
    run_epochs(mean_method(2, w), CTX, {"_run_id": "a"}, Resumed())
    saved = reports[-1][1]
    reports.clear()
    resumed = Resumed(saved["epoch"], saved["history"], saved)
    run_epochs(mean_method(4, [saved["w"]], steps), CTX, {"_run_id": "b"}, resumed)
    assert sorted({e for e, _ in steps}) == [2, 3]  # 0-based epochs 2 and 3 ran, nothing before
    history = reports[-1][1]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["run_id"] for h in history] == ["a", "a", "b", "b"]
    assert [h["session_start"] for h in history] == [0, 0, 2, 2]

    reports.clear()
    finished = Resumed(4, history, {"epoch": 4, "history": history})
    steps = []
    run_epochs(mean_method(4, [0.0], steps), CTX, {}, finished)
    assert steps == [] and len(reports) == 1 and reports[0][1] is finished.state
    assert reports[0][0]["epoch"] == 4 and "run_id" not in reports[0][0]


def test_batches_below_min_rows_are_skipped(reports):
    steps = []
    run_epochs(mean_method(1, [0.0], steps, min_rows=3), CTX, {}, Resumed())
    assert steps == [(0, 4), (0, 4)]  # the last batch of 2 rows is skipped
    assert reports[0][0]["images"] == 8


def test_an_epoch_without_a_step_stops_the_run_without_a_checkpoint(reports, capsys):
    run_epochs(mean_method(2, [0.0], min_rows=11), CTX, {}, Resumed())
    assert reports == []
    assert "stopping: toy: epoch 1: no training step ran" in capsys.readouterr().err


def test_rank_zero_evaluates_after_each_epoch(reports):
    w = [0.0]
    run_epochs(mean_method(2, w, evaluate=lambda: {"val_gap": abs(4.5 - w[0])}), CTX, {}, Resumed())
    assert [m["val_gap"] for m, _ in reports] == [abs(4.5 - state["w"]) for _, state in reports]
    assert reports[0][1]["w"] != reports[1][1]["w"]  # each epoch scored on its own weights
    other = WorkerContext(rank=1, world_size=1, device=torch.device("cpu"))
    reports.clear()
    run_epochs(mean_method(1, [0.0], evaluate=lambda: {"val_gap": 0.0}), other, {}, Resumed())
    assert "val_gap" not in reports[0][0]


def test_a_pretraining_checkpoint_with_zero_based_epochs_resumes_in_place(monkeypatch, reports):
    """Pretraining counted epochs from 0 before the shared loop (``epoch``: the last index
    finished); such a checkpoint resumes after its last epoch, numbered as today."""
    old = {"w": 1.0, "epoch": 1, "history": [{"epoch": 0, "loss": 2.0, "session_start": 0},
                                             {"epoch": 1, "loss": 1.5, "session_start": 0}]}
    monkeypatch.setattr(train, "restore_state", lambda: old)
    resumed = train.resume_point()
    assert resumed.start == 2 and [h["epoch"] for h in resumed.history] == [1, 2]
    steps = []
    run_epochs(mean_method(3, [1.0], steps), CTX, {"_run_id": "new"}, resumed)
    assert {e for e, _ in steps} == {2}  # only the third epoch ran
    assert [h["epoch"] for h in reports[-1][1]["history"]] == [1, 2, 3]
    monkeypatch.setattr(train, "restore_state", lambda: {"epoch": 3, "history": reports[-1][1]["history"]})
    assert train.resume_point().start == 3  # today's checkpoints are read as they are
