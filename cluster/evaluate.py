"""Downstream evaluation of a pretrained backbone on an ingested data set.

The protocol of USCL (Chen et al., MICCAI 2021) on POCUS, without its flaws: frames sampled as
the POCUS authors did (3 per second, at most 30 per video), K-fold cross-validation split by
patient where known and by video otherwise, model selection on a validation split carved from
the training folds (never on the test fold), a linear probe on frozen features or fine-tuning of
the last residual block. The science is in ``ultrasound.evaluation``; this module decides which
videos are in which fold, loads their frames once through the frame stream (Ray Data) into the
driver's memory, and runs the folds.

The fold split is made per video from the manifest alone (:func:`video_folds`), so that
``sonoray pretrain --holdout-fold I`` masks exactly the labels of the videos that ``sonoray
evaluate`` later tests in fold I, whatever frames either job samples.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cluster.completion import check_model_file
from cluster.dataset import IngestedDataset
from cluster.frames import StreamSpec, collect_frames, frame_stream
from cluster.storage import Storage, parse_uri
from ultrasound.checkpoint import load_state
from ultrasound.evaluation import (
    FINETUNE_EPOCHS,
    FINETUNE_LR,
    backbone_from_state,
    carve_validation,
    classification_report,
    extract_features,
    finetune_last_block,
    group_kfold_split,
    linear_probe,
    reestimate_batchnorm,
    summarise_folds,
    video_level_accuracy,
)
from ultrasound.split_unit import split_unit
from ultrasound.video import FrameFormat, FrameSampling

#: The POCUS authors' frame sampling for classification: 3 frames per second, at most 30.
POCUS_FPS = 3.0
POCUS_MAX_PER_VIDEO = 30
MODES = ("linear", "finetune")


class EvaluationError(ValueError):
    """An evaluation that must not run (e.g. a checkpoint that saw test-fold labels)."""


def split_group(row: Mapping[str, Any]) -> str:
    """The unit no split may cut (:func:`ultrasound.split_unit.split_unit`) of a manifest row."""
    return split_unit(row.get("patient_id"), row["video_id"])


def evaluation_rows(data: IngestedDataset, classes: Sequence[str] | None = None,
                    probe: str | None = None) -> tuple[list[dict], list[str]]:
    """The videos a cross-validation uses and its class names (sorted).

    Videos need a class label; ``classes`` (default: every label of the manifest) keeps those
    classes only, ``probe`` (e.g. ``convex``) those recorded with that probe.
    """
    known = data.classes
    if classes is None:
        classes = known
    classes = sorted(dict.fromkeys(str(c) for c in classes))
    unknown = sorted(set(classes) - set(known))
    if unknown:
        raise EvaluationError(f"classes {unknown} do not occur in {data.root.uri}; "
                              f"its labels are {known}")
    if len(classes) < 2:
        raise EvaluationError(f"classification needs >= 2 classes, got {classes}")
    wanted_probe = probe.strip().lower() if probe else None
    rows = [r for r in data.rows if r.get("label") in classes
            and (wanted_probe is None or str(r.get("probe") or "").lower() == wanted_probe)]
    if not rows:
        raise EvaluationError(f"no video of {data.root.uri} has a label in {classes}"
                              + (f" and probe {wanted_probe!r}" if wanted_probe else ""))
    return rows, classes


def video_folds(rows: Sequence[Mapping[str, Any]], classes: Sequence[str], k: int,
                seed: int) -> list[list[str]]:
    """The video ids of each of the ``k`` test folds.

    One entry per video goes to ``ultrasound.evaluation.group_kfold_split`` (groups: patients
    where known, else videos; stratified by class), so the split depends only on the manifest
    rows, ``k`` and ``seed``. Every video lies in exactly one test fold and all videos of a
    patient lie in the same one.
    """
    ids = [str(r["video_id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise EvaluationError("video ids are not unique")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r["label"]] for r in rows])
    groups = np.array([split_group(r) for r in rows])
    try:
        folds = group_kfold_split(groups, labels, k=k, seed=seed)
    except ValueError as err:
        raise EvaluationError(f"cannot make {k} folds of {len(rows)} videos: {err}") from err
    return [sorted(ids[i] for i in test) for _, test in folds]


VAL_FRACTION = 0.2  # share of the training folds' groups carved out for model selection


def validation_videos(rows: Sequence[Mapping[str, Any]], classes: Sequence[str], test_fold: Sequence[str],
                      fraction: float = VAL_FRACTION, seed: int = 0) -> list[str]:
    """The validation video ids of a fold: about ``fraction`` of the groups of the other folds,
    group-disjoint and stratified (one entry per video, so the carve depends on the manifest
    rows alone and pretraining can mask them as evaluation will use them)."""
    test = set(map(str, test_fold))
    train = [r for r in rows if str(r["video_id"]) not in test]
    index = {c: i for i, c in enumerate(classes)}
    groups = np.array([split_group(r) for r in train])
    labels = np.array([index[r["label"]] for r in train])
    try:
        _, val = carve_validation(np.arange(len(train)), groups, labels, fraction=fraction, seed=seed)
    except ValueError as err:
        raise EvaluationError(f"cannot carve a validation split from {len(train)} videos: {err}") from err
    return sorted(str(train[i]["video_id"]) for i in val)


@dataclass(frozen=True)
class HoldoutSpec:
    """Which test fold's labels pretraining must not see: fold ``fold`` of the split that
    ``sonoray evaluate --folds folds --split-seed seed [--classes ...] [--probe ...]`` makes."""

    fold: int
    folds: int = 5
    seed: int = 0
    classes: tuple[str, ...] | None = None
    probe: str | None = None

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if not 0 <= self.fold < self.folds:
            raise ValueError(f"holdout fold must be in [0, {self.folds - 1}], got {self.fold}")

    def test_video_ids(self, data: IngestedDataset) -> list[str]:
        rows, classes = evaluation_rows(data, self.classes, self.probe)
        return video_folds(rows, classes, self.folds, self.seed)[self.fold]

    def masked_video_ids(self, data: IngestedDataset) -> list[str]:
        """The videos whose labels pretraining must not use: the fold's test videos and the
        validation videos evaluation selects its probe C / fine-tuning epoch on."""
        rows, classes = evaluation_rows(data, self.classes, self.probe)
        test = video_folds(rows, classes, self.folds, self.seed)[self.fold]
        return sorted(set(test) | set(validation_videos(rows, classes, test, seed=self.seed)))

    def as_dict(self) -> dict:
        return {"fold": self.fold, "folds": self.folds, "seed": self.seed,
                "classes": list(self.classes) if self.classes else None, "probe": self.probe}


# -- frames in memory ------------------------------------------------------------------------
@dataclass
class EvalFrames:
    """Every sampled frame of the evaluated videos, in memory.

    Shape:
        - images: ``(N, S, S, C)`` uint8; labels ``(N,)`` int class indices; video_ids,
          groups ``(N,)`` str (groups: patient or video, see :func:`split_group`).
    """

    images: np.ndarray
    labels: np.ndarray
    video_ids: np.ndarray
    groups: np.ndarray
    classes: list[str]
    failed: list[dict]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_eval_frames(data: IngestedDataset, rows: Sequence[Mapping[str, Any]],
                     classes: Sequence[str], *, image_size: int, channels: int,
                     fps: float = POCUS_FPS, max_per_video: int | None = POCUS_MAX_PER_VIDEO,
                     cpus_per_task: float = StreamSpec.cpus_per_task, cache: bool = True) -> EvalFrames:
    """Stream the frames of ``rows`` (``fps`` per second, at most ``max_per_video``) resized to
    ``image_size`` through Ray Data, and collect them on the driver (:func:`cluster.frames.collect_frames`)."""
    subset = data.select([r["video_id"] for r in rows])
    spec = StreamSpec(sampling=FrameSampling(fps=fps, max_per_video=max_per_video),
                      fmt=FrameFormat(channels=channels, size=image_size), mode="frames",
                      seed=0, cpus_per_task=cpus_per_task, cache=cache)
    stream = frame_stream(subset, spec)
    try:
        got = collect_frames(stream, subset, ["image"])
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    by_id = {str(r["video_id"]): r for r in rows}
    class_index = {c: i for i, c in enumerate(classes)}
    return EvalFrames(
        images=got["image"].astype(np.uint8),
        labels=np.array([class_index[by_id[v]["label"]] for v in got["video_id"]], dtype=np.int64),
        video_ids=got["video_id"],
        groups=np.array([split_group(by_id[v]) for v in got["video_id"]]),
        classes=list(classes),
        failed=got.failed,
    )


# -- checkpoints -----------------------------------------------------------------------------
RANDOM = "random"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A backbone to evaluate: its state (None = random init) and what pretraining recorded."""

    uri: str
    state: dict | None
    labelled_video_ids: frozenset[str] | None  # None: the file records no label provenance
    config: dict | None

    @property
    def channels(self) -> int | None:
        return int(self.config["channels"]) if self.config and "channels" in self.config else None

    @property
    def image_size(self) -> int | None:
        return int(self.config["image_size"]) if self.config and "image_size" in self.config \
            else None


