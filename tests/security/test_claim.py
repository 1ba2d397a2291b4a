"""The exclusive claim on a training run's --out: locally (O_EXCL) and on S3 (conditional PUT)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from cluster.claim import CLAIM_FILE, ClaimError, claim_out
from cluster.storage import Storage, StorageConfig, parse_uri
from jobs.cli import main
from tests.conftest import run_cli
from tests.security.test_checkpoints import phantom16_uri  # noqa: F401  (fixture)


def where(kind: str, tmp_path, s3_server) -> tuple:
    if kind == "s3":
        return parse_uri(f"s3://sonoray-test/claims/{tmp_path.name}"), Storage(StorageConfig.from_env(s3_server.endpoint_url))
    return parse_uri(str(tmp_path / "out")), Storage(StorageConfig())


def write_claim(storage, out, heartbeat_age: float, pid: int) -> None:
    import socket
    import time

    storage.write_bytes(out.join(CLAIM_FILE), json.dumps(
        {"host": socket.gethostname(), "pid": pid, "started": 0, "heartbeat": time.time() - heartbeat_age}).encode())


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_held_claim_refuses_a_second_run_and_is_released_at_the_end(kind, tmp_path, s3_server):
    out, storage = where(kind, tmp_path, s3_server)
    with claim_out(out, storage):
        record = json.loads(storage.read_bytes(out.join(CLAIM_FILE)))
        assert record["pid"] == os.getpid() and record["heartbeat"] >= record["started"]
        with claim_out(out, storage):  # re-entrant in the same thread (pretrain -> fit)
            pass
        assert storage.exists(out.join(CLAIM_FILE))
        errors = []

        def other() -> None:
            try:
                with claim_out(out, storage, resume=True):
                    pass
            except ClaimError as err:
                errors.append(str(err))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert len(errors) == 1 and errors[0].startswith(f"{out.join(CLAIM_FILE).uri}: another run (host ")
        assert "is writing to this --out" in errors[0]
    assert not storage.exists(out.join(CLAIM_FILE))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_stale_claim_is_taken_over_only_with_resume(kind, tmp_path, s3_server):
    out, storage = where(kind, tmp_path, s3_server)
    write_claim(storage, out, heartbeat_age=1000, pid=1)  # pid 1 lives: only its age makes it stale
    with pytest.raises(ClaimError, match="stopped without releasing this --out .* pass --resume"):
        with claim_out(out, storage, stale_s=60):
            pass
    with claim_out(out, storage, resume=True, stale_s=60):
        assert json.loads(storage.read_bytes(out.join(CLAIM_FILE)))["pid"] == os.getpid()
    write_claim(storage, out, heartbeat_age=0, pid=1)  # fresh: refused even with --resume
    with pytest.raises(ClaimError, match="another run"):
        with claim_out(out, storage, resume=True, stale_s=60):
            pass


def test_a_claim_left_by_a_dead_process_on_this_host_is_free(tmp_path):
    out, storage = parse_uri(str(tmp_path / "out")), Storage(StorageConfig())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    write_claim(storage, out, heartbeat_age=0, pid=int(dead.stdout))
    with claim_out(out, storage):
        assert json.loads(storage.read_bytes(out.join(CLAIM_FILE)))["pid"] == os.getpid()


@pytest.mark.timeout(600)
def test_two_pretrains_started_on_one_out_at_once_one_is_refused(phantom16_uri, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    argv = ["pretrain", "--data", phantom16_uri, "--out", str(out), "--epochs", "1", "--image-size", "32",
            "--channels", "1", "--batch-videos", "8"]
    start = threading.Barrier(2)
    codes: list[int] = []

    def one() -> None:
        start.wait()
        codes.append(main(argv))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=540)
    err = capsys.readouterr().err
    assert sorted(codes) == [0, 2], err
    refusals = [line for line in err.splitlines() if line.startswith("sonoray: error:")]
    assert len(refusals) == 1 and f"{out / CLAIM_FILE}: another run (host " in refusals[0], refusals
    assert (out / "model.pt").is_file() and not (out / CLAIM_FILE).exists()
