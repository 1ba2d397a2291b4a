"""`sonoray sweep SPEC.yaml`: hyperparameter sweeps of pretrain / msml / simulate on Ray Tune.

The SPEC (tuning/spec.py; ready-made ones in tuning/specs/) names the job, its fixed arguments,
the search space, the metric, the searcher (Optuna TPE by default) and the scheduler (ASHA by
default). A bad SPEC fails before Ray starts. ``--resume`` continues a sweep whose driver died,
without re-running finished trials.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


from jobs.common import (
    add_json_arg,
    add_ray_args,
    add_storage_args,
    add_tracker_args,
    connect_ray,
    storage_from,
    tracker_from,
)
from jobs.output import UserError, emit_json, progress

SPECS_DIR = Path(__file__).resolve().parents[1] / "tuning" / "specs"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="hyperparameter sweep (Ray Tune + Optuna) of pretrain, msml or simulate",
        description="Run the sweep a SPEC.yaml describes: Optuna TPE (or random / grid) proposes "
        "trials, ASHA stops the bad ones early, every trial's config and metrics land in "
        "OUT/results with the best config as a YAML the job's --config accepts. Ready-made SPECs: "
        f"{', '.join(sorted(p.name for p in SPECS_DIR.glob('*.yaml')))} in tuning/specs/ "
        "(a bare name like 'tsal' picks one).",
    )
    p.add_argument("spec", metavar="SPEC.yaml", help="the sweep's SPEC file (or the name of a ready-made one)")
    p.add_argument("--data", metavar="URI", default=None,
                   help="the data set the job runs on (sets fixed.data; ready-made SPECs need it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a fixed argument of the SPEC (YAML value), e.g. --set size=64; repeatable")
    p.add_argument("--trials", type=int, default=None, help="trial budget (default: the SPEC's trials)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="trials at once (default: the SPEC's, else what the cluster's CPUs/GPUs fit)")
    p.add_argument("--out", metavar="URI", default=None,
                   help="where results go: a path or s3://bucket/prefix (default: ./sweeps/<SPEC name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep under --out (finished trials are not run again)")
    p.add_argument("--storage", metavar="SQLALCHEMY_URL", default=os.environ.get("SONORAY_OPTUNA_STORAGE"),
                   help="Optuna study database, e.g. postgresql://user@host/db (default: "
                   "$SONORAY_OPTUNA_STORAGE, which keeps a password off the command line; else SQLite "
                   "OUT/optuna.db; for an s3:// OUT, SQLite in --work-dir, copied to OUT/optuna.db)")
    p.add_argument("--work-dir", default=None,
                   help="local folder of the SQLite study when --out is on S3 (default: "
                   "$SONORAY_SWEEP_WORKDIR or ~/.cache/sonoray/sweeps/<bucket>/<prefix>)")
    add_storage_args(p)
    add_ray_args(p)
    add_tracker_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def resolve_spec_path(text: str) -> Path:
    """A SPEC path, or the name of a ready-made SPEC (``tsal`` -> tuning/specs/tsal.yaml)."""
    path = Path(text)
    if path.is_file():
        return path
    named = SPECS_DIR / (text if text.endswith(".yaml") else f"{text}.yaml")
    if "/" not in text and named.is_file():
        return named
    choices = ", ".join(sorted(p.stem for p in SPECS_DIR.glob("*.yaml")))
    raise UserError(f"SPEC {text!r} not found (a file, or a ready-made SPEC: {choices})")


def load_sweep_spec(path: Path, data: str | None = None, sets: list[str] | None = None):
    """The SPEC at ``path`` with ``fixed`` overridden by --set items, then --data (checked:
    SpecError; a malformed --set item: ConfigError)."""
    from cluster.job_config import parse_set_items
    from tuning.spec import load_spec

    fixed = {**parse_set_items(sets), **({"data": data} if data else {})}
    return load_spec(path, fixed=fixed)


def run(args: argparse.Namespace) -> int:
    from cluster.job_config import ConfigError
    from tuning.spec import SpecError

    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    if args.concurrency is not None and args.concurrency < 1:
        raise UserError(f"--concurrency must be >= 1, got {args.concurrency}")
    path = resolve_spec_path(args.spec)
    try:  # before Ray starts: a bad SPEC costs nothing
        spec = load_sweep_spec(path, args.data, args.overrides)
    except SpecError as err:  # name the file once: load_spec's own messages may already hold it
        text = str(err)
        raise UserError(text if str(path) in text else f"{path}: {text}") from None
    except ConfigError as err:
        raise UserError(str(err)) from None
    out = args.out or str(Path("sweeps") / spec.name)
    summary = run_spec(spec, out, storage=storage_from(args), connect=lambda: connect_ray(args),
                       trials=args.trials, concurrency=args.concurrency, resume=args.resume,
                       storage_url=args.storage, work_dir=args.work_dir, tracker=tracker_from(args, "sweep"))
    if args.json:
        emit_json(summary)
    return 0


def run_spec(spec, out: str, *, storage, connect, **options: Any) -> dict:
    """Connect Ray, run the sweep, turn its errors into UserErrors; returns the summary."""
    from tuning.sweep import SweepError, run_sweep

    progress(connect())
    try:
        outcome = run_sweep(spec, out, storage=storage, progress=progress, **options)
    except (SweepError, ValueError) as err:
        raise UserError(str(err)) from None
    summary = outcome.summary
    progress(f"sweep: {summary['trials']} trials ({summary['completed']} completed, {summary['stopped']} stopped "
             f"early, {summary['errored']} failed); {summary['compute']['spent']} {summary['compute']['unit']}; "
             f"results in {summary['results']}")
    return summary


def demo_stage(data_uri: str, work_uri: str, *, trials: int = 4, rounds: int = 3, seeds: int = 1,
               size: int = 64, fps: float | None = 3.0, max_per_video: int | None = 12,
               cache_uri: str | None = None, storage=None) -> dict:
    """A small sweep for `sonoray demo`: TSAL's confidence threshold in embeddings mode on
    ``data_uri`` (an ingested data set), ``trials`` trials (TPE + ASHA) under ``<work>/sweep``;
    returns the sweep's summary (``best_config``, ``best_metric``, ``best_config_path``...).

    The frames are sampled and embedded as the demo's simulation does, and the embeddings are
    read from ``cache_uri`` (default: that simulation's cache, ``<work>/simulate/cache``) when
    it already holds them. A sweep already under ``<work>/sweep`` is resumed. Connects to Ray."""
    from cluster.runtime import connect
    from cluster.storage import Storage, parse_uri
    from tuning.spec import parse_spec

    work = parse_uri(work_uri)
    spec = parse_spec({
        "job": "simulate",
        "name": "demo-tsal-confidence",
        "fixed": {"data": data_uri, "strategies": "tsal", "seeds": seeds, "initial": 0.1, "per_round": 0.1,
                  "rounds": rounds, "size": size, "channels": 1, "fps": fps or 0, "max_per_video": max_per_video or 0,
                  "cache": cache_uri or work.join("simulate", "cache").uri},
        "space": {"confidence": {"uniform": [0.55, 0.99]}},
        "metric": "aulc",
        "searcher": {"name": "tpe", "startup_trials": 2},
        "scheduler": "asha",
        "trials": trials,
        "seed": 0,
    })
    storage = storage or Storage()
    out = work.join("sweep")
    resume = storage.exists(out.join("sweep.json"))
    return run_spec(spec, out.uri, storage=storage, connect=connect, resume=resume)
