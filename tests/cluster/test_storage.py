"""Storage writes are atomic: a reader sees a whole old or a whole new object, never a mix."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from cluster.storage import Storage, StorageConfig, StorageError, parse_uri

PAYLOADS = {name: bytes([65 + i]) * (256 * 1024 + i) for i, name in enumerate("ab")}  # 256 KiB, A.. / B..


def write_many(path: str, name: str, times: int, queue) -> None:
    """Write ``PAYLOADS[name]`` ``times`` times; after each write, report what a reader saw."""
    storage, location = Storage(StorageConfig()), parse_uri(path)
    seen = set()
    for _ in range(times):
        storage.write_bytes(location, PAYLOADS[name])
        data = Path(path).read_bytes()
        seen.add(next((k for k, v in PAYLOADS.items() if v == data), f"torn ({len(data)} bytes)"))
    queue.put(sorted(seen))


def test_two_processes_writing_one_file_always_leave_one_complete_payload(tmp_path):
    path = str(tmp_path / "sub" / "result.bin")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    writers = [context.Process(target=write_many, args=(path, name, 50, queue)) for name in PAYLOADS]
    for writer in writers:
        writer.start()
    seen = {item for _ in writers for item in queue.get(timeout=120)}
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0
    assert seen <= set(PAYLOADS), seen  # every read after a write: one writer's whole payload
    assert Path(path).read_bytes() in PAYLOADS.values()
    assert sorted(p.name for p in Path(path).parent.iterdir()) == ["result.bin"]  # no temporary left


def test_a_failed_local_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        Storage(StorageConfig()).write_bytes(parse_uri(str(target)), "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_upload_file_replaces_the_target_whole(tmp_path):
    source, target = tmp_path / "src.bin", tmp_path / "out" / "dst.bin"
    source.write_bytes(b"x" * 100_000)
    Storage(StorageConfig()).upload_file(source, parse_uri(str(target)), sha256="")
    assert target.read_bytes() == source.read_bytes() and [p.name for p in target.parent.iterdir()] == ["dst.bin"]


def test_an_s3_write_that_fails_raises_storage_error_naming_the_uri():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    storage = Storage(StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1"))
    with pytest.raises(StorageError, match=rf"writing s3://b/k/x\.json: S3 endpoint http://127\.0\.0\.1:{port} failed"):
        storage.write_bytes(parse_uri("s3://b/k/x.json"), b"{}")


def test_an_endpoint_that_accepts_and_never_answers_fails_the_check_within_15_s_naming_it():
    import socket
    import time

    from cluster.storage import Storage as Store

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts connections; nobody ever reads or answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        storage = Store(StorageConfig(endpoint_url=endpoint, region="us-east-1"))
        began = time.monotonic()
        with pytest.raises(StorageError) as err:
            storage.check(parse_uri("s3://bucket/prefix"))
        elapsed = time.monotonic() - began
    assert elapsed <= 15, elapsed
    assert str(err.value).startswith(f"cannot reach the S3 endpoint {endpoint}: "), str(err.value)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_size_of_is_the_byte_count_or_none_when_absent(where, tmp_path, request):
    if where == "s3":
        storage = request.getfixturevalue("storage")
        root = parse_uri("s3://size-of/prefix")
        storage.check(root, create_bucket=True)
    else:
        storage, root = Storage(StorageConfig()), parse_uri(str(tmp_path))
    target = root.join("video.bin")
    assert storage.size_of(target) is None
    storage.write_bytes(target, b"x" * 12345)
    assert storage.size_of(target) == 12345
