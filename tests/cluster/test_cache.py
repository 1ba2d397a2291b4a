"""The decoded-frame cache, transient-failure retries and epoch order, on a real local Ray and the
loopback S3 server (through a counting proxy)."""
import shutil

import numpy as np
import pytest
import ray

from cluster.cache import CacheLocation, decode_shard, list_cache
from cluster.dataset import IngestedDataset, load_dataset
from cluster.frames import StreamSpec, drain, frame_stream, stream_items
from cluster.storage import Storage, StorageConfig, parse_uri
from cluster.train import epoch_batches
from jobs.cli import main
from tests.conftest import run_cli
from tests.s3proxy import s3_proxy
from ultrasound import phantom
from ultrasound.video import FrameFormat, FrameSampling

FMT = FrameFormat(channels=1, size=32)


def ingest(folder, uri: str) -> None:
    code, _ = run_cli(main, ["ingest", str(folder), "--manifest", str(folder / "manifest.csv"),
                             "--labels", ",".join(phantom.FINDINGS), "--to", uri])
    assert code == 0


def frames_by_key(stream) -> dict:
    out = {}
    for batch in stream.dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for vid, index, image in zip(batch["video_id"], batch["frame_index"], batch["image"]):
            out[(str(vid), int(index))] = image.copy()
    return out


def video_gets(state, data) -> dict:
    keys = {f"{data.root.bucket}/{data.root.key}/{r['key']}" for r in data.rows}
    return {k: n for k, n in state.gets.items() if k in keys}


def shard_gets(state) -> int:
    return sum(n for k, n in state.gets.items() if "/cache/" in k and k.endswith(".parquet"))


def test_cache_is_built_once_reused_and_equals_fresh_decoding(ray_cluster, phantom_dir, s3_server):
    uri = "s3://sonoray-test/cache-reuse"
    ingest(phantom_dir, uri)
    with s3_proxy(s3_server.endpoint_url) as (endpoint, state):
        data = load_dataset(uri, Storage(StorageConfig(endpoint_url=endpoint, region="us-east-1")))
        fresh = frames_by_key(frame_stream(data, StreamSpec(fmt=FMT, cache=False)))
        assert sum(video_gets(state, data).values()) == len(data.rows)

        state.gets.clear()
        first = frame_stream(data, StreamSpec(fmt=FMT))
        built = frames_by_key(first)
        assert first.cache_stats()["built"] == len(data.rows)
        assert sum(video_gets(state, data).values()) == len(data.rows)

        state.gets.clear()
        second = frame_stream(data, StreamSpec(fmt=FMT))
        cached = frames_by_key(second)
        assert video_gets(state, data) == {}  # the second job reads no video object
        assert shard_gets(state) == len(data.rows)
        assert second.cache_stats()["hits"] == len(data.rows)

        # later passes: the decode workers kept the shards they parsed; one HEAD each, no GET.
        # Two passes, since Ray may start fresh worker processes for the first of them
        kept_total = 0
        for _ in range(2):
            state.gets.clear()
            later = frame_stream(data, StreamSpec(fmt=FMT))
            kept = frames_by_key(later)
            stats = later.cache_stats()
            assert stats["hits"] == stats["kept"] + stats["fetched"] == len(data.rows)
            assert shard_gets(state) == stats["fetched"]
            assert kept.keys() == cached.keys() and all(np.array_equal(kept[k], cached[k]) for k in kept)
            kept_total += stats["kept"]
        assert kept_total > 0

    assert fresh.keys() == built.keys() == cached.keys()
    assert sum(r["frame_count"] for r in data.rows) == len(fresh)
    for key, image in fresh.items():  # bit for bit
        assert image.dtype == cached[key].dtype and np.array_equal(image, cached[key])
        assert np.array_equal(image, built[key])


def test_clips_are_drawn_afresh_from_the_cache_every_pass(ray_cluster, phantom_dir, s3_server):
    uri = "s3://sonoray-test/cache-clips"
    ingest(phantom_dir, uri)
    with s3_proxy(s3_server.endpoint_url) as (endpoint, state):
        data = load_dataset(uri, Storage(StorageConfig(endpoint_url=endpoint, region="us-east-1")))
        spec = StreamSpec(sampling=FrameSampling(per_video=3), fmt=FMT, mode="clips")
        passes = [{r["video_id"]: tuple(r["frame_index"].tolist()) for r in frame_stream(data, spec).dataset.iter_rows()}
                  for _ in range(3)]
        assert sum(video_gets(state, data).values()) == len(data.rows)  # decoded in the first pass only
    assert all(len(p) == len(data.rows) for p in passes)
    assert passes[0] != passes[1] or passes[1] != passes[2]  # fresh picks each pass
    # seeded picks from the cache equal seeded picks decoded from the video
    seeded = StreamSpec(sampling=FrameSampling(per_video=3), fmt=FMT, mode="clips", seed=7)
    unseeded_cache = {r["video_id"]: r["frames"] for r in frame_stream(data, seeded).dataset.iter_rows()}
    decoded = {r["video_id"]: r["frames"] for r in frame_stream(
        data, StreamSpec(sampling=FrameSampling(per_video=3), fmt=FMT, mode="clips", seed=7, cache=False)
    ).dataset.iter_rows()}
    assert all(np.array_equal(unseeded_cache[v], decoded[v]) for v in decoded)


