"""Does longer label-free pretraining make the features worse? Loss against linear probe, on the
task the recipe was chosen on and on one it never saw.

A report on another lung-ultrasound set had a 30-epoch label-free pretraining score below random
init, while a 2-epoch one scored above it. This benchmark pretrains the same recipe for several
budgets (each with its own warm-up and cosine schedule to 0, batches reshuffled every epoch, from
the decoded-frame cache) and, for every budget, measures:

- the pretraining loss curve;
- the linear probe on POCUS covid / pneumonia / regular (convex), 5 folds by patient x 3 split
  seeds, paired against random init (BatchNorm statistics re-estimated) and against the budget
  before it, with 95% bootstrap CIs and sign tests;
- the linear probe on the POCUS lung severity score (0-3, Gare et al. 2022), a labelling no
  choice of the recipe ever looked at (the "data you did not tune on" of this machine: the other
  set is not here), same folds rule and seeds;
- the effective rank of the frozen features of every evaluated frame (exp of the entropy of the
  normalised singular values, Roy & Vetterli 2007): a collapsing encoder loses rank as its loss
  falls.

Everything goes through the project's code (loopback S3 ingest, Ray Train pretraining, the
evaluate job's cross-validation). ``--reuse EPOCHS=model.pt`` takes a finished pretraining of
exactly these settings (checked against the checkpoint's config), e.g. the simclr-frames arm of
benchmarks/uscl_pocus.py, which is this benchmark's 91-epoch frames run.

python benchmarks/uscl_budget.py --pairs frames,uscl --budgets 2,9,27,91 --save
`--save` writes benchmarks/results/uscl_budget.{json,md,png}.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
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
SEVERITY_URI = "s3://bench/pocus-severity"
SEVERITY_COLUMN = "Lung Severity Score"
RESULTS = REPO / "benchmarks" / "results"
CONFIG_KEYS = ("epochs", "batch_videos", "image_size", "channels", "lr", "warmup_epochs", "pairs",
               "semi_supervised", "seed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pocus", type=Path, default=REPO.parent / "shared" / "data" / "pocus")
    parser.add_argument("--pairs", default="frames,uscl", help="pair modes to pretrain (image, frames, uscl)")
    parser.add_argument("--budgets", default="2,9,27,91", help="pretraining epochs, one run each")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, choices=[1, 3], default=1)
    parser.add_argument("--batch-videos", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--split-seeds", default="0,1,2")
    parser.add_argument("--fixed-batches", default="uscl:27", metavar="PAIRS:EPOCHS,...",
                        help="also run these with the same batches every epoch (the unshuffled control; '' for none)")
    parser.add_argument("--reuse", action="append", default=[], metavar="PAIRS:EPOCHS=MODEL",
                        help="a finished pretraining of these settings, e.g. frames:91=/work/simclr-frames/model.pt")
    parser.add_argument("--skip", default="", metavar="PAIRS:EPOCHS,...", help="leave these budgets out")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--resume", type=Path, default=None, metavar="WORK",
                        help="continue a stopped run: the runs its runs.json holds are not repeated")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/uscl_budget.*")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON", help="only redraw a saved report")
    parser.add_argument("--rebuild", type=Path, default=None, metavar="WORK",
                        help="only rebuild the report from a run's work folder (its settings.json and runs.json)")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    if args.rebuild:
        report = build_report(json.loads((args.rebuild / "runs.json").read_text()),
                              json.loads((args.rebuild / "settings.json").read_text()), "(rebuilt)", None)
        save(report, args.rebuild, args.save)
        return

    import torch

    from cluster.dataset import load_dataset
    from cluster.evaluate import evaluate_summary, evaluation_record, evaluation_rows, load_eval_frames
    from cluster.pretrain import pretrain
    from cluster.runtime import connect
    from cluster.train import ScaleSpec
    from ultrasound.uscl import USCLConfig

    pair_modes = [p for p in args.pairs.split(",") if p]
    budgets = sorted({int(b) for b in args.budgets.split(",") if b})
    seeds = [int(s) for s in args.split_seeds.split(",") if s]
    reuse = _parse_reuse(args.reuse, parser)
    fixed = [(p, int(e)) for p, _, e in (item.partition(":") for item in args.fixed_batches.split(",") if item)]
    skip = {(p, int(e)) for p, _, e in (item.partition(":") for item in args.skip.split(",") if item)}
    work = args.resume or (args.out or Path(tempfile.mkdtemp(prefix="uscl-budget-"))) / time.strftime("%Y%m%d-%H%M%S")
    done = json.loads((work / "runs.json").read_text()) if args.resume and (work / "runs.json").exists() else {}
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]

    with pocus_in_loopback_s3(args.pocus) as storage:
        log(connect(num_cpus=os.cpu_count()))
        _ingest_severity(args.pocus, storage)
        data = load_dataset(DATA_URI, storage)
        steps_per_epoch = math.ceil(len(data.rows) / args.batch_videos)
        tasks = {}
        for task, uri, classes in (("diagnosis", DATA_URI, CLASSES), ("severity", SEVERITY_URI, None)):
            task_data = load_dataset(uri, storage)
            rows, names = evaluation_rows(task_data, classes, PROBE)
            frames = load_eval_frames(task_data, rows, names, image_size=args.image_size, channels=args.channels)
            tasks[task] = {"uri": uri, "classes": names, "frames": frames, "videos": len(rows)}
            log(f"{task}: {len(rows)} {PROBE} videos, {len(frames)} frames, classes {names}")

        settings = {"image_size": args.image_size, "channels": args.channels, "batch_videos": args.batch_videos,
                    "lr": args.lr, "folds": args.folds, "split_seeds": seeds, "budgets": budgets,
                    "pairs": pair_modes, "fixed_batches": fixed, "steps_per_epoch": steps_per_epoch, "videos_pretrain": len(data.rows),
                    **{f"{task}_videos": t["videos"] for task, t in tasks.items()},
                    **{f"{task}_frames": len(t["frames"]) for task, t in tasks.items()},
                    **{f"{task}_classes": t["classes"] for task, t in tasks.items()}}
        work.mkdir(parents=True, exist_ok=True)
        (work / "settings.json").write_text(json.dumps(settings))

        def probe(name: str, checkpoint: str) -> dict:
            out = {}
            for task, t in tasks.items():
                summaries = [evaluate_summary(t["uri"], checkpoint, folds=args.folds, split_seed=s,
                                              classes=t["classes"], probe=PROBE, image_size=args.image_size,
                                              channels=args.channels, storage=storage, frames=t["frames"])
                             for s in seeds]
                out[task] = evaluation_record(name, summaries)
                log(f"{name} {task}: accuracy {out[task]['accuracy']:.3f}, macro-F1 {out[task]['macro_f1']:.3f}")
            out["effective_rank"] = effective_rank(checkpoint, tasks["diagnosis"]["frames"], args)
            return out

        runs = {"random": done.get("random") or {"pairs": None, "epochs": 0, "steps": 0, "loss_curve": [],
                                                  **probe("random", "random")}}
        if "random" not in done:
            (work / "runs.json").write_text(json.dumps(runs, default=json_plain))
        for pairs, epochs, unshuffled in [(p, e, False) for p in pair_modes for e in budgets if (p, e) not in skip] + \
                [(p, e, True) for p, e in fixed]:
            name = f"{pairs}-{epochs}ep" + ("-fixed" if unshuffled else "")
            if name in done:
                runs[name] = done[name]
                log(f"{name}: reusing its finished run from {work / 'runs.json'}")
                continue
            cfg = USCLConfig(epochs=epochs, batch_videos=args.batch_videos, image_size=args.image_size,
                             channels=args.channels, lr=args.lr, warmup_epochs=max(1, epochs // 10),
                             pairs=pairs, semi_supervised=False)
            t = time.perf_counter()
            if (pairs, epochs) in reuse and not unshuffled:
                checkpoint, history = _reused(reuse[(pairs, epochs)], cfg)
                log(f"{name}: reusing {checkpoint}")
            else:
                result = pretrain(data, str(work / name), cfg, scale=ScaleSpec(workers=1), storage=storage,
                                  unlabelled=True, loop_extras={"_fixed_batches": unshuffled})
                checkpoint, history = result.checkpoint_uri, result.history
            runs[name] = {"pairs": pairs, "epochs": epochs, "fixed_batches": unshuffled,
                          "steps": epochs * steps_per_epoch,
                          "loss_curve": [round(h["loss"], 4) for h in history],
                          "pretrain_s": round(time.perf_counter() - t, 1), **probe(name, checkpoint)}
            (work / "runs.json").write_text(json.dumps(runs, default=json_plain))

    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs (load average {load_at_start:.1f} at start), "
               f"torch {torch.__version__}, CPU only")
    report = build_report(runs, settings, machine, round((time.perf_counter() - started) / 60, 1))
    save(report, work, args.save)


def save(report: dict, work: Path, to_results: bool) -> None:
    """The report as JSON in ``work`` (and with ``to_results`` as benchmarks/results/uscl_budget.*:
    JSON, Markdown table, figure); the table on stdout."""
    text = json.dumps(report, indent=1, default=json_plain) + "\n"
    (work / "uscl_budget.json").write_text(text)
    table = markdown_table(report)
    if to_results:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "uscl_budget.json").write_text(text)
        (RESULTS / "uscl_budget.md").write_text(table + "\n")
        plot(report, RESULTS / "uscl_budget.png")
    log(f"results in {work / 'uscl_budget.json'}")
    print(table)


TASKS = ("diagnosis", "severity")


def build_report(runs: dict, settings: dict, machine: str, total_min: float) -> dict:
    """Each run's loss curve, probe means and effective rank, its per-fold scores, and the paired
    differences of every budget against random and against the budget before it, per task and
    pair mode."""
    from cluster.evaluate import compare_records

    comparisons = {}
    for task in TASKS:
        for pairs in settings["pairs"]:
            names = [f"{pairs}-{e}ep" for e in settings["budgets"] if f"{pairs}-{e}ep" in runs]
            chain = [(n, "random") for n in names] + list(zip(names[1:], names[:-1]))
            comparisons[f"{task}/{pairs}"] = [_difference(compare_records([runs[a][task], runs[b][task]]))
                                              for a, b in chain]
        control = [(f"{p}-{e}ep-fixed", other) for p, e in settings.get("fixed_batches", [])
                   for other in (f"{p}-{e}ep", "random") if f"{p}-{e}ep" in runs]
        if control:
            comparisons[f"{task}/fixed batches"] = [
                _difference(compare_records([runs[a][task], runs[b][task]])) for a, b in control]
    summary = ("accuracy", "accuracy_std", "macro_f1", "macro_f1_std")
    return {
        "settings": settings, "machine": machine,
        "runs": {name: {**{k: v for k, v in run.items() if k not in TASKS},
                        **{task: {m: run[task][m] for m in summary} for task in TASKS}}
                 for name, run in runs.items()},
        "per_fold": {name: {task: run[task]["per_fold"] for task in TASKS} for name, run in runs.items()},
        "comparisons": comparisons, "total_min": total_min,
    }


def _parse_reuse(items: list[str], parser) -> dict[tuple[str, int], str]:
    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        pairs, colon, epochs = key.partition(":")
        if not sep or not colon or not epochs.isdigit() or not Path(path).is_file():
            parser.error(f"--reuse {item!r}: expected PAIRS:EPOCHS=MODEL with an existing model.pt")
        out[(pairs, int(epochs))] = path
    return out


def _reused(path: str, cfg) -> tuple[str, list[dict]]:
    """The checkpoint and loss history of a finished pretraining, refused unless its recorded
    config has every setting of ``cfg`` that shapes the run."""
    from ultrasound.checkpoint import load_state

    state = load_state(Path(path).read_bytes(), path)
    saved, wanted = state.get("config") or {}, cfg.to_dict()
    differ = {k: (saved.get(k), wanted[k]) for k in CONFIG_KEYS if saved.get(k) != wanted[k]}
    if differ or state.get("labelled_video_ids"):
        raise SystemExit(f"--reuse {path}: not a label-free run of these settings (saved, wanted): {differ}")
    return path, list(state.get("history") or [])


def _ingest_severity(pocus: Path, storage) -> None:
    """POCUS again under SEVERITY_URI, labelled with the lung severity score (``grade0``-``grade3``);
    videos without a score are left out of this copy."""
    from cluster.ingest import ingest_videos
    from ultrasound.manifest import parse_pocus

    records, _, findings = parse_pocus(pocus)
    with open(pocus / "dataset_metadata.csv", newline="", encoding="utf-8") as handle:
        score = {row["Filename"].strip(): row[SEVERITY_COLUMN].strip() for row in csv.DictReader(handle)}
    graded = [dataclasses.replace(r, label=f"grade{score[r.video_id]}") for r in records
              if score.get(r.video_id, "").isdigit()]
    ingest_videos(graded, [], pocus, SEVERITY_URI, findings, source_format="pocus", storage=storage)


def effective_rank(checkpoint: str, frames, args) -> float:
    """exp(entropy) of the normalised singular values of the centred frozen features of
    ``frames`` (random init: BatchNorm statistics re-estimated on them first)."""
    import numpy as np

    feats = frozen_features(checkpoint, frames.images, args.image_size, args.channels).astype(np.float64)
    singular = np.linalg.svd(feats - feats.mean(0), compute_uv=False)
    p = singular / singular.sum()
    p = p[p > 0]
    return round(float(np.exp(-(p * np.log(p)).sum())), 2)


def _difference(comparison: dict) -> dict:
    """The a - b rows of a two-arm comparison, keyed by metric."""
    rows = {d["metric"]: d for d in comparison["differences"]}
    first = next(iter(rows.values()))
    return {"a": first["a"], "b": first["b"], "pairs": comparison["pairs"],
            **{m: {k: rows[m][k] for k in ("mean", "low", "high", "p_sign", "excludes_zero")}
               for m in ("accuracy", "macro_f1")}}



def markdown_table(report: dict) -> str:
    s = report["settings"]
    lines = [f"Label-free pretraining budgets, {s['image_size']} px x {s['channels']}, batch {s['batch_videos']} "
             f"videos ({s['steps_per_epoch']} steps an epoch), lr {s['lr']} cosine; linear probe, "
             f"{s['folds']} folds by patient x split seeds {s['split_seeds']}; diagnosis: {s['diagnosis_videos']} "
             f"videos / {s['diagnosis_frames']} frames, severity: {s['severity_videos']} videos / "
             f"{s['severity_frames']} frames; {report['machine']}; total {report['total_min']} min", "",
             "| run | steps | loss first -> last | diagnosis acc | diagnosis macro-F1 | severity acc | "
             "severity macro-F1 | effective rank |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        loss = f"{r['loss_curve'][0]:.3f} -> {r['loss_curve'][-1]:.3f}" if r["loss_curve"] else "-"
        cells = [f"{r[t][m]:.3f} ± {r[t][m + '_std']:.3f}" for t in ("diagnosis", "severity")
                 for m in ("accuracy", "macro_f1")]
        lines.append(f"| {name} | {r['steps']} | {loss} | " + " | ".join(cells) + f" | {r['effective_rank']:.1f} |")
    for title, rows in report["comparisons"].items():
        lines += ["", f"Paired differences, {title} ({rows[0]['pairs']} pairs, 95% bootstrap CI, sign test):", "",
                  "| a - b | accuracy | macro-F1 |", "|---|---|---|"]
        for d in rows:
            cells = [difference_cell(d[m]) for m in ("accuracy", "macro_f1")]
            lines.append(f"| {d['a']} - {d['b']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, png: Path) -> None:
    """Left: loss per step of every run. Middle: macro-F1 minus random (paired 95% CI) against
    pretraining steps, both tasks. Right: effective rank of the features against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s, runs = report["settings"], report["runs"]
    fig, (loss_ax, probe_ax, rank_ax) = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, r in runs.items():
        if r["loss_curve"]:
            x = np.arange(1, len(r["loss_curve"]) + 1) * s["steps_per_epoch"]
            style = ":" if r.get("fixed_batches") else "-" if r["pairs"] == s["pairs"][0] else "--"
            loss_ax.plot(x, r["loss_curve"], lw=1.2, ls=style, label=name)
    loss_ax.set_xscale("log")
    loss_ax.set_xlabel("optimiser steps")
    loss_ax.set_ylabel("NT-Xent loss (epoch mean)")
    loss_ax.set_title("Pretraining loss")
    loss_ax.legend(fontsize=7)
    for title, rows in report["comparisons"].items():
        against_random = [d for d in rows if d["b"] == "random"]
        steps = np.array([runs[d["a"]]["steps"] for d in against_random])
        mean = np.array([d["macro_f1"]["mean"] for d in against_random])
        err = np.array([[d["macro_f1"]["mean"] - d["macro_f1"]["low"] for d in against_random],
                        [d["macro_f1"]["high"] - d["macro_f1"]["mean"] for d in against_random]])
        fixed = title.endswith("fixed batches")
        probe_ax.errorbar(steps * (1.08 if fixed else 1.0), mean, yerr=err, fmt="x" if fixed else "o-",
                          capsize=3, label=title + (" (same batches every epoch)" if fixed else ""))
    probe_ax.axhline(0, color="grey", lw=1)
    probe_ax.set_xscale("log")
    probe_ax.set_xlabel("optimiser steps")
    probe_ax.set_ylabel("linear-probe macro-F1 minus random init")
    probe_ax.set_title(f"Paired difference to random (95% CI, {len(s['split_seeds'])} seeds x {s['folds']} folds)")
    probe_ax.legend(fontsize=7)
    for pairs in s["pairs"]:
        named = [r for r in runs.values() if r["pairs"] == pairs and not r.get("fixed_batches")]
        rank_ax.plot([r["steps"] for r in named], [r["effective_rank"] for r in named], "o-", label=pairs)
    for name, r in runs.items():
        if r.get("fixed_batches"):
            rank_ax.plot([r["steps"]], [r["effective_rank"]], "x", ms=9, label=f"{name} (same batches)")
    rank_ax.axhline(runs["random"]["effective_rank"], color="grey", ls="--", lw=1, label="random init")
    rank_ax.set_xscale("log")
    rank_ax.set_xlabel("optimiser steps")
    rank_ax.set_ylabel("effective rank of the 512-d features")
    rank_ax.set_ylim(bottom=0)
    rank_ax.set_title("Feature collapse check")
    rank_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
