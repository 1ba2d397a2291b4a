"""An ingested data set in object storage: ``<root>/videos/...`` plus ``<root>/manifest.parquet``.

The manifest holds one row per video: video_id, key (relative to the data set root), patient_id,
label, probe, one int8 column per finding, fps, frame_count, width, height, size_bytes, sha256.
The ordered finding names are kept in the Parquet schema metadata (``sonoray.findings``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from cluster.storage import Location, Storage, parse_uri

MANIFEST_NAME = "manifest.parquet"
VIDEOS_PREFIX = "videos"
_META_FINDINGS = b"sonoray.findings"
_META_FORMAT = b"sonoray.format"

BASE_COLUMNS = [
    ("video_id", pa.string()),
    ("key", pa.string()),
    ("patient_id", pa.string()),
    ("label", pa.string()),
    ("probe", pa.string()),
    ("fps", pa.float64()),
    ("frame_count", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("size_bytes", pa.int64()),
    ("sha256", pa.string()),
]


def manifest_table(rows: list[dict], findings: list[str], source_format: str) -> pa.Table:
    """Build the manifest table from row dicts holding BASE_COLUMNS keys and ``findings``."""
    fields = [pa.field(name, typ) for name, typ in BASE_COLUMNS]
    fields += [pa.field(name, pa.int8()) for name in findings]
    schema = pa.schema(
        fields,
        metadata={_META_FINDINGS: json.dumps(findings).encode(), _META_FORMAT: source_format.encode()},
    )
    columns = {f.name: [row.get(f.name) for row in rows] for f in fields}
    return pa.Table.from_pydict(columns, schema=schema)


@dataclass
class IngestedDataset:
    """A data set as the pipelines see it: its root, manifest rows and finding names."""

    root: Location
    rows: list[dict]
    findings: list[str]
    source_format: str = "generic"
    storage: Storage = field(default_factory=Storage, repr=False)

    @property
    def classes(self) -> list[str]:
        """Sorted distinct class labels present in the manifest."""
        return sorted({r["label"] for r in self.rows if r.get("label")})

    def video_location(self, row: dict) -> Location:
        """Where a video is: its key under the data set's root, or, for a video registered in
        place (``ingest --in-place``), the absolute ``s3://`` URI the key holds."""
        return video_location(self.root, row["key"])

    def finding_matrix(self) -> np.ndarray:
        """``(n_videos, n_findings)`` float32 0/1 targets in manifest order."""
        return np.array([[r[f] for f in self.findings] for r in self.rows], dtype=np.float32).reshape(
            len(self.rows), len(self.findings)
        )

    def select(self, video_ids) -> "IngestedDataset":
        wanted = set(video_ids)
        rows = [r for r in self.rows if r["video_id"] in wanted]
        return IngestedDataset(self.root, rows, self.findings, self.source_format, self.storage)


def video_location(root: Location, key: str) -> Location:
    """``key`` under ``root``, or the absolute location an ``s3://`` key names."""
    return parse_uri(key) if str(key).startswith("s3://") else root.join(key)


def load_dataset(uri: str, storage: Storage | None = None) -> IngestedDataset:
    """Read ``<uri>/manifest.parquet``; a clear error when it is missing."""
    storage = storage or Storage()
    root = parse_uri(uri)
    location = root.join(MANIFEST_NAME)
    storage.check(root)
    if not storage.exists(location):
        raise FileNotFoundError(
            f"no manifest at {location.uri}: ingest the videos first (sonoray ingest ... --to {root.uri})"
        )
    table = storage.read_parquet(location)
    meta = table.schema.metadata or {}
    findings = json.loads(meta.get(_META_FINDINGS, b"[]"))
    source_format = meta.get(_META_FORMAT, b"generic").decode()
    return IngestedDataset(root, table.to_pylist(), findings, source_format, storage)
