"""`sonoray pretrain`: USCL contrastive pretraining on Ray Train, fed by the frame stream.

The config is USCLConfig's defaults (the authors'), overridden by ``--config FILE.yaml`` (a flat
mapping of USCLConfig keys, as a sweep's best config is written), then ``--set KEY=VALUE``, then
the flags. With
``--resume`` the run's saved config is the starting point instead of the defaults.
"""
from __future__ import annotations

import argparse
from typing import Any

from jobs.common import (
    add_config_args,
    add_format_args,
    add_job_args,
    add_scale_args,
    add_settings_flags,
    default_help,
    connect_ray,
    csv_list,
    storage_from,
    tracker_from,
)
from jobs.output import UserError, emit_json, fail, progress

#: flag name -> USCLConfig key, for the flags that override the config file.
CONFIG_FLAGS = {"epochs": "epochs", "batch_videos": "batch_videos", "image_size": "image_size",
                "channels": "channels", "pairs": "pairs"}
PAIR_NAMES = {"uscl": "USCL (sample pair generation)", "frames": "inter-frame", "image": "SimCLR (one frame)"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="USCL contrastive pretraining of a ResNet-18 on Ray Train",
        description="Pretrain a ResNet-18 backbone with USCL (sample pair generation, NT-Xent "
        "across workers, semi-supervised cross-entropy) on every video of an ingested data set, "
        "data-parallel on Ray Train. Checkpoints and per-epoch metrics go to --out.",
    )
    p.add_argument("--data", required=True, metavar="URI", help="data set root written by `sonoray ingest`")
    p.add_argument("--out", required=True, metavar="URI", help="run folder (local or s3://): checkpoints, "
                   "metrics.json, model.pt")
    from ultrasound.uscl import USCLConfig

    add_scale_args(p, gpu_help="one GPU per worker: NCCL and bf16 mixed precision")
    add_settings_flags(p, USCLConfig, ("epochs", "batch_videos"))
    add_format_args(p, image_size=USCLConfig.default_of("image_size"), channels=USCLConfig.default_of("channels"),
                    source="config")
    add_config_args(p, "USCL settings (unknown keys are refused)")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start the backbone from this state dict (e.g. ImageNet ResNet-18 weights "
                   "you downloaded; local or s3://)")
    p.add_argument("--resume", action="store_true", help="continue the run under --out from its last checkpoint")
    p.add_argument("--pairs", choices=["uscl", "frames", "image"], default=None,
                   help="positive pairs: uscl = sample pair generation (mixup of 3 frames), frames = two "
                   "frames of one video unmixed, image = two augmentations of one frame "
                   f"({default_help(USCLConfig, 'pairs')})")
    p.add_argument("--simclr", action="store_true",
                   help="the authors' SimCLR baseline: --pairs image, no cross-entropy")
    p.add_argument("--unlabelled", action="store_true", default=None,
                   help="use no class label (the checkpoint is then valid for every fold)")
    holdout = p.add_argument_group(
        "held-out fold", "never use the labels of the test videos of fold I of the split "
        "`sonoray evaluate --folds K --split-seed S [--classes ...] [--probe ...]` makes")
    holdout.add_argument("--holdout-fold", type=int, default=None, metavar="I")
    holdout.add_argument("--folds", type=int, default=5, metavar="K", help="(default 5)")
    holdout.add_argument("--split-seed", type=int, default=0, metavar="S", help="(default 0)")
    holdout.add_argument("--classes", default=None, metavar="A,B,...",
                         help="classes evaluate keeps (default: all labels)")
    holdout.add_argument("--probe", default=None, help="probe evaluate keeps, e.g. convex")
    add_job_args(p, training=True, tracker=True)
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace, saved: dict | None = None):
    """USCLConfig defaults (or the saved run's config) <- --config file <- flags."""
    from ultrasound.uscl import USCLConfig

    from cluster.job_config import ConfigError, layered

    base = {k: v for k, v in saved["config"].items() if k != "num_classes"} if saved else {}
    try:
        values = layered(args.config, args.set_items, {key: getattr(args, flag) for flag, key in CONFIG_FLAGS.items()},
                         base=base, section="uscl", what="USCL settings", storage=storage_from(args))
        cfg = USCLConfig.from_dict(values)
    except ConfigError as err:
        raise UserError(str(err)) from err
    except ValueError as err:
        source = f" (--config {args.config})" if args.config is not None else ""
        raise UserError(f"{err}{source}") from err
    return cfg.plain_simclr() if args.simclr else cfg


def holdout_from(args: argparse.Namespace, saved: dict | None):
    from cluster.evaluate import HoldoutSpec

    if args.holdout_fold is None:
        if saved and saved.get("holdout"):
            h = saved["holdout"]
            return HoldoutSpec(h["fold"], h["folds"], h["seed"],
                               tuple(h["classes"]) if h.get("classes") else None, h.get("probe"))
        return None
    classes = csv_list(args.classes)
    try:
        return HoldoutSpec(args.holdout_fold, args.folds, args.split_seed,
                           tuple(classes) if classes else None, args.probe)
    except ValueError as err:
        raise UserError(f"--holdout-fold: {err}") from err


