"""`sonoray submit` / `sonoray jobs` against a real Ray head with token authentication.

Slow part (class ``TestAgainstRealHead``, about a minute on 2 CPUs): one head per module,
started by the fixture as its own child in a new process group (`ray start --head --block` on
loopback, token auth on) and stopped by killing that group; never `ray stop`. The CLI runs as a
subprocess with an explicit environment, exactly as a user's shell would run it. The fast tests at
the top need no cluster.
"""
from __future__ import annotations

import io
import json
import os
import hashlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from cluster import submission
from cluster.redact import register_secret
from cluster.s3server import LOCAL_ACCESS_KEY, LOCAL_REGION, LocalS3Server, free_port
from cluster.submission import (
    DEFAULT_ADDRESS,
    JobClient,
    SubmissionError,
    _LineRedactor,
    exit_code,
    forwarded_env,
    job_entrypoint,
    resolve_address,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SONORAY = str(VENV_BIN / "sonoray")
BUCKET = "sonoray-jobs"
HEAD_START_TIMEOUT_S = 120


# -- fast: no cluster ---------------------------------------------------------------------------
def test_address_argument_beats_environment_and_default_is_loopback():
    env = {"RAY_ADDRESS": "http://10.0.0.5:8265"}
    assert resolve_address("http://head:8265/", env) == "http://head:8265"
    assert resolve_address(None, env) == "http://10.0.0.5:8265"
    assert resolve_address(None, {"RAY_API_SERVER_ADDRESS": "https://a:1", "RAY_ADDRESS": "b:2"}) == "https://a:1"
    assert resolve_address(None, {}) == DEFAULT_ADDRESS == "http://127.0.0.1:8265"
    assert resolve_address("127.0.0.1:9000", {}) == "http://127.0.0.1:9000"
    with pytest.raises(SubmissionError, match="dashboard"):
        resolve_address("ray://head:10001", {})


def test_only_non_secret_variables_are_forwarded():
    env = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "RAY_AUTH_TOKEN": "tok-123456",
        "HOME": "/home/me",
    }
    assert forwarded_env(env) == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    assert forwarded_env(env, {"SONORAY_LOG": "1"})["SONORAY_LOG"] == "1"
    with pytest.raises(SubmissionError, match="HF_TOKEN"):
        forwarded_env(env, {"HF_TOKEN": "abcd"})
    with pytest.raises(SubmissionError, match="AWS_SECRET_ACCESS_KEY") as err:
        forwarded_env(env, {"SETTINGS": "key=s3cr3t-value"})
    assert "s3cr3t-value" not in str(err.value)


def test_entrypoint_is_shell_quoted_argv():
    line = job_entrypoint(["bash", "-c", "echo 'a b' && ls $HOME"])
    assert line == "bash -c 'echo '\"'\"'a b'\"'\"' && ls $HOME'"
    assert subprocess.run(["bash", "-c", f"printf '%s|' {line.split(' ', 2)[2]}"],
                          capture_output=True, text=True).stdout == "echo 'a b' && ls $HOME|"
    with pytest.raises(SubmissionError, match="no command"):
        job_entrypoint([])
    with pytest.raises(TypeError):
        job_entrypoint("sonoray pretrain")


def test_log_stream_masks_a_secret_split_across_chunks():
    register_secret("chunked-secret-42")
    out = io.StringIO()
    lines = _LineRedactor(out.write)
    for chunk in ["line one\nkey=chunk", "ed-secr", "et-42 end\npartial"]:
        lines.feed(chunk)
    assert out.getvalue() == "line one\nkey=*** end\n"  # whole lines only, masked
    lines.close()
    assert out.getvalue().endswith("partial\n")
    assert lines.consumed == len("line one\nkey=chunked-secret-42 end\npartial")


