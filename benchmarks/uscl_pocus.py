"""Does pretraining help? POCUS 3-class (covid / pneumonia / regular, convex probe), K-fold
cross-validation by patient, linear probe and last-block fine-tuning, for three backbones:

  random  - random init, no pretraining;
  simclr  - plain SimCLR (`sonoray pretrain --simclr`: no mixup, no cross-entropy), one run on
            every POCUS video without labels, valid for every fold;
  uscl    - USCL (`sonoray pretrain --holdout-fold I`), one run per fold, each using the class
            labels of every video except the test videos of its fold.

Everything goes through the project's jobs: the videos are ingested into a loopback S3 server,
pretraining runs on Ray Train fed by the frame stream, evaluation is `sonoray evaluate`'s code
(frames at 3 per second, at most 30 per video; model selection on a validation split of the
training folds). Prints a markdown table of mean +- std over folds, then one JSON object.

CPU size (default): --image-size 64 --channels 1 --epochs 20; 66 minutes on 2 CPUs (35 pretraining,
29 fine-tuning 3 x 5 folds x 20 epochs; `--finetune-epochs 8` saves about 17).
`--save` writes benchmarks/results/uscl_pocus.{md,json,png}.
Paper scale (GPU):  python benchmarks/uscl_pocus.py --gpu --image-size 224 --epochs 300
"""
from __future__ import annotations

import argparse
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

