"""Ingest: upload accepted videos to a data-set root and write its manifest.

Idempotent: a video whose object already carries the same sha256 is not sent again. Videos that
OpenCV cannot decode are reported (row, path, reason) and left out; nothing else is lost.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import time
from pathlib import Path

from cluster.dataset import MANIFEST_NAME, VIDEOS_PREFIX, manifest_table
from cluster.progress import Count
from cluster.storage import Storage, file_sha256, parse_uri
from ultrasound.manifest import SkippedRow, VideoRecord
from ultrasound.video import VideoError, count_frames


@dataclass
class IngestResult:
    ingested: int
    uploaded: int
    skipped: list[SkippedRow] = field(default_factory=list)
    manifest: str = ""

    def as_dict(self) -> dict:
        return {
            "ingested": self.ingested,
            "uploaded": self.uploaded,
            "skipped": [s.as_dict() for s in self.skipped],
            "manifest": self.manifest,
        }


def ingest_videos(
    records: list[VideoRecord],
    skipped: list[SkippedRow],
    video_dir: str | Path,
    dest_uri: str,
    findings: list[str],
    *,
    source_format: str = "generic",
    storage: Storage | None = None,
    on_progress: Callable[[str], None] = lambda message: None,
    workers: int = 4,
) -> IngestResult:
    storage = storage or Storage()
    root = parse_uri(dest_uri)
    storage.check(root, create_bucket=True)
    video_dir = Path(video_dir)
    skipped = list(skipped)

    def process(record: VideoRecord) -> tuple[VideoRecord, dict | None, bool, str]:
        source = video_dir / record.path
        try:
            info = count_frames(source)
        except VideoError as err:
            return record, None, False, str(err)
        sha = file_sha256(source)
        key = f"{VIDEOS_PREFIX}/{record.path}"
        target = root.join(key)
        sent = storage.stored_sha256(target) != sha
        if sent:
            storage.upload_file(source, target, sha)
        return record, _manifest_row(record, key, info, source.stat().st_size, sha), sent, ""

    rows: list[dict] = []
    uploaded = 0
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (record, row, sent, reason) in enumerate(pool.map(process, records), start=1):
            if row is None:
                skipped.append(SkippedRow(record.row or 0, record.path, f"undecodable video: {reason}"))
            else:
                rows.append(row)
                uploaded += int(sent)
            if done % 10 == 0 or done == len(records):
                on_progress(Count("ingest", done, len(records), "videos", f"{uploaded} uploaded", started=started))
    return _write_manifest(root, rows, findings, source_format, skipped, uploaded, storage)


def _write_manifest(root, rows: list[dict], findings: list[str], source_format: str, skipped: list[SkippedRow],
                    uploaded: int, storage: Storage) -> IngestResult:
    manifest = root.join(MANIFEST_NAME)
    storage.write_parquet(manifest_table(rows, findings, source_format), manifest)
    skipped.sort(key=lambda s: (s.row, s.path))
    return IngestResult(ingested=len(rows), uploaded=uploaded, skipped=skipped, manifest=manifest.uri)


def ingest_in_place(
    records: list[VideoRecord],
    skipped: list[SkippedRow],
    source_uri: str,
    dest_uri: str,
    findings: list[str],
    *,
    storage: Storage | None = None,
    on_progress: Callable[[str], None] = lambda message: None,
    workers: int = 4,
) -> IngestResult:
    """Register videos already in a bucket (``source_uri``: the s3:// prefix the manifest's
    paths are relative to) without copying them: each object is streamed once, through a
    temporary local file, to hash it (sha256) and count its frames; the manifest at ``dest_uri``
    keys each video by its absolute URI. Nothing is uploaded but the manifest."""
    import tempfile

    storage = storage or Storage()
    source, root = parse_uri(source_uri), parse_uri(dest_uri)
    if not source.is_s3:
        raise ValueError(f"--in-place: {source_uri} is not an s3:// prefix (a local folder ingests by copying)")
    storage.check(source)
    storage.check(root, create_bucket=True)
    skipped = list(skipped)

    def process(record: VideoRecord) -> tuple[VideoRecord, dict | None, str]:
        location = source.join(record.path)
        size = storage.size_of(location)
        if size is None:
            return record, None, "video not found in the bucket"
        with tempfile.TemporaryDirectory(prefix="sonoray-inplace-") as folder:
            local = Path(folder, Path(record.path).name)
            sha = storage.download_hashed(location, local)
            try:
                info = count_frames(local)
            except VideoError as err:
                return record, None, f"undecodable video: {err}"
        return record, _manifest_row(record, location.uri, info, size, sha), ""

    rows: list[dict] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (record, row, reason) in enumerate(pool.map(process, records), start=1):
            if row is None:
                skipped.append(SkippedRow(record.row or 0, record.path, reason))
            else:
                rows.append(row)
            if done % 10 == 0 or done == len(records):
                on_progress(Count("ingest", done, len(records), "videos registered in place", started=started))
    return _write_manifest(root, rows, findings, "generic", skipped, 0, storage)


def _manifest_row(record: VideoRecord, key: str, info, size_bytes: int, sha: str) -> dict:
    """The manifest row of one accepted video (``key``: relative to the data set, or absolute)."""
    return {
        "video_id": record.video_id,
        "key": key,
        "patient_id": record.patient_id,
        "label": record.label,
        "probe": record.probe,
        "fps": info.fps,
        "frame_count": info.frame_count,
        "width": info.width,
        "height": info.height,
        "size_bytes": size_bytes,
        "sha256": sha,
        **record.findings,
    }
