"""Does in-domain video pretraining help? POCUS 3-class (covid / pneumonia / regular, convex
probe), folds by patient, over several split seeds, compared arm against arm by paired per-fold
differences with 95% bootstrap CIs and sign tests.

Arms (same code, same budget of optimiser steps):

  random          random init, BatchNorm statistics re-estimated on each fold's training frames;
  simclr-image    SimCLR as the authors' baseline: two augmentations of one frame, no labels;
  simclr-frames   inter-frame SimCLR: two frames of one video unmixed, no labels;
  uscl-unlabelled USCL sample pair generation (mixup of 3 frames) + NT-Xent, no labels;
  uscl-semi       USCL + the semi-supervised cross-entropy, one pretraining per (split seed, fold)
                  with the labels of that fold's test AND validation videos masked.

The label-free arms pretrain once on every POCUS video and are valid for every fold of every
split seed; uscl-semi pretrains per fold of the ``--semi-seeds`` only (each pretraining costs as
much as a label-free arm), so it is compared with the others on those seeds' folds.

Everything goes through the project's code: the videos are ingested into a loopback S3 server,
pretraining runs on Ray Train from the decoded-frame cache, evaluation is `sonoray evaluate`'s
(frames at 3 per second, at most 30 per video, C chosen on validation videos carved from the
training folds). Primary measure: the linear probe. ``--finetune`` adds the authors' fine-tuning
protocol (layer4[1] + linear, Adam lr 0.01, cosine, 100 epochs) on the first split seed.

CPU size (default): 64 px grayscale (the smallest size at which ResNet-18's last block still sees
a 2 x 2 map, and 12x fewer pixels than 224), batch 12 videos (22 negatives per view),
1,000 optimiser steps per pretraining (129 ingested videos -> 11 steps an epoch -> 91 epochs), cosine
after 10% warm-up. Measured (2 CPUs, from the cache): an epoch costs 11-14 s whatever the batch,
so a pretraining takes 17-21 min; the three label-free arms and their linear probes took 48 min,
and the default run (3 label-free arms + 5 folds of uscl-semi) needs about 2.5 hours. Batch 12
rather than 16 or 32 because the cost is per epoch: fewer videos per step means fewer epochs for
1,000 steps.
A run that stopped can go on with ``--resume WORK``: finished pretrainings and evaluations are
reused. ``--merge REPORT`` adds the arms of an earlier saved report (same settings, checked) to
this run's, so the semi arm can run on its own and still be compared with the label-free arms:
python benchmarks/uscl_pocus.py --arms uscl-semi --merge benchmarks/results/uscl_pocus.json --save
`--save` writes benchmarks/results/uscl_pocus.{md,json,png} and uscl_pocus_tsne.png.
Paper scale (GPU): python benchmarks/uscl_pocus.py --gpu --image-size 224 --steps 1500 --channels 3
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.pocus_s3 import DATA_URI, difference_cell, frozen_features, json_plain, log, pocus_in_loopback_s3  # noqa: E402

CLASSES = ["covid", "pneumonia", "regular"]
PROBE = "convex"
RESULTS = REPO / "benchmarks" / "results"
ARMS = ("random", "simclr-image", "simclr-frames", "uscl-unlabelled", "uscl-semi")
LABEL_FREE = {"simclr-image": "image", "simclr-frames": "frames", "uscl-unlabelled": "uscl"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pocus", type=Path, default=REPO.parent / "shared" / "data" / "pocus")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, choices=[1, 3], default=1)
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps per pretraining")
    parser.add_argument("--batch-videos", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gpu", action="store_true", help="pretrain and evaluate on GPUs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--split-seeds", default="0,1,2")
    parser.add_argument("--semi-seeds", default="0", help="split seeds uscl-semi pretrains per fold for")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--finetune", action="store_true", help="also fine-tune (first split seed)")
    parser.add_argument("--finetune-epochs", type=int, default=100, help="(default 100, the authors')")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--resume", type=Path, default=None, metavar="WORK",
                        help="continue the run in this work folder: finished pretrainings and evaluations are reused")
    parser.add_argument("--merge", type=Path, default=None, metavar="REPORT",
                        help="add the arms of an earlier uscl_pocus.json run with the same settings")
    parser.add_argument("--save", action="store_true",
                        help="write the table, JSON and figures to benchmarks/results/uscl_pocus*")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="only redraw the figure of a saved results JSON")
    args = parser.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        plot(report, args.replot.with_suffix(".png"))
        plot_embeddings(report, args.replot.with_name(args.replot.stem + "_tsne.png"))
        return

    import torch

    from cluster.dataset import load_dataset
    from cluster.evaluate import HoldoutSpec, compare_records, evaluation_record, evaluation_rows, load_eval_frames
    from cluster.pretrain import pretrain
    from cluster.runtime import connect
    from cluster.train import ScaleSpec
    from cluster.evaluate import evaluate_summary
    from ultrasound.uscl import USCLConfig

    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    seeds = [int(s) for s in args.split_seeds.split(",") if s]
    semi_seeds = [int(s) for s in args.semi_seeds.split(",") if s]
    device = "cuda" if args.gpu else "cpu"
    scale = ScaleSpec(workers=args.workers, gpu=args.gpu)
    if args.resume is not None and not args.resume.is_dir():
        parser.error(f"--resume {args.resume}: no such work folder")
    merged = json.loads(args.merge.read_text()) if args.merge is not None else None
    if merged is not None and set(arms) & set(merged["records"]["linear"]):
        parser.error(f"--merge {args.merge}: it already holds arms "
                     f"{sorted(set(arms) & set(merged['records']['linear']))}; run only the others")
    work = args.resume or (args.out or Path(tempfile.mkdtemp(prefix="uscl-pocus-"))) / time.strftime("%Y%m%d-%H%M%S")
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    timings: dict[str, float] = {}

    with pocus_in_loopback_s3(args.pocus) as storage:
        log(connect(num_cpus=os.cpu_count()))
        data = load_dataset(DATA_URI, storage)
        rows, classes = evaluation_rows(data, CLASSES, PROBE)
        steps_per_epoch = math.ceil(len(data.rows) / args.batch_videos)
        epochs = math.ceil(args.steps / steps_per_epoch)
        cfg = USCLConfig(epochs=epochs, batch_videos=args.batch_videos, image_size=args.image_size,
                         channels=args.channels, lr=args.lr, warmup_epochs=max(1, epochs // 10))
        log(f"{len(data.rows)} POCUS videos; {len(rows)} {PROBE} videos of {classes} evaluated, "
            f"{args.folds} folds x split seeds {seeds}; pretraining {epochs} epochs x {steps_per_epoch} "
            f"steps = {epochs * steps_per_epoch} steps at {args.image_size}px")

        if merged is not None:  # before any pretraining: a mismatch must not cost an hour
            _check_same_settings(merged["settings"], cfg, epochs * steps_per_epoch, args, len(rows))
        checkpoints: dict[str, str] = {"random": "random"}
        pretrain_runs: dict[str, list[dict]] = {}

        def run_pretrain(name: str, out: Path, config: USCLConfig, **kwargs) -> str:
            done = out / "bench_run.json"  # written after the run completed: a resume reuses it
            if done.exists() and (out / "complete.json").exists():
                saved = json.loads(done.read_text())
                log(f"{out.relative_to(work)}: reusing the finished pretraining")
            else:
                t = time.perf_counter()
                result = pretrain(data, str(out), config, scale, storage=storage, **kwargs)
                saved = {"summary": _run_summary(result), "checkpoint": result.checkpoint_uri,
                         "seconds": time.perf_counter() - t}
                done.write_text(json.dumps(saved))
            pretrain_runs.setdefault(name, []).append(saved["summary"])
            timings[f"pretrain_{out.relative_to(work)}_s"] = saved["seconds"]
            log(f"{out.relative_to(work)} pretrained: {saved['summary']}")
            return saved["checkpoint"]

        for arm, pairs in LABEL_FREE.items():
            if arm in arms:
                config = USCLConfig(**{**cfg.to_dict(), "pairs": pairs, "semi_supervised": False})
                checkpoints[arm] = run_pretrain(arm, work / arm, config, unlabelled=True)
        semi: dict[int, str] = {}
        if "uscl-semi" in arms:
            for seed in semi_seeds:
                for fold in range(args.folds):
                    holdout = HoldoutSpec(fold, args.folds, seed, tuple(CLASSES), PROBE)
                    run_pretrain("uscl-semi", work / "uscl-semi" / f"seed{seed}" / str(fold), cfg, holdout=holdout)
                semi[seed] = str(work / "uscl-semi" / f"seed{seed}" / "{fold}" / "model.pt")

        t = time.perf_counter()
        frames = load_eval_frames(data, rows, classes, image_size=args.image_size, channels=args.channels)
        timings["load_frames_s"] = time.perf_counter() - t
        log(f"{len(frames)} evaluation frames of {len(set(frames.video_ids.tolist()))} videos")

        def evaluate(arm: str, checkpoint: str, seed: int, mode: str = "linear") -> dict:
            cached = work / "eval" / f"{arm}-{mode}-seed{seed}.json"
            if cached.exists():
                saved = json.loads(cached.read_text())
                timings[f"eval_{arm}_{mode}_seed{seed}_s"] = saved["seconds"]
                return saved["summary"]
            t = time.perf_counter()
            summary = evaluate_summary(DATA_URI, checkpoint, mode=mode, folds=args.folds, split_seed=seed,
                                       classes=CLASSES, probe=PROBE, image_size=args.image_size,
                                       channels=args.channels, device=device, storage=storage, frames=frames,
                                       epochs=args.finetune_epochs if mode == "finetune" else None)
            timings[f"eval_{arm}_{mode}_seed{seed}_s"] = time.perf_counter() - t
            log(f"{arm} {mode} seed {seed}: accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}")
            cached.parent.mkdir(exist_ok=True)
            cached.write_text(json.dumps({"summary": summary, "seconds": timings[f"eval_{arm}_{mode}_seed{seed}_s"]},
                                         default=json_plain))
            return summary

        records: dict[str, dict[str, dict]] = {"linear": {}, "finetune": {}}
        embeddings_merged = {}
        if merged is not None:
            for mode in records:
                records[mode].update(merged["records"].get(mode, {}))
            pretrain_runs.update(merged.get("pretrain", {}))
            embeddings_merged = (merged.get("embeddings") or {}).get("maps", {})
            log(f"merged arms {sorted(merged['records']['linear'])} from {args.merge}")
        ran = list(arms)
        arms = list(dict.fromkeys([*records["linear"], *arms]))
        for arm in ran:
            arm_seeds = semi_seeds if arm == "uscl-semi" else seeds
            summaries = [evaluate(arm, semi[s] if arm == "uscl-semi" else checkpoints[arm], s) for s in arm_seeds]
            records["linear"][arm] = evaluation_record(arm, summaries)
            if args.finetune:
                first = arm_seeds[0] if arm == "uscl-semi" else seeds[0]
                checkpoint = semi[first] if arm == "uscl-semi" else checkpoints[arm]
                records["finetune"][arm] = evaluation_record(arm, [evaluate(arm, checkpoint, first, "finetune")])
        comparisons = {}  # arms listed from the expected best to random: each difference reads "a - b"
        arms = sorted(arms, key=lambda a: -ARMS.index(a))
        label_free = [a for a in arms if a != "uscl-semi"]
        if len(label_free) >= 2:
            comparisons["label-free arms, every split seed"] = compare_records(
                [records["linear"][a] for a in label_free])
        if "uscl-semi" in arms and len(arms) >= 2:
            comparisons[f"every arm, split seeds {semi_seeds}"] = compare_records(
                [_only_seeds(records["linear"][a], semi_seeds) for a in arms])
        if args.finetune and len(arms) >= 2:
            first = semi_seeds[0] if "uscl-semi" in arms else seeds[0]
            comparisons[f"fine-tuning, split seed {first}"] = compare_records(
                [_only_seeds(records["finetune"][a], [first]) for a in arms])
        (work / "records.json").write_text(json.dumps({"records": records, "comparisons": comparisons,
                                                       "pretrain": pretrain_runs}, default=json_plain))
        try:
            embeddings = embedding_maps(ran, checkpoints, semi, frames, args)
            embeddings["maps"] = {**embeddings_merged, **embeddings["maps"]}
        except Exception as err:  # noqa: BLE001 - the map is a picture; the measured results must still be saved
            log(f"embedding maps failed ({type(err).__name__}: {err}); results are saved without them")
            embeddings = None

    timings["total_s"] = time.perf_counter() - started
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs (load average {load_at_start:.1f} at start, "
               f"{os.getloadavg()[0]:.1f} at end), torch {torch.__version__}, "
               f"{'GPU ' + torch.cuda.get_device_name(0) if args.gpu else 'CPU only'}")
    settings = {"image_size": args.image_size, "channels": args.channels, "steps": epochs * steps_per_epoch,
                "epochs": epochs, "warmup_epochs": cfg.warmup_epochs, "batch_videos": args.batch_videos,
                "lr": args.lr, "workers": args.workers, "folds": args.folds, "split_seeds": seeds,
                "semi_seeds": semi_seeds, "finetune_epochs": args.finetune_epochs if args.finetune else None,
                "videos_pretrain": len(data.rows), "videos_evaluated": len(rows),
                "frames_evaluated": len(frames), "arms": arms}
    report = {"settings": settings, "machine": machine, "records": records, "comparisons": comparisons,
              "pretrain": pretrain_runs, "embeddings": embeddings,
              "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    table = markdown_table(report)
    (work / "uscl_pocus.json").write_text(json.dumps(report, indent=1, default=json_plain) + "\n")  # for --replot
    log(f"results in {work / 'uscl_pocus.json'}")
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "uscl_pocus.md").write_text(table + "\n")
        (RESULTS / "uscl_pocus.json").write_text(json.dumps(report, indent=1, default=json_plain) + "\n")
        plot(report, RESULTS / "uscl_pocus.png")
        plot_embeddings(report, RESULTS / "uscl_pocus_tsne.png")
    print(table)
    print(json.dumps({k: report[k] for k in ("settings", "comparisons", "timings_s")}))


def _check_same_settings(saved: dict, cfg, steps: int, args, videos: int) -> None:
    """Arms from another run are comparable only when pretrained and evaluated alike."""
    mine = {"image_size": cfg.image_size, "channels": cfg.channels, "steps": steps, "epochs": cfg.epochs,
            "batch_videos": cfg.batch_videos, "lr": cfg.lr, "folds": args.folds, "videos_evaluated": videos}
    differ = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if not set(saved.get("semi_seeds", [])) <= set(saved.get("split_seeds", [])) or not set(
            int(s) for s in args.semi_seeds.split(",") if s) <= set(saved.get("split_seeds", [])):
        differ["semi_seeds"] = (saved.get("split_seeds"), args.semi_seeds)
    if differ:
        raise SystemExit(f"--merge {args.merge}: settings differ (saved, this run): {differ}")



def _only_seeds(record: dict, seeds: list[int]) -> dict:
    """``record`` restricted to the folds of ``seeds`` (to pair arms evaluated on more seeds with
    one evaluated on fewer)."""
    import numpy as np

    rows = [r for r in record["per_fold"] if r["split_seed"] in seeds]
    out = {**record, "per_fold": rows, "split_seeds": [s for s in record["split_seeds"] if s in seeds]}
    for metric in ("accuracy", "macro_f1", "video_accuracy"):
        values = np.array([r[metric] for r in rows])
        out[metric], out[f"{metric}_std"] = float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0)
    return out


def embedding_maps(arms, checkpoints, semi, frames, args) -> dict:
    """A 2-D t-SNE map of every arm's frozen POCUS frame features (uscl-semi: its fold-0 model of
    the first semi seed), coloured by class: does the backbone separate the classes without a probe?"""
    import numpy as np
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(frames), size=min(1500, len(frames)), replace=False))
    maps = {}
    for arm in arms:
        uri = next(iter(semi.values())).replace("{fold}", "0") if arm == "uscl-semi" else checkpoints[arm]
        feats = frozen_features(uri, frames.images[pick], args.image_size, args.channels)
        xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=30).fit_transform(feats)
        maps[arm] = {"xy": np.round(xy, 3).tolist(), "label": frames.labels[pick].tolist()}
    return {"classes": list(frames.classes), "maps": maps}


def _run_summary(result) -> dict:
    return {"epochs": len(result.history), "loss_first": round(result.history[0]["loss"], 4),
            "loss_last": round(result.history[-1]["loss"], 4),
            "loss_curve": [round(h["loss"], 4) for h in result.history],
            "images_per_s": round(result.images_per_s, 1),
            "seconds": round(sum(h["seconds"] for h in result.history), 1)}


def markdown_table(report: dict) -> str:
    s = report["settings"]
    lines = [f"POCUS {'/'.join(CLASSES)} ({PROBE}), {s['folds']}-fold CV by patient x split seeds "
             f"{s['split_seeds']}, {s['videos_evaluated']} videos / {s['frames_evaluated']} frames; "
             f"pretraining {s['steps']} steps ({s['epochs']} epochs, batch {s['batch_videos']} videos) at "
             f"{s['image_size']}px x {s['channels']} on {s['videos_pretrain']} videos; {report['machine']}; "
             f"total {report['timings_s']['total_s'] / 60:.1f} min", "",
             "| arm | mode | folds | accuracy | macro-F1 |", "|---|---|---|---|---|"]
    for mode, by_arm in report["records"].items():
        for arm, r in by_arm.items():
            lines.append(f"| {arm} | {mode} | {len(r['per_fold'])} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | "
                         f"{r['macro_f1']:.3f} ± {r['macro_f1_std']:.3f} |")
    for title, comparison in report["comparisons"].items():
        lines += ["", f"Paired differences ({title}; {comparison['pairs']} pairs, 95% bootstrap CI, sign test):", "",
                  "| a - b | accuracy | macro-F1 |", "|---|---|---|"]
        by_pair: dict[tuple, dict] = {}
        for d in comparison["differences"]:
            by_pair.setdefault((d["a"], d["b"]), {})[d["metric"]] = d
        for (a, b), metrics in by_pair.items():
            cells = [difference_cell(metrics[m]) for m in ("accuracy", "macro_f1")]
            lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, png: Path) -> None:
    """Left: linear-probe macro-F1 and accuracy per arm (mean over every fold it was scored on).
    Right: each arm minus random, paired, with 95% bootstrap CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = report["records"]["linear"]
    arms = list(records)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(arms))
    for offset, metric in ((-0.2, "macro_f1"), (0.2, "accuracy")):
        left.bar(x + offset, [records[a][metric] for a in arms], 0.4, label=metric.replace("_", "-"))
    left.set_xticks(x, arms, rotation=20, fontsize=9)
    left.set_ylim(0, 1)
    left.set_ylabel("linear probe, mean over folds")
    left.set_title("Linear probe per arm")
    left.legend(loc="lower right", fontsize=8)
    # every arm against random, from the comparison pairing it over the most folds (the semi arm
    # is paired on its own split seeds only)
    best: dict[str, tuple[dict, int]] = {}
    for comparison in report["comparisons"].values():
        for d in comparison["differences"]:
            if d["b"] == "random" and d["metric"] == "macro_f1" and comparison["pairs"] > best.get(d["a"], ({}, 0))[1]:
                best[d["a"]] = (d, comparison["pairs"])
    if best:
        order = [a for a in arms if a in best]
        diffs = [best[a][0] for a in order]
        y = np.arange(len(diffs))
        means = np.array([d["mean"] for d in diffs])
        errors = np.array([[d["mean"] - d["low"] for d in diffs], [d["high"] - d["mean"] for d in diffs]])
        right.errorbar(means, y, xerr=errors, fmt="o", capsize=4)
        right.axvline(0, color="grey", lw=1)
        right.set_yticks(y, [f"{a}\n({best[a][1]} folds)" for a in order], fontsize=9)
        right.set_ylim(-0.6, len(diffs) - 0.4)
        right.set_xlabel("macro-F1 minus random init (paired, 95% bootstrap CI)")
        right.set_title("Paired difference to random init")
    s = report["settings"]
    fig.suptitle(f"POCUS 3-class, {s['folds']} folds x seeds {s['split_seeds']}; {s['steps']} pretraining steps "
                 f"at {s['image_size']} px")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_embeddings(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not report.get("embeddings"):
        return
    maps, classes = report["embeddings"]["maps"], report["embeddings"]["classes"]
    fig, axes = plt.subplots(1, len(maps), figsize=(3.6 * len(maps), 3.8), squeeze=False)
    for ax, (arm, m) in zip(axes[0], maps.items()):
        xy, label = np.asarray(m["xy"]), np.asarray(m["label"])
        for c, name in enumerate(classes):
            ax.scatter(*xy[label == c].T, s=4, alpha=0.6, label=name)
        ax.set_title(arm, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=8, markerscale=3)
    fig.suptitle("t-SNE of frozen frame features (POCUS), coloured by class")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
