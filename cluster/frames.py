"""Frame streaming: manifest + video objects -> Ray Data -> decoded, sampled, resized frames.

One Ray Data task per video (one CPU each, so no more decode workers start than there are
cores) reads that video's frames from the decoded-frame cache (``cluster.cache``) when its shard
exists; otherwise it fetches the object's bytes through pyarrow's filesystem, decodes them in
memory with PyAV (``ultrasound.video.decode_bytes``; OpenCV as the fallback), writes the shard, and
yields the frames in batches. Random per-video picks (USCL clips) are drawn from the cached frames
on every pass. With ``--no-cache`` (``StreamSpec(cache=False)``) frames are decoded and streamed one
by one, never held whole. A video that cannot be read or decoded is recorded in the stream's
:class:`StreamLog` actor (key + reason) and skipped; the stream goes on, and training jobs read the
log after every epoch (``cluster.train.check_epoch_inputs``).

Rows (``mode="frames"``): video_id, patient_id, key, label, frame_index (int64), timestamp
(float64 s), findings (float32, one per finding), image (uint8 ``(S, S, C)``).
Rows (``mode="clips"``, one per video, for USCL's sample pair generation): video_id, patient_id,
key, label, findings, n_frames (int64 real frames), frame_index (int64 ``(K,)``), frames (uint8
``(K, S, S, C)``; short videos repeat their last frame up to K).
"""
from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import ray

from cluster.cache import (
    CACHE_FOLDER,
    SHARD_MEMO,
    CacheError,
    CacheLocation,
    Shard,
    base_sampling,
    decode_shard,
    encode_shard,
    write_spec,
)
from cluster.dataset import IngestedDataset, video_location
from cluster.storage import Location, Storage, StorageConfig, parse_uri
from ultrasound.video import (
    DEFAULT_MAX_DECODED_BYTES,
    FrameFormat,
    FrameSampling,
    VideoError,
    decode_bytes,
)

FRAMES_PER_BATCH = 128
# Clips read from the cache are a few frames per video: one task takes several videos and fetches
# their shards concurrently, so per-task overhead and object-store latency do not dominate.
CLIP_VIDEOS_PER_TASK = 8
SHARD_FETCHES = 4
BATCH_BYTES = 8 * 1024**2  # a yielded batch closes at 128 frames or 8 MiB, whichever comes first


@dataclass(frozen=True)
class StreamSpec:
    """What the stream yields.

    ``seed=None`` re-samples random per-video picks on every pass (every epoch); a seed makes them
    reproducible. ``order_seed`` visits the videos in a seeded random order instead of the
    manifest's (which is often sorted by class and patient). ``cache`` reads and fills the
    decoded-frame cache beside the data set (``cluster.cache``).
    """

    sampling: FrameSampling = field(default_factory=FrameSampling)
    fmt: FrameFormat = field(default_factory=FrameFormat)
    mode: str = "frames"  # or "clips"
    seed: int | None = None
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    cpus_per_task: float = 1.0
    cache: bool = True
    order_seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("frames", "clips"):
            raise ValueError(f"mode must be 'frames' or 'clips', got {self.mode!r}")
        if self.mode == "clips" and (self.sampling.per_video is None or self.fmt.size is None):
            raise ValueError("clips mode needs sampling.per_video=K and fmt.size")


