"""`sonoray msml` on real local Ray + the loopback S3 server, on phantom clips.

One 2-worker run (module fixture) is checked for its loss, its validation mAP against chance,
its report (recomputed here from model.pt and frames decoded without Ray), its split and its
Grad-CAM overlays; a resume of that run continues from its last epoch. Config and --init are
checked without training.
"""
from __future__ import annotations

import io
import json
import time

import cv2
import numpy as np
import pytest
import torch

from cluster.storage import parse_uri
from tests.conftest import run_cli

SEED = 11  # 24 clips whose validation patients carry every phantom finding
EPOCHS = 3
TRAIN_ARGS = ["--workers", "2", "--image-size", "48", "--channels", "1", "--batch-size", "16", "--fps", "4"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The driver-side model work on one thread: the CPUs are shared with the Ray workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def msml_phantom(tmp_path_factory, s3_server):
    """24 phantom clips (48 px, ~16 frames, 12 patients) ingested to s3://sonoray-test/msml."""
    from jobs.cli import main
    from ultrasound import phantom

    folder = tmp_path_factory.mktemp("msml_phantom")
    phantom.make_dataset(folder, 24, seed=SEED, n_frames=16, size=48)
    uri = "s3://sonoray-test/msml"
    code, _ = run_cli(main, ["ingest", str(folder), "--manifest", str(folder / "manifest.csv"),
                             "--labels", ",".join(phantom.FINDINGS), "--to", uri])
    assert code == 0
    return folder, uri


@pytest.fixture(scope="module")
def config_yaml(tmp_path_factory):
    """A best-config style YAML: what MSMLConfig.to_dict() writes, findings included."""
    from ultrasound import phantom
    from ultrasound.msml import MSMLConfig

    import yaml

    path = tmp_path_factory.mktemp("msml_cfg") / "best.yaml"
    values = MSMLConfig(findings=phantom.FINDINGS, lr=1e-3, epochs=EPOCHS, image_size=64).to_dict()
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def msml_run(msml_phantom, config_yaml, ray_cluster):
    from jobs.cli import main

    _, data_uri = msml_phantom
    out = "s3://sonoray-test/msml-runs/a"
    began = time.perf_counter()
    code, result = run_cli(main, ["msml", "--data", data_uri, "--out", out, "--config", str(config_yaml),
                                  *TRAIN_ARGS, "--json"])
    assert code == 0
    result["_wall_s"] = time.perf_counter() - began
    result["_out"] = out
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_worker_run_lowers_its_loss_and_beats_chance(msml_run):
    print(f"msml run: {msml_run['_wall_s']:.1f} s wall, loss {msml_run['loss']}, "
          f"mAP {msml_run['map']:.3f} vs chance {msml_run['chance_map']:.3f}, "
          f"mAP per epoch {msml_run['val_map_per_epoch']}")
    assert msml_run["epochs"] == EPOCHS and len(msml_run["loss"]) == EPOCHS
    assert msml_run["loss"][-1] < 0.7 * msml_run["loss"][0]
    assert msml_run["excluded"] == []  # the seed puts every finding on both sides
    assert msml_run["map"] > msml_run["chance_map"] + 0.2
    assert set(msml_run["per_finding_ap"]) == {"a_lines", "b_lines", "consolidation", "effusion",
                                               "pleural_irregularity"}
    assert msml_run["checkpoint"] == msml_run["_out"] + "/model.pt"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_report_matches_the_saved_model_on_frames_decoded_without_ray(msml_run, msml_phantom, storage):
    """Recompute the validation report from model.pt and the clips decoded locally."""
    from ultrasound import phantom
    from ultrasound.checkpoint import load_state
    from ultrasound.msml import MSMLConfig, MSMLNet, msml_predict
    from ultrasound.multilabel_metrics import multilabel_report
    from ultrasound.video import FrameFormat, FrameSampling, decode_bytes

    folder, _ = msml_phantom
    out = parse_uri(msml_run["_out"])
    report = json.loads(storage.read_bytes(out.join("report.json")))
    split = report["split"]
    specs = {s.video_id: s for s in phantom.plan_dataset(24, seed=SEED, n_frames=16, size=48)}
    # group-disjoint: no patient on both sides, and every video on exactly one side
    train_patients = {specs[v].patient_id for v in split["train"]}
    assert not train_patients & {specs[v].patient_id for v in split["validation"]}
    assert sorted(split["train"] + split["validation"]) == sorted(specs)
    assert split["group_by"] == "patient"

    state = torch.load(io.BytesIO(storage.read_bytes(out.join("model.pt"))), map_location="cpu",
                       weights_only=True)
    assert state["epoch"] == EPOCHS and state["split"]["validation"] == split["validation"]
    assert "optimizer" not in state  # what resuming needs stays in the run's checkpoints
    config = MSMLConfig.from_dict(state["config"])
    assert (config.lr, config.image_size, config.channels) == (1e-3, 48, 1)  # YAML, then flags
    model = MSMLNet(config)
    model.load_state_dict(state["model"])
    exported = MSMLNet(config)  # msml.safetensors + msml.json: the same classifier, nothing pickled
    exported.load_state_dict(load_state(storage.read_bytes(out.join("msml.safetensors")), "msml.safetensors"))
    meta = json.loads(storage.read_bytes(out.join("msml.json")))
    assert (meta["findings"], meta["image_size"], meta["channels"]) == (list(config.findings), 48, 1)
    assert meta["normalize"] == {"mean": 0.5, "std": 0.25}
    backbone = load_state(storage.read_bytes(out.join("backbone.safetensors")), "backbone.safetensors")
    assert backbone["conv1.weight"].shape == (64, 1, 7, 7) and not any(k.startswith("head.") for k in backbone)
    images, targets = [], []
    for vid in split["validation"]:
        spec = specs[vid]
        path = folder / spec.relative_path  # decoded as the stream decodes (PyAV, from memory)
        for _, _, image in decode_bytes(path.read_bytes(), path.suffix, FrameSampling(fps=4, max_per_video=32),
                                        FrameFormat(channels=1, size=48)):
            images.append(image)
            targets.append([int(spec.findings[f]) for f in config.findings])
    images, targets = np.stack(images), np.array(targets)
    expected = multilabel_report(targets, msml_predict(model, images, 48), list(config.findings))
    assert np.allclose(msml_predict(exported, images, 48), msml_predict(model, images, 48), atol=1e-6)
    assert report["n_frames"] == len(images)
    assert report["map"] == pytest.approx(expected["map"], abs=1e-5)
    assert report["micro_f1"] == pytest.approx(expected["micro_f1"], abs=1e-9)
    assert report["hamming_loss"] == pytest.approx(expected["hamming_loss"], abs=1e-9)
    assert report["chance_map"] == pytest.approx(targets.mean(axis=0).mean(), abs=1e-9)
    # positive weights from the training split's video labels: #neg / #pos per finding
    video_labels = np.array([[int(specs[v].findings[f]) for f in config.findings] for v in split["train"]])
    pos = video_labels.sum(axis=0)
    assert [report["positive_weights"][f] for f in config.findings] == pytest.approx(
        list((len(video_labels) - pos) / pos), rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gradcam_overlays_decode(msml_run, storage):
    assert len(msml_run["gradcam"]) == 5  # one per finding (all have a positive validation frame)
    names = set()
    for uri in msml_run["gradcam"]:
        assert uri.startswith(msml_run["_out"] + "/gradcam/") and uri.endswith(".png")
        image = cv2.imdecode(np.frombuffer(storage.read_bytes(parse_uri(uri)), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (48, 48, 3)
        assert image.std() > 0
        names.add(uri.rsplit("/", 1)[1].split("_phantom_")[0])
    assert names == {"a_lines", "b_lines", "consolidation", "effusion", "pleural_irregularity"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_continues_from_the_saved_epoch(msml_run, msml_phantom, config_yaml, storage, capsys):
    from jobs.cli import main

    _, data_uri = msml_phantom
    out = msml_run["_out"]
    code, _ = run_cli(main, ["msml", "--data", data_uri, "--out", out, "--config", str(config_yaml),
                             *TRAIN_ARGS])
    assert code != 0 and "--resume" in capsys.readouterr().err  # never resumes by accident
    code, result = run_cli(main, ["msml", "--data", data_uri, "--out", out, "--config", str(config_yaml),
                                  *TRAIN_ARGS, "--epochs", str(EPOCHS + 1), "--resume", "--json"])
    assert code == 0
    assert result["epochs"] == EPOCHS + 1
    assert result["loss"][:EPOCHS] == pytest.approx(msml_run["loss"], abs=1e-12)  # history kept
    assert len(result["loss"]) == EPOCHS + 1
    state = torch.load(io.BytesIO(storage.read_bytes(parse_uri(out).join("model.pt"))), map_location="cpu",
                       weights_only=True)
    assert state["epoch"] == EPOCHS + 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_refuses_changed_settings(msml_run, msml_phantom, config_yaml, capsys):
    from jobs.cli import main

    _, data_uri = msml_phantom
    code, _ = run_cli(main, ["msml", "--data", data_uri, "--out", msml_run["_out"], "--config",
                             str(config_yaml), *TRAIN_ARGS, "--lr", "0.01", "--resume"])
    assert code == 2
    assert "lr" in capsys.readouterr().err


def test_unknown_config_key_fails_naming_the_valid_keys(tmp_path, msml_phantom, capsys):
    from jobs.cli import main

    _, data_uri = msml_phantom
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\nlearning_rate: 0.01\n")
    code, _ = run_cli(main, ["msml", "--data", data_uri, "--out", str(tmp_path / "out"), "--config", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert "learning_rate" in err
    for valid in ("findings", "image_size", "lr", "attention_lambda", "max_pos_weight"):
        assert valid in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_config_layers_defaults_then_yaml_then_flags(config_yaml):
    from cluster.job_config import read_config_file
    from jobs.msml import resolve_config
    from jobs.output import UserError

    findings = ["a_lines", "b_lines", "effusion"]
    config = resolve_config(findings, {}, {"epochs": None})
    assert config.findings == tuple(findings) and config.lr == 1e-4 and config.image_size == 224
    values = read_config_file(str(config_yaml))
    with pytest.raises(UserError, match="not columns of the data set"):  # the YAML names 5 findings
        resolve_config(findings, values, {})
    config = resolve_config(findings + ["consolidation", "pleural_irregularity"], values,
                            {"image_size": 48, "lr": None}, labels=["b_lines", "effusion"])
    assert (config.lr, config.epochs, config.image_size) == (1e-3, EPOCHS, 48)
    assert config.findings == ("b_lines", "effusion")


def _torchvision_state(seed: int) -> dict:
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    return resnet18(weights=None).state_dict()


def test_init_loads_a_torchvision_state_dict_and_a_uscl_checkpoint(tmp_path, storage, s3_server):
    from cluster.train import load_init_backbone
    from cluster.storage import Storage
    from ultrasound.msml import MSMLConfig, MSMLNet, prepare_images
    from ultrasound.uscl import USCLModel

    # a raw torchvision ResNet-18 state dict, 3 channels: every backbone tensor is loaded
    tv = _torchvision_state(7)
    torch.save(tv, tmp_path / "tv.pt")
    backbone, missing = load_init_backbone(str(tmp_path / "tv.pt"), 3, Storage())
    assert missing == []
    assert torch.equal(backbone["stem.0.weight"], tv["conv1.weight"])
    assert torch.equal(backbone["layer4.1.bn2.running_var"], tv["layer4.1.bn2.running_var"])
    # ... and it changes what a fresh MSML model predicts
    config = MSMLConfig(findings=("a", "b"), image_size=32)
    fresh, loaded = MSMLNet(config).eval(), MSMLNet(config).eval()
    loaded.backbone.load_state_dict(backbone)
    x = prepare_images(np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), 32, 3)
    assert not torch.allclose(fresh(x), loaded(x))

    # a USCL pretraining checkpoint in object storage: {"model": USCLModel.state_dict(), ...}
    torch.manual_seed(3)
    uscl = USCLModel(in_channels=1, num_classes=3)
    buffer = io.BytesIO()
    torch.save({"model": uscl.state_dict(), "epoch": 2, "config": {"lr": 3e-4}, "history": [{"loss": 1.0}]},
               buffer)
    location = parse_uri("s3://sonoray-test/msml-init/uscl.pt")
    storage.check(location, create_bucket=True)
    storage.write_bytes(location, buffer.getvalue())
    backbone, missing = load_init_backbone(location.uri, 1, storage)
    assert missing == []
    for key, value in uscl.backbone.state_dict().items():
        assert torch.equal(backbone[key], value), key

    # the same trunk exported as backbone.safetensors (torchvision names) loads back to the same tensors
    from ultrasound.export import backbone_safetensors

    (tmp_path / "backbone.safetensors").write_bytes(backbone_safetensors(uscl.state_dict()))
    backbone, missing = load_init_backbone(str(tmp_path / "backbone.safetensors"), 1, Storage())
    assert missing == []
    for key, value in uscl.backbone.state_dict().items():
        assert torch.equal(backbone[key], value), key


def test_init_without_a_backbone_is_refused(tmp_path, msml_phantom, ray_cluster, capsys):
    from jobs.cli import main

    _, data_uri = msml_phantom
    torch.save({"fc.weight": torch.zeros(3, 512)}, tmp_path / "head.pt")
    code, _ = run_cli(main, ["msml", "--data", data_uri, "--out", str(tmp_path / "out"), "--init",
                             str(tmp_path / "head.pt"), *TRAIN_ARGS, "--epochs", "1"])
    assert code == 2
    assert "no parameter matches a ResNet-18 backbone" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_validation_report_leaves_out_findings_without_training_positives():
    from cluster.msml_train import validation_report

    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    probs = np.array([[0.9, 0.2, 0.6], [0.3, 0.8, 0.1], [0.4, 0.1, 0.7], [0.2, 0.3, 0.2]])
    report = validation_report(targets, probs, ["a", "b", "c"], trained=[True, True, False])
    # "c" has validation positives but no training positive: out of mAP and macro F1
    assert report["per_finding_ap"] == {"a": 1.0, "b": 1.0}
    assert report["map"] == 1.0 and report["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert report["excluded"] == ["c"] and report["no_training_positives"] == ["c"]
    assert report["chance_map"] == pytest.approx((0.5 + 0.25) / 2)
    # micro F1 and hamming loss pool every decision, "c" included: 12 decisions, 2 wrong
    # (a: 0.4 < 0.5 on a positive; c: 0.7 on a negative), tp = 1 (a) + 1 (b) + 1 (c) = 3
    assert report["hamming_loss"] == pytest.approx(2 / 12)
    assert report["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_init_names_a_missing_or_foreign_file(tmp_path):
    from cluster.storage import Storage
    from cluster.train import load_init_backbone

    with pytest.raises(FileNotFoundError, match="no file at .*absent.pt"):
        load_init_backbone(str(tmp_path / "absent.pt"), 1, Storage())
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt: no parameter matches a ResNet-18"):
        load_init_backbone(str(tmp_path / "foreign.pt"), 1, Storage())
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt: not a state dict"):
        load_init_backbone(str(tmp_path / "list.pt"), 1, Storage())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_predict_ranks_held_out_clips_with_a_finding_above_those_without(msml_run, tmp_path, storage):
    """`sonoray predict` on a folder of phantom clips the run never saw: one row per video, and
    the video scores rank clips with each finding above clips without it."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from jobs.cli import main
    from ultrasound import phantom

    folder = tmp_path / "held_out"
    specs = phantom.plan_dataset(16, seed=SEED + 100, n_frames=16, size=48)
    phantom.make_dataset(folder, 16, seed=SEED + 100, n_frames=16, size=48)
    (folder / "manifest.csv").unlink()  # a plain folder of videos: no manifest, no labels
    out = tmp_path / "predicted"
    code, result = run_cli(main, ["predict", "--model", msml_run["_out"], "--data", str(folder),
                                  "--out", str(out), "--fps", "4", "--gradcam", "3", "--json"])
    assert code == 0
    videos = pd.read_parquet(out / "videos.parquet")
    frames = pd.read_parquet(out / "frames.parquet")
    assert len(videos) == 16 == result["videos"] and videos["video_id"].is_unique
    assert frames.groupby("video_id").size().to_dict() == videos.set_index("video_id")["n_frames"].to_dict()
    assert pd.read_csv(out / "videos.csv")["video_id"].tolist() == videos["video_id"].tolist()
    by_path = {f"videos/{s.relative_path}": s for s in specs}
    aucs = {}
    for name in phantom.FINDINGS:
        truth = [int(by_path[k].findings[name]) for k in videos["key"]]
        assert videos[name].to_numpy() == pytest.approx(
            frames.groupby("video_id")[name].mean().reindex(videos["video_id"]).to_numpy(), abs=1e-6)
        if 0 < sum(truth) < len(truth):
            aucs[name] = roc_auc_score(truth, videos[name])
    print(f"held-out video AUC per finding: {aucs}")
    assert len(aucs) >= 3 and float(np.mean(list(aucs.values()))) > 0.8, aucs
    pngs = sorted((out / "gradcam").glob("*.png"))
    assert len(pngs) == 3 == len(result["files"]["gradcam"])
    image = cv2.imread(str(pngs[0]))
    assert image.shape == (224, 448, 3)  # the frame beside its overlay, at 224 px a side
    assert json.loads((out / "complete.json").read_text())["files"].keys() >= {"frames.parquet", "videos.csv"}


def test_predict_names_a_missing_or_foreign_model_before_any_work(tmp_path, capsys):
    from jobs.cli import main

    (tmp_path / "videos").mkdir()
    code = main(["predict", "--model", str(tmp_path / "nowhere"), "--data", str(tmp_path / "videos"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sonoray: error: --model: no MSML model at ")
    torch.save({"model": {"stem.0.weight": torch.zeros(1)}}, tmp_path / "backbone.pt")
    code = main(["predict", "--model", str(tmp_path / "backbone.pt"), "--data", str(tmp_path / "videos"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "backbone.pt: not an MSML model" in err[-1]
    assert not (tmp_path / "out").exists()
