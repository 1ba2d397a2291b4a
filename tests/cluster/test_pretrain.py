"""`sonoray pretrain` on a real local Ray (2 CPUs) and the loopback S3 server, on phantom clips."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

from cluster.dataset import load_dataset
from cluster.storage import Storage, StorageConfig, parse_uri
from jobs.cli import main
from tests.conftest import run_cli
from ultrasound import phantom

PHANTOM16_URI = "s3://sonoray-test/phantom16"
SMALL = ["--image-size", "32", "--channels", "1", "--batch-videos", "8"]


def ingest_phantom16(tmp_dir) -> str:
    """16 phantom clips, 8 patients of 2 videos, all three classes (seed 1); ingested once."""
    storage = Storage(StorageConfig.from_env())
    if not storage.exists(parse_uri(PHANTOM16_URI).join("manifest.parquet")):
        phantom.make_dataset(tmp_dir, 16, seed=1, n_frames=16, size=48)
        code, _ = run_cli(main, ["ingest", str(tmp_dir), "--manifest", str(tmp_dir / "manifest.csv"),
                                 "--labels", ",".join(phantom.FINDINGS), "--to", PHANTOM16_URI])
        assert code == 0
    return PHANTOM16_URI


@pytest.fixture(scope="module")
def phantom16_uri(ray_cluster, tmp_path_factory) -> str:
    return ingest_phantom16(tmp_path_factory.mktemp("phantom16"))


def load_model_file(uri: str) -> dict:
    import io

    storage = Storage(StorageConfig.from_env())
    return torch.load(io.BytesIO(storage.read_bytes(parse_uri(uri))), map_location="cpu",
                      weights_only=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_worker_pretrain_lowers_the_loss(phantom16_uri, tmp_path):
    out = tmp_path / "run"
    mlruns = tmp_path / "mlruns"  # a real local MLflow file store
    code, result = run_cli(main, ["pretrain", "--data", phantom16_uri, "--out", str(out),
                                  "--workers", "2", "--epochs", "8", *SMALL, "--tracker", "mlflow",
                                  "--tracking-uri", str(mlruns), "--json"])
    assert code == 0
    assert result["epochs"] == 8 and len(result["loss"]) == 8
    loss = np.array(result["loss"])
    assert np.all(np.isfinite(loss))
    # USCL's total loss (NT-Xent over 16 views + 0.2 x CE) starts near ln(15) + 0.4 ~ 3.1
    assert loss[:2].mean() > 2.5
    assert loss[-2:].mean() < loss[:2].mean() - 0.1, loss
    assert result["images_per_s"] > 0
    assert result["checkpoint"] == str(out / "model.pt")
    saved = load_model_file(result["checkpoint"])
    assert "optimizer" not in saved  # model.pt is the model, not the resume state
    assert saved["epoch"] == 8 and saved["config"]["epochs"] == 8  # epochs finished
    assert saved["classes"] == ["covid", "pneumonia", "regular"]
    data = load_dataset(phantom16_uri)
    assert saved["labelled_video_ids"] == sorted(r["video_id"] for r in data.rows)
    assert saved["config"]["num_classes"] == 3
    assert any(k.startswith("classifier.") for k in saved["model"])  # the CE head was trained
    history = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert [round(h["loss"], 6) for h in history] == result["loss"]
    assert_backbone_export_matches(out, saved["model"], channels=1, image_size=32)
    assert_mlflow_run_holds_the_epochs(mlruns, result["loss"])


def assert_mlflow_run_holds_the_epochs(mlruns, losses: list[float]) -> None:
    """The MLflow run rank 0 logged to: every epoch's loss at its step, the settings, the files."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # what sonoray sets for a local store
    client = MlflowClient(tracking_uri=mlruns.resolve().as_uri())
    experiment = client.get_experiment_by_name("sonoray-pretrain")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 9))
    assert [round(m.value, 6) for m in history] == losses
    assert run.data.params["config.epochs"] == "8" and run.data.params["job"] == "pretrain"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "backbone.safetensors", "metrics.json"} <= artifacts