@ray.remote(num_cpus=0)
class StreamLog:
    """What a stream did, over every pass: the videos it skipped (key + reason), the cache's hits
    and builds, and an abort message a training loop leaves for its driver."""

    def __init__(self) -> None:
        self._items: list[dict] = []
        self._cache = {"hits": 0, "kept": 0, "fetched": 0, "built": 0, "rebuilt": 0, "bytes_read": 0,
                       "bytes_written": 0, "write_errors": 0}
        self._abort: str | None = None

    def record(self, key: str, reason: str) -> None:
        self._items.append({"key": key, "reason": reason})

    def items(self) -> list[dict]:
        return list(self._items)

    def cache_event(self, kind: str, nbytes: int = 0) -> None:
        """A shard ``built`` (``nbytes`` written), ``rebuilt`` or a ``write_errors``; called and
        awaited by the decode tasks, so a pass's counts are complete when it ends (calls from
        different processes to one actor are not ordered)."""
        self._cache[kind] += 1
        self._cache["bytes_written"] += int(nbytes)

    def cache_counts(self, counts: dict) -> None:
        """Hits of one batch: ``hits`` (= ``kept`` in the task's memory + ``fetched`` from
        storage) and ``bytes_read``; awaited like :meth:`cache_event`."""
        for key, value in counts.items():
            self._cache[key] += int(value)

    def cache_stats(self) -> dict:
        return dict(self._cache)

    def abort(self, message: str) -> None:
        self._abort = self._abort or message

    def aborted(self) -> str | None:
        return self._abort


def _video_rng(spec: StreamSpec, video_id: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(video_id.encode()).digest()[:8], "little")
    if spec.seed is None:
        return np.random.default_rng([digest, int.from_bytes(os.urandom(8), "little")])
    return np.random.default_rng([digest, spec.seed])


def _fetch_shard(storage: Storage, location: Location) -> tuple[str | None, bytes | Shard | None]:
    """``(version, content)`` of a shard: the decoded copy this process kept when it is still the
    stored version (one HEAD request), else the stored bytes; ``(None, None)`` when there is none."""
    version = storage.version(location)
    if version is None:
        return None, None
    kept = SHARD_MEMO.get(location.uri, version)
    if kept is not None:
        return version, kept
    try:
        return version, storage.read_bytes(location)
    except (OSError, RuntimeError):
        if not storage.exists(location):
            return None, None
        raise


def _read_shard(storage: Storage, location: Location, sha256: str, log, counts: dict,
                fetched=None) -> Shard | None:
    """The cached shard (``fetched``: :func:`_fetch_shard`'s answer, already started), or None
    when it is missing or cannot be trusted (then it is rebuilt). Hits are added to ``counts``,
    which the decode task sends to the log once per batch."""
    version, data = _fetch_shard(storage, location) if fetched is None else fetched()
    if data is None:
        return None
    if isinstance(data, Shard):
        _count_hit(counts, "kept", 0)
        return data
    try:
        shard = decode_shard(data, sha256)
    except CacheError:
        ray.get(log.cache_event.remote("rebuilt"))
        return None
    SHARD_MEMO.put(location.uri, version, shard)
    _count_hit(counts, "fetched", len(data))
    return shard


def _count_hit(counts: dict, how: str, nbytes: int) -> None:
    for key, value in (("hits", 1), (how, 1), ("bytes_read", nbytes)):
        counts[key] = counts.get(key, 0) + value


def _build_shard(storage: Storage, location: Location, meta: dict, frames: list, log) -> Shard:
    """Cache one video's decoded frames; a failed write leaves the stream going (counted)."""
    try:
        data = encode_shard(frames, str(meta["video_id"]), str(meta["sha256"]))
        storage.write_bytes(location, data)
        ray.get(log.cache_event.remote("built", len(data)))
    except (OSError, RuntimeError, CacheError):
        ray.get(log.cache_event.remote("write_errors"))
    return Shard(np.array([f[0] for f in frames], dtype=np.int64), np.array([f[1] for f in frames]),
                 np.stack([f[2] for f in frames]))


def _video_frames(meta: dict, spec: StreamSpec, storage: Storage, root: Location, cache: CacheLocation | None,
                  log, counts: dict, fetched=None):
    """The sampled ``(frame_index, timestamp, image)`` of one video: from its cache shard when
    there is one, else decoded from the object (and cached)."""
    key = str(meta["key"])
    rng = _video_rng(spec, str(meta["video_id"]))
    decode = dict(max_decoded_bytes=spec.max_decoded_bytes, frame_count=int(meta["frame_count"]) or None,
                  fps=float(meta["fps"]) or None)
    suffix = PurePosixPath(key).suffix or ".bin"
    if cache is None:
        return decode_bytes(storage.read_bytes(video_location(root, key)), suffix, spec.sampling, spec.fmt, rng=rng, **decode)
    location = cache.shard(str(meta["sha256"]))
    shard = _read_shard(storage, location, str(meta["sha256"]), log, counts, fetched)
    if shard is None:
        frames = list(decode_bytes(storage.read_bytes(video_location(root, key)), suffix, base_sampling(spec.sampling),
                                   spec.fmt, **decode))
        if not frames:
            raise VideoError("no frame could be decoded")
        shard = _build_shard(storage, location, meta, frames, log)
    rows = None
    if spec.sampling.per_video is not None:  # the shard holds every frame: draw this pass's picks
        rows = spec.sampling.select(len(shard.frame_index), float(meta["fps"]), rng)
    return shard.frames(rows)


_META_COLUMNS = ("video_id", "patient_id", "key", "label")


def _decode_video_batches(batch: dict, *, spec: StreamSpec, storage_config: StorageConfig,
                          root_uri: str, log, n_findings: int, cache_key: str | None):
    """Ray Data map_batches generator: manifest rows in (one per video, several in clips mode),
    batches of frames out. Several videos' cache shards are fetched concurrently."""
    storage = Storage(storage_config)
    root = parse_uri(root_uri)
    cache = CacheLocation(root.join(CACHE_FOLDER, cache_key), cache_key) if cache_key else None
    n = len(batch["video_id"])
    counts: dict[str, int] = {}  # cache hits of this batch, sent to the log in one call
    prefetch = None
    if cache is not None and n > 1:
        pool = ThreadPoolExecutor(max_workers=min(n, SHARD_FETCHES))
        prefetch = [pool.submit(_fetch_shard, storage, cache.shard(str(sha))) for sha in batch["sha256"]]
        pool.shutdown(wait=False)
    for i in range(n):
        meta = {name: batch[name][i] for name in (*_META_COLUMNS, "frame_count", "fps", "sha256")}
        findings = np.asarray(batch["findings"][i], dtype=np.float32).reshape(n_findings)
        labels = {name: meta[name] for name in _META_COLUMNS}
        try:
            frames = _video_frames(meta, spec, storage, root, cache, log, counts,
                                   prefetch[i].result if prefetch is not None else None)
            if spec.mode == "clips":
                yield _clip_batch(list(frames), labels, findings, spec.sampling.per_video)
            else:
                yield from _frame_batches(frames, labels, findings)
        except (VideoError, CacheError, OSError, RuntimeError) as err:
            ray.get(log.record.remote(str(meta["key"]), str(err)))
    if counts:  # awaited, so a pass's counts are complete when it ends
        ray.get(log.cache_counts.remote(counts))


def _frame_batches(frames, meta: dict, findings: np.ndarray):
    buffer: list[tuple[int, float, np.ndarray]] = []
    size = 0
    for item in frames:
        buffer.append(item)
        size += item[2].nbytes
        if len(buffer) == FRAMES_PER_BATCH or size >= BATCH_BYTES:
            yield _pack(buffer, meta, findings)
            buffer, size = [], 0
    if buffer:
        yield _pack(buffer, meta, findings)


def _pack(buffer, meta: dict, findings: np.ndarray) -> dict:
    n = len(buffer)
    out = {name: np.array([str(value)] * n, dtype=object) for name, value in meta.items()}
    out["frame_index"] = np.array([b[0] for b in buffer], dtype=np.int64)
    out["timestamp"] = np.array([b[1] for b in buffer], dtype=np.float64)
    out["findings"] = np.repeat(findings[None, :], n, axis=0)
    out["image"] = np.stack([b[2] for b in buffer])
    return out


def _clip_batch(frames: list, meta: dict, findings: np.ndarray, k: int) -> dict:
    if not frames:
        raise VideoError("no frame could be decoded")
    n_real = len(frames)
    padded = frames + [frames[-1]] * (k - n_real)
    out = {name: np.array([str(value)], dtype=object) for name, value in meta.items()}
    out["findings"] = findings[None, :]
    out["n_frames"] = np.array([n_real], dtype=np.int64)
    out["frame_index"] = np.array([[f[0] for f in padded]], dtype=np.int64)
    out["frames"] = np.stack([f[2] for f in padded])[None]
    return out


@dataclass
class FrameStream:
    """A lazy Ray Dataset of frames plus the log of what it did (skipped videos, cache use)."""

    dataset: ray.data.Dataset
    log: ray.actor.ActorHandle
    n_videos: int
    findings: list[str]
    cache_uri: str | None = None

    def failed(self) -> list[dict]:
        """Every (key, reason) recorded, over every pass (an epoch that re-reads a failing video
        records it again)."""
        return ray.get(self.log.items.remote())

    def skipped_videos(self) -> list[dict]:
        """One entry per failed video: key, its last reason, and how many passes skipped it."""
        return summarise_failures(self.failed())

    def cache_stats(self) -> dict:
        return ray.get(self.log.cache_stats.remote())

    def aborted(self) -> str | None:
        return ray.get(self.log.aborted.remote())


def summarise_failures(items: list[dict]) -> list[dict]:
    by_key: dict[str, dict] = {}
    for item in items:
        entry = by_key.setdefault(item["key"], {"key": item["key"], "reason": item["reason"], "times": 0})
        entry["reason"] = item["reason"]
        entry["times"] += 1
    return sorted(by_key.values(), key=lambda e: e["key"])


def stream_items(data: IngestedDataset, order_seed: int | None = None) -> list[dict]:
    """One input row per video, in manifest order or (``order_seed``) a seeded random order."""
    findings = data.finding_matrix()
    items = [
        {
            "video_id": r["video_id"],
            "patient_id": r.get("patient_id") or "",
            "key": r["key"],
            "label": r.get("label") or "",
            "findings": findings[i],
            "frame_count": int(r.get("frame_count") or 0),
            "fps": float(r.get("fps") or 0.0),
            "sha256": str(r.get("sha256") or ""),
        }
        for i, r in enumerate(data.rows)
    ]
    if order_seed is not None:
        order = np.random.default_rng(order_seed).permutation(len(items))
        items = [items[i] for i in order]
    return items


def frame_stream(data: IngestedDataset, spec: StreamSpec) -> FrameStream:
    """Build the lazy pipeline over every video of ``data`` (filter with ``data.select``)."""
    if not data.rows:
        raise ValueError(f"{data.root.uri}: the data set holds no video")
    items = stream_items(data, spec.order_seed)
    cache = None
    if spec.cache:
        if any(not item["sha256"] for item in items):
            raise ValueError(f"{data.root.uri}: the manifest lacks sha256 for some videos, so their frames "
                             f"cannot be cached: re-ingest, or pass --no-cache")
        cache = CacheLocation.of(data.root, spec.sampling, spec.fmt)
        try:
            write_spec(data.storage, cache, spec.sampling, spec.fmt)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"cannot write the frame cache under {cache.root.uri} ({err}): "
                             f"pass --no-cache to decode without it") from err
    log = StreamLog.remote()
    per_task = CLIP_VIDEOS_PER_TASK if spec.mode == "clips" and cache is not None else 1
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // per_task)).map_batches(
        _decode_video_batches,
        batch_size=per_task,
        num_cpus=spec.cpus_per_task,
        fn_kwargs=dict(
            spec=spec,
            storage_config=data.storage.config,
            root_uri=data.root.uri,
            log=log,
            n_findings=len(data.findings),
            cache_key=cache.key if cache else None,
        ),
    )
    return FrameStream(ds, log, len(items), list(data.findings), cache.root.uri if cache else None)


@dataclass
class CollectedFrames:
    """Frames held in memory: the collected ``columns`` (numpy arrays, one row per frame, in the
    order :func:`collect_frames` gives) and the videos that yielded nothing (key, reason, times)."""

    columns: dict[str, np.ndarray]
    failed: list[dict]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __len__(self) -> int:
        return len(self.columns["video_id"])


def collect_frames(stream: FrameStream, data: IngestedDataset, columns: tuple[str, ...] | list[str],
                   dataset: "ray.data.Dataset | None" = None) -> CollectedFrames:
    """Every frame of ``dataset`` (default: the stream's own) on the driver, the named
    ``columns`` as numpy arrays, sorted by the video's position in ``data``'s manifest, then by
    frame index: the one order every job that holds frames in memory uses.

    ``video_id`` and ``frame_index`` are always collected (``video_id`` as str). The failure
    rule, the same everywhere: a video that yields no frame is listed in ``failed`` (the caller
    reports it), and no frame at all raises ValueError naming the data set and the first reasons.

    Shape: each column ``(N, ...)`` as the stream gives it (``image``: ``(N, S, S, C)`` uint8).
    """
    names = list(dict.fromkeys(["video_id", "frame_index", *columns]))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    source = stream.dataset if dataset is None else dataset
    for batch in source.select_columns(names).iter_batches(batch_size=None, batch_format="numpy"):
        for name in names:
            parts[name].append(np.asarray(batch[name]))
    failed = stream.skipped_videos()
    if not parts["video_id"]:
        reasons = "; ".join(f"{f['key']}: {f['reason']}" for f in failed[:3])
        raise ValueError(f"{data.root.uri}: no frame could be decoded from {stream.n_videos} videos"
                         + (f" ({reasons})" if reasons else ""))
    joined = {name: np.concatenate(values) for name, values in parts.items()}
    joined["video_id"] = joined["video_id"].astype(str)
    joined["frame_index"] = joined["frame_index"].astype(np.int64)
    position = {str(row["video_id"]): i for i, row in enumerate(data.rows)}
    video_pos = np.array([position[v] for v in joined["video_id"]], dtype=np.int64)
    order = np.lexsort((joined["frame_index"], video_pos))
    return CollectedFrames({name: values[order] for name, values in joined.items()}, failed)


@dataclass
class StreamSummary:
    videos: int
    frames: int
    frames_per_s: float
    seconds: float
    failed: list[dict]
    frames_per_video: dict[str, int]
    cache: dict | None = None

    def as_dict(self) -> dict:
        return {"videos": self.videos, "frames": self.frames,
                "frames_per_s": round(self.frames_per_s, 1), "failed": self.failed, "cache": self.cache}


def drain(stream: FrameStream, limit: int | None = None, on_progress=None) -> StreamSummary:
    """Consume the stream (up to ``limit`` frames), counting frames per video."""
    counts: dict[str, int] = {}
    total = 0
    start = time.perf_counter()
    last_report = start
    for batch in stream.dataset.iter_batches(batch_size=None, batch_format="numpy"):
        ids = batch["video_id"]
        n_rows = len(ids)
        per_row = batch["frames"].shape[1] if "frames" in batch else 1
        for vid in ids:
            counts[str(vid)] = counts.get(str(vid), 0) + per_row
        total += n_rows * per_row
        now = time.perf_counter()
        if on_progress and now - last_report > 5:
            on_progress(f"frames: {total} frames from {len(counts)} videos, {total / (now - start):.0f} frames/s")
            last_report = now
        if limit is not None and total >= limit:
            break
    seconds = time.perf_counter() - start
    return StreamSummary(
        videos=len(counts), frames=total, frames_per_s=total / seconds if seconds > 0 else 0.0,
        seconds=seconds, failed=stream.failed(), frames_per_video=counts,
        cache={"uri": stream.cache_uri, **stream.cache_stats()} if stream.cache_uri else None,
    )
