"""Downstream evaluation: group-disjoint folds, reports against hand counts, probes that learn."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ultrasound.augment import resize_and_normalize, to_float_chw
from ultrasound.backbone import ResNet18Backbone
from ultrasound.evaluation import (backbone_from_state, carve_validation, classification_report,
                                   extract_features, finetune_last_block, group_kfold_split,
                                   linear_probe, summarise_folds, video_level_accuracy)
from ultrasound.uscl import USCLModel

torch.set_num_threads(1)


def frames_of_videos(n_videos: int, seed: int = 0):
    """Per-frame video ids and labels: video v has 2-9 frames, class v % 3."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 10, n_videos)
    groups = np.repeat(np.arange(n_videos) * 7 + 100, counts)  # ids need not be 0..n-1
    labels = np.repeat(np.arange(n_videos) % 3, counts)
    return groups, labels


def test_group_kfold_never_puts_one_video_in_two_folds():
    groups, labels = frames_of_videos(31)
    folds = group_kfold_split(groups, labels, k=5, seed=0)
    assert len(folds) == 5
    seen_test = np.concatenate([test for _, test in folds])
    assert sorted(seen_test.tolist()) == list(range(len(groups)))  # every frame tested once
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(groups)
        assert set(labels[test]) == {0, 1, 2}  # stratified: every class in every test fold
    fold_of_group = {}
    for f, (_, test) in enumerate(folds):
        for g in set(groups[test]):
            assert fold_of_group.setdefault(g, f) == f
    assert group_kfold_split(groups, labels, k=5, seed=0)[2][1].tolist() == folds[2][1].tolist()
    with pytest.raises(ValueError, match="cannot fill"):
        group_kfold_split([1, 1, 2], [0, 0, 1], k=3)


def test_carve_validation_is_group_disjoint_inside_train():
    groups, labels = frames_of_videos(30)
    train, _ = group_kfold_split(groups, labels, k=5, seed=1)[0]
    fit, val = carve_validation(train, groups, labels, fraction=0.2, seed=3)
    assert set(fit) | set(val) == set(train) and not set(fit) & set(val)
    assert not set(groups[fit]) & set(groups[val])
    n_val_groups, n_train_groups = len(set(groups[val])), len(set(groups[train]))
    assert 0.1 <= n_val_groups / n_train_groups <= 0.3
    with pytest.raises(ValueError, match="2 groups"):
        carve_validation([0, 1], [5, 5], [0, 1])


