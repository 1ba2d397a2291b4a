"""Submitting sonoray jobs to a Ray cluster through Ray's Job Submission API.

Every use of ``ray.job_submission`` in the project sits here. ``JobClient`` wraps
``JobSubmissionClient`` with the project's rules:

- Address: the ``address`` argument, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else
  ``http://127.0.0.1:8265`` (a dashboard reached through ``ray dashboard ray_cluster.yaml``).
  Ray's own client lets the environment override an explicit address; here the argument wins.
- Token: Ray's standard sources, in Ray's order (``RAY_AUTH_TOKEN``, the file named by
  ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), read with Ray's own loader and sent as a
  bearer header. The token is registered with ``cluster.redact`` and never printed.
- What a job gets: the working directory (minus ``DEFAULT_EXCLUDES`` and whatever ``.gitignore``
  excludes) and the non-secret variables of ``FORWARDED_ENV_VARS``. Credentials are NOT shipped:
  a job reads S3 with the credentials of the node it runs on (the instance profile of
  ray_cluster.yaml on AWS). A command line or variable that carries a credential is refused, since
  the cluster would keep it in its job table for anyone with the token to read.
- Errors: an unreachable address fails within ``connect_timeout_s`` naming the address; a 401/403
  becomes one sentence saying the token is missing or wrong. Everything shown is redacted.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cluster.redact import (
    is_secret_name,
    redact,
    redact_mapping,
    register_secret,
    secret_values,
    secret_variables,
)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
CONNECT_TIMEOUT_S = 5.0

# Non-secret settings a job needs to find its object storage; copied from the submitting shell
# when set. Credentials never are (see the module docstring).
FORWARDED_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)

# Left out of the working-directory package (gitignore syntax, relative to the working dir),
# on top of what .gitignore files exclude: environments, history, run outputs, video data and
# weights belong in object storage, not in every job's upload.
DEFAULT_EXCLUDES = (
    ".venv/",
    "venv/",
    ".git/",
    "runs/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    "*.egg-info/",
    "/data/",
    "*.mp4",
    "*.avi",
    "*.mov",
    "*.mkv",
    "*.pt",
    "*.pth",
    "*.ckpt",
)

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmissionError(RuntimeError):
    """The cluster could not be reached, refused the request, or the request was unsafe.

    The message is redacted and names the address.
    """


def resolve_address(address: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The job API URL to use: ``address``, else the environment, else ``DEFAULT_ADDRESS``.

    A bare ``host:port`` gets ``http://``; a Ray Client address (``ray://``) is refused because
    the job API is the dashboard's HTTP port (8265 by default), not the GCS or client port.
    """
    environ = os.environ if environ is None else environ
    chosen = address
    if not chosen:
        chosen = next((environ[name] for name in ADDRESS_VARIABLES if environ.get(name)), None)
    chosen = (chosen or DEFAULT_ADDRESS).strip().rstrip("/")
    if chosen == "auto":
        raise SubmissionError(
            "address 'auto' names a local Ray for ray.init, not a job API; give the dashboard URL, "
            f"e.g. {DEFAULT_ADDRESS}"
        )
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    scheme = chosen.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise SubmissionError(
            f"{redact(chosen)} is not a job API address: jobs are submitted to the dashboard's HTTP "
            f"port, e.g. {DEFAULT_ADDRESS} (forward it with `ray dashboard ray_cluster.yaml`)"
        )
    return chosen


def load_token() -> str | None:
    """The cluster token from Ray's standard sources, or None when there is none.

    Ray's loader decides (``RAY_AUTH_TOKEN``, then ``RAY_AUTH_TOKEN_PATH``, then
    ``~/.ray/auth_token``), so sonoray and the ``ray`` CLI always agree on which token is used.
    """
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # read the current environment, not the one at first use
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None
        token = loader.get_raw_token(ignore_auth_mode=True)
    except AuthenticationError:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
        raise SubmissionError(
            f"RAY_AUTH_TOKEN_PATH is set to {path!r}, which cannot be read or is empty"
        ) from None
    token = (token or "").strip()
    if not token:
        return None
    register_secret(token)
    return token


def auth_refused_message(address: str, status_code: int) -> str:
    what = "no token was sent" if status_code == 401 else "the token sent was not accepted"
    return (
        f"the Ray cluster at {address} refused the request: authentication token missing or wrong "
        f"({what}; HTTP {status_code}). Set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, or put the "
        "token in ~/.ray/auth_token (print the cluster's token on its head node with "
        "`ray get-auth-token`)"
    )


