"""Frame-streaming throughput on the real POCUS videos, every figure of one configuration in one run.

(a) a plain single-process loop: boto3 get + OpenCV decode, same sampling and format;
(b) the Ray Data pipeline (cluster/frames.py) with all CPUs, decoding (``--no-cache``);
(b') the same pipeline reading the decoded-frame cache (built by a first pass, not timed here);
(c) the decode limit: CPUs x the single-process OpenCV decode rate of the same files from local disk;
(d) what a user would write by hand: a PyTorch DataLoader, one worker process per CPU, each
    fetching a video with boto3 and decoding it with OpenCV (same sampling and format).

Every arm yields the same frames (asserted). Ray's worker processes are started by a short
warm-up pass before the timed runs. Targets (issue: the data path): b/d >= 1.2, b/c >= 0.85.

Usage: python benchmarks/frame_stream.py [--pocus DIR] [--sizes 224,64] [--fps none,3] [--repeats 2]
Prints one JSON object (and writes it to benchmarks/results/frame_stream.json with --save).
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

from benchmarks.pocus_s3 import DATA_URI, log, pocus_in_loopback_s3  # noqa: E402


class VideoFrames:
    """torch Dataset: item i = the sampled frames of video i, fetched with boto3, decoded with OpenCV."""

    def __init__(self, rows, bucket_prefix, endpoint, sampling, fmt):
        self.rows, self.bucket_prefix, self.endpoint = rows, bucket_prefix, endpoint
        self.sampling, self.fmt = sampling, fmt
        self._client = None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import boto3
        import numpy as np

        from ultrasound.video import iter_frames, spooled

        if self._client is None:
            self._client = boto3.client("s3", endpoint_url=self.endpoint)
        bucket, prefix = self.bucket_prefix
        row = self.rows[i]
        body = self._client.get_object(Bucket=bucket, Key=f"{prefix}/{row['key']}")["Body"].read()
        with spooled(body, Path(row["key"]).suffix) as path:
            frames = [f[2] for f in iter_frames(path, self.sampling, self.fmt, frame_count=row["frame_count"])]
        return np.stack(frames) if frames else np.zeros((0,), np.uint8)


def run_config(data, storage, pocus: Path, size: int, fps: float | None, repeats: int, cpus: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from cluster.frames import StreamSpec, drain, frame_stream
    from ultrasound.video import FrameFormat, FrameSampling, iter_frames, spooled

    sampling = FrameSampling(fps=fps)
    fmt = FrameFormat(channels=1, size=size)
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
            n += sum(1 for _ in iter_frames(pocus / row["key"].removeprefix("videos/"), sampling, fmt))
        return n, time.perf_counter() - start

    def dataloader() -> tuple[int, float]:
        dataset = VideoFrames(data.rows, (data.root.bucket, data.root.key), storage.config.endpoint_url,
                              sampling, fmt)
        loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=cpus,
                            persistent_workers=False, prefetch_factor=2)
        start, n = time.perf_counter(), 0
        for frames in loader:
            n += int(frames.shape[0]) if frames.ndim == 4 else 0
        return n, time.perf_counter() - start

    def ray_stream(cache: bool):
        def run():
            summary = drain(frame_stream(data, StreamSpec(sampling=sampling, fmt=fmt, cache=cache)))
            assert summary.failed == [], summary.failed
            return summary.frames, summary.seconds
        return run

    def best(name, fn) -> tuple[int, float]:
        runs = [fn() for _ in range(repeats)]
        n, t = max(runs, key=lambda r: r[0] / r[1])
        log(f"  {name}: {n} frames, {n / t:.1f} frames/s (best of {repeats})")
        return n, t

    torch.set_num_threads(1)
    label = f"{size} px, {'every frame' if fps is None else f'{fps:g} fps'}"
    log(f"configuration {label}")
    n_a, t_a = best("(a) single process, boto3 + OpenCV", single_process_s3)
    n_c, t_c = best("(c1) single process, OpenCV from local disk", single_process_local)
    n_d, t_d = best(f"(d) PyTorch DataLoader, {cpus} workers", dataloader)
    n_b, t_b = best("(b) Ray Data, decoding", ray_stream(cache=False))
    ray_stream(cache=True)()  # first pass builds the cache (its rate: the cache-building epoch)
    log("  cache built")
    n_bc, t_bc = best("(b') Ray Data, from the cache", ray_stream(cache=True))
    assert n_a == n_b == n_c == n_d == n_bc, (n_a, n_b, n_c, n_d, n_bc)
    rate = {k: n / t for k, (n, t) in {"a": (n_a, t_a), "b": (n_b, t_b), "c1": (n_c, t_c), "d": (n_d, t_d),
                                        "b_cache": (n_bc, t_bc)}.items()}
    rate_c = cpus * rate["c1"]
    return {
        "size": size, "sampling": "every frame" if fps is None else f"{fps:g} per second", "frames": n_a,
        "a_single_process_s3_fps": round(rate["a"], 1),
        "b_ray_data_fps": round(rate["b"], 1),
        "b_cache_fps": round(rate["b_cache"], 1),
        "c_decode_limit_fps": round(rate_c, 1),
        "d_torch_dataloader_fps": round(rate["d"], 1),
        "b_over_a": round(rate["b"] / rate["a"], 2),
        "b_over_c": round(rate["b"] / rate_c, 2),
        "b_over_d": round(rate["b"] / rate["d"], 2),
        "b_cache_over_d": round(rate["b_cache"] / rate["d"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pocus", type=Path, default=REPO.parent / "shared" / "data" / "pocus")
    parser.add_argument("--sizes", default="224,64")
    parser.add_argument("--fps", default="none,3", help="comma list: none = every frame, else frames/s")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each figure")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/frame_stream.json")
    args = parser.parse_args()

    from cluster.dataset import load_dataset
    from cluster.runtime import connect

    cpus = os.cpu_count() or 1
    load_start = os.getloadavg()[0]
    configs = []
    with pocus_in_loopback_s3(args.pocus) as storage:
        data = load_dataset(DATA_URI, storage)
        connect(num_cpus=cpus)
        # Start Ray's worker processes once (a long job pays this once, not per epoch).
        from cluster.frames import StreamSpec, drain, frame_stream
        from ultrasound.video import FrameFormat

        drain(frame_stream(data.select([r["video_id"] for r in data.rows[:2 * cpus]]),
                           StreamSpec(fmt=FrameFormat(size=32), cache=False)))
        for size in [int(s) for s in args.sizes.split(",")]:
            for fps in args.fps.split(","):
                configs.append(run_config(data, storage, args.pocus, size,
                                          None if fps.strip() == "none" else float(fps), args.repeats, cpus))
    result = {
        "machine": f"{platform.machine()}, {cpus} CPUs, Python {platform.python_version()}",
        "load_average_start": round(load_start, 2),
        "load_average_end": round(os.getloadavg()[0], 2),
        "videos": len(data.rows),
        "configs": configs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.save:
        (REPO / "benchmarks" / "results" / "frame_stream.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