def test_a_changed_video_invalidates_only_its_own_shard(ray_cluster, phantom_dir, s3_server, tmp_path, storage):
    folder = tmp_path / "videos"
    shutil.copytree(phantom_dir, folder)
    uri = "s3://sonoray-test/cache-changed"
    ingest(folder, uri)
    data = load_dataset(uri, storage)
    drain(frame_stream(data, StreamSpec(fmt=FMT)))
    first = data.rows[0]
    # the first video's file now holds another clip: same name, new content, new sha256
    other = tmp_path / "other"
    phantom.make_dataset(other, 1, seed=99, n_frames=16, size=64)
    (new_clip,) = sorted(other.rglob("*.mp4"))
    shutil.copyfile(new_clip, folder / first["key"].removeprefix("videos/"))
    ingest(folder, uri)
    with s3_proxy(s3_server.endpoint_url) as (endpoint, state):
        changed = load_dataset(uri, Storage(StorageConfig(endpoint_url=endpoint, region="us-east-1")))
        stream = frame_stream(changed, StreamSpec(fmt=FMT))
        summary = drain(stream)
        gets = video_gets(state, changed)
    assert list(gets) == [f"{data.root.bucket}/{data.root.key}/{first['key']}"] and gets[list(gets)[0]] == 1
    assert stream.cache_stats()["built"] == 1 and stream.cache_stats()["hits"] == len(data.rows) - 1
    assert summary.frames == sum(r["frame_count"] for r in changed.rows)
    current = {r["sha256"] for r in changed.rows}
    (entry,) = list_cache(storage, data.root, current)
    assert (entry.shards, entry.current, entry.stale) == (len(data.rows) + 1, len(data.rows), 1)
    code, result = run_cli(main, ["cache", "rm", uri, "--stale", "--json"])
    assert code == 0 and result["removed"] == 1
    code, listing = run_cli(main, ["cache", "ls", uri, "--json"])
    assert code == 0 and listing["caches"][0]["stale"] == 0 and listing["caches"][0]["current"] == len(data.rows)


