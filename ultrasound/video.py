"""Decoding ultrasound videos with OpenCV, frame sampling, scan-sector cropping and resizing.

Everything here works on a local file path (the Ray pipeline in cluster/frames.py hands each
video's bytes to ``decode_bytes``, which spools them to a memory-backed temporary file, one video
at a time). Frames come out one by one, so a long video never sits decoded in memory.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

cv2.setNumThreads(1)  # one decode per CPU: parallelism comes from running videos side by side

DEFAULT_MAX_DECODED_BYTES = 8 * 1024**3


class VideoError(ValueError):
    """A video that cannot be decoded (empty, truncated, not a video) or is refused."""


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frame_count: int  # frames OpenCV actually decodes (container headers can disagree)
    width: int
    height: int


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video to keep.

    * neither ``fps`` nor ``per_video``: every frame;
    * ``fps=F``: frames nearest to times 0, 1/F, 2/F, ... (never more than the native rate);
    * ``per_video=K``: K distinct frames drawn uniformly at random (``rng`` given) or evenly
      spaced (no ``rng``); fewer when the video is shorter;
    * ``max_per_video=M`` caps the count after the above (evenly thinned).
    """

    fps: float | None = None
    per_video: int | None = None
    max_per_video: int | None = None

    def __post_init__(self) -> None:
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.per_video is not None and self.per_video < 1:
            raise ValueError(f"per_video must be >= 1, got {self.per_video}")
        if self.fps is not None and self.per_video is not None:
            raise ValueError("choose one of fps and per_video, not both")
        if self.max_per_video is not None and self.max_per_video < 1:
            raise ValueError(f"max_per_video must be >= 1, got {self.max_per_video}")

    def select(self, n_frames: int, native_fps: float, rng: np.random.Generator | None = None) -> np.ndarray:
        """Sorted frame indices to keep, shape ``(n_kept,)`` int64."""
        if n_frames <= 0:
            return np.zeros(0, dtype=np.int64)
        if self.per_video is not None:
            k = min(self.per_video, n_frames)
            if rng is not None:
                idx = np.sort(rng.choice(n_frames, size=k, replace=False))
            else:
                idx = np.unique(np.linspace(0, n_frames - 1, k).round().astype(np.int64))
        elif self.fps is not None and native_fps > 0:
            step = max(native_fps / self.fps, 1.0)
            idx = np.unique(np.floor(np.arange(0, n_frames, step)).astype(np.int64))
        else:
            idx = np.arange(n_frames, dtype=np.int64)
        if self.max_per_video is not None and len(idx) > self.max_per_video:
            keep = np.linspace(0, len(idx) - 1, self.max_per_video).round().astype(np.int64)
            idx = idx[np.unique(keep)]
        return idx.astype(np.int64)


@dataclass(frozen=True)
class FrameFormat:
    """How decoded frames are shaped: channels 1 (grayscale) or 3 (RGB), optional square
    ``size``, optional crop to the scan sector."""

    channels: int = 1
    size: int | None = None
    crop_sector: bool = False

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.size is not None and self.size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {self.size}")


def _open(path: str | Path) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError("OpenCV cannot open it as a video (empty, truncated or not a video)")
    return cap