def load_checkpoint(uri: str, storage: Storage | None = None) -> LoadedCheckpoint:
    """``random``, a ``sonoray pretrain`` model.pt (local path or s3://), or any state dict."""
    if uri == RANDOM:
        return LoadedCheckpoint(RANDOM, None, frozenset(), None)
    storage = storage or Storage()
    location = parse_uri(uri)
    if not storage.exists(location):
        raise FileNotFoundError(f"no checkpoint at {location.uri}")
    data = storage.read_bytes(location)
    check_model_file(location, data, storage)
    blob = load_state(data, location.uri)
    if not isinstance(blob, dict):
        raise EvaluationError(f"{location.uri} holds a {type(blob).__name__}, not a state dict")
    if isinstance(blob.get("model"), dict):
        labelled = blob.get("labelled_video_ids")
        return LoadedCheckpoint(location.uri, blob["model"],
                                None if labelled is None else frozenset(map(str, labelled)),
                                blob.get("config"))
    return LoadedCheckpoint(location.uri, blob, None, None)


def check_no_test_labels(checkpoint: LoadedCheckpoint, test_video_ids: Sequence[str],
                         fold: int, validation_video_ids: Sequence[str] = ()) -> None:
    """Refuse a checkpoint pretrained with the class labels of any test or validation video of
    ``fold`` (validation labels would bias the choice of C / the fine-tuning epoch)."""
    if not checkpoint.labelled_video_ids:
        return
    for kind, ids in (("test", test_video_ids), ("validation", validation_video_ids)):
        leaked = sorted(checkpoint.labelled_video_ids & set(map(str, ids)))
        if not leaked:
            continue
        raise EvaluationError(
            f"{checkpoint.uri} was pretrained with the labels of {len(leaked)} {kind} video(s) of "
            f"fold {fold} (e.g. {leaked[:3]}): its accuracy on that fold would be inflated. "
            f"Pretrain one checkpoint per fold with `sonoray pretrain --holdout-fold I --folds K "
            f"--split-seed S` (same --folds/--split-seed/--classes/--probe as here) and pass "
            f"--checkpoint '.../{{fold}}/model.pt', or pretrain with --unlabelled")


