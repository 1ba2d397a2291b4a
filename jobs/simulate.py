"""`sonoray simulate` and `sonoray report`: labelling-budget simulations and their report.

`simulate` runs (strategy x seed) active-learning experiments on Ray against a simulated
oracle, writing every completed round as Parquet under --out, then builds the report (learning
curves PNG, markdown + JSON table). Running the same command again skips finished experiments
and resumes interrupted ones. `report URI` rebuilds the report from the Parquet files alone.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from jobs.common import (
    add_config_args,
    add_embedding_args,
    add_job_args,
    add_json_arg,
    add_settings_flags,
    add_storage_args,
    connect_ray,
    sample_spec_from,
    settings_from_flags,
    storage_from,
    tracker_from,
)
from jobs.output import UserError, emit_json, human_stream, progress

# SimulationConfig fields that are flags too (flags left unset keep the YAML's or the default value)
CONFIG_FLAGS = ("strategies", "initial", "per_round", "rounds", "seeds", "mode", "labels", "noise", "cost_unit",
                "query_unit", "max_machine_per_round", "confidence", "audit", "audit_cost", "correlation_weight",
                "machine_weight", "test_fraction", "embedding_dims")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="labelling-budget simulations: active-learning experiments on Ray",
        description="Run every (strategy, seed) active-learning experiment on the data set at --data "
        "against a simulated oracle and write rounds, reference and report under --out. 'tsal' = "
        "multi-label margin queries + confidence-validated machine labels + audits; mlm (its query "
        "stream alone) and self_training (random queries + its machine stream) isolate the two streams; "
        "random, least_margin, mean_entropy, lci, adaptive are single-stream baselines. Settings come "
        "from the defaults, then --config FILE.yaml (keys = the settings' names), then --set KEY=VALUE, then the flags.",
    )
    p.add_argument("--data", required=True, metavar="URI", help="data set written by `sonoray ingest`")
    p.add_argument("--out", required=True, metavar="URI", help="results folder (local path or s3://bucket/prefix)")
    add_config_args(p, "simulation settings")
    from ultrasound.active.sim_config import MODES, SimulationConfig

    add_settings_flags(p.add_argument_group("simulation settings"), SimulationConfig, CONFIG_FLAGS,
                       choices={"mode": list(MODES), "cost_unit": ["frame", "video"], "query_unit": ["frame", "video"]},
                       metavars={"max_machine_per_round": "N|budget|none", "strategies": "KIND,...",
                                 "labels": "COL,..."})
    add_embedding_args(p, cache_default="<out>/cache")
    run = p.add_argument_group("execution")
    run.add_argument("--cpus-per-task", type=float, default=1.0,
                     help="CPUs per Ray task, one batch of experiments (1: a batch per CPU)")
    run.add_argument("--gpus-per-task", type=float, default=0.0, help="GPUs per Ray task (0)")
    run.add_argument("--batch-size", type=int, default=None,
                     help="experiments run together in one task, their heads fitted as one batched solve "
                     "(default: about four batches per parallel task, at most 64; 1 in finetune mode)")
    run.add_argument("--max-retries", type=int, default=3, help="retries of a crashed task (3)")
    run.add_argument("--serial", action="store_true", help="run the experiments in this process")
    add_job_args(p, tracker=True)
    p.set_defaults(func=run_simulate)

    r = subparsers.add_parser(
        "report",
        help="rebuild a simulation's report from its Parquet files",
        description="Read every completed round under URI/experiments and the full-data references, "
        "and write URI/report/{learning_curves.png,report.md,report.json}.",
    )
    r.add_argument("uri", metavar="URI", help="the --out of `sonoray simulate`")
    add_storage_args(r)
    add_json_arg(r)
    r.set_defaults(func=run_report)


def config_from_args(args: argparse.Namespace, storage) -> Any:
    """Defaults, then the YAML file, then --set, then the flags that were given."""
    from cluster.job_config import ConfigError, layered
    from cluster.simulate import SimulationConfig

    try:
        values = layered(args.config, getattr(args, "set_items", None),
                         settings_from_flags(args, CONFIG_FLAGS),
                         storage=storage, what="simulation settings")
    except ConfigError as err:
        raise UserError(str(err)) from err
    try:
        return SimulationConfig.from_mapping(values)
    except (TypeError, ValueError) as err:
        where = f" in {args.config}" if args.config else ""
        raise UserError(f"bad simulation settings{where}: {err}") from err


def run_simulate(args: argparse.Namespace) -> int:
    from cluster.simulate import simulate

    storage = storage_from(args)
    config = config_from_args(args, storage)
    spec = sample_spec_from(args)
    tracker = tracker_from(args, "simulate")
    progress(connect_ray(args))
    from cluster.tracking import TrackedRun

    with TrackedRun(tracker, {"job": "simulate", "data": args.data, **config.to_dict()}) as tracked:
        try:
            result = simulate(args.data, config, args.out, storage, spec, cache_uri=args.cache,
                              on_progress=progress, executor="serial" if args.serial else "ray",
                              cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task,
                              max_retries=args.max_retries, batch_size=args.batch_size)
        except ValueError as err:
            raise UserError(str(err)) from err
        for name, entry in result.as_json()["strategies"].items():  # one metric per strategy and number
            tracked.log({f"{name}.{key}": value for key, value in entry.items()})
        if result.report is not None:
            tracked.attach_paths([result.report["report_uri"], result.report["png_uri"]])
    for item in result.failed:
        progress(f"  failed {item['experiment_id']}: {item['error']}")
    if result.report is not None:
        print(result.report["markdown"], file=human_stream(args.json))
    if args.json:
        emit_json(result.as_json())
    if result.failed:
        progress(f"simulate: {len(result.failed)} experiments failed; run the same command again to resume them")
        return 1
    return 0


def run_report(args: argparse.Namespace) -> int:
    from cluster.simulate import build_report

    report = build_report(storage_from(args), args.uri, on_progress=progress)
    print(report["markdown"], file=human_stream(args.json))
    if args.json:
        emit_json(report_json(report))
    return 0


def report_json(report: dict) -> dict:
    from ultrasound.al_report import strategy_entries

    return {"experiments": report["experiments"], "rounds": report["rounds"], "report": report["report_uri"],
            "strategies": strategy_entries(report["summary"])}


def demo_stage(data_uri: str, work_uri: str, *, strategies: tuple[str, ...] = ("tsal", "random", "least_margin"),
               seeds: int = 2, rounds: int = 4, initial: float = 0.1, per_round: float = 0.1, size: int = 64,
               fps: float | None = 3.0, max_per_video: int | None = 12, on_progress=progress) -> dict:
    """The demo's simulation: embeddings of the phantom clips (random-init trunk) and a small
    simulation (3 strategies x 2 seeds x 4 rounds by default) with its report under
    ``<work_uri>/simulate``. Returns the summary (``--json`` object plus the table)."""
    from cluster.embeddings import SampleSpec
    from cluster.runtime import connect
    from cluster.simulate import SimulationConfig, simulate
    from cluster.storage import Storage, StorageConfig, parse_uri

    connect()
    started = time.perf_counter()
    out = parse_uri(work_uri).join("simulate")
    config = SimulationConfig(strategies=tuple(strategies), seeds=seeds, rounds=rounds, initial=initial,
                              per_round=per_round)
    spec = SampleSpec(fps=fps, max_per_video=max_per_video, size=size, channels=1)
    result = simulate(data_uri, config, out.uri, Storage(StorageConfig.from_env()), spec, on_progress=on_progress)
    summary = result.as_json()
    summary["table"] = result.report["markdown"] if result.report else ""
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary
