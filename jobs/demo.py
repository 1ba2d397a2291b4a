"""`sonoray demo`: the whole system on the embedded default, end to end on one machine.

Stages: start the loopback S3 server, write phantom clips, ingest them, stream their frames
through Ray Data, pretrain USCL and evaluate it against random init, train MSML, simulate
labelling budgets (TSAL and baselines), run a small sweep, and end with what a user takes away:
predictions of the MSML run on clips it never saw, and the next videos TSAL would have labelled.
Each stage is the job's own
``demo_stage`` at demo size; the demo prints one table at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from jobs.output import emit_json, human_stream, progress

STAGES = ("frames", "pretrain", "msml", "simulate", "sweep", "predict", "query")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run every stage on synthetic clips with a local S3 server and a local Ray",
        description="Run sonoray end to end on the embedded default: a loopback S3 server, "
        "synthetic lung-ultrasound clips, ingest, frame streaming, USCL pretraining + evaluation, "
        "MSML, a TSAL labelling-budget simulation and a small sweep.",
    )
    p.add_argument("--out", type=Path, default=Path("sonoray-demo"),
                   help="local folder for clips and reports (default: ./sonoray-demo)")
    p.add_argument("--videos", type=int, default=24, help="phantom clips to generate (default 24)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON summary last on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.dataset import load_dataset
    from cluster.frames import StreamSpec, drain, frame_stream
    from cluster.ingest import ingest_videos
    from cluster.runtime import connect
    from cluster.s3server import LocalS3Server
    from cluster.storage import Storage, StorageConfig
    from jobs.output import UserError
    from ultrasound import phantom
    from ultrasound.manifest import parse_generic_manifest
    from ultrasound.video import FrameFormat

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise UserError(f"--stages: unknown {unknown}; valid: {', '.join(STAGES)}")
    started = time.perf_counter()
    summary: dict = {"stages": {}}
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work_uri = str(out / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    with LocalS3Server() as server:
        os.environ.update(server.env())  # the local Ray started below passes it to its workers
        progress(f"demo: S3-compatible server on {server.endpoint_url} (loopback only)")
        storage = Storage(StorageConfig.from_env())
        data_uri = "s3://sonoray-demo/phantom"

        clips_dir = out / "phantom"
        manifest_csv = phantom.make_dataset(clips_dir, args.videos, seed=0, n_frames=32, size=96)
        progress(f"demo: {args.videos} phantom clips in {clips_dir}")
        records, skipped, findings = parse_generic_manifest(manifest_csv, clips_dir, findings=list(phantom.FINDINGS))
        result = ingest_videos(records, skipped, clips_dir, data_uri, findings, storage=storage, on_progress=progress)
        summary["ingest"] = result.as_dict()
        progress(connect())

        def stage(name: str, fn) -> None:
            if name not in stages:
                return
            t0 = time.perf_counter()
            progress(f"demo: stage {name} ...")
            summary["stages"][name] = {**fn(), "seconds": round(time.perf_counter() - t0, 1)}
            progress(f"demo: stage {name} done in {summary['stages'][name]['seconds']} s")

        def frames_stage() -> dict:
            stream = frame_stream(load_dataset(data_uri, storage), StreamSpec(fmt=FrameFormat(channels=1, size=64)))
            return drain(stream).as_dict()

        def pretrain_stage() -> dict:
            from jobs.pretrain import demo_stage

            return demo_stage(data_uri, work_uri)

        def msml_stage() -> dict:
            from jobs.msml import demo_stage

            return demo_stage(data_uri, work_uri, storage=storage)

        def predict_stage() -> dict:
            from jobs.predict import demo_stage

            if "msml" not in summary["stages"]:
                raise UserError("--stages: predict needs the msml stage (it scores with that run's model)")
            new_dir = out / "phantom-unseen"  # clips the model never saw, as a plain folder of videos
            phantom.make_dataset(new_dir, 8, seed=1, n_frames=32, size=96)
            (new_dir / "manifest.csv").unlink()
            return demo_stage(summary["stages"]["msml"]["checkpoint"], str(new_dir), work_uri, storage)

        def query_stage() -> dict:
            from jobs.query import demo_stage

            return demo_stage(data_uri, work_uri, storage)

        def simulate_stage() -> dict:
            from jobs.simulate import demo_stage

            return demo_stage(data_uri, work_uri)

        def sweep_stage() -> dict:
            from jobs.sweep import demo_stage

            return demo_stage(data_uri, work_uri, storage=storage)

        # the last two stages are what a user takes away: predictions on new videos, the next to label
        for name, fn in (("frames", frames_stage), ("pretrain", pretrain_stage), ("msml", msml_stage),
                         ("simulate", simulate_stage), ("sweep", sweep_stage), ("predict", predict_stage),
                         ("query", query_stage)):
            stage(name, fn)

    summary["work_dir"] = work_uri
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print_table(summary, human_stream(args.json))
    if args.json:
        emit_json(summary)
    return 0


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(summary: dict, out: TextIO = sys.stdout) -> None:
    s = summary["stages"]

    def say(text: str) -> None:
        print(text, file=out)

    say("\nsonoray demo: results on the embedded default (phantom clips)")
    say(f"  ingest    {summary['ingest']['ingested']} videos, {summary['ingest']['uploaded']} uploaded")
    if "frames" in s:
        f = s["frames"]
        say(f"  frames    {f['frames']} frames from {f['videos']} videos, {f['frames_per_s']} frames/s")
    if "pretrain" in s:
        p = s["pretrain"]
        pre = p["pretrain"]
        say(f"  pretrain  USCL {pre['epochs']} epochs, loss {pre['loss_first']} -> {pre['loss_last']}, "
              f"{pre['images_per_s']} images/s")
        say("  evaluate  linear probe        accuracy          macro-F1")
        for name in ("random", "uscl"):
            r = p[name]
            say(f"            {name:<18} {r['accuracy']:.3f} +- {r['accuracy_std']:.3f}   "
                  f"{r['macro_f1']:.3f} +- {r['macro_f1_std']:.3f}")
    if "msml" in s:
        m = s["msml"]
        loss = m.get("loss") or []
        say(f"  msml      {m.get('epochs')} epochs, loss {_fmt(loss[0]) if loss else '?'} -> "
              f"{_fmt(loss[-1]) if loss else '?'}, mAP {_fmt(m.get('map'))}, macro-F1 {_fmt(m.get('macro_f1'))}")
    if "simulate" in s:
        sim = s["simulate"]
        say(f"  simulate  {sim.get('experiments')} experiments, {sim.get('rounds')} rounds; report {sim.get('report')}")
        for name, row in (sim.get("strategies") or {}).items():
            say(f"            {name:<14} AULC {_fmt(row.get('aulc'))}  final mAP {_fmt(row.get('final_map'))}")
    if "sweep" in s:
        sw = s["sweep"]
        say(f"  sweep     {sw.get('completed')}/{sw.get('trials')} trials, best {_fmt(sw.get('best_metric'))} "
              f"with {sw.get('best_config')}")
    if "predict" in s:
        pr = s["predict"]
        best = {name: rows[0]["video_id"] for name, rows in pr["top_videos"].items() if rows}
        say(f"  predict   {pr['videos']} unseen videos, {pr['frames']} frames scored -> {pr['out']}; "
            f"{len(pr['files']['gradcam'])} Grad-CAM overlays")
        say(f"            top video per finding: {best}")
    if "query" in s:
        q = s["query"]
        say(f"  query     {q['strategy']}, {q['labelled_videos']} labelled: label next {q['next']} "
            f"(+{q['machine_proposals']} machine proposals) -> {q['out']}")
    say(f"  total     {summary['seconds']} s; outputs under {summary['work_dir']}")
