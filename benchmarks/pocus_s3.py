"""What the POCUS benchmarks share: the videos ingested into a loopback S3 server for the run,
and a timestamped progress line on stderr."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DATA_URI = "s3://bench/pocus"


@contextmanager
def pocus_in_loopback_s3(pocus: Path, uri: str = DATA_URI) -> Iterator:
    """Start the loopback S3 server, ingest the POCUS videos under ``uri`` and yield the
    :class:`cluster.storage.Storage` that reads them; the server stops on exit. Its endpoint is
    put in ``os.environ``, so a local Ray started inside passes it to its workers."""
    from cluster.ingest import ingest_videos
    from cluster.s3server import LocalS3Server
    from cluster.storage import Storage, StorageConfig
    from ultrasound.manifest import parse_pocus

    with LocalS3Server() as server:
        os.environ.update(server.env())
        storage = Storage(StorageConfig.from_env())
        records, skipped, findings = parse_pocus(pocus)
        ingest_videos(records, skipped, pocus, uri, findings, source_format="pocus", storage=storage)
        yield storage


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