def test_classification_report_matches_hand_counts():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    y_pred = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0]
    report = classification_report(y_true, y_pred, ["covid", "pneumonia", "regular"])
    # confusion by hand (rows true, cols predicted)
    assert report["confusion"] == [[3, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert report["accuracy"] == pytest.approx(7 / 10)
    covid = report["per_class"]["covid"]  # tp 3, predicted 4, actual 4
    assert (covid["precision"], covid["recall"], covid["f1"]) == pytest.approx((0.75, 0.75, 0.75))
    pneu = report["per_class"]["pneumonia"]  # tp 1, predicted 2, actual 2
    assert (pneu["precision"], pneu["recall"], pneu["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    reg = report["per_class"]["regular"]  # tp 3, predicted 4, actual 4
    assert reg["f1"] == pytest.approx(0.75) and reg["support"] == 4
    assert report["macro_f1"] == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    # a class never predicted: precision and F1 are 0, not NaN
    report = classification_report([0, 1, 1], [0, 0, 0], ["a", "b"])
    assert report["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert report["per_class"]["a"]["precision"] == pytest.approx(1 / 3)
    assert report["per_class"]["a"]["f1"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    with pytest.raises(ValueError, match="indices"):
        classification_report([0, 3], [0, 1], ["a", "b"])


def test_summarise_folds_means_stds_and_summed_confusion():
    r1 = classification_report([0, 1, 1, 0], [0, 1, 0, 0], ["a", "b"])  # acc 0.75
    r2 = classification_report([0, 1], [1, 1], ["a", "b"])  # acc 0.5
    summary = summarise_folds([r1, r2])
    assert summary["folds"] == 2 and summary["classes"] == ["a", "b"]
    assert summary["accuracy"] == pytest.approx(0.625)
    assert summary["accuracy_std"] == pytest.approx(np.std([0.75, 0.5], ddof=1))
    assert summary["macro_f1"] == pytest.approx((r1["macro_f1"] + r2["macro_f1"]) / 2)
    assert summary["confusion"] == [[2, 1], [1, 2]]
    assert summarise_folds([r1])["accuracy_std"] == 0.0


def test_video_level_majority_vote():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 1, 0, 0, 0, 2]
    groups = ["a", "a", "a", "b", "b", "c"]  # a: 0 wins (right), b: 0 (wrong), c: right
    assert video_level_accuracy(y_true, y_pred, groups) == pytest.approx(2 / 3)


def test_extract_features_normalises_like_training():
    torch.manual_seed(0)
    backbone = ResNet18Backbone(1)
    frames = np.random.default_rng(0).integers(0, 256, (5, 40, 48, 1), dtype=np.uint8)
    feats = extract_features(backbone, frames, image_size=32, batch_size=2)
    assert feats.shape == (5, 512) and feats.dtype == np.float32
    backbone.eval()
    with torch.no_grad():
        expected = backbone(resize_and_normalize(to_float_chw(frames), 32)).numpy()
    assert np.allclose(feats, expected, atol=1e-5)
    assert backbone.training is False  # mode restored (it was eval)


def test_linear_probe_separates_separable_features():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (3, 16))

    def sample(n):
        y = np.arange(n) % 3
        return centers[y] + rng.normal(0, 1, (n, 16)), y

    (xt, yt), (xv, yv), (xs, ys) = sample(60), sample(30), sample(30)
    pred = linear_probe(xt, yt, xv, yv, xs)
    assert pred.shape == (30,) and np.mean(pred == ys) >= 0.9


def test_backbone_from_state_reads_a_ddp_uscl_checkpoint():
    model = USCLModel(in_channels=1, num_classes=2)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    backbone = backbone_from_state(state, channels=1)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, model.backbone.state_dict()[key])
    with pytest.raises(ValueError, match="does not fit"):
        backbone_from_state(state, channels=3)


def test_batchnorm_reestimation_changes_the_statistics_and_nothing_else():
    from ultrasound.evaluation import reestimate_batchnorm

    torch.manual_seed(0)
    backbone = ResNet18Backbone(1).eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    frames = np.random.default_rng(0).integers(0, 255, (10, 32, 32, 1)).astype(np.uint8)
    reestimate_batchnorm(backbone, frames, 32, batch_size=4)
    after = backbone.state_dict()
    stats = {k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed == stats  # every statistic moved, no weight did
    assert not backbone.training  # the mode is restored
    # the first BatchNorm's running mean is the plain average of the batch means of its input
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    conv = backbone.stem[0](((x - 0.5) / 0.25))
    batch_means = [conv[i:i + 4].mean(dim=(0, 2, 3)) for i in (0, 4)]  # the 2 frames left form batch 3
    third = conv[8:10].mean(dim=(0, 2, 3))
    expected = (batch_means[0] + batch_means[1] + third) / 3
    assert torch.allclose(after["stem.1.running_mean"], expected, atol=1e-5)
    assert all(m.momentum == 0.1 for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_finetuning_trains_exactly_layer4_1_and_the_new_layer():
    from ultrasound.evaluation import finetune_model

    model = finetune_model(ResNet18Backbone(1), num_classes=3)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("0.layer4.1.", "1.")) for n in trainable)
    assert {n for n, _ in model.named_parameters() if n.startswith(("0.layer4.1.", "1."))} == trainable
    assert model[1].out_features == 3
    # a real fine-tuning step moves exactly those parameters (BatchNorm statistics move everywhere)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    moved = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    weights_moved = {k for k in moved if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert weights_moved == trainable
    assert "0.stem.1.running_mean" in moved  # frozen layers' statistics follow the training frames


def test_finetune_last_block_learns_a_brightness_cue():
    rng = np.random.default_rng(0)

    def sample(n):
        y = np.arange(n) % 2
        frames = rng.integers(0, 60, (n, 32, 32, 1)).astype(np.uint8)
        frames[y == 1, :, :16] += 150  # class 1: bright left half
        return frames, y

    (ft, yt), (fv, yv), (fs, ys) = sample(24), sample(10), sample(12)
    torch.manual_seed(0)
    state = ResNet18Backbone(1).state_dict()
    before = {k: v.clone() for k, v in state.items()}
    pred = finetune_last_block(state, ft, yt, fv, yv, fs, num_classes=2, epochs=6,
                               image_size=32, channels=1, seed=0, batch_size=8)
    assert pred.shape == (12,) and np.mean(pred == ys) >= 0.9
    assert all(torch.equal(before[k], state[k]) for k in state)  # the caller's state untouched
    with pytest.raises(ValueError, match="labels must lie"):
        finetune_last_block(state, ft, yt + 5, fv, yv, fs, num_classes=2, epochs=1,
                            image_size=32, channels=1)


def test_one_split_unit_rule_for_every_split():
    from ultrasound.split_unit import split_unit, split_units, unit_kind

    assert split_unit("p1", "v1") == "patient:p1" and split_unit(" ", "v1") == "video:v1"
    assert split_units(["p1", None, "p1"], ["a", "b", "c"]).tolist() == ["patient:p1", "video:b", "patient:p1"]
    assert (unit_kind(["p", "q"]), unit_kind([None, ""]), unit_kind(["p", None])) == ("patient", "video", "patient/video")