def count_frames(path: str | Path) -> VideoInfo:
    """Decode the whole video once and count its frames (headers are not trusted)."""
    cap = _open(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        n = 0
        while cap.grab():
            n += 1
    finally:
        cap.release()
    if n == 0:
        raise VideoError("no frame could be decoded")
    return VideoInfo(fps=fps, frame_count=n, width=width, height=height)


def scan_sector_box(gray_frames: np.ndarray, threshold: int = 12) -> tuple[int, int, int, int]:
    """Bounding box ``(y0, y1, x0, x1)`` of the scan sector in ``(T, H, W)`` uint8 frames.

    The sector is where the image is bright in some frame; the black border, and thin text or
    calibration marks (rows/columns with little bright area), fall outside it.
    """
    peak = gray_frames.max(axis=0)
    mask = peak > threshold
    rows = np.flatnonzero(mask.mean(axis=1) > 0.05)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.05)
    if len(rows) == 0 or len(cols) == 0:
        return 0, peak.shape[0], 0, peak.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def format_frame(bgr: np.ndarray, fmt: FrameFormat, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """BGR ``(H, W, 3)`` uint8 -> ``(S, S, C)`` uint8 (or native size when ``fmt.size`` is None)."""
    if box is not None:
        y0, y1, x0, x1 = box
        bgr = bgr[y0:y1, x0:x1]
    if fmt.channels == 1:
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    else:
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if fmt.size is not None:
        interp = cv2.INTER_AREA if min(image.shape[:2]) > fmt.size else cv2.INTER_LINEAR
        image = cv2.resize(image, (fmt.size, fmt.size), interpolation=interp)
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(image)


def iter_frames(
    path: str | Path,
    sampling: FrameSampling = FrameSampling(),
    fmt: FrameFormat = FrameFormat(),
    *,
    rng: np.random.Generator | None = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    frame_count: int | None = None,
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield ``(frame_index, timestamp_s, image (S, S, C) uint8)`` for the sampled frames.

    ``frame_count`` (the decoded count recorded at ingest) spares random / capped sampling a
    counting pass over the video.

    Raises ``VideoError`` before decoding when the header says the decoded frames would exceed
    ``max_decoded_bytes``, and when the file holds no decodable frame.
    """
    cap = _open(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        header_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        decoded = header_count * width * height * 3
        if decoded > max_decoded_bytes:
            raise VideoError(
                f"refused: {header_count} frames of {width}x{height} decode to "
                f"{decoded / 1024**3:.1f} GiB, over the limit of {max_decoded_bytes / 1024**3:.1f} GiB"
            )
        needs_count = sampling.per_video is not None or sampling.max_per_video is not None
        if needs_count:
            # Random / evenly spaced picks need the true length (headers are not trusted).
            if frame_count is None:
                cap.release()
                frame_count = count_frames(path).frame_count
                cap = _open(path)
            wanted = sampling.select(frame_count, fps, rng)
        else:
            wanted = None
        box = None
        if fmt.crop_sector:
            box = _sector_box_of(path, fps)
        n_yielded = 0
        index = -1
        next_pick = 0
        while True:
            if wanted is not None and next_pick >= len(wanted):
                break
            if not cap.grab():
                break
            index += 1
            if wanted is not None:
                if index != wanted[next_pick]:
                    continue
                next_pick += 1
            elif sampling.fps is not None and fps > 0:
                step = max(fps / sampling.fps, 1.0)
                if index != int(np.floor(np.ceil(index / step - 1e-9) * step)):
                    continue
            ok, bgr = cap.retrieve()
            if not ok or bgr is None:
                break
            timestamp = index / fps if fps > 0 else float(index)
            n_yielded += 1
            yield index, timestamp, format_frame(bgr, fmt, box)
        if index < 0:
            raise VideoError("no frame could be decoded (empty or truncated video)")
    finally:
        cap.release()


def _sector_box_of(path: str | Path, fps: float, n_probe: int = 8) -> tuple[int, int, int, int]:
    info = count_frames(path)
    picks = set(FrameSampling(per_video=n_probe).select(info.frame_count, fps).tolist())
    cap = _open(path)
    grays = []
    try:
        index = 0
        while cap.grab():
            if index in picks:
                ok, bgr = cap.retrieve()
                if ok:
                    grays.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
            index += 1
    finally:
        cap.release()
    return scan_sector_box(np.stack(grays)) if grays else (0, info.height, 0, info.width)


def _spool_dir() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


@contextmanager
def spooled(data: bytes, suffix: str) -> Iterator[Path]:
    """A video's bytes as a temporary file (in memory-backed /dev/shm where there is one), removed
    on exit. OpenCV's FFmpeg backend reads containers by path; one video at a time is spooled."""
    if not data:
        raise VideoError("empty object (0 bytes)")
    fd, name = tempfile.mkstemp(suffix=suffix, prefix="sonoray-", dir=_spool_dir())
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        yield Path(name)
    finally:
        os.unlink(name)
