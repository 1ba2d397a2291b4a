"""Training throughput of the USCL loop on Ray Train, on the real POCUS videos, in one run:

(a) plain: a single-process PyTorch loop (no Ray) over clips held in memory as numpy arrays,
    calling the same ``ultrasound.uscl.train_step`` with the same model, batch and torch threads;
(b) ray-memory: ``cluster.pretrain`` (Ray Train, 1 worker) over the same clips as a materialised
    Ray Dataset;
(c) ray-stream: ``cluster.pretrain`` with the real frame stream (S3 get + OpenCV decode of every
    video every epoch, frames re-sampled), as ``sonoray pretrain`` runs.

Images are the augmented views through the network (2 per video per step). Each figure is the
median of its per-epoch rates. Targets: b/a >= 0.9 (Ray Train adds little), c/b >= 0.8 (the
stream does not starve training).

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

DATA_URI = "s3://bench/pocus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pocus", type=Path, default=REPO.parent / "shared" / "data" / "pocus")
    parser.add_argument("--image-sizes", default="224", help="comma-separated, e.g. 224,64")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=1)
    parser.add_argument("--batch-videos", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per figure (median taken)")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    import numpy as np
    import ray
    import torch

    from cluster.dataset import load_dataset
    from cluster.frames import frame_stream
    from cluster.ingest import ingest_videos
    from cluster.pretrain import pretrain, stream_spec
    from cluster.runtime import connect
    from cluster.s3server import LocalS3Server
    from cluster.storage import Storage, StorageConfig
    from cluster.train import ScaleSpec
    from ultrasound.manifest import parse_pocus
    from ultrasound.uscl import USCLConfig

    log = lambda message: print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
                                flush=True)  # noqa: E731
    scale = ScaleSpec(workers=1, gpu=args.gpu)
    work = Path(tempfile.mkdtemp(prefix="train-throughput-"))
    report: dict = {"machine": _machine(args.gpu), "batch_videos": args.batch_videos,
                    "channels": args.channels, "epochs": args.epochs, "sizes": {}}
    with LocalS3Server() as server:
        os.environ.update(server.env())
        storage = Storage(StorageConfig.from_env())
        records, skipped, findings = parse_pocus(args.pocus)
        ingest_videos(records, skipped, args.pocus, DATA_URI, findings, source_format="pocus",
                      storage=storage)
        log(connect(num_cpus=os.cpu_count()))
        data = load_dataset(DATA_URI, storage)
        threads = max(1, int(scale.resources(float(ray.cluster_resources()["CPU"]))["CPU"]))
        report["videos"] = len(data.rows)
        report["torch_threads"] = threads
        for size in [int(s) for s in args.image_sizes.split(",") if s]:
            cfg = USCLConfig(epochs=args.epochs, batch_videos=args.batch_videos, image_size=size,
                             channels=args.channels, warmup_epochs=args.epochs, num_classes=0,
                             semi_supervised=False)
            spec = dataclasses.replace(stream_spec(cfg, args.gpu), seed=0)  # one fixed pick
            clips = [row for batch in frame_stream(data, spec).dataset.select_columns(
                ["video_id", "frames", "n_frames"]).iter_batches(batch_size=64, batch_format="numpy")
                for row in _rows(batch)]
            log(f"{size}px: {len(clips)} clips of {clips[0]['frames'].shape} in memory")

            plain = plain_loop(clips, cfg, threads, "cuda" if args.gpu else "cpu")
            log(f"{size}px (a) plain single-process loop: {plain:.1f} images/s")
            memory_ds = ray.data.from_items(clips).materialize()
            in_memory = pretrain(data, str(work / f"memory-{size}"), cfg, scale, unlabelled=True,
                                 storage=storage, datasets={"train": memory_ds}).images_per_s
            log(f"{size}px (b) Ray Train, in-memory dataset: {in_memory:.1f} images/s")
            streamed = pretrain(data, str(work / f"stream-{size}"), cfg, scale, unlabelled=True,
                                storage=storage).images_per_s
            log(f"{size}px (c) Ray Train, frame stream: {streamed:.1f} images/s")
            figures = {"plain_images_per_s": round(plain, 2),
                       "ray_memory_images_per_s": round(in_memory, 2),
                       "ray_stream_images_per_s": round(streamed, 2),
                       "ray_memory_over_plain": round(in_memory / plain, 3),
                       "ray_stream_over_ray_memory": round(streamed / in_memory, 3)}
            figures["targets_met"] = {"ray_memory_over_plain>=0.9": figures["ray_memory_over_plain"] >= 0.9,
                                      "ray_stream_over_ray_memory>=0.8": figures["ray_stream_over_ray_memory"] >= 0.8}
            report["sizes"][str(size)] = figures
            print(f"{size}px: plain {plain:.1f}, Ray in-memory {in_memory:.1f} "
                  f"({figures['ray_memory_over_plain']:.2f}x plain), Ray stream {streamed:.1f} "
                  f"({figures['ray_stream_over_ray_memory']:.2f}x in-memory) images/s", flush=True)
    print(json.dumps(report))


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


def _machine(gpu: bool) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} CPUs, load average {load:.1f} at start, torch "
            f"{torch.__version__}" + (f", {torch.cuda.get_device_name(0)}" if gpu else ", CPU only"))


if __name__ == "__main__":
    main()
