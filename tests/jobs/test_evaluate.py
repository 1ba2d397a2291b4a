"""`sonoray evaluate` and the demo stage, on a real local Ray and the loopback S3 server."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from cluster.dataset import load_dataset
from cluster.evaluate import evaluation_rows, load_eval_frames, validation_videos, video_folds
from jobs.cli import main
from tests.cluster.test_pretrain import ingest_phantom16
from tests.conftest import run_cli
from ultrasound.backbone import ResNet18Backbone


@pytest.fixture(scope="module")
def phantom16_uri(ray_cluster, tmp_path_factory) -> str:
    return ingest_phantom16(tmp_path_factory.mktemp("phantom16"))


@pytest.mark.timeout(600)
def test_no_video_or_patient_has_frames_in_two_folds(phantom16_uri):
    from cluster.evaluate import evaluate_summary
    from jobs.evaluate import print_table

    data = load_dataset(phantom16_uri)
    rows, classes = evaluation_rows(data)
    frames = load_eval_frames(data, rows, classes, image_size=32, channels=1)
    # 3 frames per second of 1.0-1.7 s clips at 12 fps, every video present
    per_video = {v: int(np.sum(frames.video_ids == v)) for v in np.unique(frames.video_ids)}
    assert set(per_video) == {r["video_id"] for r in rows}
    assert all(2 <= n <= 6 for n in per_video.values()), per_video
    summary = evaluate_summary(phantom16_uri, "random", folds=4, split_seed=1, image_size=32,
                               channels=1, frames=frames)
    fold_of_frame = summary["fold_of_frame"]
    assert fold_of_frame.shape == (len(frames),) and fold_of_frame.min() >= 0
    patient = {r["video_id"]: r["patient_id"] for r in rows}
    folds_of_video, folds_of_patient = {}, {}
    for video, fold in zip(frames.video_ids, fold_of_frame):
        folds_of_video.setdefault(video, set()).add(int(fold))
        folds_of_patient.setdefault(patient[video], set()).add(int(fold))
    assert all(len(f) == 1 for f in folds_of_video.values())
    assert all(len(f) == 1 for f in folds_of_patient.values())
    assert sorted({f for fs in folds_of_video.values() for f in fs}) == [0, 1, 2, 3]
    # every frame is tested exactly once: the summed confusion counts every frame
    assert int(np.sum(summary["confusion"])) == len(frames)
    assert sum(r["test_videos"] for r in summary["fold_reports"]) == len(rows)
    # the same split as the manifest-only one that pretrain --holdout-fold uses
    assert summary["test_folds"] == video_folds(rows, classes, 4, 1)
    for fold, videos in enumerate(summary["test_folds"]):
        assert {v for v, f in folds_of_video.items() if f == {fold}} == set(videos)
    table = io.StringIO()
    print_table(summary, table)
    lines = table.getvalue().splitlines()
    assert sum(line.split()[0] in "0123" for line in lines[2:6]) == 4  # one row per fold
    assert f"{summary['accuracy']:.3f}" in next(line for line in lines if line.startswith("  mean"))


@pytest.mark.timeout(600)
def test_a_checkpoint_pretrained_with_test_fold_labels_is_refused(phantom16_uri, tmp_path, capsys):
    data = load_dataset(phantom16_uri)
    rows, classes = evaluation_rows(data)
    test_folds = video_folds(rows, classes, 3, 0)
    state = {f"backbone.{k}": v for k, v in ResNet18Backbone(1).state_dict().items()}

    def checkpoint(path, labelled):
        torch.save({"model": state, "config": {"channels": 1, "image_size": 32},
                    "labelled_video_ids": sorted(labelled)}, path)
        return str(path)

    one_leak = checkpoint(tmp_path / "leak.pt",
                          set(test_folds[0]) - {test_folds[0][0]} | {test_folds[2][-1]})
    code, _ = run_cli(main, ["evaluate", "--data", phantom16_uri, "--checkpoint", one_leak,
                             "--folds", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "fold 0" in err and test_folds[0][1] in err

    # blind to the test fold but not to its validation videos: refused too (selection bias)
    every = {r["video_id"] for r in rows}
    validation = [validation_videos(rows, classes, test) for test in test_folds]
    assert all(v and not set(v) & set(t) for v, t in zip(validation, test_folds))
    val_leak = checkpoint(tmp_path / "val-leak.pt", every - set(test_folds[0]))
    code, _ = run_cli(main, ["evaluate", "--data", phantom16_uri, "--checkpoint", val_leak, "--folds", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "validation video(s) of fold 0" in err

    # one checkpoint per fold, each blind to its own test and validation videos' labels: accepted
    for fold in range(3):
        (tmp_path / str(fold)).mkdir()
        checkpoint(tmp_path / str(fold) / "model.pt", every - set(test_folds[fold]) - set(validation[fold]))
    code, result = run_cli(main, ["evaluate", "--data", phantom16_uri, "--checkpoint",
                                  str(tmp_path / "{fold}" / "model.pt"), "--folds", "3", "--json"])
    assert code == 0
    assert result["folds"] == 3 and result["classes"] == classes
    assert result["test_folds"] == test_folds
    assert 0.0 <= result["accuracy"] <= 1.0 and result["accuracy_std"] >= 0.0
    assert np.asarray(result["confusion"]).shape == (3, 3)
    assert int(np.sum(result["confusion"])) == result["frames"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_stage_pretrains_and_compares_with_random_init(phantom16_uri, tmp_path):
    from jobs.pretrain import demo_stage

    table = demo_stage(phantom16_uri, str(tmp_path), epochs=2)
    assert table["pretrain"]["epochs"] == 2
    for name in ("random", "uscl"):
        assert set(table[name]) == {"accuracy", "accuracy_std", "macro_f1", "macro_f1_std"}
        assert 0.0 <= table[name]["accuracy"] <= 1.0


@pytest.mark.timeout(600)
def test_evaluate_out_round_trips_and_compare_pairs_the_same_splits(phantom16_uri, tmp_path, capsys):
    import json

    other = tmp_path / "other.pt"
    torch.manual_seed(5)
    torch.save(ResNet18Backbone(1).state_dict(), other)
    common = ["--data", phantom16_uri, "--folds", "3", "--split-seeds", "0,1", "--image-size", "32",
              "--channels", "1", "--json"]
    code, random_run = run_cli(main, ["evaluate", "--checkpoint", "random", "--out", str(tmp_path / "random"),
                                      *common])
    assert code == 0
    saved = json.loads((tmp_path / "random" / "evaluation.json").read_text())
    assert saved["name"] == "random" and saved["split_seeds"] == [0, 1] and len(saved["per_fold"]) == 6
    assert saved["per_fold"] == random_run["per_fold"]  # what was printed is what was kept
    data = load_dataset(phantom16_uri)
    rows, classes = evaluation_rows(data)
    assert [row["test_videos"] for row in saved["per_fold"]] == video_folds(rows, classes, 3, 0) + \
        video_folds(rows, classes, 3, 1)
    assert saved["accuracy"] == pytest.approx(np.mean([row["accuracy"] for row in saved["per_fold"]]))
    code, _ = run_cli(main, ["evaluate", "--checkpoint", str(other), "--out", str(tmp_path / "seed5"), *common])
    assert code == 0
    capsys.readouterr()

    code, comparison = run_cli(main, ["evaluate", "--compare", str(tmp_path / "seed5"),
                                      str(tmp_path / "random" / "evaluation.json"), "--json"])
    assert code == 0
    assert [a["name"] for a in comparison["arms"]] == ["seed5", "random"] and comparison["pairs"] == 6
    kept = json.loads((tmp_path / "seed5" / "evaluation.json").read_text())
    by_metric = {d["metric"]: d for d in comparison["differences"]}
    assert set(by_metric) == {"accuracy", "macro_f1", "video_accuracy"}
    for metric, d in by_metric.items():
        diffs = [a[metric] - b[metric] for a, b in zip(kept["per_fold"], saved["per_fold"])]
        assert d["mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
        assert d["low"] <= d["mean"] <= d["high"]
        assert d["wins"] == sum(x > 0 for x in diffs) and d["losses"] == sum(x < 0 for x in diffs)
    assert "paired differences over 6" in capsys.readouterr().err  # the table: on stderr with --json

    # arms evaluated on other splits are not paired
    code, _ = run_cli(main, ["evaluate", "--checkpoint", "random", "--out", str(tmp_path / "folds4"),
                             *[a if a != "3" else "4" for a in common]])
    assert code == 0
    capsys.readouterr()
    code, _ = run_cli(main, ["evaluate", "--compare", str(tmp_path / "random"), str(tmp_path / "folds4")])
    assert code == 2
    assert "not evaluated on the same splits" in capsys.readouterr().err
