"""Training throughput of the USCL loop on Ray Train, on the real POCUS videos, in one run:

(a) plain: a single-process PyTorch loop (no Ray) over clips held in memory as numpy arrays,
    calling the same ``ultrasound.uscl.train_step`` with the same model, batch and torch threads;
(b) ray-memory: ``cluster.pretrain`` (Ray Train, 1 worker) over the same clips as a materialised
    Ray Dataset;
(c) ray-stream: ``cluster.pretrain`` on the real frame stream, as ``sonoray pretrain`` runs: the
    first epoch decodes every video (S3 get + PyAV) and fills the decoded-frame cache; later
    epochs re-sample 3 frames per video from the cache. Reported: the median of the cached epochs,
    and the first (cache-building) epoch's rate;
(d) ray-decode: the same with ``--no-cache`` (every video fetched and decoded every epoch).

Images are the augmented views through the network (2 per video per step). Each figure is the
median of its per-epoch rates. Targets: b/a >= 0.9 (Ray Train adds little), c/b >= 0.9 (the
cached stream does not starve training).

Usage: python benchmarks/train_throughput.py [--pocus DIR] [--image-sizes 224,64] [--epochs 3]
Prints one line per figure, then a JSON object with all figures, ratios and the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.pocus_s3 import DATA_URI, log, pocus_in_loopback_s3  # noqa: E402

RAY_WORKER_NICENESS = 15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pocus", type=Path, default=REPO.parent / "shared" / "data" / "pocus")
    parser.add_argument("--image-sizes", default="224", help="comma-separated, e.g. 224,64")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=1)
    parser.add_argument("--batch-videos", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per figure (median taken)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPU share of the training worker (default: ScaleSpec's)")
    parser.add_argument("--figures", default="plain,memory,stream,decode", help="which figures to measure")
    parser.add_argument("--decode-cpus", type=float, default=None,
                        help="CPU share of one decode task of the stream (default: pretrain's)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/train_throughput.json")
    args = parser.parse_args()

    import numpy as np
    import ray

    from cluster.dataset import load_dataset
    from cluster.frames import frame_stream
    from cluster.pretrain import pretrain, stream_spec
    from cluster.runtime import connect
    from cluster.train import ScaleSpec
    from ultrasound.uscl import USCLConfig

    scale = ScaleSpec(workers=1, gpu=args.gpu, cpus_per_worker=args.cpus_per_worker)
    work = Path(tempfile.mkdtemp(prefix="train-throughput-"))
    load_at_start = os.getloadavg()[0]
    report: dict = {"batch_videos": args.batch_videos, "decode_cpus": args.decode_cpus,
                    "cpus_per_worker": args.cpus_per_worker,
                    "channels": args.channels, "epochs": args.epochs, "sizes": {}}
    with pocus_in_loopback_s3(args.pocus) as storage:
        log(connect(num_cpus=os.cpu_count()))
        # Ray runs its workers at niceness 15 (RAY_worker_niceness); the plain loop runs in this
        # process, so it takes the same niceness (after Ray started, which its workers inherit
        # from): on a shared machine all three figures compete for CPU alike.
        os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
        report["machine"] = _machine(args.gpu, load_at_start)
        data = load_dataset(DATA_URI, storage)
        threads = max(1, int(scale.resources(float(ray.cluster_resources()["CPU"]))["CPU"]))
        report["videos"] = len(data.rows)
        report["torch_threads"] = threads
        for size in [int(s) for s in args.image_sizes.split(",") if s]:
            cfg = USCLConfig(epochs=args.epochs, batch_videos=args.batch_videos, image_size=size,
                             channels=args.channels, warmup_epochs=args.epochs, num_classes=0,
                             semi_supervised=False)
            spec = dataclasses.replace(stream_spec(cfg, 1.0, cache=False), seed=0)  # one fixed pick
            clips = [row for batch in frame_stream(data, spec).dataset.select_columns(
                ["video_id", "frames", "n_frames"]).iter_batches(batch_size=64, batch_format="numpy")
                for row in _rows(batch)]
            log(f"{size}px: {len(clips)} clips of {clips[0]['frames'].shape} in memory")

            wanted = set(args.figures.split(","))
            rates: dict[str, float] = {}
            if "plain" in wanted:
                rates["plain"] = plain_loop(clips, cfg, threads, "cuda" if args.gpu else "cpu")
                log(f"{size}px (a) plain single-process loop: {rates['plain']:.1f} images/s")
            if "memory" in wanted:
                memory_ds = ray.data.from_items(clips).materialize()
                rates["memory"] = pretrain(
                    data, str(work / f"memory-{size}"), cfg, scale, unlabelled=True,
                    storage=storage, datasets={"train": memory_ds}).images_per_s
                log(f"{size}px (b) Ray Train, in-memory dataset: {rates['memory']:.1f} images/s")
            if "stream" in wanted:
                history = pretrain(
                    data, str(work / f"stream-{size}"), cfg, scale, unlabelled=True,
                    storage=storage, decode_cpus=args.decode_cpus).history
                rates["stream_first_epoch"] = float(history[0]["images_per_s"])
                rates["stream"] = float(np.median([h["images_per_s"] for h in history[1:]]))
                log(f"{size}px (c) Ray Train, cached frame stream: {rates['stream']:.1f} images/s "
                    f"(first, cache-building epoch: {rates['stream_first_epoch']:.1f})")
            if "decode" in wanted:
                rates["decode"] = pretrain(
                    data, str(work / f"decode-{size}"), cfg, scale, unlabelled=True,
                    storage=storage, decode_cpus=args.decode_cpus, cache=False).images_per_s
                log(f"{size}px (d) Ray Train, decoding every epoch: {rates['decode']:.1f} images/s")
            figures = {f"{name}_images_per_s": round(rate, 2) for name, rate in rates.items()}
            ratios = {"memory_over_plain": ("memory", "plain", 0.9),
                      "stream_over_memory": ("stream", "memory", 0.9),
                      "decode_over_memory": ("decode", "memory", 0.8)}
            for key, (top, bottom, target) in ratios.items():
                if top in rates and bottom in rates:
                    figures[key] = round(rates[top] / rates[bottom], 3)
                    figures[f"{key}_target_{target}_met"] = figures[key] >= target
            report["sizes"][str(size)] = figures
            print(f"{size}px: " + ", ".join(f"{k} {v}" for k, v in figures.items()), flush=True)
    report["load_average_at_end"] = round(os.getloadavg()[0], 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.save:
        (REPO / "benchmarks" / "results" / "train_throughput.json").write_text(text + "\n")


def _rows(batch: dict) -> list[dict]:
    return [{"video_id": str(batch["video_id"][i]), "frames": batch["frames"][i],
             "n_frames": int(batch["n_frames"][i])} for i in range(len(batch["n_frames"]))]


def plain_loop(clips: list[dict], cfg, threads: int, device: str) -> float:
    """Median images/s over ``cfg.epochs`` epochs of a single-process loop: same model, batch,
    step and thread count as the Ray Train worker, batches sliced from in-memory arrays."""
    import numpy as np
    import torch

    from ultrasound.uscl import USCLModel, make_augment, make_losses, make_optimizer, train_step

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.seed)
        model = USCLModel.from_config(cfg).to(device)
        optimizer = make_optimizer(model, cfg)
        augment = make_augment(cfg)
        ntxent, ce = make_losses(cfg)
        frames = np.stack([c["frames"] for c in clips])
        n_frames = np.array([c["n_frames"] for c in clips], dtype=np.int64)
        rates = []
        for epoch in range(cfg.epochs):
            rng = np.random.default_rng([cfg.seed, 0, epoch])
            began, images = time.perf_counter(), 0
            for i in range(0, len(clips), cfg.batch_videos):
                batch = {"frames": frames[i: i + cfg.batch_videos],
                         "n_frames": n_frames[i: i + cfg.batch_videos]}
                if len(batch["n_frames"]) < 2:
                    continue
                train_step(model, optimizer, batch, augment, cfg, rng, ntxent=ntxent, ce=ce,
                           autocast_dtype=torch.bfloat16 if device == "cuda" else None)
                images += 2 * len(batch["n_frames"])
            rates.append(images / (time.perf_counter() - began))
        return float(np.median(rates))
    finally:
        torch.set_num_threads(previous)


def _machine(gpu: bool, load: float) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, load average {load:.1f} at start, niceness "
            f"{os.nice(0)}, torch "
            f"{torch.__version__}" + (f", {torch.cuda.get_device_name(0)}" if gpu else ", CPU only"))


if __name__ == "__main__":
    main()