CLASSES = ["covid", "pneumonia", "regular"]
PROBE = "convex"
RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pocus", type=Path, default=REPO.parent / "shared" / "data" / "pocus")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, choices=[1, 3], default=1)
    parser.add_argument("--epochs", type=int, default=20, help="pretraining epochs")
    parser.add_argument("--warmup-epochs", type=int, default=None,
                        help="constant-lr epochs before the cosine decay (default: 10, or "
                        "epochs // 30 when epochs < 300, keeping the authors' 10-of-300 shape)")
    parser.add_argument("--batch-videos", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPU share of each training worker (default: leave one CPU to Ray Data)")
    parser.add_argument("--decode-cpus", type=float, default=None,
                        help="CPU share of one decode task (default: pretrain's)")
    parser.add_argument("--gpu", action="store_true", help="pretrain and evaluate on GPUs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--methods", default="random,simclr,uscl")
    parser.add_argument("--modes", default="linear,finetune")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--save", action="store_true",
                        help="write the table, JSON and figure to benchmarks/results/uscl_pocus.*")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="only redraw the figure of a saved results JSON")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return

    import torch

    from cluster.dataset import load_dataset
    from cluster.evaluate import HoldoutSpec, evaluation_rows, load_eval_frames
    from cluster.pretrain import pretrain
    from cluster.runtime import connect
    from cluster.train import ScaleSpec
    from jobs.evaluate import evaluate_summary
    from ultrasound.uscl import USCLConfig

    methods = [m for m in args.methods.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    warmup = args.warmup_epochs if args.warmup_epochs is not None else \
        (10 if args.epochs >= 300 else args.epochs // 30)
    cfg = USCLConfig(epochs=args.epochs, batch_videos=args.batch_videos, image_size=args.image_size,
                     channels=args.channels, lr=args.lr, warmup_epochs=warmup)
    scale = ScaleSpec(workers=args.workers, gpu=args.gpu, cpus_per_worker=args.cpus_per_worker)
    device = "cuda" if args.gpu else "cpu"
    work = args.out or Path(tempfile.mkdtemp(prefix="uscl-pocus-"))
    work = work / time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    timings: dict[str, float] = {}

    with pocus_in_loopback_s3(args.pocus) as storage:
        log(connect(num_cpus=os.cpu_count()))
        data = load_dataset(DATA_URI, storage)
        rows, classes = evaluation_rows(data, CLASSES, PROBE)
        log(f"{len(data.rows)} POCUS videos ingested; {len(rows)} {PROBE} videos of {classes} "
            f"evaluated with {args.folds} folds; pretraining on all {len(data.rows)}")

        checkpoints = {"random": "random"}
        pretrain_runs: dict[str, list[dict]] = {}
        if "simclr" in methods:
            t = time.perf_counter()
            result = pretrain(data, str(work / "simclr"), cfg.plain_simclr(), scale,
                              unlabelled=True, storage=storage, decode_cpus=args.decode_cpus)
            checkpoints["simclr"] = result.checkpoint_uri
            pretrain_runs["simclr"] = [_run_summary(result)]
            timings["pretrain_simclr_s"] = time.perf_counter() - t
            log(f"simclr pretrained in {timings['pretrain_simclr_s']:.0f} s: {pretrain_runs['simclr'][0]}")
        if "uscl" in methods:
            t = time.perf_counter()
            pretrain_runs["uscl"] = []
            for fold in range(args.folds):
                holdout = HoldoutSpec(fold, args.folds, args.split_seed, tuple(CLASSES), PROBE)
                result = pretrain(data, str(work / "uscl" / str(fold)), cfg, scale, holdout=holdout,
                                  storage=storage, decode_cpus=args.decode_cpus)
                pretrain_runs["uscl"].append(_run_summary(result))
                log(f"uscl fold {fold} pretrained: {pretrain_runs['uscl'][-1]}")
            checkpoints["uscl"] = str(work / "uscl" / "{fold}" / "model.pt")
            timings["pretrain_uscl_s"] = time.perf_counter() - t

        t = time.perf_counter()
        frames = load_eval_frames(data, rows, classes, image_size=args.image_size,
                                  channels=args.channels)
        timings["load_frames_s"] = time.perf_counter() - t
        log(f"{len(frames)} evaluation frames of {len(set(frames.video_ids.tolist()))} videos "
            f"in {timings['load_frames_s']:.0f} s")
        results: dict[str, dict[str, dict]] = {}
        for method in methods:
            results[method] = {}
            for mode in modes:
                t = time.perf_counter()
                summary = evaluate_summary(
                    DATA_URI, checkpoints[method], mode=mode, folds=args.folds,
                    split_seed=args.split_seed, classes=CLASSES, probe=PROBE,
                    image_size=args.image_size, channels=args.channels,
                    epochs=args.finetune_epochs, device=device, storage=storage, frames=frames)
                timings[f"eval_{method}_{mode}_s"] = time.perf_counter() - t
                results[method][mode] = {k: summary[k] for k in (
                    "accuracy", "accuracy_std", "macro_f1", "macro_f1_std", "video_accuracy",
                    "video_accuracy_std", "confusion", "per_class")}
                log(f"{method} {mode}: accuracy {summary['accuracy']:.3f} +- "
                    f"{summary['accuracy_std']:.3f}, macro-F1 {summary['macro_f1']:.3f} +- "
                    f"{summary['macro_f1_std']:.3f}")

    timings["total_s"] = time.perf_counter() - started
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs (load average {load_at_start:.1f} at "
               f"start, {os.getloadavg()[0]:.1f} at end), torch {torch.__version__}, "
               f"{'GPU ' + torch.cuda.get_device_name(0) if args.gpu else 'CPU only'}")
    settings = {"image_size": args.image_size, "channels": args.channels, "epochs": args.epochs,
                "warmup_epochs": warmup, "batch_videos": args.batch_videos, "lr": args.lr,
                "workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
                "decode_cpus": args.decode_cpus, "folds": args.folds, "split_seed": args.split_seed,
                "finetune_epochs": args.finetune_epochs, "videos_pretrain": len(data.rows),
                "videos_evaluated": len(rows), "frames_evaluated": len(frames)}
    table = markdown_table(results, modes, settings, machine, timings)
    report = {"settings": settings, "machine": machine, "results": results,
              "pretrain": pretrain_runs, "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "uscl_pocus.md").write_text(table + "\n")
        (RESULTS / "uscl_pocus.json").write_text(json.dumps(report, indent=1) + "\n")
        plot(report, RESULTS / "uscl_pocus.png")
    print(table)
    print(json.dumps(report))


def plot(report: dict, png: Path) -> None:
    """Macro-F1 and accuracy (mean +- std over folds) per backbone and mode, and the confusion
    matrices summed over folds, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = report["results"]
    methods = list(results)
    modes = list(next(iter(results.values())))
    labels = {"random": "random init", "simclr": "SimCLR", "uscl": "USCL"}
    fig, axes = plt.subplots(2, max(2, len(methods)), figsize=(4 * max(2, len(methods)), 7.5))
    width = 0.8 / len(methods)
    for ax, metric in zip(axes[0], ("macro_f1", "accuracy")):
        for i, method in enumerate(methods):
            means = [results[method][m][metric] for m in modes]
            stds = [results[method][m][f"{metric}_std"] for m in modes]
            ax.bar(np.arange(len(modes)) + i * width, means, width, yerr=stds, capsize=3,
                   label=labels.get(method, method))
        ax.set_xticks(np.arange(len(modes)) + width * (len(methods) - 1) / 2, modes)
        ax.set_ylim(0, 1)
        ax.set_title(f"{metric} (mean ± std over folds)")
        ax.legend(loc="lower right", fontsize=8)
    for ax in axes[0][2:]:
        ax.axis("off")
    for ax, method in zip(axes[1], methods):
        confusion = np.array(results[method][modes[0]]["confusion"])
        ax.imshow(confusion, cmap="Blues")
        for (r, c), v in np.ndenumerate(confusion):
            ax.text(c, r, str(v), ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(CLASSES)), CLASSES)
        ax.set_yticks(range(len(CLASSES)), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_title(f"{labels.get(method, method)}, {modes[0]}: frames summed over folds", fontsize=9)
    fig.suptitle(f"POCUS 3-class, {report['settings']['folds']}-fold CV; pretraining "
                 f"{report['settings']['epochs']} epochs at {report['settings']['image_size']} px")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _run_summary(result) -> dict:
    return {"epochs": len(result.history), "loss_first": round(result.history[0]["loss"], 4),
            "loss_last": round(result.history[-1]["loss"], 4),
            "images_per_s": round(result.images_per_s, 1),
            "seconds": round(sum(h["seconds"] for h in result.history), 1)}


def markdown_table(results: dict, modes: list[str], settings: dict, machine: str,
                   timings: dict) -> str:
    names = {"linear": "linear probe", "finetune": "fine-tune last block"}
    header = "| backbone | " + " | ".join(f"{names[m]} accuracy | {names[m]} macro-F1" for m in modes) + " |"
    lines = [f"POCUS {'/'.join(CLASSES)} ({PROBE}), {settings['folds']}-fold CV by patient, "
             f"{settings['videos_evaluated']} videos / {settings['frames_evaluated']} frames; "
             f"pretraining {settings['epochs']} epochs at {settings['image_size']}px x "
             f"{settings['channels']} on {settings['videos_pretrain']} videos; {machine}; "
             f"total {timings['total_s'] / 60:.1f} min", "",
             header, "|" + "---|" * (1 + 2 * len(modes))]
    labels = {"random": "random init", "simclr": "SimCLR", "uscl": "USCL"}
    for method, by_mode in results.items():
        cells = []
        for mode in modes:
            r = by_mode[mode]
            cells += [f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f}",
                      f"{r['macro_f1']:.3f} ± {r['macro_f1_std']:.3f}"]
        lines.append(f"| {labels.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
