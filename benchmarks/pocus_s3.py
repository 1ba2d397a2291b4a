"""What the POCUS benchmarks share: the videos ingested into a loopback S3 server for the run,
the frame-embeddings table of the simulation benchmarks (flags and cached build), and a
timestamped progress line on stderr."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

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


def json_plain(value):
    """``json.dumps`` default for numpy scalars and arrays in the benchmarks' reports."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def difference_cell(d: dict) -> str:
    """One paired difference (``mean``, ``low``, ``high``, ``p_sign``, ``excludes_zero``) as a
    Markdown table cell: ``+0.012 [-0.003, +0.027] p=0.302``, starred when the CI excludes 0."""
    return (f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] p={d['p_sign']:.3f}"
            + (" *" if d["excludes_zero"] else ""))


def frozen_features(checkpoint: str, images, image_size: int, channels: int):
    """``(N, 512)`` frozen trunk features of ``images`` (``(N, S, S, C)`` uint8) for a checkpoint
    path or ``random`` (seeded; BatchNorm statistics re-estimated on ``images`` first)."""
    import torch

    from cluster.evaluate import RANDOM, load_checkpoint
    from ultrasound.evaluation import backbone_from_state, extract_features, reestimate_batchnorm

    torch.manual_seed(0)
    backbone = backbone_from_state(load_checkpoint(checkpoint).state, channels)
    if checkpoint == RANDOM:
        reestimate_batchnorm(backbone, images, image_size)
    return extract_features(backbone, images, image_size)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def add_embedding_args(parser, work_default: str = "/tmp/sonoray-bench-simulate") -> None:
    """The flags that pick the POCUS folder, the work folder (ingest and embeddings cache) and the
    trunk that embeds the frames."""
    parser.add_argument("--pocus", type=Path, default=REPO.parent / "shared" / "data" / "pocus")
    parser.add_argument("--work", type=Path, default=Path(work_default))
    parser.add_argument("--init", default=None, help="USCL checkpoint (model.pt) for the trunk")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3,
                        help="trunk input channels (1 for a grayscale checkpoint)")


def pocus_embeddings(args, storage) -> tuple:
    """Ingest POCUS under ``args.work/pocus``, connect Ray, and embed its frames (3 fps, at most
    30 per video) with the trunk of ``args``, cached under ``args.work/cache``: ``(table,
    from_cache)``."""
    from cluster.dataset import load_dataset
    from cluster.embeddings import SampleSpec, load_samples
    from cluster.ingest import ingest_videos
    from cluster.runtime import connect
    from cluster.storage import parse_uri
    from ultrasound.manifest import parse_pocus

    args.work.mkdir(parents=True, exist_ok=True)
    data_uri = str(args.work / "pocus")
    records, skipped, findings = parse_pocus(args.pocus)
    ingest_videos(records, skipped, args.pocus, data_uri, findings, source_format="pocus", storage=storage)
    log(connect())
    spec = SampleSpec(fps=3.0, max_per_video=30, size=args.size, channels=args.channels, init=args.init)
    return load_samples(load_dataset(data_uri, storage), spec, parse_uri(str(args.work / "cache")), storage, log)