# -- cross-validation --------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSettings:
    mode: str = "linear"
    image_size: int = 224
    channels: int = 1
    epochs: int = FINETUNE_EPOCHS  # fine-tuning (the authors' protocol)
    lr: float = FINETUNE_LR
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


def fold_of_frames(video_ids: Sequence[str], folds: Sequence[Sequence[str]]) -> np.ndarray:
    """The test fold of every frame (from the video it comes from); -1 for a video in no fold."""
    fold_of_video = {v: f for f, fold in enumerate(folds) for v in fold}
    return np.array([fold_of_video.get(str(v), -1) for v in video_ids], dtype=np.int64)


def cross_validate(
    frames: EvalFrames, folds: Sequence[Sequence[str]], validation: Sequence[Sequence[str]],
    checkpoint_for_fold: Callable[[int], LoadedCheckpoint], settings: EvalSettings,
    on_fold: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Run every fold: train on the other folds minus the fold's ``validation`` videos (used for
    model selection only, :func:`validation_videos`), test on the fold. Returns
    ``summarise_folds`` plus ``per_class`` (from the summed confusion), ``video_accuracy`` (mean
    over folds of the per-video majority vote), ``fold_reports`` and ``fold_of_frame`` (the test
    fold of every frame, for audit)."""
    fold_of_frame = fold_of_frames(frames.video_ids, folds)
    reports, video_accs = [], []
    features_cache: dict[str, np.ndarray] = {}
    for fold in range(len(folds)):
        checkpoint = checkpoint_for_fold(fold)
        check_no_test_labels(checkpoint, folds[fold], fold, validation[fold])
        test_idx = np.flatnonzero(fold_of_frame == fold)
        train_idx = np.flatnonzero((fold_of_frame != fold) & (fold_of_frame >= 0))
        if len(test_idx) == 0:
            raise EvaluationError(f"fold {fold}: none of its videos gave a frame")
        is_val = np.isin(frames.video_ids[train_idx], np.asarray(list(validation[fold]), dtype=str))
        fit_idx, val_idx = train_idx[~is_val], train_idx[is_val]
        if len(val_idx) == 0 or len(np.unique(frames.labels[fit_idx])) < 2:
            raise EvaluationError(f"fold {fold}: its validation videos gave no frame, or its training "
                                  f"frames hold fewer than 2 classes")
        if settings.mode == "linear":
            # one extraction per distinct checkpoint; a random trunk's BatchNorm statistics come
            # from the fold's training frames, so it is extracted once per fold
            key = checkpoint.uri if checkpoint.state is not None else f"{checkpoint.uri}#fold{fold}"
            if key not in features_cache:
                torch.manual_seed(settings.seed)  # a random init is reproducible
                backbone = backbone_from_state(checkpoint.state, settings.channels).to(settings.device)
                if checkpoint.state is None:
                    reestimate_batchnorm(backbone, frames.images[train_idx], settings.image_size)
                features_cache = {key: extract_features(backbone, frames.images, settings.image_size)}
            feats = features_cache[key]
            pred = linear_probe(feats[fit_idx], frames.labels[fit_idx], feats[val_idx],
                                frames.labels[val_idx], feats[test_idx], seed=settings.seed)
        else:
            state = checkpoint.state
            if state is None:
                torch.manual_seed(settings.seed)
                state = backbone_from_state(None, settings.channels).state_dict()
            pred = finetune_last_block(
                state, frames.images[fit_idx], frames.labels[fit_idx], frames.images[val_idx],
                frames.labels[val_idx], frames.images[test_idx], num_classes=len(frames.classes),
                epochs=settings.epochs, lr=settings.lr, image_size=settings.image_size,
                channels=settings.channels, seed=settings.seed, device=settings.device)
        report = classification_report(frames.labels[test_idx], pred, frames.classes)
        report["video_accuracy"] = video_level_accuracy(frames.labels[test_idx], pred,
                                                        frames.video_ids[test_idx])
        report["test_videos"] = len(folds[fold])
        reports.append(report)
        video_accs.append(report["video_accuracy"])
        if on_fold is not None:
            on_fold(fold, report)
    summary = summarise_folds(reports)
    pooled = _pooled_per_class(np.asarray(summary["confusion"]), frames.classes)
    summary["per_class"] = pooled
    summary["video_accuracy"] = float(np.mean(video_accs))
    summary["video_accuracy_std"] = float(np.std(video_accs, ddof=1 if len(video_accs) > 1 else 0))
    summary["fold_reports"] = reports
    summary["fold_of_frame"] = fold_of_frame
    return summary


def _pooled_per_class(confusion: np.ndarray, classes: Sequence[str]) -> dict[str, dict]:
    truth = np.repeat(np.arange(len(classes)), confusion.sum(axis=1))
    pred = np.concatenate([np.repeat(np.arange(len(classes)), row) for row in confusion])
    return classification_report(truth, pred, classes)["per_class"]


# -- records and paired comparisons ------------------------------------------------------------
EVALUATION_FILE = "evaluation.json"
METRICS = ("accuracy", "macro_f1", "video_accuracy")


def evaluation_record(name: str, summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What ``sonoray evaluate --out`` keeps of the cross-validations of one backbone, one per
    split seed: every (split seed, fold)'s scores and test videos, so that two arms evaluated on
    the same splits can be compared pair by pair (:func:`compare_records`).

    ``summaries``: :func:`cross_validate` results (with ``split_seed`` and ``test_folds``)."""
    if not summaries:
        raise EvaluationError("no cross-validation to record")
    first = summaries[0]
    per_fold = [{"split_seed": int(s["split_seed"]), "fold": fold, "test_videos": list(s["test_folds"][fold]),
                 **{m: float(report[m]) for m in METRICS}}
                for s in summaries for fold, report in enumerate(s["fold_reports"])]
    overall = {}
    for m in METRICS:
        values = np.array([row[m] for row in per_fold])
        overall[m] = float(values.mean())
        overall[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"name": str(name), "checkpoint": first["checkpoint"], "mode": first["mode"],
            "image_size": int(first["image_size"]), "channels": int(first["channels"]),
            "classes": list(first["classes"]), "folds": int(first["folds"]),
            "split_seeds": [int(s["split_seed"]) for s in summaries], "videos": int(first["videos"]),
            "frames": int(first["frames"]), **overall, "per_fold": per_fold}


def compare_records(records: Sequence[Mapping[str, Any]], *, level: float = 0.95,
                    n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Paired differences between arms: for every pair (earlier-listed arm ``a``, later ``b``)
    and metric, ``a - b`` over the (split seed, fold) pairs both were scored on, with its
    bootstrap CI and sign test (:func:`ultrasound.stats.paired_difference`). Refused when the
    arms were not evaluated on the same splits (same test videos per split seed and fold)."""
    from ultrasound.stats import paired_difference

    if len(records) < 2:
        raise EvaluationError("--compare needs at least two evaluations")
    names = [str(r["name"]) for r in records]
    if len(set(names)) != len(names):
        raise EvaluationError(f"the evaluations to compare share a name: {names}")
    splits = [{(row["split_seed"], row["fold"]): tuple(row["test_videos"]) for row in r["per_fold"]}
              for r in records]
    for name, split, record in zip(names[1:], splits[1:], records[1:]):
        if split != splits[0] or record["classes"] != records[0]["classes"]:
            raise EvaluationError(f"{name} was not evaluated on the same splits as {names[0]} (split seeds, "
                                  f"folds, classes or test videos differ): pairing needs the same ones")
    keys = sorted(splits[0])
    scores = [{(row["split_seed"], row["fold"]): row for row in r["per_fold"]} for r in records]
    differences = []
    for i in range(len(records)):
        for j in range(i + 1, len(records)):
            for metric in METRICS:
                a = [scores[i][k][metric] for k in keys]
                b = [scores[j][k][metric] for k in keys]
                result = paired_difference(a, b, level=level, n_boot=n_boot, seed=seed)
                differences.append({"a": names[i], "b": names[j], "metric": metric, **result.as_dict()})
    arms = [{"name": n, "checkpoint": r["checkpoint"], "mode": r["mode"],
             **{m: r[m] for m in METRICS}, **{f"{m}_std": r[f"{m}_std"] for m in METRICS}}
            for n, r in zip(names, records)]
    return {"arms": arms, "pairs": len(keys), "level": level, "differences": differences}


# -- one evaluation, end to end ---------------------------------------------------------------
FOLD_PLACEHOLDER = "{fold}"


def checkpoints_for_folds(template: str, folds: int, storage) -> list:
    """One LoadedCheckpoint per fold: the same one, or ``template`` with '{fold}' filled in."""
    if FOLD_PLACEHOLDER not in template:
        shared = load_checkpoint(template, storage)
        return [shared] * folds
    return [load_checkpoint(template.replace(FOLD_PLACEHOLDER, str(f)), storage)
            for f in range(folds)]


def evaluate_summary(
    data_uri: str, checkpoint: str, *, mode: str = "linear", folds: int = 5, split_seed: int = 0,
    classes: list[str] | None = None, probe: str | None = None, image_size: int | None = None,
    channels: int | None = None, fps: float | None = 3.0, max_per_video: int | None = 30,
    epochs: int | None = None, lr: float | None = None, device: str = "cpu", storage=None, frames=None,
    on_progress: Callable[[str], None] | None = None, cache: bool = True,
) -> dict[str, Any]:
    """Cross-validate ``checkpoint`` on the data set at ``data_uri`` (Ray connected): what
    ``sonoray evaluate`` runs per split seed, and what the demo's pretrain stage and the
    evaluate-after-pretrain sweep call. ``frames``
    (an EvalFrames of the same videos, image size and channels) skips streaming them again.
    Returns the summary of ``cluster.evaluate.cross_validate`` plus ``test_folds`` (video ids),
    ``videos``, ``frames``, ``mode``, ``checkpoint``, ``image_size``, ``channels``."""
    from cluster.dataset import load_dataset

    say = on_progress or (lambda message: None)
    data = load_dataset(data_uri, storage)
    rows, class_names = evaluation_rows(data, classes, probe)
    test_folds = video_folds(rows, class_names, folds, split_seed)
    validation = [validation_videos(rows, class_names, test, seed=split_seed) for test in test_folds]
    loaded = checkpoints_for_folds(checkpoint, folds, storage)
    for fold, ckpt in enumerate(loaded):  # refuse before any frame is decoded
        check_no_test_labels(ckpt, test_folds[fold], fold, validation[fold])
        if ckpt.labelled_video_ids is None:
            say(f"evaluate: {ckpt.uri} records no label provenance (not a sonoray pretrain "
                f"checkpoint); make sure it never saw labels of these videos")
    channels = channels or loaded[0].channels or 1
    image_size = image_size or loaded[0].image_size or 224
    wrong = sorted({c.uri for c in loaded if c.channels not in (None, channels)})
    if wrong:
        raise EvaluationError(f"--channels {channels} does not match the checkpoint(s) {wrong}")
    tuning = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
    settings = EvalSettings(mode=mode, image_size=image_size, channels=channels, seed=split_seed,
                            device=device, **tuning)
    if frames is None:
        say(f"evaluate: sampling frames of {len(rows)} videos ({fps} per second, at most "
            f"{max_per_video}) at {image_size}px")
        frames = load_eval_frames(data, rows, class_names, image_size=image_size,
                                  channels=channels, fps=fps, max_per_video=max_per_video, cache=cache)
        for item in frames.failed:
            say(f"evaluate: skipped {item['key']}: {item['reason']}")

    def on_fold(fold: int, report: dict) -> None:
        say(f"evaluate: fold {fold + 1}/{folds}: accuracy {report['accuracy']:.3f}, "
            f"macro-F1 {report['macro_f1']:.3f}")

    summary = cross_validate(frames, test_folds, validation, lambda f: loaded[f], settings, on_fold=on_fold)
    summary.update(test_folds=test_folds, validation_folds=validation, videos=len(set(frames.video_ids.tolist())),
                   frames=len(frames), eval_frames=frames, split_seed=split_seed, mode=mode,
                   checkpoint=checkpoint, image_size=image_size, channels=channels)
    return summary
