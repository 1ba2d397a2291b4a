"""Shared fixtures: one local Ray (2 CPUs) and one loopback S3 server per test session.

Real POCUS videos are found through SONORAY_POCUS_DIR (default ../shared/data/pocus beside the
repository); tests that need them skip with a reason where they are absent, unless
SONORAY_REQUIRE_POCUS=1 (set by .ci/run), which turns their absence into a failure.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pocus_path() -> Path:
    return Path(os.environ.get("SONORAY_POCUS_DIR", REPO_ROOT.parent / "shared" / "data" / "pocus"))


@pytest.fixture(scope="session")
def pocus_dir() -> Path:
    path = pocus_path()
    if not (path / "dataset_metadata.csv").is_file():
        message = f"POCUS videos not found at {path} (set SONORAY_POCUS_DIR)"
        if os.environ.get("SONORAY_REQUIRE_POCUS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def s3_server():
    from cluster.s3server import LocalS3Server

    with LocalS3Server() as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())  # set before Ray starts so its workers inherit it
        yield server
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    import ray

    from cluster.runtime import connect

    connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def storage(s3_server):
    from cluster.storage import Storage, StorageConfig

    return Storage(StorageConfig.from_env(s3_server.endpoint_url))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Eight small phantom clips (64x64, ~16 frames) with their manifest."""
    from ultrasound import phantom

    out = tmp_path_factory.mktemp("phantom")
    phantom.make_dataset(out, 8, seed=3, n_frames=16, size=64)
    return out


@pytest.fixture(scope="session")
def phantom_uri(phantom_dir, s3_server) -> str:
    """The phantom clips ingested into the loopback S3 server."""
    from jobs.cli import main
    from ultrasound import phantom

    uri = "s3://sonoray-test/phantom"
    code, _ = run_cli(main, ["ingest", str(phantom_dir), "--manifest", str(phantom_dir / "manifest.csv"),
                             "--labels", ",".join(phantom.FINDINGS), "--to", uri])
    assert code == 0
    return uri


def run_cli(main, argv: list[str]) -> tuple[int, dict | None]:
    """Run `sonoray ARGV` in-process; returns (exit code, the JSON result if any).

    With ``--json`` the WHOLE of stdout must be one JSON object (or nothing, on a failure):
    every CLI test that passes ``--json`` checks that its command's stdout pipes into ``jq``.
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if "--json" in argv:
        text = out.getvalue()
        if not text.strip():
            assert code != 0, f"sonoray {' '.join(argv)}: exit 0 with --json but nothing on stdout"
            return code, None
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as err:
            raise AssertionError(f"sonoray {' '.join(argv)} --json: stdout is not one JSON object ({err}): "
                                 f"{text[:500]!r}") from None
        assert isinstance(payload, dict), f"--json stdout is {type(payload).__name__}, not an object"
        return code, payload
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    payload = None
    if lines:
        with contextlib.suppress(json.JSONDecodeError):
            payload = json.loads(lines[-1])
    return code, payload


@pytest.fixture(scope="session")
def pocus_uri_result(pocus_dir, s3_server) -> dict:
    """POCUS ingested (with --format pocus) into the loopback S3 server; the ingest's JSON."""
    from jobs.cli import main

    code, result = run_cli(main, ["ingest", str(pocus_dir), "--format", "pocus",
                                  "--to", "s3://sonoray-test/pocus", "--json"])
    assert code == 0
    return result


@pytest.fixture(scope="session")
def pocus_uri(pocus_uri_result) -> str:
    return "s3://sonoray-test/pocus"
