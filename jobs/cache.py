"""`sonoray cache ls|build|rm URI`: the decoded-frame cache beside an ingested data set."""
from __future__ import annotations

import argparse

from cluster.cache import list_cache, remove_cache
from cluster.dataset import load_dataset
from cluster.frames import drain, frame_stream
from jobs.common import add_json_arg, add_ray_args, add_storage_args, connect_ray, storage_from
from jobs.frames import add_stream_frame_args, spec_from
from jobs.output import UserError, emit_json, progress


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cache",
        help="list, build or remove the decoded-frame cache of a data set",
        description="Every job that reads frames keeps them, decoded once, as Parquet shards under "
        "URI/cache/<key>/ (one per video, named by its sha256; the key names the sampling and "
        "format). `ls` lists the caches, `build` fills one ahead of a job (same sampling flags as "
        "`sonoray frames`), `rm` removes them.",
    )
    p.add_argument("action", choices=["ls", "build", "rm"])
    p.add_argument("uri", metavar="URI", help="data set root written by `sonoray ingest`")
    add_stream_frame_args(p)
    p.add_argument("--key", default=None, help="rm: only the cache with this key (see `ls`)")
    p.add_argument("--stale", action="store_true",
                   help="rm: only shards of videos no longer in the manifest (changed or removed)")
    add_storage_args(p)
    add_ray_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    storage = storage_from(args)
    data = load_dataset(args.uri, storage)
    current = {str(r.get("sha256") or "") for r in data.rows}
    if args.action == "ls":
        entries = list_cache(storage, data.root, current)
        for e in entries:
            spec = e.spec or {}
            progress(f"cache {e.key}: {e.current}/{len(data.rows)} videos, {e.stale} stale shard(s), "
                     f"{e.bytes / 1e6:.1f} MB; sampling {spec.get('sampling')}, format {spec.get('format')}")
        if not entries:
            progress(f"cache: none under {data.root.join('cache').uri}")
        result = {"uri": data.root.uri, "videos": len(data.rows), "caches": [e.as_dict() for e in entries],
                  "bytes": sum(e.bytes for e in entries)}
    elif args.action == "rm":
        removed = remove_cache(storage, data.root, key=args.key, stale_only=args.stale,
                               manifest_sha256s=current)
        progress(f"cache: removed {removed} file(s) under {data.root.join('cache').uri}")
        result = {"uri": data.root.uri, "removed": removed}
    else:
        if args.key or args.stale:
            raise UserError("--key and --stale go with `cache rm`")
        args.no_cache = False
        spec = spec_from(args, mode="frames")
        progress(connect_ray(args))
        stream = frame_stream(data, spec)
        summary = drain(stream, on_progress=progress)
        for item in summary.failed:
            progress(f"  skipped {item['key']}: {item['reason']}")
        c = summary.cache or {}
        progress(f"cache: {c.get('uri')}: {c.get('built', 0)} videos decoded and added, {c.get('hits', 0)} "
                 f"already there, {len(summary.failed)} failed; {c.get('bytes_written', 0) / 1e6:.1f} MB written")
        result = {"uri": data.root.uri, **summary.as_dict()}
    if args.json:
        emit_json(result)
    return 0
