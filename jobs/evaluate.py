"""`sonoray evaluate`: does a pretrained backbone help classification? K-fold cross-validation.

USCL's downstream protocol (Chen et al., MICCAI 2021) on any ingested data set: frames sampled
as the POCUS authors did (3 per second, at most 30 per video), folds split by patient where known
else by video, a validation split carved from the training folds for model selection, a linear
probe on frozen features or fine-tuning of the last residual block. A checkpoint pretrained with
the labels of a test fold's videos is refused.
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from jobs.common import (
    add_flag_config_args,
    add_format_args,
    add_job_args,
    add_sampling_args,
    apply_flag_config,
    connect_ray,
    csv_list,
    storage_from,
)
from jobs.output import UserError, emit_json, human_stream, progress

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="cross-validate a pretrained backbone (linear probe or fine-tuning)",
        description="K-fold cross-validation of a class label with a pretrained (or random) "
        "backbone: frames at 3 per second (at most 30 per video), folds by patient where known "
        "else by video, model selection on a validation split of the training folds.",
    )
    p.add_argument("--data", default=None, metavar="URI", help="data set root written by `sonoray ingest`")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="model.pt of `sonoray pretrain` (local or s3://), any backbone state dict, "
                   "or 'random'; '{fold}' in it is replaced by the fold index (one checkpoint per fold)")
    p.add_argument("--mode", choices=["linear", "finetune"], default="linear",
                   help="linear probe on frozen features (default) or fine-tune the last block")
    p.add_argument("--folds", type=int, default=5, help="folds (default 5)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fold split (default 0)")
    p.add_argument("--split-seeds", default=None, metavar="S1,S2,...",
                   help="cross-validate once per split seed (e.g. 0,1,2: 3 x --folds paired scores)")
    p.add_argument("--out", default=None, metavar="URI",
                   help="write evaluation.json (every split seed and fold's scores and test videos) there")
    p.add_argument("--name", default=None, help="the arm's name in evaluation.json (default: --out's last part)")
    p.add_argument("--compare", nargs="+", default=None, metavar="URI",
                   help="compare evaluations written with --out on the same splits instead of evaluating: "
                   "paired per-fold differences (earlier minus later) with 95%% bootstrap CIs and sign tests")
    p.add_argument("--classes", default=None, metavar="A,B,...", help="classes to keep (default: all labels)")
    p.add_argument("--probe", default=None, help="keep videos of this probe only, e.g. convex")
    add_format_args(p, image_size=224, channels=1, source="checkpoint")
    add_sampling_args(p, fps=3.0, max_per_video=30)  # the POCUS authors' sampling
    p.add_argument("--epochs", type=int, default=100, help="fine-tuning epochs (default 100, the authors')")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (default 0.01, the authors')")
    p.add_argument("--gpu", action="store_true", help="compute features / fine-tune on this machine's GPU")
    add_job_args(p)
    add_flag_config_args(p, "evaluation settings")
    p.set_defaults(func=run)


def print_table(summary: dict, out: TextIO = sys.stdout) -> None:
    """The human-readable report: per fold, mean +- std, per class, summed confusion."""
    mode = {"linear": "linear probe", "finetune": "fine-tuned last block"}[summary["mode"]]
    print(f"evaluate: {summary['checkpoint']} ({mode}), {summary['folds']} folds, "
          f"{summary['videos']} videos, {summary['frames']} frames", file=out)
    print(f"{'fold':>6} {'accuracy':>9} {'macro-F1':>9} {'video acc':>10} {'videos':>7}", file=out)
    for i, r in enumerate(summary["fold_reports"]):
        print(f"{i:>6} {r['accuracy']:>9.3f} {r['macro_f1']:>9.3f} {r['video_accuracy']:>10.3f} "
              f"{r['test_videos']:>7}", file=out)
    print(f"{'mean':>6} {summary['accuracy']:>9.3f} {summary['macro_f1']:>9.3f} "
          f"{summary['video_accuracy']:>10.3f}", file=out)
    print(f"{'std':>6} {summary['accuracy_std']:>9.3f} {summary['macro_f1_std']:>9.3f} "
          f"{summary['video_accuracy_std']:>10.3f}", file=out)
    width = max(len(c) for c in summary["classes"]) + 2
    print(f"{'class':<{width}} {'precision':>9} {'recall':>7} {'F1':>6} {'frames':>7}", file=out)
    for name, m in summary["per_class"].items():
        print(f"{name:<{width}} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} "
              f"{m['support']:>7}", file=out)
    print("confusion, summed over folds (rows: true, columns: predicted):", file=out)
    print(" " * width + "".join(f"{c[:8]:>9}" for c in summary["classes"]), file=out)
    for name, row in zip(summary["classes"], summary["confusion"]):
        print(f"{name:<{width}}" + "".join(f"{v:>9}" for v in row), file=out)


def json_result(summary: dict) -> dict:
    keys = ("folds", "accuracy", "accuracy_std", "macro_f1", "macro_f1_std", "classes",
            "confusion", "per_class", "video_accuracy", "video_accuracy_std", "mode",
            "checkpoint", "videos", "frames", "test_folds", "validation_folds")
    return {k: summary[k] for k in keys}


def run(args: argparse.Namespace) -> int:
    apply_flag_config(args, storage_from(args))
    if args.compare:
        return run_compare(args)
    from cluster.evaluate import EVALUATION_FILE, EvaluationError, evaluate_summary, evaluation_record

    if not args.data or not args.checkpoint:
        raise UserError("evaluate needs --data and --checkpoint (or --compare URI URI ...)")
    if args.folds < 2:
        raise UserError(f"--folds must be >= 2, got {args.folds}")
    seeds = [args.split_seed]
    if args.split_seeds:
        try:
            seeds = [int(s) for s in csv_list(args.split_seeds)]
        except ValueError:
            raise UserError(f"--split-seeds: expected integers like 0,1,2, got {args.split_seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise UserError(f"--split-seeds: expected distinct integers, got {args.split_seeds!r}")
    # built again on purpose: --config / --set may have set endpoint_url, and the job must use it
    storage = storage_from(args)
    out = _out_location(args.out) if args.out else None
    progress(connect_ray(args))
    summaries, frames = [], None
    try:
        for seed in seeds:
            if len(seeds) > 1:
                progress(f"evaluate: split seed {seed} ({len(summaries) + 1}/{len(seeds)})")
            summary = evaluate_summary(
                args.data, args.checkpoint, mode=args.mode, folds=args.folds,
                split_seed=seed, classes=csv_list(args.classes), probe=args.probe,
                image_size=args.image_size, channels=args.channels, fps=args.fps,
                max_per_video=args.max_per_video, epochs=args.epochs, lr=args.lr,
                device="cuda" if args.gpu else "cpu", storage=storage, on_progress=progress,
                cache=not args.no_cache, frames=frames)
            frames = summary["eval_frames"]
            summaries.append(summary)
    except (EvaluationError, ValueError) as err:  # bad flags, a checkpoint that does not fit
        raise UserError(str(err)) from err
    human = human_stream(args.json)
    for summary in summaries:
        print_table(summary, human)
    record = evaluation_record(args.name or _default_name(args), summaries)
    if out is not None:
        import json

        target = out.join(EVALUATION_FILE)
        storage.check(out, create_bucket=True)
        storage.write_bytes(target, json.dumps(record, indent=1).encode())
        progress(f"evaluate: wrote {target.uri}")
    if args.json:
        result = json_result(summaries[0]) if len(summaries) == 1 else {}
        emit_json({**result, **{k: record[k] for k in ("name", "split_seeds", "per_fold")},
                   "overall": {k: v for k, v in record.items() if k.startswith(("accuracy", "macro_f1", "video_acc"))},
                   "out": out.join(EVALUATION_FILE).uri if out is not None else None})
    return 0


def _out_location(uri: str):
    from cluster.storage import parse_uri

    try:
        return parse_uri(uri)
    except ValueError as err:
        raise UserError(f"--out: {err}") from None


def _default_name(args: argparse.Namespace) -> str:
    if args.out:
        return args.out.rstrip("/").rsplit("/", 1)[-1]
    return "random" if args.checkpoint == "random" else args.checkpoint


def run_compare(args: argparse.Namespace) -> int:
    """``--compare``: paired differences between evaluations written with ``--out``."""
    import json

    from cluster.evaluate import EVALUATION_FILE, EvaluationError, compare_records

    storage = storage_from(args)
    records = []
    for uri in args.compare:
        location = _out_location(uri)
        if not location.key.endswith(".json"):
            location = location.join(EVALUATION_FILE)
        if not storage.exists(location):
            raise UserError(f"--compare: no evaluation at {location.uri} (write one with evaluate --out)")
        try:
            records.append(json.loads(storage.read_bytes(location)))
        except ValueError as err:
            raise UserError(f"--compare: {location.uri} is not an evaluation.json: {err}") from None
    try:
        comparison = compare_records(records)
    except EvaluationError as err:
        raise UserError(str(err)) from err
    print_comparison(comparison, human_stream(args.json))
    if args.json:
        emit_json(comparison)
    return 0


def print_comparison(comparison: dict, out: TextIO = sys.stdout) -> None:
    """Arms (mean +- std over every split seed x fold), then each pair's paired difference."""
    width = max(len(a["name"]) for a in comparison["arms"]) + 2
    print(f"{'arm':<{width}} {'accuracy':>16} {'macro-F1':>16}", file=out)
    for arm in comparison["arms"]:
        print(f"{arm['name']:<{width}} {arm['accuracy']:>8.3f} ± {arm['accuracy_std']:<5.3f} "
              f"{arm['macro_f1']:>8.3f} ± {arm['macro_f1_std']:<5.3f}", file=out)
    print(f"paired differences over {comparison['pairs']} (split seed, fold) pairs, "
          f"{comparison['level']:.0%} bootstrap CI, sign-test p:", file=out)
    for d in comparison["differences"]:
        if d["metric"] == "video_accuracy":
            continue
        mark = " *" if d["excludes_zero"] else ""
        print(f"  {d['a']} - {d['b']} {d['metric']:<9} {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
              f"wins {d['wins']}/{d['wins'] + d['losses'] + d['ties']} p {d['p_sign']:.3f}{mark}", file=out)
