import cv2
import numpy as np
import pytest

from ultrasound import phantom
from ultrasound.video import (
    FrameFormat,
    FrameSampling,
    VideoError,
    count_frames,
    iter_frames,
    scan_sector_box,
    spooled,
)


def opencv_count(path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    return n


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "c.mp4"
    frames = phantom.render_clip({"b_lines": True}, 30, 64, 64, np.random.default_rng(0))
    phantom.write_clip(path, frames, fps=10)
    return path


def test_every_frame_by_default(clip):
    frames = list(iter_frames(clip))
    assert len(frames) == opencv_count(clip) == 30
    assert [f[0] for f in frames] == list(range(30))
    assert frames[3][1] == pytest.approx(0.3)
    assert frames[0][2].shape == (64, 64, 1) and frames[0][2].dtype == np.uint8


def test_fps_sampling_matches_select(clip):
    got = [f[0] for f in iter_frames(clip, FrameSampling(fps=3))]
    assert got == FrameSampling(fps=3).select(30, 10.0).tolist() == [0, 3, 6, 10, 13, 16, 20, 23, 26]


def test_per_video_and_cap(clip):
    rng = np.random.default_rng(1)
    picks = [f[0] for f in iter_frames(clip, FrameSampling(per_video=4), rng=rng)]
    assert len(picks) == 4 and len(set(picks)) == 4 and picks == sorted(picks)
    capped = [f[0] for f in iter_frames(clip, FrameSampling(fps=10, max_per_video=5))]
    assert capped == [0, 7, 14, 22, 29]
    assert FrameSampling(per_video=50).select(30, 10.0).tolist() == list(range(30))


def test_format_resizes_and_converts(clip):
    _, _, image = next(iter_frames(clip, fmt=FrameFormat(channels=3, size=32)))
    assert image.shape == (32, 32, 3)
    _, _, cropped = next(iter_frames(clip, fmt=FrameFormat(channels=1, crop_sector=True)))
    assert cropped.shape[0] <= 64 and cropped.shape[1] <= 64


def test_scan_sector_box_finds_the_bright_region():
    frames = np.zeros((3, 100, 120), dtype=np.uint8)
    frames[:, 20:80, 30:90] = 100
    frames[1, 0, 0:2] = 255  # a speck of text is not the sector
    assert scan_sector_box(frames) == (20, 80, 30, 90)


def test_refuses_a_video_over_the_size_limit(clip):
    with pytest.raises(VideoError, match="refused: 30 frames of 64x64"):
        list(iter_frames(clip, max_decoded_bytes=1000))


def test_garbage_and_empty_bytes_are_video_errors():
    with pytest.raises(VideoError, match="empty"):
        with spooled(b"", ".mp4"):
            pass
    with spooled(b"not a video at all" * 100, ".mp4") as path:
        with pytest.raises(VideoError):
            list(iter_frames(path))
        with pytest.raises(VideoError):
            count_frames(path)


def test_truncated_video_yields_what_decodes_or_fails_cleanly(clip):
    data = clip.read_bytes()
    with spooled(data[: len(data) // 3], ".mp4") as path:
        try:
            frames = list(iter_frames(path))
        except VideoError:
            frames = []
        assert len(frames) < 30