def assert_backbone_export_matches(out, model_state: dict, channels: int, image_size: int) -> None:
    """``backbone.safetensors`` loads into torchvision's ResNet-18 (only ``fc.*`` missing) and
    gives sonoray's backbone features on the same input, to 1e-5."""
    import torchvision
    from safetensors.torch import load_file

    from ultrasound.backbone import ResNet18Backbone

    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    exported = load_file(str(out / "backbone.safetensors"))
    assert exported["conv1.weight"].shape == (64, channels, 7, 7)
    missing, unexpected = net.load_state_dict(exported, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    ours = ResNet18Backbone(in_channels=channels)
    ours.load_state_dict({k.removeprefix("backbone."): v for k, v in model_state.items()
                          if k.startswith("backbone.")})
    net.fc = torch.nn.Identity()
    x = torch.randn(3, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), ours.eval()(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_continues_from_the_saved_epoch_and_labels_of_the_held_out_fold_stay_unused(
        phantom16_uri, tmp_path):
    out = tmp_path / "run"
    base = ["pretrain", "--data", phantom16_uri, "--out", str(out), *SMALL,
            "--holdout-fold", "0", "--folds", "3", "--split-seed", "4", "--json"]
    code, first = run_cli(main, [*base, "--epochs", "2"])
    assert code == 0 and first["epochs"] == 2
    saved = load_model_file(first["checkpoint"])

    # the masked videos are exactly evaluate's test fold 0 for the same split
    code, report = run_cli(main, ["evaluate", "--data", phantom16_uri, "--checkpoint", "random",
                                  "--folds", "3", "--split-seed", "4", "--image-size", "32", "--json"])
    assert code == 0
    data = load_dataset(phantom16_uri)
    every = {r["video_id"] for r in data.rows}
    test0 = set(report["test_folds"][0])
    val0 = set(report["validation_folds"][0])  # evaluate selects C on these: their labels stay unused too
    assert test0 and val0 and not test0 & val0
    assert set(saved["labelled_video_ids"]) == every - test0 - val0
    # and the cross-entropy term received the labels of exactly those videos, none of test0 / val0
    assert set(saved["labels_fed_video_ids"]) == every - test0 - val0
    patients = {r["video_id"]: r["patient_id"] for r in data.rows}
    assert {v for v in every if patients[v] in {patients[t] for t in test0}} == test0
    assert saved["holdout"] == {"fold": 0, "folds": 3, "seed": 4, "classes": None, "probe": None}

    # evaluating that checkpoint on all folds is refused: folds 1 and 2 had their labels used
    code, _ = run_cli(main, ["evaluate", "--data", phantom16_uri, "--checkpoint", first["checkpoint"],
                             "--folds", "3", "--split-seed", "4"])
    assert code == 2

    # a second run into the same --out is refused without --resume
    code, _ = run_cli(main, [*base, "--epochs", "3"])
    assert code == 1

    code, second = run_cli(main, [*base, "--epochs", "3", "--resume"])
    assert code == 0
    assert second["epochs"] == 3 and second["loss"][:2] == first["loss"]
    history = load_model_file(second["checkpoint"])["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    first_run, second_run = history[0]["run_id"], history[2]["run_id"]
    assert history[1]["run_id"] == first_run != second_run  # only epoch 2 ran the second time
    assert history[2]["session_start"] == 2
    assert set(load_model_file(second["checkpoint"])["labelled_video_ids"]) == every - test0 - val0

    # resuming a finished run trains nothing and gives the same result
    code, third = run_cli(main, [*base, "--epochs", "3", "--resume"])
    assert code == 0 and third["loss"] == second["loss"]
    assert [h["run_id"] for h in load_model_file(third["checkpoint"])["history"]] == \
        [h["run_id"] for h in history]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_killed_mid_run_is_retried_and_the_run_completes(phantom16_uri, tmp_path):
    from cluster.pretrain import pretrain
    from cluster.train import ScaleSpec
    from ultrasound.uscl import USCLConfig

    marker = tmp_path / "crashed-once"
    cfg = USCLConfig(epochs=3, batch_videos=8, image_size=32, channels=1)
    result = pretrain(load_dataset(phantom16_uri), str(tmp_path / "run"), cfg,
                      ScaleSpec(workers=2, max_failures=1), unlabelled=True,
                      loop_extras={"_crash_once_marker": str(marker), "_crash_epoch": 1})
    assert marker.read_text().startswith("rank 1 died at epoch 1")  # the worker really died
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0]["session_start"] == 0
    # the restarted workers resumed from the epoch-0 checkpoint, not from scratch
    assert history[1]["session_start"] == history[2]["session_start"] == 1
    assert all(np.isfinite(h["loss"]) for h in history)
    assert os.path.exists(tmp_path / "run" / "model.pt")


def saved_epoch(out) -> int | None:
    """The epochs finished by the newest checkpoint Ray Train has registered for the run under
    ``out`` (what a resume starts after), or None while there is none."""
    snapshot = out / "ray" / "run" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return None if not latest else int(latest["metrics"]["epoch"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_driver_killed_mid_epoch_resumes_with_no_epoch_lost_or_repeated(phantom16_uri, ray_cluster, tmp_path):
    """The `sonoray pretrain` process (its own driver, on this session's cluster) is SIGKILLed in
    the epoch after its second checkpoint; `--resume` then trains each remaining epoch once."""
    import signal
    import subprocess
    import sys
    import time

    import ray

    out = tmp_path / "run"
    epochs = 8
    argv = ["pretrain", "--data", phantom16_uri, "--out", str(out), "--epochs", str(epochs), *SMALL,
            "--unlabelled"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(tmp_path / "killed.log", "wb") as log:
        driver = subprocess.Popen([sys.executable, "-m", "jobs.cli", *argv], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                  cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        try:
            deadline = time.monotonic() + 300
            while (saved_epoch(out) or 0) < 2 and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and whatever it started, nothing else
            driver.wait(timeout=30)
    killed_after = saved_epoch(out)
    log_text = (tmp_path / "killed.log").read_text(errors="replace")
    assert killed_after is not None and 2 <= killed_after < epochs, log_text[-3000:]
    # a default run's output is sonoray's own: progress and epoch lines, none of Ray's internals
    lines = [line for line in log_text.splitlines() if line.strip()]
    assert lines and all(line.startswith(("[sonoray ", "pretrain: epoch ")) for line in lines), log_text[-3000:]
    assert sum(line.startswith("pretrain: epoch ") for line in lines) >= 2
    assert not (out / "model.pt").exists() and not (out / "complete.json").exists()

    code, resumed = run_cli(main, [*argv, "--resume", "--json"])
    assert code == 0
    history = load_model_file(resumed["checkpoint"])["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # none lost, none twice
    first, second = history[0]["run_id"], history[-1]["run_id"]
    assert first != second
    assert [h["run_id"] for h in history] == [first] * killed_after + [second] * (epochs - killed_after)
    assert all(h["session_start"] == killed_after for h in history[killed_after:])
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(history))
    marker = json.loads((out / "complete.json").read_text())
    assert set(marker["files"]) == {"model.pt", "backbone.safetensors", "metrics.json", "pretrain.json"}


def test_config_file_with_an_unknown_key_fails_naming_the_valid_ones(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-3\ntemprature: 0.2\n")
    code, _ = run_cli(main, ["pretrain", "--data", "/nowhere", "--out", str(tmp_path / "o"),
                             "--config", str(bad)])
    assert code == 2
    err = capsys.readouterr().err
    assert "temprature" in err and "valid keys" in err and "'temperature'" in err


def test_config_precedence_defaults_then_file_then_flags(tmp_path):
    from jobs.pretrain import register, resolve_config

    best = tmp_path / "best.yaml"  # as a sweep writes it: YAML reads 3e-4 as text
    best.write_text("lr: 3e-4\ntemperature: 0.2\nepochs: 7\nce_weight: 0.3\nmixup: true\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["pretrain", "--data", "d", "--out", "o", "--config", str(best),
                              "--epochs", "2", "--channels", "1"])
    cfg = resolve_config(args)
    assert (cfg.lr, cfg.temperature, cfg.ce_weight) == (3e-4, 0.2, 0.3)  # from the file
    assert (cfg.epochs, cfg.channels) == (2, 1)  # flags win
    assert (cfg.batch_videos, cfg.image_size, cfg.warmup_epochs) == (32, 224, 10)  # defaults
    simclr = resolve_config(parser.parse_args(["pretrain", "--data", "d", "--out", "o", "--simclr"]))
    assert simclr.pairs == "image" and not simclr.semi_supervised
    frames = resolve_config(parser.parse_args(["pretrain", "--data", "d", "--out", "o", "--pairs", "frames"]))
    assert frames.pairs == "frames" and frames.semi_supervised


def test_decode_share_leaves_training_its_cores():
    from cluster.frames import StreamSpec
    from cluster.pretrain import default_decode_cpus
    from cluster.train import ScaleSpec

    assert default_decode_cpus(ScaleSpec(workers=1), 2.0) == 1.0  # 1 CPU trains, 1 decodes
    assert default_decode_cpus(ScaleSpec(workers=2), 2.0) == 1.0  # 2 x 0.5 train
    assert default_decode_cpus(ScaleSpec(workers=1), 1.0) == 0.75  # a 0.25 worker on 1 CPU
    assert default_decode_cpus(ScaleSpec(workers=2), 8.0) == 1.0
    assert default_decode_cpus(ScaleSpec(workers=1, gpu=True), 16.0) == StreamSpec.cpus_per_task