@contextmanager
def _without_address_variables():
    """Hide RAY_ADDRESS & co. while Ray's client resolves its address (it prefers them over
    the argument it is given)."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_entrypoint(command: Sequence[str]) -> str:
    """The shell command line Ray runs for ``command`` (an argv list), quoted with shlex."""
    if isinstance(command, str):
        raise TypeError("command must be a list of arguments, not one string")
    argv = [str(part) for part in command]
    if not argv or not argv[0].strip():
        raise SubmissionError("no command to submit: give it after `--`, e.g. -- sonoray pretrain ...")
    return shlex.join(argv)


def forwarded_env(
    environ: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The variables a submitted job receives: ``FORWARDED_ENV_VARS`` that are set, plus
    ``extra``. A credential name, or a value that contains a credential, is refused."""
    environ = os.environ if environ is None else environ
    env = {name: environ[name] for name in FORWARDED_ENV_VARS if environ.get(name)}
    for name, value in (extra or {}).items():
        if not name or "=" in name:
            raise SubmissionError(f"invalid environment variable name {name!r}")
        if is_secret_name(name):
            raise SubmissionError(
                f"refusing to send {name} to the cluster: it names a credential, and the cluster "
                "keeps a job's environment in its job table. Give the cluster its own credentials "
                "(the instance profile in ray_cluster.yaml)"
            )
        env[name] = str(value)
    secrets = secret_variables(environ)
    for name, value in env.items():
        leaked = [secret for secret, secret_value in secrets.items() if secret_value in value]
        if leaked:
            raise SubmissionError(f"refusing to send {name}: its value contains {', '.join(leaked)}")
    return env


class JobClient:
    """A connection to one Ray cluster's job API.

    ``JobClient(address=None)`` resolves the address and token (see the module docstring),
    checks within ``connect_timeout_s`` that a Ray dashboard answers there, and raises
    ``SubmissionError`` otherwise.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        token: str | None = None,
    ) -> None:
        if not connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be positive, got {connect_timeout_s}")
        self.address = resolve_address(address)
        self._token = token if token is not None else load_token()
        register_secret(self._token)
        self._headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._probe(connect_timeout_s)
        self._client = self._connect()

    # -- connecting -------------------------------------------------------------------------
    def _probe(self, timeout_s: float) -> None:
        """Fail fast: Ray's client waits without a timeout on an address that does not answer."""
        import requests

        shown = redact(self.address)
        try:
            response = requests.get(f"{self.address}/api/version", headers=self._headers, timeout=timeout_s)
        except requests.exceptions.Timeout:
            raise SubmissionError(
                f"cannot reach a Ray cluster at {shown}: no answer within {timeout_s:g}s. "
                "Is the dashboard port forwarded (`ray dashboard ray_cluster.yaml`)? "
                "Pass --address or set RAY_ADDRESS."
            ) from None
        except requests.exceptions.RequestException as err:
            raise SubmissionError(
                f"cannot reach a Ray cluster at {shown}: {redact(_short_reason(err))}. "
                "Is the cluster up and its dashboard port forwarded (`ray dashboard ray_cluster.yaml`)? "
                "Pass --address or set RAY_ADDRESS."
            ) from None
        if response.status_code in (401, 403):
            raise SubmissionError(auth_refused_message(shown, response.status_code))
        if response.status_code != 200 or "ray_version" not in response.text:
            raise SubmissionError(
                f"{shown} answered HTTP {response.status_code} to /api/version: it does not look "
                "like a Ray dashboard (the job API is on the dashboard port, 8265 by default)"
            )

    def _connect(self):
        from ray.job_submission import JobSubmissionClient

        with _without_address_variables(), self._translate_errors():
            return JobSubmissionClient(self.address, headers=dict(self._headers))

    @contextmanager
    def _translate_errors(self):
        """Turn the SDK's errors into one redacted ``SubmissionError`` naming the address."""
        import requests
        from ray.exceptions import AuthenticationError

        shown = redact(self.address)
        try:
            yield
        except AuthenticationError as err:
            status = 403 if "Authentication failed" in str(err) else 401
            raise SubmissionError(auth_refused_message(shown, status)) from None
        except (requests.exceptions.ConnectionError, ConnectionError) as err:
            raise SubmissionError(f"lost the connection to the Ray cluster at {shown}: {redact(str(err))}") from None
        except SubmissionError:
            raise
        except (RuntimeError, ValueError) as err:
            raise SubmissionError(f"the Ray cluster at {shown}: {redact(str(err))}") from None

    # -- jobs ---------------------------------------------------------------------------------
    def submit(
        self,
        command: Sequence[str],
        *,
        working_dir: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        excludes: Sequence[str] = DEFAULT_EXCLUDES,
        submission_id: str | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
    ) -> str:
        """Submit ``command`` (an argv list) to run in ``working_dir`` (default: the current
        directory) packaged and uploaded; returns the submission id."""
        entrypoint = job_entrypoint(command)
        leaked = [name for name, value in secret_variables().items() if value in entrypoint]
        if self._token and self._token in entrypoint:
            leaked.append("the Ray token")
        if leaked:
            raise SubmissionError(
                f"refusing to submit: the command line contains the value of {', '.join(sorted(set(leaked)))}; "
                "the cluster would keep it in its job table. Give the cluster its own credentials "
                "(the instance profile in ray_cluster.yaml) instead"
            )
        directory = Path(working_dir) if working_dir is not None else Path.cwd()
        if not directory.is_dir():
            raise SubmissionError(f"working directory {directory} does not exist")
        runtime_env: dict[str, Any] = {
            "working_dir": str(directory.resolve()),
            "excludes": list(excludes),
        }
        env_vars = forwarded_env(extra=env)
        if env_vars:
            runtime_env["env_vars"] = env_vars
        with self._translate_errors():
            return self._client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                metadata={"submitted_with": "sonoray submit"},
                entrypoint_num_cpus=entrypoint_num_cpus,
                entrypoint_num_gpus=entrypoint_num_gpus,
            )

    def status(self, job_id: str) -> str:
        """The job's state: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
        with self._translate_errors():
            return _state_name(self._client.get_job_status(job_id))

    def info(self, job_id: str) -> dict[str, Any]:
        """What the cluster records about the job, redacted (see ``job_summary``)."""
        with self._translate_errors():
            return job_summary(self._client.get_job_info(job_id))

    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job the cluster knows, oldest first, redacted."""
        with self._translate_errors():
            details = self._client.list_jobs()
        summaries = [job_summary(item) for item in details]
        return sorted(summaries, key=lambda item: (item.get("start_time") or 0, item["submission_id"] or ""))

    def logs(self, job_id: str) -> str:
        """The job's whole log so far, redacted."""
        with self._translate_errors():
            return redact(self._client.get_job_logs(job_id))

    def stop(self, job_id: str) -> bool:
        """Ask the cluster to stop the job; True if it was running."""
        with self._translate_errors():
            return bool(self._client.stop_job(job_id))

    def wait(self, job_id: str, timeout_s: float = 60.0, poll_s: float = 0.5) -> str:
        """Poll until the job reaches a terminal state; returns it, or the last state seen
        when ``timeout_s`` runs out."""
        deadline = time.monotonic() + timeout_s
        state = self.status(job_id)
        while state not in TERMINAL_STATES and time.monotonic() < deadline:
            time.sleep(poll_s)
            state = self.status(job_id)
        return state

    def follow(self, job_id: str, write: Callable[[str], Any], *, poll_s: float = 1.0) -> int:
        """Stream the job's log to ``write`` (whole lines, redacted) until the job ends.

        Returns the exit status for the job's final state: 0 for SUCCEEDED, 1 otherwise. The log
        comes over Ray's websocket tail; if that breaks, the rest is fetched by polling.
        """
        lines = _LineRedactor(write)
        try:
            asyncio.run(self._tail(job_id, lines))
            streamed = True
        except Exception:  # the websocket broke or was refused: poll the full log instead
            streamed = False
        while True:
            state = self.status(job_id)
            if not streamed:
                text = self._raw_logs(job_id)
                if len(text) > lines.consumed:
                    lines.feed(text[lines.consumed:])
            if state in TERMINAL_STATES:
                break
            time.sleep(poll_s)
        lines.close()
        return exit_code(state)

    def _raw_logs(self, job_id: str) -> str:
        with self._translate_errors():
            return self._client.get_job_logs(job_id)

    async def _tail(self, job_id: str, lines: "_LineRedactor") -> None:
        async for chunk in self._client.tail_job_logs(job_id):
            lines.feed(chunk)


