"""`sonoray evaluate`: does a pretrained backbone help classification? K-fold cross-validation.

USCL's downstream protocol (Chen et al., MICCAI 2021) on any ingested data set: frames sampled
as the POCUS authors did (3 per second, at most 30 per video), folds split by patient where known
else by video, a validation split carved from the training folds for model selection, a linear
probe on frozen features or fine-tuning of the last residual block. A checkpoint pretrained with
the labels of a test fold's videos is refused.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TextIO

from jobs.common import (
    add_json_arg,
    add_ray_args,
    add_storage_args,
    add_stream_args,
    connect_ray,
    csv_list,
    storage_from,
)
from jobs.output import UserError, emit_json, progress

FOLD_PLACEHOLDER = "{fold}"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="cross-validate a pretrained backbone (linear probe or fine-tuning)",
        description="K-fold cross-validation of a class label with a pretrained (or random) "
        "backbone: frames at 3 per second (at most 30 per video), folds by patient where known "
        "else by video, model selection on a validation split of the training folds.",
    )
    p.add_argument("--data", required=True, metavar="URI", help="data set root written by `sonoray ingest`")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="model.pt of `sonoray pretrain` (local or s3://), any backbone state dict, "
                   "or 'random'; '{fold}' in it is replaced by the fold index (one checkpoint per fold)")
    p.add_argument("--mode", choices=["linear", "finetune"], default="linear",
                   help="linear probe on frozen features (default) or fine-tune the last block")
    p.add_argument("--folds", type=int, default=5, help="folds (default 5)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fold split (default 0)")
    p.add_argument("--classes", default=None, metavar="A,B,...", help="classes to keep (default: all labels)")
    p.add_argument("--probe", default=None, help="keep videos of this probe only, e.g. convex")
    p.add_argument("--image-size", type=int, default=None,
                   help="frame size (default: the checkpoint's, else 224)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="(default: the checkpoint's, else 1)")
    p.add_argument("--fps", type=float, default=3.0, help="frames per second sampled (default 3)")
    p.add_argument("--max-per-video", type=int, default=30, help="cap per video (default 30)")
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (default 20)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default 1e-3)")
    p.add_argument("--gpu", action="store_true", help="compute features / fine-tune on this machine's GPU")
    add_stream_args(p)
    add_storage_args(p)
    add_ray_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def checkpoints_for_folds(template: str, folds: int, storage) -> list:
    """One LoadedCheckpoint per fold: the same one, or ``template`` with '{fold}' filled in."""
    from cluster.evaluate import load_checkpoint

    if FOLD_PLACEHOLDER not in template:
        shared = load_checkpoint(template, storage)
        return [shared] * folds
    return [load_checkpoint(template.replace(FOLD_PLACEHOLDER, str(f)), storage)
            for f in range(folds)]


def evaluate_summary(
    data_uri: str, checkpoint: str, *, mode: str = "linear", folds: int = 5, split_seed: int = 0,
    classes: list[str] | None = None, probe: str | None = None, image_size: int | None = None,
    channels: int | None = None, fps: float | None = 3.0, max_per_video: int | None = 30,
    epochs: int = 20, lr: float = 1e-3, device: str = "cpu", storage=None, frames=None,
    on_progress: Callable[[str], None] | None = None, cache: bool = True,
) -> dict[str, Any]:
    """Cross-validate ``checkpoint`` on the data set at ``data_uri`` (Ray connected). ``frames``
    (an EvalFrames of the same videos, image size and channels) skips streaming them again.
    Returns the summary of ``cluster.evaluate.cross_validate`` plus ``test_folds`` (video ids),
    ``videos``, ``frames``, ``mode``, ``checkpoint``, ``image_size``, ``channels``."""
    from cluster.dataset import load_dataset
    from cluster.evaluate import (
        EvalSettings,
        check_no_test_labels,
        cross_validate,
        evaluation_rows,
        load_eval_frames,
        video_folds,
    )

    say = on_progress or (lambda message: None)
    data = load_dataset(data_uri, storage)
    rows, class_names = evaluation_rows(data, classes, probe)
    test_folds = video_folds(rows, class_names, folds, split_seed)
    loaded = checkpoints_for_folds(checkpoint, folds, storage)
    for fold, ckpt in enumerate(loaded):  # refuse before any frame is decoded
        check_no_test_labels(ckpt, test_folds[fold], fold)
        if ckpt.labelled_video_ids is None:
            say(f"evaluate: {ckpt.uri} records no label provenance (not a sonoray pretrain "
                f"checkpoint); make sure it never saw labels of these videos")
    channels = channels or loaded[0].channels or 1
    image_size = image_size or loaded[0].image_size or 224
    wrong = sorted({c.uri for c in loaded if c.channels not in (None, channels)})
    if wrong:
        raise UserError(f"--channels {channels} does not match the checkpoint(s) {wrong}")
    settings = EvalSettings(mode=mode, image_size=image_size, channels=channels, epochs=epochs,
                            lr=lr, seed=split_seed, device=device)
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

    summary = cross_validate(frames, test_folds, lambda f: loaded[f], settings, on_fold=on_fold)
    summary.update(test_folds=test_folds, videos=len(set(frames.video_ids.tolist())),
                   frames=len(frames), mode=mode,
                   checkpoint=checkpoint, image_size=image_size, channels=channels)
    return summary


def print_table(summary: dict, out: TextIO = sys.stdout) -> None:
    """The human-readable report: per fold, mean +- std, per class, summed confusion."""
    mode = {"linear": "linear probe", "finetune": "fine-tuned last block"}[summary["mode"]]
    print(f"evaluate: {summary['checkpoint']} ({mode}), {summary['folds']} folds, "
          f"{summary['videos']} videos, {summary['frames']} frames", file=out)
    print(f"{'fold':>6} {'accuracy':>9} {'macro-F1':>9} {'video acc':>10} {'videos':>7}", file=out)
    for i, r in enumerate(summary["fold_reports"]):
        print(f"{i:>6} {r['accuracy']:>9.3f} {r['macro_f1']:>9.3f} {r['video_accuracy']:>10.3f} "
              f"{r['test_videos']:>7}", file=out)
    print(f"{'mean':>6} {summary['accuracy']:>9.3f} {summary['macro_f1']:>9.3f} "
          f"{summary['video_accuracy']:>10.3f}", file=out)
    print(f"{'std':>6} {summary['accuracy_std']:>9.3f} {summary['macro_f1_std']:>9.3f} "
          f"{summary['video_accuracy_std']:>10.3f}", file=out)
    width = max(len(c) for c in summary["classes"]) + 2
    print(f"{'class':<{width}} {'precision':>9} {'recall':>7} {'F1':>6} {'frames':>7}", file=out)
    for name, m in summary["per_class"].items():
        print(f"{name:<{width}} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} "
              f"{m['support']:>7}", file=out)
    print("confusion, summed over folds (rows: true, columns: predicted):", file=out)
    print(" " * width + "".join(f"{c[:8]:>9}" for c in summary["classes"]), file=out)
    for name, row in zip(summary["classes"], summary["confusion"]):
        print(f"{name:<{width}}" + "".join(f"{v:>9}" for v in row), file=out)


def json_result(summary: dict) -> dict:
    keys = ("folds", "accuracy", "accuracy_std", "macro_f1", "macro_f1_std", "classes",
            "confusion", "per_class", "video_accuracy", "video_accuracy_std", "mode",
            "checkpoint", "videos", "frames", "test_folds")
    return {k: summary[k] for k in keys}


def run(args: argparse.Namespace) -> int:
    from cluster.evaluate import EvaluationError

    if args.folds < 2:
        raise UserError(f"--folds must be >= 2, got {args.folds}")
    storage = storage_from(args)
    progress(connect_ray(args))
    try:
        summary = evaluate_summary(
            args.data, args.checkpoint, mode=args.mode, folds=args.folds,
            split_seed=args.split_seed, classes=csv_list(args.classes), probe=args.probe,
            image_size=args.image_size, channels=args.channels, fps=args.fps,
            max_per_video=args.max_per_video, epochs=args.epochs, lr=args.lr,
            device="cuda" if args.gpu else "cpu", storage=storage, on_progress=progress,
            cache=not args.no_cache)
    except (EvaluationError, ValueError) as err:  # bad flags, a checkpoint that does not fit
        raise UserError(str(err)) from err
    print_table(summary)
    if args.json:
        emit_json(json_result(summary))
    return 0
