"""Frame-streaming throughput on the real POCUS videos, all three figures in one run.

(a) a plain single-process loop: boto3 get + OpenCV decode, same sampling and format;
(b) the Ray Data pipeline (cluster/frames.py) with all CPUs;
(c) the decode limit: CPUs x the single-process decode rate of the same files from local disk.

Usage: python benchmarks/frame_stream.py [--pocus DIR] [--size 224] [--fps F] [--repeats 2]
Prints a JSON object with the figures and the ratios b/a and b/c.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.pocus_s3 import DATA_URI, pocus_in_loopback_s3  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pocus", type=Path, default=REPO.parent / "shared" / "data" / "pocus")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--fps", type=float, default=None, help="sample F frames/s (default: every frame)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each figure")
    args = parser.parse_args()

    from cluster.dataset import load_dataset
    from cluster.frames import StreamSpec, drain, frame_stream
    from cluster.runtime import connect
    from ultrasound.video import FrameFormat, FrameSampling, iter_frames, spooled

    sampling = FrameSampling(fps=args.fps)
    fmt = FrameFormat(channels=1, size=args.size)
    cpus = os.cpu_count() or 1

    with pocus_in_loopback_s3(args.pocus) as storage:
        data = load_dataset(DATA_URI, storage)
        client = storage.client()

        def single_process_s3() -> tuple[int, float]:
            start, n = time.perf_counter(), 0
            for row in data.rows:
                loc = data.video_location(row)
                body = client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
                with spooled(body, Path(row["key"]).suffix) as path:
                    n += sum(1 for _ in iter_frames(path, sampling, fmt))
            return n, time.perf_counter() - start

        def single_process_local() -> tuple[int, float]:
            start, n = time.perf_counter(), 0
            for row in data.rows:
                n += sum(1 for _ in iter_frames(args.pocus / row["key"].removeprefix("videos/"), sampling, fmt))
            return n, time.perf_counter() - start

        def best(fn) -> tuple[int, float]:
            runs = [fn() for _ in range(args.repeats)]
            return max(runs, key=lambda r: r[0] / r[1])

        n_a, t_a = best(single_process_s3)
        n_c, t_c = best(single_process_local)
        connect(num_cpus=cpus)
        ray_runs = []
        for _ in range(args.repeats):
            summary = drain(frame_stream(data, StreamSpec(sampling=sampling, fmt=fmt)))
            ray_runs.append(summary)
        b = max(ray_runs, key=lambda s: s.frames_per_s)
        assert b.frames == n_a == n_c, (b.frames, n_a, n_c)

    rate_a, rate_c1 = n_a / t_a, n_c / t_c
    rate_c = cpus * rate_c1
    result = {
        "machine": f"{platform.node()} {platform.machine()}, {cpus} CPUs, Python {platform.python_version()}",
        "videos": len(data.rows),
        "frames": n_a,
        "size": args.size,
        "sampling": "every frame" if args.fps is None else f"{args.fps} per second",
        "a_single_process_s3_fps": round(rate_a, 1),
        "b_ray_data_fps": round(b.frames_per_s, 1),
        "c_decode_limit_fps": round(rate_c, 1),
        "single_process_local_fps": round(rate_c1, 1),
        "b_over_a": round(b.frames_per_s / rate_a, 2),
        "b_over_c": round(b.frames_per_s / rate_c, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
