"""Decoding ultrasound videos, frame sampling, scan-sector cropping and resizing.

Two decoders, one sampling rule (:func:`_picks`):

- :func:`decode_bytes`: a video held in memory (the Ray pipeline in cluster/frames.py hands it
  each object's bytes), decoded with PyAV straight from memory; grayscale is FFmpeg's luma plane.
  Containers PyAV cannot open fall back to OpenCV on a spooled copy.
- :func:`iter_frames`: a local file decoded with OpenCV, the reference for frame counts (ingest
  counts with it).

Frames come out one by one, so a long video never sits decoded in memory.
"""
from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterator
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
    """BGR ``(H, W, 3)`` uint8 (OpenCV) -> ``(S, S, C)`` uint8 (or native size when ``fmt.size`` is None)."""
    if box is not None:
        y0, y1, x0, x1 = box
        bgr = bgr[y0:y1, x0:x1]
    image = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY if fmt.channels == 1 else cv2.COLOR_BGR2RGB)
    return _resize(image, fmt, None)


def _picks(sampling: FrameSampling, n_frames: int | None, fps: float,
           rng: np.random.Generator | None) -> Callable[[int], bool | None]:
    """A predicate over decoded frame indices: True keep, False skip, None stop decoding.

    Random / evenly spaced / capped picks need the true length ``n_frames``; ``fps`` sampling
    keeps the frame nearest each 1/F step and needs no length."""
    if sampling.per_video is not None or sampling.max_per_video is not None:
        wanted = sampling.select(int(n_frames or 0), fps, rng)
        position = {int(i): k for k, i in enumerate(wanted)}
        last = int(wanted[-1]) if len(wanted) else -1
        return lambda index: None if index > last else index in position
    if sampling.fps is not None and fps > 0:
        step = max(fps / sampling.fps, 1.0)
        return lambda index: index == int(np.floor(np.ceil(index / step - 1e-9) * step))
    return lambda index: True


def _check_decoded_size(frames: int, width: int, height: int, max_decoded_bytes: int) -> None:
    decoded = frames * width * height * 3
    if decoded > max_decoded_bytes:
        raise VideoError(
            f"refused: {frames} frames of {width}x{height} decode to "
            f"{decoded / 1024**3:.1f} GiB, over the limit of {max_decoded_bytes / 1024**3:.1f} GiB"
        )


def iter_frames(
    path: str | Path,
    sampling: FrameSampling = FrameSampling(),
    fmt: FrameFormat = FrameFormat(),
    *,
    rng: np.random.Generator | None = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    frame_count: int | None = None,
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield ``(frame_index, timestamp_s, image (S, S, C) uint8)`` for the sampled frames of a
    local file, decoded with OpenCV (the reference decoder: ingest counts frames with it).

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
        _check_decoded_size(int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), width, height, max_decoded_bytes)
        if (sampling.per_video is not None or sampling.max_per_video is not None) and frame_count is None:
            # Random / evenly spaced picks need the true length (headers are not trusted).
            cap.release()
            frame_count = count_frames(path).frame_count
            cap = _open(path)
        keep = _picks(sampling, frame_count, fps, rng)
        box = _sector_box_of(path, fps) if fmt.crop_sector else None
        index = -1
        while True:
            if not cap.grab():
                break
            index += 1
            decision = keep(index)
            if decision is None:
                break
            if not decision:
                continue
            ok, bgr = cap.retrieve()
            if not ok or bgr is None:
                break
            yield index, index / fps if fps > 0 else float(index), format_frame(bgr, fmt, box)
        if index < 0:
            raise VideoError("no frame could be decoded (empty or truncated video)")
    finally:
        cap.release()


# -- decoding from memory with PyAV --------------------------------------------------------------
# Pixel formats whose first plane is the 8-bit luma (Y) image: grayscale needs no colour conversion.
_LUMA_FIRST = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p",
                         "yuv411p", "yuv410p", "yuv440p", "yuvj440p", "nv12", "nv21", "gray"})


def _luma(frame) -> np.ndarray:
    """``(H, W)`` uint8 grayscale of a PyAV frame: the Y plane itself where the pixel format
    carries one (no copy, no conversion), else FFmpeg's own conversion to gray."""
    if frame.format.name in _LUMA_FIRST:
        plane = frame.planes[0]
        return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
    return frame.to_ndarray(format="gray")


def _resize(image: np.ndarray, fmt: FrameFormat, box: tuple[int, int, int, int] | None) -> np.ndarray:
    if box is not None:
        y0, y1, x0, x1 = box
        image = image[y0:y1, x0:x1]
    if fmt.size is not None:
        interp = cv2.INTER_AREA if min(image.shape[:2]) > fmt.size else cv2.INTER_LINEAR
        image = cv2.resize(image, (fmt.size, fmt.size), interpolation=interp)
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(image)


def _format_av(frame, fmt: FrameFormat, box: tuple[int, int, int, int] | None) -> np.ndarray:
    image = _luma(frame) if fmt.channels == 1 else frame.to_ndarray(format="rgb24")
    return _resize(image, fmt, box)


def _open_av(data: bytes):
    """``(container, video stream)`` of a video held in memory, one decode thread."""
    import av

    container = av.open(io.BytesIO(data), mode="r")
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream in the container")
    stream = container.streams.video[0]
    stream.thread_type = "SLICE"  # frame threading reorders work across cores: one core per decode
    stream.codec_context.thread_count = 1
    return container, stream


def _av_frames(data: bytes) -> Iterator:
    """Every decoded frame of ``data``; a decode error mid-stream ends the video there, as a failed
    ``grab`` does in OpenCV."""
    import av

    container, stream = _open_av(data)
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                return
            yield from frames
    finally:
        container.close()


def _av_sector_box(data: bytes, frame_count: int, fps: float, n_probe: int = 8) -> tuple[int, int, int, int]:
    picks = set(FrameSampling(per_video=n_probe).select(frame_count, fps).tolist())
    grays, shape = [], None
    for index, frame in enumerate(_av_frames(data)):
        if index in picks:
            grays.append(np.array(_luma(frame)))
        shape = (frame.height, frame.width)
    if not grays:
        return (0, shape[0], 0, shape[1]) if shape else (0, 0, 0, 0)
    return scan_sector_box(np.stack(grays))


def _iter_frames_av(
    data: bytes, sampling: FrameSampling, fmt: FrameFormat, *, rng: np.random.Generator | None,
    max_decoded_bytes: int, frame_count: int | None, fps: float | None,
) -> Iterator[tuple[int, float, np.ndarray]]:
    container, stream = _open_av(data)
    try:
        native_fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        width, height = stream.codec_context.width, stream.codec_context.height
        header_count = int(stream.frames or 0) or int(round(float(stream.duration * stream.time_base) * native_fps)
                                                      if stream.duration and stream.time_base else 0)
    finally:
        container.close()
    fps = native_fps if fps is None or fps <= 0 else float(fps)
    _check_decoded_size(frame_count or header_count, width, height, max_decoded_bytes)
    needs_count = sampling.per_video is not None or sampling.max_per_video is not None or fmt.crop_sector
    if needs_count and frame_count is None:
        frame_count = sum(1 for _ in _av_frames(data))
    keep = _picks(sampling, frame_count, fps, rng)
    box = _av_sector_box(data, int(frame_count), fps) if fmt.crop_sector else None
    index = -1
    for index, frame in enumerate(_av_frames(data)):
        decision = keep(index)
        if decision is None:
            break
        if decision:
            yield index, index / fps if fps > 0 else float(index), _format_av(frame, fmt, box)
    if index < 0:
        raise VideoError("no frame could be decoded (empty or truncated video)")


def decode_bytes(
    data: bytes,
    suffix: str,
    sampling: FrameSampling = FrameSampling(),
    fmt: FrameFormat = FrameFormat(),
    *,
    rng: np.random.Generator | None = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    frame_count: int | None = None,
    fps: float | None = None,
) -> Iterator[tuple[int, float, np.ndarray]]:
    """The sampled frames of a video held in memory: ``(frame_index, timestamp_s, (S, S, C) uint8)``.

    Decoded with PyAV (FFmpeg) straight from memory, no temporary file; grayscale is the decoder's
    own luma plane (no YUV -> BGR -> gray round trip), so it differs from OpenCV's BGR -> gray by
    rounding and by video range (16-235) where the video uses it. A container PyAV cannot open
    falls back to OpenCV on a spooled copy. Frame indices and counts are the same either way (the
    POCUS test compares every video with OpenCV's count). ``frame_count`` and ``fps`` are the
    values recorded at ingest; given, they make sampling identical whichever decoder runs.
    """
    if not data:
        raise VideoError("empty object (0 bytes)")
    try:
        frames = _iter_frames_av(data, sampling, fmt, rng=rng, max_decoded_bytes=max_decoded_bytes,
                                 frame_count=frame_count, fps=fps)
        first = next(frames, None)
    except ImportError:
        first, frames = None, None
    except VideoError:
        raise
    except Exception:  # av.error.*: a container FFmpeg-through-PyAV cannot open; try OpenCV
        first, frames = None, None
    if frames is not None and first is not None:
        yield first
        yield from frames
        return
    with spooled(data, suffix or ".bin") as path:
        yield from iter_frames(path, sampling, fmt, rng=rng, max_decoded_bytes=max_decoded_bytes,
                               frame_count=frame_count)


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
