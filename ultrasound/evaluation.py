"""Downstream evaluation of a pretrained backbone: does pretraining help classification?

USCL (Chen et al., MICCAI 2021) evaluates on POCUS (covid / pneumonia / regular) with 5-fold
cross-validation split by video and fine-tunes the last residual block (``layer4[1]``) plus a new
linear layer (:func:`finetune_last_block`, the authors' protocol). Unlike the authors' scripts,
model selection here never looks at the test fold: C of the linear probe and the fine-tuning
epoch are chosen on a validation split carved, group-disjoint, from the training folds. A random
trunk gets BatchNorm statistics estimated on the training frames (:func:`reestimate_batchnorm`). Predictions are per frame; :func:`video_level_accuracy` adds a per-video
majority vote.

Everything takes plain arrays: ``groups`` are video (or patient, where known) ids, one per frame,
and no group is ever split between train, validation and test.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F

from ultrasound.augment import USCLAugment, resize_and_normalize, to_float_chw
from ultrasound.backbone import FEATURE_DIM, ResNet18Backbone

DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0)


def _check_groups_labels(groups: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    groups, labels = np.asarray(groups), np.asarray(labels)
    if groups.ndim != 1 or labels.shape != groups.shape:
        raise ValueError(f"groups and labels must be 1-D of equal length, got {groups.shape} "
                         f"and {labels.shape}")
    return groups, labels


def group_kfold_split(groups: Any, labels: Any, k: int = 5,
                      seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train_idx, test_idx) folds; each group lies in exactly one test fold, and class
    proportions are kept as far as whole groups allow (sklearn ``StratifiedGroupKFold``).

    Example:
        >>> folds = group_kfold_split([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 0, 0], k=3)
        >>> sorted(len(test) for _, test in folds)
        [2, 2, 2]
    """
    groups, labels = _check_groups_labels(groups, labels)
    n_groups = len(np.unique(groups))
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    if n_groups < k:
        raise ValueError(f"{n_groups} groups (videos) cannot fill {k} folds")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(train), np.sort(test))
            for train, test in splitter.split(np.zeros(len(labels)), labels, groups)]


