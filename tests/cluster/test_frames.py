"""The Ray Data frame stream on a real local Ray and the loopback S3 server."""
import cv2
import numpy as np
import pytest

from cluster.dataset import load_dataset
from cluster.frames import StreamSpec, drain, frame_stream
from jobs.cli import main
from tests.conftest import run_cli
from ultrasound import phantom
from ultrasound.video import FrameFormat, FrameSampling


def opencv_frame_count(path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_phantom_frames_carry_their_labels(ray_cluster, phantom_uri, storage):
    data = load_dataset(phantom_uri, storage)
    truth = {r["video_id"]: ([r[f] for f in phantom.FINDINGS], r["label"], r["frame_count"]) for r in data.rows}
    stream = frame_stream(data, StreamSpec(fmt=FrameFormat(channels=1, size=32)))
    seen: dict[str, list[int]] = {}
    for batch in stream.dataset.iter_batches(batch_size=16, batch_format="numpy"):
        assert batch["image"].shape[1:] == (32, 32, 1) and batch["image"].dtype == np.uint8
        for vid, label, findings, index in zip(batch["video_id"], batch["label"], batch["findings"],
                                               batch["frame_index"]):
            assert findings.tolist() == truth[vid][0] and label == truth[vid][1]
            seen.setdefault(vid, []).append(int(index))
    assert {vid: sorted(ix) for vid, ix in seen.items()} == {
        vid: list(range(t[2])) for vid, t in truth.items()
    }
    assert stream.failed() == []


def test_clips_mode_gives_k_frames_per_video(ray_cluster, phantom_uri, storage):
    data = load_dataset(phantom_uri, storage)
    spec = StreamSpec(sampling=FrameSampling(per_video=3), fmt=FrameFormat(channels=1, size=32),
                      mode="clips", seed=5)
    rows = list(frame_stream(data, spec).dataset.iter_rows())
    assert len(rows) == len(data.rows)
    for row in rows:
        assert row["frames"].shape == (3, 32, 32, 1) and row["n_frames"] == 3
        assert len(set(row["frame_index"].tolist())) == 3
    again = {r["video_id"]: r["frame_index"].tolist() for r in frame_stream(data, spec).dataset.iter_rows()}
    assert again == {r["video_id"]: r["frame_index"].tolist() for r in rows}  # seeded picks repeat


def test_corrupt_truncated_and_empty_objects_are_skipped_and_reported(ray_cluster, phantom_dir, storage):
    code, _ = run_cli(main, ["ingest", str(phantom_dir), "--manifest", str(phantom_dir / "manifest.csv"),
                             "--to", "s3://sonoray-test/corrupt"])
    assert code == 0
    data = load_dataset("s3://sonoray-test/corrupt", storage)
    keys = [r["key"] for r in data.rows]
    good = storage.read_bytes(data.root.join(keys[0]))
    storage.write_bytes(data.root.join(keys[0]), b"")  # empty
    storage.write_bytes(data.root.join(keys[1]), b"\x00garbage, not a video" * 50)  # not a video
    storage.write_bytes(data.root.join(keys[2]), good[:40])  # truncated to its first bytes
    summary = drain(frame_stream(data, StreamSpec(fmt=FrameFormat(size=32))))
    failed = {f["key"]: f["reason"] for f in summary.failed}
    assert set(failed) == set(keys[:3])
    assert "empty" in failed[keys[0]]
    assert summary.videos == len(keys) - 3
    expected = sum(r["frame_count"] for r in data.rows[3:])
    assert summary.frames == expected


def test_video_over_the_size_limit_is_refused_with_a_message(ray_cluster, phantom_uri, storage):
    data = load_dataset(phantom_uri, storage)
    summary = drain(frame_stream(data.select([data.rows[0]["video_id"]]),
                                 StreamSpec(max_decoded_bytes=10_000)))
    assert summary.frames == 0
    assert len(summary.failed) == 1 and "over the limit" in summary.failed[0]["reason"]


def test_frames_cli_json(ray_cluster, phantom_uri):
    code, result = run_cli(main, ["frames", phantom_uri, "--fps", "6", "--size", "32", "--json"])
    assert code == 0
    assert result["videos"] == 8 and result["failed"] == [] and result["frames_per_s"] > 0
    # phantom clips are 12 fps: every other frame
    code, every = run_cli(main, ["frames", phantom_uri, "--size", "32", "--json"])
    assert result["frames"] == sum((n + 1) // 2 for n in _counts(phantom_uri))
    assert every["frames"] == sum(_counts(phantom_uri))
    code, limited = run_cli(main, ["frames", phantom_uri, "--limit", "20", "--size", "32", "--json"])
    assert 20 <= limited["frames"] < every["frames"]


def _counts(uri):
    return [r["frame_count"] for r in load_dataset(uri).rows]


@pytest.mark.pocus
@pytest.mark.timeout(900)
def test_every_pocus_video_streams_as_many_frames_as_opencv_decodes(ray_cluster, pocus_dir, pocus_uri, storage):
    data = load_dataset(pocus_uri, storage)
    summary = drain(frame_stream(data, StreamSpec(fmt=FrameFormat(channels=1, size=16))))
    assert summary.failed == []
    # keys are "videos/" + the path relative to the ingested folder
    expected = {r["video_id"]: opencv_frame_count(pocus_dir / r["key"].removeprefix("videos/"))
                for r in data.rows}
    assert summary.frames_per_video == expected
