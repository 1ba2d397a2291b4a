"""`sonoray frames`: stream an ingested data set's frames through Ray Data and summarise."""
from __future__ import annotations

import argparse

from cluster.dataset import load_dataset
from cluster.frames import StreamSpec, drain, frame_stream
from jobs.common import (
    add_format_args,
    add_job_args,
    add_sampling_args,
    connect_ray,
    storage_from,
)
from jobs.output import UserError, emit_json, progress
from ultrasound.video import DEFAULT_MAX_DECODED_BYTES, FrameFormat, FrameSampling


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "frames",
        help="stream decoded frames of an ingested data set",
        description="Stream every frame (default), F per second (--fps) or K per video "
        "(--per-video) of the data set at URI through Ray Data, and report throughput.",
    )
    p.add_argument("uri", metavar="URI", help="data set root written by `sonoray ingest`")
    add_stream_frame_args(p)
    p.add_argument("--limit", type=int, default=None, help="stop after N frames")
    add_job_args(p)
    p.set_defaults(func=run)


def add_stream_frame_args(p: argparse.ArgumentParser) -> None:
    """The frame stream's own sampling and format flags (frames, cache): the shared groups with
    every frame at native size by default, plus ``--per-video``, ``--crop`` and ``--seed``."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--per-video", type=int, default=None, metavar="K", help="keep K random frames per video")
    add_sampling_args(p, fps_into=group)
    add_format_args(p, channels=FrameFormat.channels)
    p.add_argument("--crop", action="store_true", help="crop each video to its scan sector")
    p.add_argument("--seed", type=int, default=None, help="seed for --per-video picks")
    p.add_argument("--max-decoded-gib", type=float, default=DEFAULT_MAX_DECODED_BYTES / 1024**3,
                   help="refuse videos whose decoded frames exceed this (default: %(default)g GiB)")


def spec_from(args: argparse.Namespace, mode: str = "frames") -> StreamSpec:
    try:
        return StreamSpec(
            sampling=FrameSampling(fps=args.fps, per_video=args.per_video, max_per_video=args.max_per_video),
            fmt=FrameFormat(channels=args.channels, size=args.image_size, crop_sector=args.crop),
            mode=mode,
            seed=args.seed,
            max_decoded_bytes=int(args.max_decoded_gib * 1024**3),
            cache=not getattr(args, "no_cache", False),
        )
    except ValueError as err:
        raise UserError(str(err)) from err


def run(args: argparse.Namespace) -> int:
    spec = spec_from(args)
    data = load_dataset(args.uri, storage_from(args))
    progress(connect_ray(args))
    stream = frame_stream(data, spec)
    progress(f"frames: streaming {stream.n_videos} videos from {data.root.uri}")
    summary = drain(stream, limit=args.limit, on_progress=progress)
    for item in summary.failed:
        progress(f"  skipped {item['key']}: {item['reason']}")
    progress(f"frames: {summary.frames} frames from {summary.videos} videos, "
             f"{summary.frames_per_s:.0f} frames/s, {len(summary.failed)} failed")
    if summary.cache:
        c = summary.cache
        progress(f"frames: cache {c['uri']}: {c['hits']} videos read from it, {c['built']} decoded and added "
                 f"({c['bytes_written'] / 1e6:.1f} MB written, {c['bytes_read'] / 1e6:.1f} MB read)")
    if args.json:
        emit_json(summary.as_dict())
    return 0