def test_exit_code_of_final_states():
    assert [exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED")] == [0, 1, 1]


@pytest.mark.timeout(60)
def test_unreachable_address_fails_fast_naming_it():
    address = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run([SONORAY, "jobs", "list", "--address", address], capture_output=True,
                            text=True, timeout=50, env=_base_env(Path(tempfile.gettempdir())))
    assert result.returncode == 2
    assert f"cannot reach a Ray cluster at {address}" in result.stderr
    assert time.monotonic() - started < 30


# -- slow: a real head --------------------------------------------------------------------------
def _base_env(home: Path) -> dict[str, str]:
    """The caller's environment without anything that could point at another cluster or carry
    credentials; HOME is a fresh folder so no ~/.ray/auth_token is found by accident."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
            "RAY_AUTH_MODE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_PROFILE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["HOME"] = str(home)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Head:
    def __init__(self, address: str, token: str, secret: str, s3: LocalS3Server, home: Path, log: Path):
        self.address, self.token, self.secret, self.s3, self.home, self.log = address, token, secret, s3, home, log
        # the laptop's own S3 secret differs from the node's: a job that sees the node's secret got
        # it from the node, not from the laptop
        self.laptop_secret = "laptop-secret-" + secrets.token_hex(12)

    def client_env(self, *, token: str | None = "own") -> dict[str, str]:
        """A user's shell: S3 endpoint, the credential, and (unless token=None) the token."""
        env = _base_env(self.home)
        env.update({
            "AWS_ENDPOINT_URL": self.s3.endpoint_url,
            "AWS_DEFAULT_REGION": LOCAL_REGION,
            "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.laptop_secret,
        })
        if token is not None:
            env["RAY_AUTH_TOKEN"] = self.token if token == "own" else token
        return env

    def sonoray(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([SONORAY, *argv], capture_output=True, text=True, timeout=timeout,
                              env=env or self.client_env(), cwd=REPO_ROOT)

    def client(self) -> JobClient:
        return JobClient(self.address, token=self.token)


@pytest.fixture(scope="module")
def head():
    """A Ray head on loopback with token auth, its own process group; S3 server beside it.

    The head's environment carries the node's S3 credentials (what an instance profile gives a
    cluster node) but no S3 endpoint: the endpoint reaches a job only if `sonoray submit`
    forwards it.
    """
    token = secrets.token_urlsafe(24)
    secret = "node-secret-" + secrets.token_hex(12)
    register_secret(secret)
    register_secret(token)
    workdir = Path(tempfile.mkdtemp(prefix="srh", dir="/tmp"))  # short: Ray's socket paths
    home = workdir / "home"
    home.mkdir()
    log = workdir / "head.log"
    s3 = LocalS3Server().start()
    port, dashboard_port = free_port(), free_port()
    env = _base_env(home)
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": LOCAL_REGION,
    })
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=1",
        "--include-dashboard=true",
        f"--temp-dir={workdir / 'ray'}",
        "--disable-usage-stats",
    ]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(process, address, token, log)
        yield Head(address, token, secret, s3, home, log)
    finally:
        _stop_group(process)
        s3.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_dashboard(process: subprocess.Popen, address: str, token: str, log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            answer = requests.get(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=2)
            if answer.status_code == 200:
                return
        except requests.exceptions.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the head's job API did not answer in {HEAD_START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the head's process group, then SIGKILL what is left after 5 s (a test head needs
    none of the up-to-30-s drain Ray attempts on SIGTERM)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=15)


INGEST_SCRIPT = (
    'd=$(mktemp -d) && '
    'sonoray phantom "$d" --videos 4 --frames 8 --size 32 && '
    f'sonoray ingest "$d" --manifest "$d/manifest.csv" --to s3://{BUCKET}/run1 && '
    'python -c "import os, hashlib; print(\'node credential sha256:\', '
    'hashlib.sha256(os.environ[\'AWS_SECRET_ACCESS_KEY\'].encode()).hexdigest())" && '
    'rm -rf "$d"'
)


@pytest.fixture(scope="module")
def ingest_job(head):
    """`sonoray submit --follow` of phantom + ingest, writing to the S3 server; its result."""
    result = head.sonoray("submit", "--address", head.address, "--follow", "--", "bash", "-c", INGEST_SCRIPT,
                          timeout=240)
    job_ids = [line for line in result.stdout.splitlines() if line.startswith("raysubmit_")]
    return result, (job_ids[0] if job_ids else None)