def carve_validation(train_idx: Any, groups: Any, labels: Any, fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into (fit_idx, val_idx), group-disjoint and stratified, with about
    ``fraction`` of the groups in validation. Indices are positions in ``groups``/``labels``."""
    groups, labels = _check_groups_labels(groups, labels)
    train_idx = np.asarray(train_idx, dtype=np.int64)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_groups = len(np.unique(groups[train_idx]))
    if n_groups < 2:
        raise ValueError(f"need >= 2 groups to carve a validation split, got {n_groups}")
    # at most as many splits as the largest class has members (StratifiedGroupKFold's limit;
    # reached on small sets carved one entry per video)
    largest = int(np.max(np.unique(labels[train_idx], return_counts=True)[1]))
    n_splits = min(n_groups, max(2, int(round(1.0 / fraction))), max(2, largest))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fit, val = next(splitter.split(np.zeros(len(train_idx)), labels[train_idx], groups[train_idx]))
    return np.sort(train_idx[fit]), np.sort(train_idx[val])


def _model_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _prepare(frames: Any, image_size: int, device: torch.device) -> torch.Tensor:
    return resize_and_normalize(to_float_chw(torch.as_tensor(frames)).to(device), image_size)


@torch.no_grad()
def extract_features(backbone: nn.Module, frames: Any, image_size: int,
                     batch_size: int = 64) -> np.ndarray:
    """Frozen backbone features, with the training normalisation (resize, mean 0.5, std 0.25).

    Shape:
        - frames: ``(N, H, W, C)`` uint8.
        - Output: ``(N, 512)`` float32 numpy.
    """
    frames = torch.as_tensor(frames)
    if frames.ndim != 4:
        raise ValueError(f"frames must be (N, H, W, C) uint8, got shape {tuple(frames.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = backbone.training
    backbone.eval()
    device = _model_device(backbone)
    out = [backbone(_prepare(frames[i: i + batch_size], image_size, device)).float().cpu()
           for i in range(0, frames.shape[0], batch_size)]
    backbone.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM), np.float32)


def linear_probe(train_feats: np.ndarray, train_y: Any, val_feats: np.ndarray, val_y: Any,
                 test_feats: np.ndarray, Cs: Sequence[float] = DEFAULT_CS,
                 seed: int = 0) -> np.ndarray:
    """Logistic regression on standardised frozen features; ``C`` is the one with the best
    validation accuracy (ties: the smaller C), then refit on train + validation. Returns the
    predicted test labels."""
    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    if len(train_feats) != len(train_y) or len(val_feats) != len(val_y):
        raise ValueError("features and labels differ in length")
    if len(val_y) == 0 or len(np.unique(train_y)) < 2:
        raise ValueError("linear_probe needs a non-empty validation split and >= 2 train classes")
    if not Cs:
        raise ValueError("Cs must name at least one C")

    def fit(feats: np.ndarray, y: np.ndarray,
            c: float) -> tuple[StandardScaler, LogisticRegression]:
        scaler = StandardScaler().fit(feats)
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        return scaler, clf.fit(scaler.transform(feats), y)

    best_c, best_acc = None, -1.0
    for c in sorted(Cs):
        scaler, clf = fit(train_feats, train_y, c)
        acc = float(np.mean(clf.predict(scaler.transform(val_feats)) == val_y))
        if acc > best_acc:
            best_c, best_acc = c, acc
    scaler, clf = fit(np.concatenate([train_feats, val_feats]), np.concatenate([train_y, val_y]),
                      best_c)
    return clf.predict(scaler.transform(test_feats))


def backbone_from_state(state: Mapping[str, torch.Tensor] | None,
                        channels: int) -> ResNet18Backbone:
    """A backbone from a state dict: plain backbone keys, or a USCL model / DDP checkpoint whose
    keys start with ``module.`` / ``backbone.`` (other heads ignored); None = random init."""
    backbone = ResNet18Backbone(channels)
    if state is None:
        return backbone
    stripped = {key.removeprefix("module."): value for key, value in state.items()}
    if any(key.startswith("backbone.") for key in stripped):
        stripped = {key.removeprefix("backbone."): value for key, value in stripped.items()
                    if key.startswith("backbone.")}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(stripped))
    unexpected = sorted(set(stripped) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(stripped) if own[k].shape != stripped[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(f"state does not fit a {channels}-channel ResNet-18 backbone: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"wrong shape {wrong_shape[:5]}")
    backbone.load_state_dict(stripped)
    return backbone


@torch.no_grad()
def reestimate_batchnorm(backbone: nn.Module, frames: Any, image_size: int,
                         batch_size: int = 64) -> nn.Module:
    """Replace every BatchNorm layer's running mean and variance by their average over
    ``frames`` (resized and normalised as in evaluation), in place; weights are untouched.

    A randomly initialised trunk keeps BatchNorm's identity statistics (mean 0, variance 1),
    while a pretrained one carries statistics adapted to ultrasound frames; re-estimating them
    on the training frames makes random init the stronger, fairer baseline (a data-adapted
    random feature map). Uses the cumulative average (``momentum=None``) so the result does not
    depend on the batch order beyond float rounding.

    Shape:
        - frames: ``(N, H, W, C)`` uint8, ``N >= 2``.
    """
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise ValueError(f"frames must be (N >= 2, H, W, C) uint8, got shape {tuple(frames.shape)}")
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = backbone.training
    backbone.train()
    device = _model_device(backbone)
    try:
        for i in range(0, frames.shape[0], batch_size):
            chunk = frames[i: i + batch_size]
            if chunk.shape[0] < 2:  # a batch of one has no variance to add
                continue
            backbone(_prepare(chunk, image_size, device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        backbone.train(was_training)
    return backbone


FINETUNE_EPOCHS = 100
FINETUNE_LR = 0.01
FINETUNE_WEIGHT_DECAY = 1e-4


def finetune_last_block(
    backbone_state: Mapping[str, torch.Tensor] | None,
    train_frames: Any, train_y: Any, val_frames: Any, val_y: Any, test_frames: Any, *,
    num_classes: int, epochs: int = FINETUNE_EPOCHS, lr: float = FINETUNE_LR,
    weight_decay: float = FINETUNE_WEIGHT_DECAY, image_size: int = 224, channels: int = 3,
    seed: int = 0, batch_size: int = 32, augment: bool = True, device: str | torch.device = "cpu",
) -> np.ndarray:
    """USCL's fine-tuning protocol (the authors' ``eval_pretrained_model.py``): train the last
    residual block (``layer4[1]``) and a new linear layer, everything else frozen; Adam (lr 0.01,
    weight decay 1e-4) with cosine annealing over ``epochs`` (100); training frames randomly
    resized-cropped (scale 0.8-1, ratio 0.8-1.25) and flipped; the network in train mode, so
    every BatchNorm layer's statistics follow the training frames, as in the authors' code.

    Unlike the authors' script, which keeps each fold's best epoch on its test fold, the epoch
    is chosen by accuracy on the validation frames (ties: the earlier epoch), then the test
    frames are predicted (eval mode).

    Shape:
        - *_frames: ``(N, H, W, C)`` uint8; *_y: ``(N,)`` int in ``[0, num_classes)``.
        - Output: ``(N_test,)`` predicted labels.
    """
    train_y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    val_y = torch.as_tensor(np.asarray(val_y), dtype=torch.long)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if epochs < 1 or lr <= 0 or batch_size < 1 or weight_decay < 0:
        raise ValueError(f"need epochs >= 1, lr > 0, batch_size >= 1, weight_decay >= 0; "
                         f"got {epochs}, {lr}, {batch_size}, {weight_decay}")
    for name, y, frames in (("train", train_y, train_frames), ("val", val_y, val_frames)):
        if len(y) == 0 or len(y) != len(frames):
            raise ValueError(
                f"{name} split: {len(frames)} frames, {len(y)} labels (need equal, > 0)")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"{name} labels must lie in [0, {num_classes - 1}]")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = finetune_model(backbone_from_state(backbone_state, channels), num_classes).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0)
    crop_flip = USCLAugment(image_size, channels, strength=0.0) if augment else None
    train_float = to_float_chw(torch.as_tensor(train_frames))

    def batch_of(idx: torch.Tensor) -> torch.Tensor:
        if crop_flip is None:
            return resize_and_normalize(train_float[idx], image_size).to(device)
        return torch.stack([crop_flip(train_float[int(i)], generator) for i in idx]).to(device)

    @torch.no_grad()
    def predict(frames: Any) -> torch.Tensor:
        model.eval()
        frames = torch.as_tensor(frames)
        return torch.cat([model(_prepare(frames[i: i + batch_size], image_size, device)).argmax(1).cpu()
                          for i in range(0, frames.shape[0], batch_size)]) if len(frames) else \
            torch.zeros(0, dtype=torch.long)

    best_acc, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            if len(idx) < 2 and len(order) > 1:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(model(batch_of(idx)), train_y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        acc = float((predict(val_frames) == val_y).float().mean())
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return predict(test_frames).numpy()


def finetune_model(backbone: ResNet18Backbone, num_classes: int) -> nn.Sequential:
    """``backbone`` + a new ``Linear(512, num_classes)``, with only ``layer4[1]`` and the new
    layer trainable (the authors' ``features.7.1`` + ``linear``)."""
    for param in backbone.parameters():
        param.requires_grad = False
    for param in backbone.layer4[1].parameters():
        param.requires_grad = True
    return nn.Sequential(backbone, nn.Linear(FEATURE_DIM, num_classes))


def classification_report(y_true: Any, y_pred: Any, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / F1 (0 where undefined), macro-F1, and the
    confusion matrix (rows: true class, columns: predicted), labels being indices into
    ``classes``."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    n = len(classes)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got {y_true.shape} "
                         f"and {y_pred.shape}")
    both = np.concatenate([y_true, y_pred])
    if len(both) and (both.min() < 0 or both.max() >= n):
        raise ValueError(f"labels must be indices in [0, {n - 1}] for classes {list(classes)}")
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    per_class = {}
    for c, name in enumerate(classes):
        tp = confusion[c, c]
        predicted, actual = confusion[:, c].sum(), confusion[c, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[str(name)] = {"precision": float(precision), "recall": float(recall),
                                "f1": float(f1), "support": int(actual)}
    return {
        "accuracy": float(np.trace(confusion) / len(y_true)) if len(y_true) else 0.0,
        "per_class": per_class,
        "macro_f1": float(np.mean([v["f1"] for v in per_class.values()])),
        "classes": [str(c) for c in classes],
        "confusion": confusion.tolist(),
    }


def summarise_folds(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; 0 for one fold) of accuracy and macro-F1 over
    folds, and the confusion matrices summed."""
    if not reports:
        raise ValueError("no fold reports to summarise")
    classes = list(reports[0]["classes"])
    if any(list(r["classes"]) != classes for r in reports):
        raise ValueError("fold reports name different classes")
    acc = np.array([r["accuracy"] for r in reports], dtype=float)
    f1 = np.array([r["macro_f1"] for r in reports], dtype=float)
    ddof = 1 if len(reports) > 1 else 0
    return {
        "folds": len(reports),
        "accuracy": float(acc.mean()), "accuracy_std": float(acc.std(ddof=ddof)),
        "macro_f1": float(f1.mean()), "macro_f1_std": float(f1.std(ddof=ddof)),
        "classes": classes,
        "confusion": np.sum([np.asarray(r["confusion"]) for r in reports], axis=0).tolist(),
    }


def video_level_accuracy(y_true: Any, y_pred: Any, groups: Any) -> float:
    """Accuracy of a per-video majority vote over frame predictions (ties: the smallest label);
    a video's true label is the majority of its frames' labels."""
    y_true, y_pred, groups = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups)
    if not (y_true.shape == y_pred.shape == groups.shape) or y_true.ndim != 1 or not len(groups):
        raise ValueError("y_true, y_pred and groups must be non-empty 1-D of equal length")
    hits = []
    for group in np.unique(groups):
        member = groups == group
        hits.append(np.bincount(y_pred[member]).argmax() == np.bincount(y_true[member]).argmax())
    return float(np.mean(hits))
