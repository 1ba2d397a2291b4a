"""`sonoray msml`: train the MSML multi-label classifier on Ray Train (data parallel).

The config is built in layers: ``MSMLConfig`` defaults <- ``--config FILE.yaml`` <- ``--set KEY=VALUE`` <- flags.
The YAML holds MSMLConfig keys (a file written from ``MSMLConfig.to_dict()``, e.g. a sweep's
best config, is accepted as is); an unknown key is refused, naming the valid ones.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from jobs.common import (
    add_config_args,
    add_format_args,
    add_job_args,
    add_sampling_args,
    add_scale_args,
    add_settings_flags,
    connect_ray,
    csv_list,
    storage_from,
    tracker_from,
)
from jobs.output import UserError, emit_json, fail, progress


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "msml",
        help="train the multi-symptom multi-label (MSML) classifier",
        description="Train MSML (ResNet-18 + per-symptom attention head, one sigmoid per finding) on "
        "the frames of an ingested data set with data-parallel Ray Train workers. The videos are split "
        "by patient (by video where the patient is unknown) into training and validation; the "
        "validation report (mAP, per-finding AP, macro/micro F1, hamming loss), the model and "
        "Grad-CAM overlays are written under --out.",
    )
    p.add_argument("--data", required=True, metavar="URI", help="data set root written by `sonoray ingest`")
    p.add_argument("--out", required=True, metavar="URI", help="where checkpoints, model.pt, report.json "
                   "and gradcam/ go (s3://bucket/prefix or a path)")
    p.add_argument("--init", metavar="CKPT", help="backbone weights: a USCL checkpoint (model.pt) or a "
                   "ResNet-18 state dict (path or s3:// URI); default: random init")
    add_config_args(p, "MSML settings")
    p.add_argument("--labels", metavar="COL,..", help="finding columns to learn (default: all the manifest's)")
    from ultrasound.msml import LOSSES, MSMLConfig

    add_settings_flags(p, MSMLConfig, ("epochs", "batch_size"))
    add_format_args(p, image_size=MSMLConfig.default_of("image_size"), channels=MSMLConfig.default_of("channels"),
                    source="config")
    add_settings_flags(p, MSMLConfig, ("loss", "lr", "seed"), choices={"loss": list(LOSSES)})
    add_sampling_args(p)
    p.add_argument("--val-max-per-video", type=int, default=32,
                   help="cap on validation frames per video, held in memory (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients in validation (default 0.2)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")
    add_scale_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run under --out from its last epoch")
    p.add_argument("--gradcam", type=int, default=6, help="Grad-CAM overlays to save (default %(default)s)")
    add_job_args(p, training=True, tracker=True)
    p.set_defaults(func=run)


FLAG_KEYS = ("epochs", "batch_size", "image_size", "channels", "loss", "lr", "seed")  # MSMLConfig keys that are flags


def resolve_config(manifest_findings: list[str], file_values: dict[str, Any], overrides: dict[str, Any],
                   labels: list[str] | None = None):
    """MSMLConfig defaults <- ``file_values`` <- ``overrides`` (None values skipped) <- ``labels``.

    ``findings`` default to the manifest's finding columns. Raises UserError naming the valid
    keys for an unknown key, and naming the manifest's findings for an unknown finding.
    """
    from ultrasound.msml import MSMLConfig

    values = {"findings": list(manifest_findings)}
    values.update(file_values)
    values.update({key: value for key, value in overrides.items() if value is not None})
    if labels:
        values["findings"] = list(labels)
    try:
        config = MSMLConfig.from_dict(values)
    except (ValueError, TypeError) as err:
        raise UserError(f"MSML config: {err}") from err
    unknown = [f for f in config.findings if f not in manifest_findings]
    if unknown:
        raise UserError(f"finding(s) {unknown} are not columns of the data set; it has {list(manifest_findings)}")
    return config


def run(args: argparse.Namespace) -> int:
    from cluster.dataset import load_dataset
    from cluster.msml_train import MSMLRunOptions, run_msml
    from cluster.train import ScaleSpec, TrainingError
    from ultrasound.video import FrameSampling

    started = time.perf_counter()
    storage = storage_from(args)
    from cluster.job_config import ConfigError, layered

    try:
        file_values = layered(args.config, args.set_items, {}, storage=storage, what="MSML settings")
    except ConfigError as err:
        raise UserError(str(err)) from err
    data = load_dataset(args.data, storage)
    if not data.findings:
        raise UserError(f"{data.root.uri} has no finding columns: ingest with --labels COL,.. first")
    overrides = {key: getattr(args, key) for key in FLAG_KEYS}
    config = resolve_config(data.findings, file_values, overrides, csv_list(args.labels))
    if args.workers < 1 or args.gradcam < 0 or args.max_failures < 0:
        raise UserError(f"need --workers >= 1, --gradcam >= 0 and --max-failures >= 0, got "
                        f"{args.workers}, {args.gradcam}, {args.max_failures}")
    if not 0.0 < args.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    try:
        options = MSMLRunOptions(
            out_uri=args.out,
            scale=ScaleSpec(workers=args.workers, gpu=args.gpu, max_failures=args.max_failures),
            fps=args.fps, max_per_video=args.max_per_video, val_max_per_video=args.val_max_per_video,
            val_fraction=args.val_fraction, split_seed=args.split_seed, init_uri=args.init,
            resume=args.resume, gradcam=args.gradcam, cache=not args.no_cache,
            max_failed_fraction=args.max_failed_fraction, tracker=tracker_from(args, "msml"),
        )
        FrameSampling(fps=args.fps, max_per_video=args.max_per_video)  # validates the sampling flags
    except ValueError as err:
        raise UserError(str(err)) from err
    progress(connect_ray(args))
    progress(f"msml: {len(data.rows)} videos in {data.root.uri}, findings {list(config.findings)}")
    try:
        summary = run_msml(data, config, options, storage, on_progress=progress)
    except ValueError as err:
        raise UserError(str(err)) from err
    except TrainingError as err:
        return fail(str(err), code=1)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    progress(f"msml: done in {summary['seconds']:.0f} s; model {summary['checkpoint']}, report {summary['report']}")
    if args.json:
        emit_json(summary)
    return 0


def demo_stage(data_uri: str, work_uri: str, *, epochs: int = 3, image_size: int = 48, workers: int = 2,
               fps: float = 2.0, lr: float = 1e-3, batch_size: int = 16, channels: int = 1,
               storage=None) -> dict:
    """A small MSML run for `sonoray demo` on the phantom data at ``data_uri``.

    Writes under ``<work_uri>/msml`` (``msml-2``, ``msml-3``, ... when that already holds a run)
    and returns the job's summary dict. About a minute on 2 CPUs at the defaults.
    """
    from cluster.dataset import load_dataset
    from cluster.msml_train import MSMLRunOptions, run_msml
    from cluster.storage import Storage, parse_uri
    from cluster.train import ScaleSpec

    storage = storage or Storage()
    started = time.perf_counter()
    data = load_dataset(data_uri, storage)
    config = resolve_config(data.findings, {}, {"epochs": epochs, "image_size": image_size, "lr": lr,
                                                "batch_size": batch_size, "channels": channels})
    work = parse_uri(work_uri)
    out, n = work.join("msml"), 1
    while storage.exists(out):
        n += 1
        out = work.join(f"msml-{n}")
    options = MSMLRunOptions(out_uri=out.uri, scale=ScaleSpec(workers=workers), fps=fps)
    summary = run_msml(data, config, options, storage, on_progress=progress)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary
