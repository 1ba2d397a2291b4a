"""Frame streaming: manifest + video objects -> Ray Data -> decoded, sampled, resized frames.

One Ray Data task per video fetches the object's bytes through pyarrow's filesystem, decodes it
with OpenCV (ultrasound/video.py) and yields frames in small batches, so a video is never held
decoded in memory and nothing is copied to local disk beyond one spooled video in /dev/shm.
A video that cannot be read or decoded is recorded in a ``FailureLog`` actor (key + reason) and
skipped; the stream goes on.

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
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import ray

from cluster.dataset import IngestedDataset
from cluster.storage import Storage, StorageConfig
from ultrasound.video import (
    DEFAULT_MAX_DECODED_BYTES,
    FrameFormat,
    FrameSampling,
    VideoError,
    iter_frames,
    spooled,
)

FRAMES_PER_BATCH = 128
BATCH_BYTES = 8 * 1024**2  # a yielded batch closes at 128 frames or 8 MiB, whichever comes first


@dataclass(frozen=True)
class StreamSpec:
    """What the stream yields. ``seed=None`` re-samples randomly on every pass (every epoch);
    a seed makes per-video random picks reproducible."""

    sampling: FrameSampling = field(default_factory=FrameSampling)
    fmt: FrameFormat = field(default_factory=FrameFormat)
    mode: str = "frames"  # or "clips"
    seed: int | None = None
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    # Several decodes per CPU: while one task waits on its object fetch, another decodes.
    cpus_per_task: float = 0.25

    def __post_init__(self) -> None:
        if self.mode not in ("frames", "clips"):
            raise ValueError(f"mode must be 'frames' or 'clips', got {self.mode!r}")
        if self.mode == "clips" and (self.sampling.per_video is None or self.fmt.size is None):
            raise ValueError("clips mode needs sampling.per_video=K and fmt.size")


@ray.remote(num_cpus=0)
class FailureLog:
    """Collects (key, reason) for videos the stream skipped."""

    def __init__(self) -> None:
        self._items: list[dict] = []

    def record(self, key: str, reason: str) -> None:
        self._items.append({"key": key, "reason": reason})

    def items(self) -> list[dict]:
        return list(self._items)


def _video_rng(spec: StreamSpec, video_id: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(video_id.encode()).digest()[:8], "little")
    if spec.seed is None:
        return np.random.default_rng([digest, int.from_bytes(os.urandom(8), "little")])
    return np.random.default_rng([digest, spec.seed])


def _decode_video_batches(batch: dict, *, spec: StreamSpec, storage_config: StorageConfig,
                          root_uri: str, failures, n_findings: int):
    """Ray Data map_batches generator: one manifest row in, batches of frames out."""
    from cluster.storage import parse_uri

    storage = Storage(storage_config)
    root = parse_uri(root_uri)
    for i in range(len(batch["video_id"])):
        meta = {name: batch[name][i] for name in ("video_id", "patient_id", "key", "label")}
        findings = np.asarray(batch["findings"][i], dtype=np.float32).reshape(n_findings)
        key = str(meta["key"])
        try:
            data = storage.read_bytes(root.join(key))
            with spooled(data, PurePosixPath(key).suffix or ".bin") as path:
                frames = iter_frames(path, spec.sampling, spec.fmt, rng=_video_rng(spec, str(meta["video_id"])),
                                     max_decoded_bytes=spec.max_decoded_bytes,
                                     frame_count=int(batch["frame_count"][i]))
                if spec.mode == "clips":
                    yield _clip_batch(list(frames), meta, findings, spec.sampling.per_video)
                else:
                    yield from _frame_batches(frames, meta, findings)
        except (VideoError, OSError, RuntimeError) as err:
            ray.get(failures.record.remote(key, str(err)))


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
    """A lazy Ray Dataset of frames plus the log of videos it skipped."""

    dataset: ray.data.Dataset
    failures: ray.actor.ActorHandle
    n_videos: int
    findings: list[str]

    def failed(self) -> list[dict]:
        return ray.get(self.failures.items.remote())


def frame_stream(data: IngestedDataset, spec: StreamSpec) -> FrameStream:
    """Build the lazy pipeline over every video of ``data`` (filter with ``data.select``)."""
    rows = data.rows
    if not rows:
        raise ValueError(f"{data.root.uri}: the data set holds no video")
    findings = data.finding_matrix()
    items = [
        {
            "video_id": r["video_id"],
            "patient_id": r.get("patient_id") or "",
            "key": r["key"],
            "label": r.get("label") or "",
            "findings": findings[i],
            "frame_count": int(r["frame_count"]),
        }
        for i, r in enumerate(rows)
    ]
    failures = FailureLog.remote()
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _decode_video_batches,
        batch_size=1,
        num_cpus=spec.cpus_per_task,
        fn_kwargs=dict(
            spec=spec,
            storage_config=data.storage.config,
            root_uri=data.root.uri,
            failures=failures,
            n_findings=len(data.findings),
        ),
    )
    return FrameStream(ds, failures, len(items), list(data.findings))


@dataclass
class StreamSummary:
    videos: int
    frames: int
    frames_per_s: float
    seconds: float
    failed: list[dict]
    frames_per_video: dict[str, int]

    def as_dict(self) -> dict:
        return {"videos": self.videos, "frames": self.frames,
                "frames_per_s": round(self.frames_per_s, 1), "failed": self.failed}


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
    )
