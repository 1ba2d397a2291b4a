"""A real S3-compatible HTTP server on loopback for the embedded default and the tests.

It is moto's standalone server run as a separate process: sonoray talks to it over HTTP through
exactly the boto3 / pyarrow code path it uses for AWS S3, MinIO or Ceph. The server keeps its
objects in memory, so it lives as long as the process that started it (or `sonoray store serve`).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
# Credentials the local server accepts; it accepts any, these are only so boto3 signs requests.
LOCAL_ACCESS_KEY = "sonoray-local"
LOCAL_SECRET_KEY = "sonoray-local-secret"
LOCAL_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass
class LocalS3Server:
    """A moto S3 server child process bound to 127.0.0.1.

    Use as a context manager, or ``start()`` / ``stop()``. ``env()`` gives the variables that point
    boto3, pyarrow (through sonoray's storage module) and child processes at it.
    """

    port: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
            "AWS_DEFAULT_REGION": LOCAL_REGION,
        }

    def start(self, timeout_s: float = 30.0) -> "LocalS3Server":
        if self.process is not None:
            return self
        self.port = self.port or free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped by pid, never by name
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"local S3 server exited with status {self.process.returncode}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"local S3 server did not answer on {self.endpoint_url} in {timeout_s}s")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
