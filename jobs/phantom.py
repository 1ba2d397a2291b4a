"""`sonoray phantom OUT_DIR --videos N`: write synthetic lung-ultrasound clips and a manifest.

The manifest (``OUT_DIR/manifest.csv``) is the generic one that ``sonoray ingest`` reads:
path, video_id, patient_id, label and one yes/no column per finding.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from cluster.progress import Count
from jobs.output import UserError, emit_json, progress
from ultrasound import phantom


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "phantom",
        help="write synthetic lung-ultrasound clips (mp4) with known findings plus a manifest",
        description="Write synthetic lung-ultrasound clips (convex sector, speckle, pleural line, "
        "lung sliding) with known class and findings "
        f"({', '.join(phantom.FINDINGS)}) to OUT_DIR/videos/ and OUT_DIR/manifest.csv.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="output folder")
    parser.add_argument("--videos", type=int, required=True, help="number of clips")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--frames", type=int, default=48,
                        help="mean frames per clip; each clip varies by +-25%% (default 48)")
    parser.add_argument("--size", type=int, default=128,
                        help="frame height and width in pixels, even, >= 32 (default 128)")
    parser.add_argument("--fps", type=float, default=12.0, help="frames per second (default 12)")
    parser.add_argument("--videos-per-patient", type=int, default=2,
                        help="consecutive clips that share a patient and class (default 2)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object last on stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.videos < 1:
        raise UserError(f"--videos must be at least 1, got {args.videos}")
    if args.frames < 2:
        raise UserError(f"--frames must be at least 2, got {args.frames}")
    if args.size < phantom.MIN_SIZE or args.size % 2:
        raise UserError(f"--size must be an even number >= {phantom.MIN_SIZE}, got {args.size}")
    if not args.fps > 0:
        raise UserError(f"--fps must be positive, got {args.fps}")
    if args.videos_per_patient < 1:
        raise UserError(f"--videos-per-patient must be at least 1, got {args.videos_per_patient}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise UserError(f"{args.out_dir} exists and is not a folder")

    total_frames = 0
    step = max(1, args.videos // 10)
    started = time.perf_counter()

    def on_clip(spec: phantom.PhantomClipSpec) -> None:
        nonlocal total_frames
        total_frames += spec.n_frames
        done = spec.index + 1
        if done % step == 0 or done == args.videos:
            progress(Count("phantom", done, args.videos, "clips written", started=started))

    progress(f"phantom: writing {args.videos} clips of ~{args.frames} frames, "
             f"{args.size}x{args.size}, to {args.out_dir}")
    try:
        manifest = phantom.make_dataset(
            args.out_dir, args.videos, seed=args.seed, n_frames=args.frames, size=args.size,
            fps=args.fps, videos_per_patient=args.videos_per_patient, on_clip=on_clip)
    except phantom.VideoWriteError as err:
        raise UserError(str(err)) from err
    except OSError as err:
        raise UserError(f"cannot write to {args.out_dir}: {err}") from err
    progress(f"phantom: manifest {manifest}")
    if args.json:
        emit_json({"videos": args.videos, "frames": total_frames, "manifest": str(manifest)})
    else:
        print(manifest)
    return 0
