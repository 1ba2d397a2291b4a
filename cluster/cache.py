"""The decoded-frame cache: frames decoded once, kept as Parquet shards beside the data set.

Layout: ``<data>/cache/<key>/<sha256>.parquet``, one shard per video, plus ``<data>/cache/<key>/spec.json``.

- ``key`` names what was decoded: the cache format version, the base sampling (which frames) and
  the frame format (channels, size, sector crop). Random per-video picks (USCL's clips,
  ``per_video=K``) are drawn from a shard of every frame, so USCL still draws fresh frames every
  epoch, from frames decoded once.
- a shard is named by its video's sha256 (recorded in the manifest at ingest): a re-ingested,
  changed video gets a new shard and leaves every other one valid; shards of videos no longer in
  the manifest are reported as stale by ``sonoray cache ls`` and removed by ``sonoray cache rm``.
- a shard is written in one piece (one PUT on S3, temporary name + rename locally), so a shard cut
  off half way is never at its final name; a shard that does not parse, or whose recorded sha256
  or frame count disagrees with its name, is treated as missing and rebuilt. Two jobs building the
  same shard write the same bytes: the last complete write wins.

Shard rows: ``frame_index`` int64, ``timestamp`` float64, ``image`` binary (the ``(H, W, C)``
uint8 frame, C-order); schema metadata ``sonoray.cache`` holds video_id, sha256, shape, frames.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.storage import Location, Storage
from ultrasound.video import FrameFormat, FrameSampling

CACHE_FOLDER = "cache"
CACHE_FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
_META = b"sonoray.cache"


class CacheError(ValueError):
    """A shard that cannot be trusted (truncated, unreadable, or not the video it claims)."""


def base_sampling(sampling: FrameSampling) -> FrameSampling:
    """The frames a shard holds for ``sampling``: the same frames for deterministic sampling
    (every frame, ``fps``, ``max_per_video``), every frame for random picks (``per_video``),
    which are drawn from the shard on every pass."""
    if sampling.per_video is not None:
        return FrameSampling()
    return sampling


def cache_spec(sampling: FrameSampling, fmt: FrameFormat) -> dict:
    base = base_sampling(sampling)
    return {"version": CACHE_FORMAT_VERSION, "sampling": asdict(base), "format": asdict(fmt)}


def cache_key(sampling: FrameSampling, fmt: FrameFormat) -> str:
    """16 hex digits naming the decoded frames' sampling and format (and the cache version)."""
    text = json.dumps(cache_spec(sampling, fmt), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CacheLocation:
    """Where one sampling + format of a data set is cached."""

    root: Location  # <data>/cache/<key>
    key: str

    @classmethod
    def of(cls, data_root: Location, sampling: FrameSampling, fmt: FrameFormat) -> "CacheLocation":
        key = cache_key(sampling, fmt)
        return cls(data_root.join(CACHE_FOLDER, key), key)

    def shard(self, sha256: str) -> Location:
        if not sha256 or not all(c in "0123456789abcdef" for c in sha256):
            raise CacheError(f"cannot cache a video without a sha256 in the manifest (got {sha256!r})")
        return self.root.join(f"{sha256}.parquet")


def encode_shard(frames: list[tuple[int, float, np.ndarray]], video_id: str, sha256: str) -> bytes:
    """The Parquet bytes of one video's decoded frames (as yielded by the decoder)."""
    if not frames:
        raise CacheError(f"{video_id}: no frame to cache")
    shape = list(frames[0][2].shape)
    if any(list(f[2].shape) != shape or f[2].dtype != np.uint8 for f in frames):
        raise CacheError(f"{video_id}: frames of one video must share one uint8 shape")
    meta = {"video_id": str(video_id), "sha256": sha256, "shape": shape, "frames": len(frames),
            "version": CACHE_FORMAT_VERSION}
    table = pa.table(
        {
            "frame_index": pa.array([int(f[0]) for f in frames], pa.int64()),
            "timestamp": pa.array([float(f[1]) for f in frames], pa.float64()),
            "image": pa.array([np.ascontiguousarray(f[2]).tobytes() for f in frames], pa.binary()),
        }
    ).replace_schema_metadata({_META: json.dumps(meta).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="lz4")
    return sink.getvalue()


@dataclass
class Shard:
    """One video's cached frames. Shape: ``images`` ``(T, H, W, C)`` uint8, ``frame_index`` and
    ``timestamp`` ``(T,)``."""

    frame_index: np.ndarray
    timestamp: np.ndarray
    images: np.ndarray

    def frames(self, rows: np.ndarray | None = None):
        """``(frame_index, timestamp, image)`` tuples, as the decoder yields them."""
        rows = np.arange(len(self.frame_index)) if rows is None else rows
        for r in rows:
            yield int(self.frame_index[r]), float(self.timestamp[r]), self.images[r]


def decode_shard(data: bytes, sha256: str) -> Shard:
    """Parse shard bytes; raises :class:`CacheError` unless they are a whole shard of ``sha256``."""
    try:
        table = pq.read_table(io.BytesIO(data))
        meta = json.loads((table.schema.metadata or {})[_META])
    except (pa.ArrowException, OSError, KeyError, ValueError) as err:
        raise CacheError(f"unreadable shard: {err}") from err
    if meta.get("sha256") != sha256 or meta.get("frames") != table.num_rows or table.num_rows == 0:
        raise CacheError(f"shard does not hold the {meta.get('frames')} frames of video {sha256[:12]} it claims")
    shape = tuple(meta["shape"])
    column = table.column("image").combine_chunks()
    buffers = column.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32, count=len(column) + 1, offset=column.offset * 4)
    flat = np.frombuffer(buffers[2], dtype=np.uint8)
    frame_bytes = int(np.prod(shape))
    if not np.all(np.diff(offsets) == frame_bytes):
        raise CacheError("shard frames do not match its recorded shape")
    images = flat[offsets[0]: offsets[0] + frame_bytes * len(column)].reshape((len(column), *shape))
    return Shard(np.asarray(table.column("frame_index"), dtype=np.int64),
                 np.asarray(table.column("timestamp"), dtype=np.float64), images)


# -- listing and removal (sonoray cache ls | rm) --------------------------------------------------
@dataclass(frozen=True)
class CacheEntry:
    key: str
    spec: dict | None
    shards: int
    current: int  # shards of videos in the manifest
    stale: int  # shards of videos no longer in the manifest (changed or removed)
    bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def write_spec(storage: Storage, cache: CacheLocation, sampling: FrameSampling, fmt: FrameFormat) -> None:
    location = cache.root.join(SPEC_FILE)
    if not storage.exists(location):
        storage.write_bytes(location, json.dumps(cache_spec(sampling, fmt), indent=1).encode())


def list_cache(storage: Storage, data_root: Location, manifest_sha256s: set[str]) -> list[CacheEntry]:
    """Every cache under ``data_root``: its spec, shards for current and stale videos, bytes."""
    folder = data_root.join(CACHE_FOLDER)
    by_key: dict[str, list[tuple[str, int]]] = {}
    for path, size in storage.list_sizes(folder):
        key, _, name = path.partition("/")
        by_key.setdefault(key, []).append((name, size))
    entries = []
    for key, files in sorted(by_key.items()):
        spec = None
        if any(name == SPEC_FILE for name, _ in files):
            try:
                spec = json.loads(storage.read_bytes(folder.join(key, SPEC_FILE)))
            except (OSError, ValueError):
                spec = None
        shards = [name.removesuffix(".parquet") for name, _ in files if name.endswith(".parquet")]
        current = sum(1 for sha in shards if sha in manifest_sha256s)
        entries.append(CacheEntry(key, spec, len(shards), current, len(shards) - current,
                                  sum(size for _, size in files)))
    return entries


def remove_cache(storage: Storage, data_root: Location, key: str | None = None,
                 stale_only: bool = False, manifest_sha256s: set[str] = frozenset()) -> int:
    """Delete one cache (``key``), every cache, or only stale shards; returns the files removed."""
    folder = data_root.join(CACHE_FOLDER)
    removed = 0
    for path, _ in storage.list_sizes(folder):
        entry_key, _, name = path.partition("/")
        if key is not None and entry_key != key:
            continue
        if stale_only and (not name.endswith(".parquet") or name.removesuffix(".parquet") in manifest_sha256s):
            continue
        storage.delete(folder.join(path))
        removed += 1
    return removed


class ShardMemo:
    """Decoded shards this worker process keeps between passes, keyed by shard URI and the stored
    object's version (:meth:`cluster.storage.Storage.version`), least recently used dropped
    beyond ``max_bytes``.

    A training epoch on a small data set (POCUS: 129 videos, about 600 KB a shard at 64 px) used
    to fetch and parse every video's whole shard from object storage to keep 3 frames of each,
    about 27 s an epoch on 2 CPUs whatever the batch size. A kept shard costs one HEAD request
    instead; a replaced or corrupted object has a new version, so it is fetched and checked again.
    ``SONORAY_SHARD_MEMO_MB`` sets the bound per worker process, in decoded bytes (default 256:
    POCUS at 64 px grayscale is about 80 MB decoded; 0 turns keeping off).
    """

    def __init__(self, max_bytes: int) -> None:
        import threading
        from collections import OrderedDict

        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[str, tuple[str, Shard, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # a decode task's prefetch threads read while it stores

    def get(self, uri: str, version: str) -> Shard | None:
        with self._lock:
            item = self._items.get(uri)
            if item is None or item[0] != version:
                return None
            self._items.move_to_end(uri)
            return item[1]

    def put(self, uri: str, version: str, shard: Shard) -> None:
        """Keep ``shard``, counted at its decoded size (the arrays it holds in memory)."""
        nbytes = int(shard.images.nbytes + shard.frame_index.nbytes + shard.timestamp.nbytes)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(uri, None)
            if old is not None:
                self._bytes -= old[2]
            self._items[uri] = (version, shard, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, _, size) = self._items.popitem(last=False)
                self._bytes -= size

    def __len__(self) -> int:
        return len(self._items)


SHARD_MEMO = ShardMemo(int(float(os.environ.get("SONORAY_SHARD_MEMO_MB", "256")) * (1 << 20)))
