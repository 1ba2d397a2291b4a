"""`sonoray store serve`: run the embedded S3-compatible server on loopback by hand."""
from __future__ import annotations

import argparse
import time

from cluster.s3server import LocalS3Server
from jobs.output import progress


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("store", help="the embedded S3-compatible server (loopback only)")
    sub = p.add_subparsers(dest="store_command", metavar="ACTION")
    sub.required = True
    serve = sub.add_parser("serve", help="serve S3 on 127.0.0.1 until interrupted (objects live in memory)")
    serve.add_argument("--port", type=int, default=9000)
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    server = LocalS3Server(port=args.port).start()
    env = server.env()
    progress(f"S3-compatible server on {server.endpoint_url} (loopback only; objects are kept in memory)")
    print("Point sonoray at it with:")
    for key, value in env.items():
        print(f"  export {key}={value}")
    try:
        while server.process and server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
