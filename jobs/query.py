"""`sonoray query`: the next videos annotators should label, on a partly labelled data set.

Trains the simulator's head on the videos labelled so far (``--labelled``: video_id + one 0/1
column per finding), scores the others with the strategy at video level, and writes ``next.csv``:
the ``--budget`` videos to label (``human`` rows) and, for tsal, machine-label proposals for the
videos the model is sure of (``machine`` rows, a human confirms them).
"""
from __future__ import annotations

import argparse
import io

from jobs.common import (
    add_flag_config_args,
    apply_flag_config,
    add_embedding_args,
    add_job_args,
    connect_ray,
    sample_spec_from,
    storage_from,
)
from jobs.output import UserError, emit_json, human_stream, progress


def register(subparsers: argparse._SubParsersAction) -> None:
    from ultrasound.active.sim_config import KINDS

    p = subparsers.add_parser(
        "query",
        help="the next videos to label (one active-learning step on your own pool)",
        description="One TSAL step on a partly labelled data set: which unlabelled videos to label next.",
    )
    p.add_argument("--data", required=True, metavar="URI", help="data set written by `sonoray ingest`")
    p.add_argument("--labelled", required=True, metavar="CSV",
                   help="the answers so far: video_id + one column per finding (1/0, yes/no, true/false)")
    p.add_argument("--budget", required=True, type=int, metavar="N", help="videos to label next")
    p.add_argument("--strategy", default="tsal", choices=list(KINDS), help="(default tsal)")
    p.add_argument("--out", required=True, metavar="CSV", help="next.csv to write (local path or s3://)")
    p.add_argument("--seed", type=int, default=0, help="tie-breaking and random-strategy seed (0)")
    add_embedding_args(p, cache_default="URI/cache/samples beside the data set")
    add_job_args(p)
    add_flag_config_args(p, "query settings")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.dataset import load_dataset
    from cluster.query import query_data
    from cluster.storage import parse_uri
    from ultrasound.manifest import ManifestError

    apply_flag_config(args, storage_from(args))
    if args.budget < 1:
        raise UserError(f"--budget must be >= 1, got {args.budget}")
    spec = sample_spec_from(args)
    # built again on purpose: --config / --set may have set endpoint_url, and the job must use it
    storage = storage_from(args)
    try:
        out = parse_uri(args.out)
        data = load_dataset(args.data, storage)
        cache = parse_uri(args.cache) if args.cache else data.root.join("cache", "samples")
    except ValueError as err:
        raise UserError(str(err)) from None
    progress(connect_ray(args))
    try:
        frame, summary = query_data(data, args.labelled, args.budget, args.strategy, spec=spec, cache=cache,
                                    storage=storage, seed=args.seed, on_progress=progress)
    except (ManifestError, ValueError) as err:
        raise UserError(str(err)) from None
    storage.check(out, create_bucket=True)
    storage.write_bytes(out, frame.to_csv(index=False).encode())
    summary["out"] = out.uri
    human = human_stream(args.json)
    print(f"query ({args.strategy}): label next, best first: {', '.join(summary['next'])}", file=human)
    if summary["machine_proposals"]:
        print(f"  and confirm {summary['machine_proposals']} machine-labelled video(s) (stream 'machine')", file=human)
    progress(f"query: wrote {out.uri}")
    if args.json:
        emit_json(summary)
    return 0


def demo_stage(data_uri: str, work_uri: str, storage, *, budget: int = 4, share_labelled: float = 0.25) -> dict:
    """`sonoray demo`'s query stage: the first quarter of the phantom videos count as labelled
    (their manifest labels written as an answers sheet), and TSAL picks the next ``budget``
    videos, reusing the simulate stage's embeddings (same sampling, same cache)."""
    import csv

    from cluster.dataset import load_dataset
    from cluster.embeddings import SampleSpec
    from cluster.query import query_data
    from cluster.storage import parse_uri

    work = parse_uri(work_uri)
    data = load_dataset(data_uri, storage)
    sheet = work.join("query", "labelled.csv")
    rows = data.rows[:max(1, int(len(data.rows) * share_labelled))]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["video_id", *data.findings])
    writer.writerows([[r["video_id"], *(int(r[f]) for f in data.findings)] for r in rows])
    storage.write_bytes(sheet, buffer.getvalue().encode())
    spec = SampleSpec(fps=3.0, max_per_video=12, size=64, channels=1)  # the simulate stage's
    frame, summary = query_data(data, sheet.key, budget, "tsal", spec=spec, cache=work.join("simulate", "cache"),
                                storage=storage, on_progress=progress)
    out = work.join("query", "next.csv")
    storage.write_bytes(out, frame.to_csv(index=False).encode())
    progress(f"query: wrote {out.uri}")
    return {**summary, "out": out.uri}