def run(args: argparse.Namespace) -> int:
    from cluster.dataset import load_dataset
    from cluster.evaluate import EvaluationError
    from cluster.pretrain import plan_labels, pretrain, read_run_spec
    from cluster.train import ScaleSpec, TrainingError, load_init_backbone

    if args.workers < 1 or args.max_failures < 0:
        raise UserError("--workers must be >= 1 and --max-failures >= 0")
    storage = storage_from(args)
    saved = read_run_spec(args.out, storage) if args.resume else None
    cfg = resolve_config(args, saved)
    unlabelled = args.unlabelled if args.unlabelled is not None else bool(saved and saved["unlabelled"])
    holdout = holdout_from(args, saved)
    data = load_dataset(args.data, storage)
    try:
        plan = plan_labels(data, use_labels=not unlabelled and cfg.semi_supervised, holdout=holdout)
    except EvaluationError as err:
        raise UserError(f"--holdout-fold: {err}") from err
    init_state = None
    if args.init and not args.resume:
        init_state, missing = load_init_backbone(args.init, cfg.channels, storage)
        progress(f"pretrain: backbone from {args.init}"
                 + (f" ({len(missing)} parameters left at random init)" if missing else ""))
    progress(connect_ray(args))
    masked = f", labels of {len(plan.masked_video_ids)} fold-{holdout.fold} test and validation videos masked" \
        if holdout else ""
    progress(f"pretrain: {len(data.rows)} videos from {data.root.uri}; "
             f"{PAIR_NAMES[cfg.pairs]} pairs, labels of "
             f"{len(plan.class_of)} videos used{masked}; {cfg.epochs} epochs, batch "
             f"{cfg.batch_videos} videos, {cfg.image_size}px x {cfg.channels}, "
             f"{args.workers} worker(s){' on GPUs' if args.gpu else ''}")
    scale = ScaleSpec(workers=args.workers, gpu=args.gpu, max_failures=args.max_failures)
    tracker = tracker_from(args, "pretrain")
    try:
        result = pretrain(data, args.out, cfg, scale, unlabelled=unlabelled, holdout=holdout,
                          init_state=init_state, resume=args.resume, storage=storage,
                          cache=not args.no_cache, max_failed_fraction=args.max_failed_fraction,
                          tracker=tracker)
    except (TrainingError, ValueError) as err:
        return fail(str(err), code=1)
    last = result.history[-1]
    progress(f"pretrain: done, {len(result.history)} epochs, loss {last['loss']:.4f}, "
             f"{result.images_per_s:.1f} images/s; model at {result.checkpoint_uri}")
    for item in result.skipped_videos:
        progress(f"pretrain: skipped {item['key']} in {item['times']} epoch(s): {item['reason']}")
    if args.json:
        emit_json(result.as_json())
    return 0


def demo_stage(data_uri: str, work_uri: str, *, epochs: int = 3, image_size: int = 32,
               channels: int = 1, batch_videos: int = 8, workers: int = 1, folds: int = 3) -> dict:
    """Demo size (Ray already connected): a short unlabelled pretrain, so that one checkpoint
    is valid for every fold, then the linear-probe cross-validation of random init vs that
    checkpoint. Returns ``{"pretrain": {...}, "random": {...}, "uscl": {...}}`` where the last
    two hold accuracy, accuracy_std, macro_f1, macro_f1_std over ``folds`` folds."""
    import time

    from cluster.dataset import load_dataset
    from cluster.evaluate import evaluate_summary
    from cluster.pretrain import pretrain
    from cluster.storage import Storage, StorageConfig, parse_uri
    from cluster.train import ScaleSpec
    from ultrasound.uscl import USCLConfig

    storage = Storage(StorageConfig.from_env())
    out = parse_uri(work_uri).join(f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}").uri
    cfg = USCLConfig(epochs=epochs, batch_videos=batch_videos, image_size=image_size,
                     channels=channels)
    result = pretrain(load_dataset(data_uri, storage), out, cfg, ScaleSpec(workers=workers),
                      unlabelled=True, storage=storage)
    table: dict[str, Any] = {"pretrain": {
        "epochs": len(result.history), "loss_first": round(result.history[0]["loss"], 4),
        "loss_last": round(result.history[-1]["loss"], 4),
        "images_per_s": round(result.images_per_s, 1), "checkpoint": result.checkpoint_uri}}
    for name, checkpoint in (("random", "random"), ("uscl", result.checkpoint_uri)):
        summary = evaluate_summary(data_uri, checkpoint, mode="linear", folds=folds,
                                   image_size=image_size, channels=channels, storage=storage)
        table[name] = {k: round(summary[k], 4)
                       for k in ("accuracy", "accuracy_std", "macro_f1", "macro_f1_std")}
    return table
