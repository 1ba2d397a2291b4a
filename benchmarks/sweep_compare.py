"""Optuna TPE + ASHA vs random search without early stopping, same trial budget.

The sweep is tuning/specs/tsal.yaml's (TSAL confidence threshold, MLM correlation weight,
per-round budget; simulate in embeddings mode; metric: AULC up to 30% labelled). Both arms run
the same number of trials on the same embeddings (computed once); each arm is repeated with
``--repeats`` searcher seeds. Reported per run: the best AULC among trials that ran to the
budget, the compute spent in trial-rounds (active-learning rounds computed, summed over trials
and seeds: what a round costs is the same whichever the arm), trials stopped early, wall time.

    python benchmarks/sweep_compare.py                       # phantom data made here
    python benchmarks/sweep_compare.py --data s3://b/pocus   # an ingested data set

Target (issue 5): TPE + ASHA reaches an equal or better best metric with <= 0.6 of the compute.
Prints a markdown table; results JSON next to the sweeps (``--work``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = {
    "tpe+asha": {"searcher": {"name": "tpe"}, "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 3}},
    "random": {"searcher": {"name": "random"}, "scheduler": "none"},
}


def make_phantom(work: Path, videos: int, frames: int, size: int) -> str:
    """Phantom clips made and ingested under ``work`` (once); returns the data set path."""
    from ultrasound import phantom

    data = work / "data"
    if (data / "manifest.parquet").is_file():
        return str(data)
    clips = work / "clips"
    phantom.make_dataset(clips, videos, seed=11, n_frames=frames, size=size)
    subprocess.run([sys.executable, "-m", "jobs.cli", "ingest", str(clips), "--manifest", str(clips / "manifest.csv"),
                    "--labels", ",".join(phantom.FINDINGS), "--to", str(data)], check=True, cwd=REPO)
    return str(data)


def rf_suffix(arm: str, args) -> str:
    """ASHA's settings when they are not the spec's: the random arm has no scheduler, so its
    trials (and folder) are the same whatever these are."""
    if arm != "tpe+asha":
        return ""
    return (f"-rf{args.reduction_factor:g}" if args.reduction_factor != 3 else "") + \
        (f"-rp{args.report_points}" if args.report_points else "")


def run_name(arm: str, args, seed: int) -> str:
    """One folder per (budget, arm, seed), and ASHA's reduction factor when it is not 3: a run
    already there is resumed (a finished one just gives its results)."""
    return f"trials{args.trials}-seed{seed}-{arm.replace('+', '-')}{rf_suffix(arm, args)}"


def spec_for(arm: str, args, data: str, cache: str, seed: int):
    import yaml

    from tuning.spec import parse_spec

    raw = yaml.safe_load((REPO / "tuning" / "specs" / "tsal.yaml").read_text())
    raw["fixed"].update({"data": data, "cache": cache, "size": args.size, "channels": 1, "fps": args.fps,
                         "max_per_video": args.max_per_video, "seeds": args.seeds})
    raw.update(json.loads(json.dumps(ARMS[arm])))
    if arm == "tpe+asha":
        raw["scheduler"]["reduction_factor"] = args.reduction_factor
        if args.report_points:
            raw["fixed"]["report_points"] = args.report_points
    raw.update({"name": f"bench-{args.trials}-{arm.replace('+', '-')}-{seed}{rf_suffix(arm, args)}",
                "trials": args.trials, "seed": seed})
    if arm == "tpe+asha":
        raw["searcher"]["startup_trials"] = args.startup
    return parse_spec(raw)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="an ingested data set (default: phantom clips made here)")
    parser.add_argument("--work", default="/tmp/sonoray-sweep-bench", help="sweeps, data and results go here")
    parser.add_argument("--trials", type=int, default=16, help="trials per sweep (both arms)")
    parser.add_argument("--repeats", type=int, default=3, help="searcher seeds per arm")
    parser.add_argument("--startup", type=int, default=5, help="TPE's random start-up trials")
    parser.add_argument("--seeds", type=int, default=2, help="simulation seeds per trial")
    parser.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA's reduction factor (default 3)")
    parser.add_argument("--report-points", type=int, default=None,
                        help="budget points each TPE+ASHA trial reports at, i.e. ASHA's steps (default: the spec's 5)")
    parser.add_argument("--concurrency", type=int, default=None, help="trials at once (default: from CPUs)")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--phantom-videos", type=int, default=32)
    parser.add_argument("--phantom-frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=64, help="trunk input size")
    parser.add_argument("--fps", type=float, default=0, help="frames per second sampled (0: all)")
    parser.add_argument("--max-per-video", type=int, default=8)
    args = parser.parse_args()

    from cluster.runtime import connect
    from cluster.storage import Storage
    from tuning.sweep import run_sweep

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(connect(num_cpus=args.num_cpus), file=sys.stderr)
    data = args.data or make_phantom(work, args.phantom_videos, args.phantom_frames, 128)
    cache = str(work / "cache")
    storage = Storage()
    runs = []
    for seed in range(args.repeats):
        for arm in ARMS:
            spec = spec_for(arm, args, data, cache, seed)
            out = work / run_name(arm, args, seed)
            resume = (out / "sweep.json").is_file()
            started = time.perf_counter()
            summary = run_sweep(spec, str(out), concurrency=args.concurrency, resume=resume, storage=storage).summary
            runs.append({
                "arm": arm, "seed": seed, "best": summary["best_metric"], "compute": summary["compute"]["spent"],
                "completed": summary["completed"], "stopped": summary["stopped"], "errored": summary["errored"],
                "trials": summary["trials"], "seconds": round(time.perf_counter() - started, 1),
                "best_config": summary["best_config"],
            })
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    (work / f"results-trials{args.trials}-rf{args.reduction_factor:g}-rp{args.report_points or 'spec'}.json").write_text(json.dumps(runs, indent=1))
    print(table(runs, args))
    return 0


def table(runs: list[dict], args) -> str:
    lines = [f"Sweep of tuning/specs/tsal.yaml (confidence, correlation_weight, per_round), {args.trials} trials "
             f"per sweep, {args.seeds} simulation seeds per trial, {args.repeats} searcher seeds per arm, ASHA "
             f"reduction factor {args.reduction_factor:g}, {args.report_points or 5} report points "
             "per TPE+ASHA trial.", "",
             "| arm | searcher seed | best AULC | compute (trial-rounds) | stopped early | wall (s) |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        best = f"{r['best']:.4f}" if r["best"] is not None else "-"
        lines.append(f"| {r['arm']} | {r['seed']} | {best} | {r['compute']:.0f} | {r['stopped']}/{r['trials']} | "
                     f"{r['seconds']:.0f} |")
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    mean = {arm: (statistics.mean(r["best"] for r in rs if r["best"] is not None),
                  statistics.mean(r["compute"] for r in rs)) for arm, rs in by_arm.items()}
    for arm, (best, compute) in mean.items():
        lines.append(f"| **{arm} mean** | | {best:.4f} | {compute:.1f} | | |")
    asha, rand = mean["tpe+asha"], mean["random"]
    pairs = [(a, b) for a in by_arm["tpe+asha"] for b in by_arm["random"] if a["seed"] == b["seed"]]
    wins = sum(a["best"] is not None and b["best"] is not None and a["best"] >= b["best"] - 1e-12 for a, b in pairs)
    lines += ["", f"Compute ratio (TPE+ASHA / random): {asha[1] / rand[1]:.2f} (target <= 0.6); "
              f"best AULC {asha[0]:.4f} vs {rand[0]:.4f} (difference {asha[0] - rand[0]:+.4f}); "
              f"TPE+ASHA equal or better in {wins}/{len(pairs)} paired runs."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