def exit_code(state: str) -> int:
    """0 for a job that SUCCEEDED, 1 for any other final state."""
    return 0 if state == "SUCCEEDED" else 1


class _LineRedactor:
    """Buffers a character stream and writes it out as whole, redacted lines (a secret split
    across two chunks is still masked)."""

    def __init__(self, write: Callable[[str], Any]) -> None:
        self._write = write
        self._pending = ""
        self.consumed = 0

    def feed(self, chunk: str) -> None:
        self.consumed += len(chunk)
        self._pending += chunk
        if "\n" in self._pending:
            complete, self._pending = self._pending.rsplit("\n", 1)
            self._write(redact(complete + "\n"))

    def close(self) -> None:
        if self._pending:
            self._write(redact(self._pending + "\n"))
            self._pending = ""


def _state_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def job_summary(details: Any) -> dict[str, Any]:
    """The fields of Ray's ``JobDetails`` that a user needs, redacted."""
    runtime_env = getattr(details, "runtime_env", None) or {}
    summary = {
        "submission_id": getattr(details, "submission_id", None),
        "job_id": getattr(details, "job_id", None),
        "status": _state_name(getattr(details, "status", "")),
        "entrypoint": getattr(details, "entrypoint", ""),
        "message": getattr(details, "message", "") or "",
        "start_time": getattr(details, "start_time", None),
        "end_time": getattr(details, "end_time", None),
        "driver_exit_code": getattr(details, "driver_exit_code", None),
        "env_vars": dict(runtime_env.get("env_vars") or {}),
    }
    return redact_mapping(summary, secret_values())


def _short_reason(err: Exception) -> str:
    """The innermost reason of a requests error, without the long urllib3 wrapper text."""
    text = str(err)
    for marker in ("Connection refused", "Name or service not known", "No route to host",
                   "Temporary failure in name resolution", "Network is unreachable"):
        if marker in text:
            return marker.lower()
    return text
