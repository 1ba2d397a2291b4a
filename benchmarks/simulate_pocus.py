"""Labelling-budget simulation benchmark on the real POCUS videos (six findings), embeddings mode.

Steps (each timed; the embeddings are computed once and cached, outside every other timing):

1. ingest POCUS into a local folder and embed its frames (3 fps, at most 30 per video) with a
   frozen ResNet-18: random init by default, or ``--init`` a USCL checkpoint;
2. quality: 6 strategies x 5 seeds, 5% initial + 5% per round up to 50% labelled; the table,
   the learning curves (PNG) and the two targets: TSAL above random on AULC beyond the seed
   spread, and TSAL at 20% labelled >= 95% of the full-data mAP. Run on the 512-d embeddings
   and on their top-32 principal components (``--quality-dims``);
3. speed: the same experiments (projection ``--fast-dims``, 32 by default: the head fit is most
   of a round) with all CPUs (Ray tasks) vs one after the other in this process;
   experiments per minute of each, their ratio (target >= 1.7 on 2 CPUs) and the cost per
   experiment-round;
4. scale: about 1,000 experiments x 10 rounds (the 6 strategies x ceil(1000 / 6) seeds, the
   ``--fast-dims`` projection) with all CPUs; target <= 30 minutes on a 2-CPU machine.

The machine's load average is recorded before each timed step: on a shared machine the timings
only mean something when it is near the CPU count.

Usage: python benchmarks/simulate_pocus.py [--pocus DIR] [--work DIR] [--init CKPT] [--skip-scale]
Writes benchmarks/results/simulate_pocus.json (merged with the steps of earlier runs that this one
skipped) and the curves PNGs, prints the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
STRATEGIES = ("tsal", "random", "least_margin", "mean_entropy", "lci", "adaptive")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def dims_list(text: str) -> list[int | None]:
    return [None if item.strip() == "full" else int(item) for item in text.split(",") if item.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pocus", type=Path, default=REPO.parent / "shared" / "data" / "pocus")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sonoray-bench-simulate"))
    parser.add_argument("--init", default=None, help="USCL checkpoint (model.pt) for the trunk")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=9, help="quality run: 5%% + 9 x 5%% = 50%% labelled")
    parser.add_argument("--scale-experiments", type=int, default=1000)
    parser.add_argument("--scale-rounds", type=int, default=10)
    parser.add_argument("--quality-dims", type=dims_list, default=[None, 32],
                        help="quality runs: embedding projections, 'full' = none (default full,32)")
    parser.add_argument("--fast-dims", type=lambda v: None if v == "full" else int(v), default=32,
                        help="projection used by the speed and scale runs (default 32; 'full' = none)")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="delete earlier results under --work first")
    args = parser.parse_args()

    from cluster.dataset import load_dataset
    from cluster.embeddings import SampleSpec, load_samples
    from cluster.ingest import ingest_videos
    from cluster.runtime import cluster_cpus, connect
    from cluster.simulate import SimulationConfig, simulate_table
    from cluster.storage import Storage, parse_uri
    from ultrasound.manifest import parse_pocus

    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    storage = Storage()
    report: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "load_average_start": load_average()}}

    def note(message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    data_uri = str(args.work / "pocus")
    records, skipped, findings = parse_pocus(args.pocus)
    ingest_videos(records, skipped, args.pocus, data_uri, findings, source_format="pocus", storage=storage)
    data = load_dataset(data_uri, storage)
    note(connect())
    cpus = int(cluster_cpus())
    report["machine"]["ray_cpus"] = cpus

    spec = SampleSpec(fps=3.0, max_per_video=30, size=args.size, channels=3, init=args.init)
    started = time.perf_counter()
    table, cached = load_samples(data, spec, parse_uri(str(args.work / "cache")), storage, note)
    report["embeddings"] = {"frames": len(table), "videos": int(len(set(table.video_id.tolist()))),
                            "findings": list(table.findings), "positives": table.labels.sum(axis=0).tolist(),
                            "trunk": f"USCL checkpoint {args.init}" if args.init else "ResNet-18, random init (seed 0)",
                            "size": args.size, "seconds": round(time.perf_counter() - started, 1),
                            "from_cache": cached}
    note(f"embeddings: {report['embeddings']}")

    # 2. quality ------------------------------------------------------------------------------
    report["quality"] = {}
    for dims in args.quality_dims:
        name = "full" if dims is None else f"pca{dims}"
        quality = SimulationConfig(strategies=STRATEGIES, seeds=args.seeds, initial=0.05, per_round=0.05,
                                   rounds=args.rounds, embedding_dims=dims)
        started = time.perf_counter()
        result = simulate_table(table, quality, str(args.work / f"quality-{name}"), storage, on_progress=note)
        seconds = time.perf_counter() - started
        summary = result.report["summary"]
        RESULTS.mkdir(parents=True, exist_ok=True)
        png_name = "simulate_pocus_curves.png" if dims is None else f"simulate_pocus_curves_{name}.png"
        (RESULTS / png_name).write_bytes(storage.read_bytes(parse_uri(result.report["png_uri"])))
        s = summary["strategies"]
        tsal, rand = s["tsal"], s["random"]
        paired = [tsal["aulc_per_seed"][k] - rand["aulc_per_seed"][k] for k in tsal["aulc_per_seed"]]
        mean_d = sum(paired) / len(paired)
        sd_d = math.sqrt(sum((d - mean_d) ** 2 for d in paired) / (len(paired) - 1)) if len(paired) > 1 else 0.0
        spread = max(tsal["aulc_std"], rand["aulc_std"])
        share20 = tsal["map_share_at"].get("0.2")
        report["quality"][name] = {
            "embedding_dims": dims, "png": f"benchmarks/results/{png_name}", "config": quality.to_dict(),
            "experiments": result.experiments, "rounds_computed": result.rounds,
            "rounds_resumed": result.resumed_rounds, "seconds": round(seconds, 1), "range": summary["range"],
            "table_markdown": result.report["markdown"], "strategies": s,
            "targets": {
                "tsal_aulc_minus_random": round(tsal["aulc"] - rand["aulc"], 4),
                "seed_spread_sd_max": round(spread, 4),
                "paired_difference_mean_sd": [round(mean_d, 4), round(sd_d, 4)],
                "tsal_wins_seeds": sum(d > 0 for d in paired),
                "tsal_above_random_beyond_spread": bool(tsal["aulc"] - rand["aulc"] > spread),
                "tsal_map_share_at_20pct": share20,
                "tsal_20pct_reaches_95pct_of_full": bool(share20 is not None and share20 >= 0.95),
            },
        }
        note(f"quality {name}: {report['quality'][name]['targets']}")
        print(result.report["markdown"], file=sys.stderr)
    fast = SimulationConfig(strategies=STRATEGIES, seeds=args.seeds, initial=0.05, per_round=0.05,
                            rounds=args.rounds, embedding_dims=args.fast_dims)

    # 3. speed: all CPUs vs serial, same experiments ------------------------------------------------
    if not args.skip_speed:
        runs = {}
        for executor in ("ray", "serial"):
            out = args.work / f"speed-{executor}"
            shutil.rmtree(out, ignore_errors=True)
            load_before = load_average()
            started = time.perf_counter()
            r = simulate_table(table, fast, str(out), storage, executor=executor, report=False, on_progress=note)
            seconds = time.perf_counter() - started
            assert not r.failed, r.failed
            runs[executor] = {"seconds": round(seconds, 1), "experiments": r.experiments, "rounds": r.rounds,
                              "experiments_per_min": round(60 * r.experiments / seconds, 2),
                              "seconds_per_experiment_round": round(seconds / r.rounds, 4),
                              "cpu_seconds_per_experiment_round": round(seconds * (cpus if executor == "ray" else 1)
                                                                        / r.rounds, 4),
                              "load_average_before": load_before}
            note(f"speed {executor}: {runs[executor]}")
        ratio = runs["ray"]["experiments_per_min"] / runs["serial"]["experiments_per_min"]
        report["speed"] = {**runs, "embedding_dims": args.fast_dims, "ratio": round(ratio, 2), "target_ratio": 1.7,
                           "met": bool(ratio >= 1.7)}

    # 4. scale --------------------------------------------------------------------------------------
    if not args.skip_scale:
        seeds = math.ceil(args.scale_experiments / len(STRATEGIES))
        scale = SimulationConfig(strategies=STRATEGIES, seeds=seeds, initial=0.05, per_round=0.045,
                                 rounds=args.scale_rounds, embedding_dims=args.fast_dims)
        out = args.work / "scale"
        shutil.rmtree(out, ignore_errors=True)
        load_before = load_average()
        started = time.perf_counter()
        r = simulate_table(table, scale, str(out), storage, report=False, on_progress=note, progress_every_s=30)
        seconds = time.perf_counter() - started
        started_report = time.perf_counter()
        from cluster.simulate import build_report

        built = build_report(storage, str(out))
        report["scale"] = {"experiments": r.experiments, "embedding_dims": args.fast_dims, "rounds_per_experiment": args.scale_rounds,
                           "rounds_computed": r.rounds, "failed": len(r.failed), "seconds": round(seconds, 1),
                           "minutes": round(seconds / 60, 2), "target_minutes": 30, "met": bool(seconds <= 1800),
                           "experiments_per_min": round(60 * r.experiments / seconds, 1),
                           "seconds_per_experiment_round": round(seconds / max(r.rounds, 1), 4),
                           "report_seconds": round(time.perf_counter() - started_report, 1),
                           "load_average_before": load_before, "load_average_after": load_average(),
                           "aulc": {k: round(v["aulc"], 4) for k, v in built["summary"]["strategies"].items()}}
        note(f"scale: {report['scale']}")

    report["machine"]["load_average_end"] = load_average()
    target = RESULTS / "simulate_pocus.json"
    merged = json.loads(target.read_text()) if target.exists() else {}
    for key, value in report.items():  # steps skipped this time keep their earlier results
        if key == "quality" and isinstance(merged.get(key), dict) and "targets" not in merged[key]:
            merged[key].update(value)
        else:
            merged[key] = value
    target.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    print(json.dumps(merged, indent=2, default=str))


if __name__ == "__main__":
    main()
