"""`sonoray ingest`: upload a folder of videos and write its manifest."""
from __future__ import annotations

import argparse

from cluster.ingest import ingest_videos
from jobs.common import add_json_arg, add_storage_args, csv_list, storage_from
from jobs.output import UserError, emit_json, progress
from ultrasound.manifest import parse_generic_manifest, parse_pocus


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="upload videos + manifest to object storage",
        description="Upload the videos of VIDEO_DIR to URI/videos/ and write URI/manifest.parquet. "
        "Re-running uploads only videos whose sha256 changed.",
    )
    p.add_argument("video_dir", metavar="VIDEO_DIR", help="a local folder of videos, or with --in-place an "
                   "s3:// prefix already holding them")
    p.add_argument("--in-place", action="store_true",
                   help="register the videos under an s3:// VIDEO_DIR where they are: nothing is copied, "
                        "the manifest keys them by URI")
    p.add_argument("--to", required=True, metavar="URI", help="data set root: s3://bucket/prefix or a path")
    p.add_argument("--manifest", metavar="CSV", help="generic manifest, CSV or Parquet (column 'path' relative to VIDEO_DIR)")
    p.add_argument("--format", choices=["generic", "pocus"], default="generic",
                   help="'pocus' reads the upstream POCUS layout (dataset_metadata.csv + videos/)")
    p.add_argument("--labels", metavar="COL,COL", help="finding columns (multi-label targets, 0/1 yes/no true/false), or 'auto': every "
                   "column whose values are all such")
    p.add_argument("--label-col", default="label", help="class-label column (default: label)")
    p.add_argument("--patient-col", default="patient_id", help="patient column (default: patient_id)")
    add_storage_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    remote = args.video_dir.startswith("s3://")
    if remote and not args.in_place:
        raise UserError(f"{args.video_dir}: videos already in a bucket are registered with --in-place "
                        f"(nothing copied); a local folder is uploaded")
    if args.in_place and (not remote or args.format == "pocus"):
        raise UserError("--in-place needs VIDEO_DIR as an s3:// prefix and a --manifest (generic format)")
    if args.format == "pocus":
        if args.manifest:
            raise UserError("--manifest is not used with --format pocus (it reads dataset_metadata.csv)")
        records, skipped, findings = parse_pocus(args.video_dir)
    else:
        if not args.manifest:
            raise UserError("--manifest CSV is required (or use --format pocus)")
        records, skipped, findings = parse_generic_manifest(
            args.manifest,
            args.video_dir,
            findings=args.labels if args.labels == "auto" else csv_list(args.labels),
            label_col=args.label_col,
            patient_col=args.patient_col,
            remote=remote,
        )
    verb = "registering them in place" if remote else "uploading to"
    progress(f"ingest: {len(records)} videos accepted, {len(skipped)} rows skipped; {verb} {args.to}")
    for item in skipped:
        progress(f"  skipped row {item.row} {item.path}: {item.reason}")
    if remote:
        from cluster.ingest import ingest_in_place

        try:
            result = ingest_in_place(records, skipped, args.video_dir, args.to, findings,
                                     storage=storage_from(args), on_progress=progress)
        except ValueError as err:
            raise UserError(str(err)) from None
        for item in result.skipped:
            if item not in skipped:  # objects missing or undecodable in the bucket
                progress(f"  skipped row {item.row} {item.path}: {item.reason}")
    else:
        result = ingest_videos(
            records, skipped, args.video_dir, args.to, findings,
            source_format=args.format, storage=storage_from(args), on_progress=progress,
        )
    progress(f"ingest: {result.ingested} videos in {result.manifest} ({result.uploaded} uploaded this time)")
    if args.json:
        emit_json(result.as_dict())
    return 0
