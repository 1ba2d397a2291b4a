"""`sonoray demo`: the whole system on the embedded default, end to end on one machine.

Stages: start the loopback S3 server, write phantom clips, ingest them, stream their frames
through Ray Data; later stages (pretraining, evaluation, MSML, simulation, sweep) follow.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from jobs.output import emit_json, progress


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run every stage on synthetic clips with a local S3 server and a local Ray",
        description="Run sonoray end to end on the embedded default: a loopback S3 server, "
        "synthetic lung-ultrasound clips, ingest, frame streaming and the training stages.",
    )
    p.add_argument("--out", type=Path, default=Path("sonoray-demo"), help="working folder (default: ./sonoray-demo)")
    p.add_argument("--videos", type=int, default=24, help="phantom clips to generate (default 24)")
    p.add_argument("--json", action="store_true", help="print one JSON summary last on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.dataset import load_dataset
    from cluster.frames import StreamSpec, drain, frame_stream
    from cluster.ingest import ingest_videos
    from cluster.runtime import connect
    from cluster.s3server import LocalS3Server
    from cluster.storage import Storage, StorageConfig
    from ultrasound import phantom
    from ultrasound.manifest import parse_generic_manifest
    from ultrasound.video import FrameFormat, FrameSampling

    started = time.perf_counter()
    summary: dict = {}
    out = args.out.resolve()
    with LocalS3Server() as server:
        os.environ.update(server.env())  # Ray workers started below inherit the endpoint
        progress(f"demo: S3-compatible server on {server.endpoint_url}")
        storage = Storage(StorageConfig.from_env())
        data_uri = "s3://sonoray-demo/phantom"

        clips_dir = out / "phantom"
        manifest_csv = phantom.make_dataset(clips_dir, args.videos, seed=0)
        progress(f"demo: {args.videos} phantom clips in {clips_dir}")

        records, skipped, findings = parse_generic_manifest(
            manifest_csv, clips_dir, findings=list(phantom.FINDINGS)
        )
        result = ingest_videos(records, skipped, clips_dir, data_uri, findings, storage=storage,
                               on_progress=progress)
        summary["ingest"] = result.as_dict()
        progress(f"demo: ingested {result.ingested} videos to {data_uri}")

        progress(connect())
        data = load_dataset(data_uri, storage)
        stream = frame_stream(data, StreamSpec(fmt=FrameFormat(channels=1, size=64)))
        frames = drain(stream)
        summary["frames"] = frames.as_dict()
        progress(f"demo: streamed {frames.frames} frames from {frames.videos} videos "
                 f"at {frames.frames_per_s:.0f} frames/s")

    summary["seconds"] = round(time.perf_counter() - started, 1)
    print_table(summary)
    if args.json:
        emit_json(summary)
    return 0


def print_table(summary: dict) -> None:
    print("sonoray demo")
    print(f"  ingest : {summary['ingest']['ingested']} videos, {summary['ingest']['uploaded']} uploaded")
    f = summary["frames"]
    print(f"  frames : {f['frames']} frames from {f['videos']} videos, {f['frames_per_s']} frames/s")
    print(f"  total  : {summary['seconds']} s")