@pytest.mark.timeout(420)
class TestAgainstRealHead:
    """Slow: needs the module's real head (started once, ~10-30 s) and runs real jobs."""

    def test_follow_succeeds_and_the_job_wrote_to_s3(self, head, ingest_job):
        result, job_id = ingest_job
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert job_id is not None
        assert "ingest: 4 videos" in result.stdout  # the job's own log, streamed
        assert f"job {job_id} SUCCEEDED" in result.stderr
        import boto3
        import pyarrow.parquet as pq

        s3 = boto3.client("s3", endpoint_url=head.s3.endpoint_url, region_name=LOCAL_REGION,
                          aws_access_key_id=LOCAL_ACCESS_KEY, aws_secret_access_key="any")
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="run1/")["Contents"])
        assert "run1/manifest.parquet" in keys
        assert len([k for k in keys if k.startswith("run1/videos/") and k.endswith(".mp4")]) == 4
        body = s3.get_object(Bucket=BUCKET, Key="run1/manifest.parquet")["Body"].read()
        assert pq.read_table(io.BytesIO(body)).num_rows == 4

    def test_credential_appears_in_no_output(self, head, ingest_job):
        result, job_id = ingest_job
        assert job_id is not None
        logs = head.sonoray("jobs", "logs", job_id, "--address", head.address)
        status = head.sonoray("jobs", "status", job_id, "--address", head.address, "--json")
        listing = head.sonoray("jobs", "list", "--address", head.address, "--json")
        for run in (result, logs, status, listing):
            assert run.returncode == 0, run.stderr
            for text in (run.stdout, run.stderr):
                assert head.secret not in text and head.laptop_secret not in text
                assert head.token not in text
        # the job saw the node's credential (by its digest), not the laptop's: it was not forwarded
        node_digest = hashlib.sha256(head.secret.encode()).hexdigest()
        assert f"node credential sha256: {node_digest}" in result.stdout
        assert f"node credential sha256: {node_digest}" in logs.stdout
        assert hashlib.sha256(head.laptop_secret.encode()).hexdigest() not in result.stdout
        # what the cluster stores about the job: the endpoint was forwarded, credentials were not
        stored = requests.get(f"{head.address}/api/jobs/{job_id}",
                              headers={"Authorization": f"Bearer {head.token}"}, timeout=10).text
        assert head.s3.endpoint_url in stored
        assert head.secret not in stored and head.laptop_secret not in stored and LOCAL_ACCESS_KEY not in stored
        assert json.loads(status.stdout.splitlines()[-1])["env_vars"]["AWS_ENDPOINT_URL"] == head.s3.endpoint_url

    def test_command_line_carrying_a_credential_is_refused(self, head):
        result = head.sonoray("submit", "--address", head.address, "--", "echo", head.laptop_secret)
        assert result.returncode == 2
        assert "AWS_SECRET_ACCESS_KEY" in result.stderr and "refusing to submit" in result.stderr
        assert head.secret not in result.stdout + result.stderr
        refused = head.sonoray("submit", "--address", head.address, "--env", "HF_TOKEN=abcdef", "--", "true")
        assert refused.returncode == 2 and "HF_TOKEN" in refused.stderr
        assert not [j for j in head.client().list_jobs() if "echo" in j["entrypoint"]]

    def test_submit_without_or_with_wrong_token_is_refused(self, head):
        for token, why in ((None, "no token was sent"), ("wrong-token-000", "the token sent was not accepted")):
            result = head.sonoray("submit", "--address", head.address, "--", "true",
                                  env=head.client_env(token=token), timeout=60)
            assert result.returncode == 2, result.stderr
            assert (f"the Ray cluster at {head.address} refused the request: "
                    "authentication token missing or wrong") in result.stderr
            assert why in result.stderr and "RAY_AUTH_TOKEN" in result.stderr
            assert "Traceback" not in result.stderr
            assert "wrong-token-000" not in result.stderr

    def test_jobs_stop_stops_a_running_job(self, head):
        submitted = head.sonoray("submit", "--address", head.address, "--json", "--", "sleep", "600")
        assert submitted.returncode == 0, submitted.stderr
        job_id = json.loads(submitted.stdout.splitlines()[-1])["submission_id"]
        client = head.client()
        deadline = time.monotonic() + 60
        while client.status(job_id) != "RUNNING":
            assert time.monotonic() < deadline, f"job never started: {client.status(job_id)}"
            time.sleep(0.5)
        stopped = head.sonoray("jobs", "stop", job_id, "--address", head.address, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == "STOPPED"
        status = head.sonoray("jobs", "status", job_id, "--address", head.address)
        assert status.stdout.startswith("STOPPED")
        assert client.status(job_id) == "STOPPED"

    def test_follow_returns_failure_of_a_failing_job(self, head):
        result = head.sonoray("submit", "--address", head.address, "--follow", "--",
                              "bash", "-c", "echo about to fail; exit 3")
        assert result.returncode == 1
        assert "about to fail" in result.stdout
        job_id = next(line for line in result.stdout.splitlines() if line.startswith("raysubmit_"))
        assert head.client().status(job_id) == "FAILED"

    def test_unknown_job_id_is_a_clear_error(self, head):
        result = head.sonoray("jobs", "status", "raysubmit_doesnotexist", "--address", head.address)
        assert result.returncode == 2
        assert head.address in result.stderr and "Traceback" not in result.stderr


def test_submission_module_keeps_ray_import_lazy():
    """`sonoray --help` must not pay for importing ray through jobs.submit."""
    code = "import sys, jobs.submit; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "False", out.stderr
    assert submission.DEFAULT_EXCLUDES  # the module imported without ray
