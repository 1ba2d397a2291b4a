"""`sonoray predict`: score videos with a trained MSML classifier.

Writes ``frames.parquet`` (one row per frame, a probability per finding), ``videos.parquet`` and
``videos.csv`` (one row per video: the mean of its frames per finding, the max beside it) and
Grad-CAM overlays of the top-scoring frames (the frame beside its heatmap, >= 224 px) under
``--out``. ``--data`` is a data set written by `sonoray ingest` or a folder of video files (ingested
under ``--out``/input first, no labels needed).
"""
from __future__ import annotations

import argparse
import os

from jobs.common import (
    add_flag_config_args,
    add_job_args,
    add_sampling_args,
    apply_flag_config,
    connect_ray,
    storage_from,
)
from jobs.output import UserError, emit_json, human_stream, progress


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="score videos with a trained MSML run (per frame, per video, Grad-CAM)",
        description="Apply a `sonoray msml` run to every video of a data set or a folder of videos.",
    )
    p.add_argument("--model", required=True, metavar="RUN",
                   help="a `sonoray msml --out` folder, its model.pt, or its msml.safetensors (local or s3://)")
    p.add_argument("--data", required=True, metavar="URI|VIDEO_DIR",
                   help="data set root written by `sonoray ingest`, or a local folder of video files")
    p.add_argument("--out", required=True, metavar="URI", help="where frames.parquet, videos.parquet/.csv and gradcam/ go")
    p.add_argument("--gradcam", type=int, default=6, metavar="N",
                   help="Grad-CAM overlays of the N top-scoring frames, findings in turn (default 6; 0: none)")
    add_sampling_args(p)
    p.add_argument("--gpu", action="store_true", help="score on the Ray cluster's GPUs")
    add_job_args(p)
    add_flag_config_args(p, "predict settings")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.dataset import load_dataset
    from cluster.predict import PredictError, load_msml, predict
    from cluster.storage import parse_uri
    from ultrasound.video import FrameSampling

    apply_flag_config(args, storage_from(args))
    if args.gradcam < 0:
        raise UserError(f"--gradcam must be >= 0, got {args.gradcam}")
    try:
        sampling = FrameSampling(fps=args.fps, max_per_video=args.max_per_video)
        out = parse_uri(args.out)
    except ValueError as err:
        raise UserError(str(err)) from None
    # built again on purpose: --config / --set may have set endpoint_url, and the job must use it
    storage = storage_from(args)
    try:
        model = load_msml(args.model, storage)  # a wrong --model fails before Ray starts
    except PredictError as err:
        raise UserError(str(err)) from None
    progress(connect_ray(args))
    if os.path.isdir(args.data) and not os.path.isfile(os.path.join(args.data, "manifest.parquet")):
        data_uri = ingest_folder(args.data, out.join("input").uri, storage)
    else:
        data_uri = args.data
    try:
        data = load_dataset(data_uri, storage)
        summary = predict(data, model, out.uri, sampling=sampling, gradcam=args.gradcam, gpu=args.gpu,
                          cache=not args.no_cache, storage=storage, on_progress=progress)
    except (PredictError, ValueError) as err:
        raise UserError(str(err)) from None
    print_top(summary, human_stream(args.json))
    if args.json:
        emit_json(summary)
    return 0


def ingest_folder(video_dir: str, dest_uri: str, storage) -> str:
    """Register a plain folder of videos (no manifest, no labels) under ``dest_uri``."""
    from cluster.ingest import ingest_videos
    from ultrasound.manifest import parse_video_folder

    records = parse_video_folder(video_dir)
    progress(f"predict: {len(records)} videos in {video_dir}; ingesting them under {dest_uri}")
    result = ingest_videos(records, [], video_dir, dest_uri, [], storage=storage, on_progress=progress)
    for item in result.skipped:
        progress(f"  skipped {item.path}: {item.reason}")
    return dest_uri


def print_top(summary: dict, out) -> None:
    print(f"predict: {summary['videos']} videos, {summary['frames']} frames -> {summary['out']}", file=out)
    for name, rows in summary["top_videos"].items():
        cells = ", ".join(f"{r['video_id']} {r['score']:.2f}" for r in rows)
        print(f"  top {name}: {cells}", file=out)
    for item in summary["skipped_videos"]:
        print(f"  skipped {item['key']}: {item['reason']}", file=out)


def demo_stage(model_uri: str, video_dir: str, work_uri: str, storage) -> dict:
    """`sonoray demo`'s predict stage: the demo's MSML run scores a folder of phantom clips it
    never saw (ingested under ``<work_uri>/predict/input``); results under ``<work_uri>/predict``."""
    from cluster.dataset import load_dataset
    from cluster.predict import predict
    from cluster.storage import parse_uri
    from ultrasound.video import FrameSampling

    out = parse_uri(work_uri).join("predict")
    data = load_dataset(ingest_folder(video_dir, out.join("input").uri, storage), storage)
    return predict(data, model_uri, out.uri, sampling=FrameSampling(fps=2.0), gradcam=3, storage=storage,
                   on_progress=progress)