def test_a_shard_cut_off_half_way_is_never_read(ray_cluster, phantom_dir, storage):
    uri = "s3://sonoray-test/cache-torn"
    ingest(phantom_dir, uri)
    data = load_dataset(uri, storage)
    expected = frames_by_key(frame_stream(data, StreamSpec(fmt=FMT, cache=False)))
    drain(frame_stream(data, StreamSpec(fmt=FMT)))
    cache = CacheLocation.of(data.root, FrameSampling(), FMT)
    victim = data.rows[2]
    shard = cache.shard(victim["sha256"])
    whole = storage.read_bytes(shard)
    decode_shard(whole, victim["sha256"])  # a whole shard parses
    storage.write_bytes(shard, whole[: len(whole) // 2])  # as a writer killed half way would leave it
    stream = frame_stream(data, StreamSpec(fmt=FMT))
    again = frames_by_key(stream)
    assert stream.cache_stats()["rebuilt"] == 1 and stream.cache_stats()["built"] == 1
    assert again.keys() == expected.keys()
    assert all(np.array_equal(again[k], expected[k]) for k in expected)
    assert storage.read_bytes(shard) == whole  # rebuilt whole


def test_a_transient_503_on_every_video_loses_no_video(ray_cluster, phantom_dir, s3_server):
    uri = "s3://sonoray-test/flaky"
    ingest(phantom_dir, uri)
    prefix = f"{parse_uri(uri).bucket}/{parse_uri(uri).key}/videos/"
    with s3_proxy(s3_server.endpoint_url, fail_first_get=prefix) as (endpoint, state):
        data = load_dataset(uri, Storage(StorageConfig(endpoint_url=endpoint, region="us-east-1")))
        summary = drain(frame_stream(data, StreamSpec(fmt=FMT, cache=False)))
        assert sum(state.refused.values()) == len(data.rows)  # every video's first GET was refused
    assert summary.failed == []
    assert summary.frames == sum(r["frame_count"] for r in data.rows)


def test_epochs_visit_videos_in_fresh_seeded_orders(ray_cluster):
    # a POCUS-like manifest: sorted by class, then patient
    rows = [{"video_id": f"{label}-{i:02d}", "key": f"videos/{label}-{i}.mp4", "patient_id": f"{label}{i // 3}",
             "label": label, "frame_count": 10, "fps": 10.0, "sha256": "0" * 64}
            for label in ("covid", "pneumonia", "regular") for i in range(16)]
    data = IngestedDataset(parse_uri("/nonexistent"), rows, [])
    items = stream_items(data, order_seed=0)
    assert [r["video_id"] for r in items] != [r["video_id"] for r in rows]
    ctx = ray.data.DataContext.get_current()
    saved, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        ds = ray.data.from_items([{"video_id": r["video_id"], "label": r["label"]} for r in items])

        def epoch(e, shuffle_rows=16):
            return [tuple(b["video_id"].tolist())
                    for b in epoch_batches(ds, 8, seed=0, epoch=e, shuffle_rows=shuffle_rows)]

        first, second = epoch(0), epoch(1)
        assert epoch(0) == first  # reproducible for a seed
        # shuffle_rows=0 (the unshuffled control): stream order, the same batches every epoch
        in_order = [tuple(r["video_id"] for r in items[i:i + 8]) for i in range(0, len(items), 8)]
        assert epoch(0, 0) == epoch(1, 0) == in_order
    finally:
        ctx.execution_options.preserve_order = saved
    assert sorted(v for b in first for v in b) == sorted(r["video_id"] for r in rows)
    assert {frozenset(b) for b in first} != {frozenset(b) for b in second}  # other batch compositions
    for batch in first + second:
        assert len({v.split("-")[0] for v in batch}) > 1  # no batch is all one class


@pytest.mark.slow
def test_a_deleted_video_is_named_in_pretrain_and_msml_results(ray_cluster, phantom_dir, storage, tmp_path):
    uri = "s3://sonoray-test/deleted"
    ingest(phantom_dir, uri)
    data = load_dataset(uri, storage)
    gone = data.rows[3]["key"]
    storage.delete(data.root.join(gone))
    code, _ = run_cli(main, ["pretrain", "--data", uri, "--out", str(tmp_path / "stopped"), "--epochs", "1",
                             "--image-size", "32", "--batch-videos", "4", "--json"])
    assert code == 1  # 1 of 8 videos (12.5%) is over the default limit of 10%: the job stops
    code, result = run_cli(main, ["pretrain", "--data", uri, "--out", str(tmp_path / "pre"), "--epochs", "2",
                                  "--image-size", "32", "--batch-videos", "4", "--max-failed-fraction", "0.5",
                                  "--json"])
    assert code == 0
    assert [v["key"] for v in result["skipped_videos"]] == [gone] and result["skipped_videos"][0]["times"] == 2
    assert result["skipped_videos_per_epoch"] == [1, 1]
    code, result = run_cli(main, ["msml", "--data", uri, "--out", str(tmp_path / "msml"), "--epochs", "1",
                                  "--image-size", "32", "--batch-size", "8", "--max-failed-fraction", "0.5",
                                  "--split-seed", "1", "--gradcam", "0", "--json"])
    if code == 0:
        assert [v["key"] for v in result["skipped_videos"]] == [gone]
        assert result["skipped_videos_per_epoch"] == [1]
    else:  # the deleted video fell in the validation split, which must decode whole
        assert code == 1


def test_shard_memo_keeps_the_stored_version_only_and_stays_in_its_bound():
    from cluster.cache import Shard, ShardMemo

    def shard(value, frames=2):  # 2 frames of 4 x 4 x 4: 128 bytes of images + 32 of indices
        return Shard(np.arange(frames), np.zeros(frames), np.full((frames, 4, 4, 4), value, np.uint8))

    memo = ShardMemo(max_bytes=400)
    memo.put("s3://b/a", "v1", shard(1))
    assert memo.get("s3://b/a", "v1").images[0, 0, 0, 0] == 1
    assert memo.get("s3://b/a", "v2") is None  # the object was replaced: fetch and check it again
    memo.put("s3://b/b", "v1", shard(2))
    memo.get("s3://b/a", "v1")  # a is now the most recently used
    memo.put("s3://b/c", "v1", shard(3))  # 3 x 160 > 400 decoded bytes: the least recently used (b) goes
    assert memo.get("s3://b/b", "v1") is None and memo.get("s3://b/a", "v1") is not None and len(memo) == 2
    memo.put("s3://b/big", "v1", shard(4, frames=8))  # larger than the bound: never kept
    assert memo.get("s3://b/big", "v1") is None
    assert ShardMemo(0).get("x", "v") is None
