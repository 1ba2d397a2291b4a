"""Connecting to Ray: a local cluster by default, a remote one when an address is given.

The local default binds the dashboard (and with it the job API) to 127.0.0.1 only. The dashboard
stays on because Tune driving Train needs it (see Ray issue 54305).
"""
from __future__ import annotations

import logging
import os
import re
import warnings

import ray

# What sonoray's own code prints inside Ray workers (rank 0's epoch lines, a stopped run's
# reason), and what must never be hidden (a traceback, an error): kept when Ray's own log lines
# are hidden. Everything else a worker or the raylet forwards is Ray's internals ("Requesting
# resources", "Checkpoint successfully created", PreemptionWatcher, DDP stride warnings).
SONORAY_WORKER_LINE = re.compile(r"^\s*(\(\S+ pid=\S+\)\s*)?((pretrain|msml|stopping|simulate|sweep):|\[sonoray)"
                                 r"|Traceback|\b\w*Error\b")
RAY_LOGS_VARIABLE = "SONORAY_RAY_LOGS"  # "1": show Ray's own log lines (sonoray -v)


def ray_logs_shown() -> bool:
    return os.environ.get(RAY_LOGS_VARIABLE, "0") == "1"


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> str:
    """Start or join Ray once per process; returns a short description of the cluster.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; otherwise a local one starts,
    sized by ``num_cpus`` (default: all CPUs of this machine).
    """
    if ray.is_initialized():
        return _describe()
    _forward_ray_output_to_stderr()
    if not ray_logs_shown():
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = dict(logging_level=logging.WARNING if ray_logs_shown() else logging.ERROR, log_to_driver=True)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _system_config=local_system_config(num_cpus),
            **common,
        )
    _quiet_data_progress()
    return _describe()


def local_system_config(num_cpus: int | None) -> dict:
    """Raylet settings of a local cluster: keep idle workers alive.

    Ray keeps at most ``num_workers_soft_limit`` workers (default: one per CPU) and kills idle
    ones above it within a second. A training run on a small machine holds more actors than CPUs
    (train worker, controller, data coordinator, stream log, ...), so every frame-decoding task
    got a freshly started Python process: measured on POCUS, 2 CPUs, a new worker every 5-8 s,
    each spending seconds importing before it decoded anything, and the epoch's decoded shards
    it kept lost with it. Keeping a few workers per CPU costs memory (about 0.3 GB each), not CPU.
    """
    cpus = num_cpus or os.cpu_count() or 1
    return {"num_workers_soft_limit": max(8, 4 * int(cpus))}


def _forward_ray_output_to_stderr() -> None:
    """Print what Ray forwards from its workers and raylet (their stdout too, e.g. the raylet's
    "N PYTHON worker processes have been started" warning) on stderr, redacted: stdout is
    sonoray's own, so that a job's ``--json`` object is the last line there, and a worker that
    prints a credential (a traceback holding a URL with its password) shows it masked. Unless
    Ray's logs are shown (``sonoray -v``), only sonoray's own lines, tracebacks and errors pass
    (``SONORAY_WORKER_LINE``). Must run before ``ray.init``, which binds the printer."""
    import ray._private.worker as ray_worker

    from cluster.redact import redact

    original = ray_worker.print_to_stdstream
    if getattr(original, "_sonoray_stderr", False):
        return

    def to_stderr(data, ignore_prefix: bool):
        lines = [redact(line) for line in data.get("lines", [])
                 if ray_logs_shown() or SONORAY_WORKER_LINE.search(line)]
        if not lines:
            return None
        # sonoray's own lines without Ray's "(RayTrainWorker pid=...)" prefix unless -v
        return original({**data, "lines": lines, "is_err": True}, ignore_prefix or not ray_logs_shown())

    to_stderr._sonoray_stderr = True
    ray_worker.print_to_stdstream = to_stderr


def _quiet_data_progress() -> None:
    """Ray Data settings for every sonoray driver: no progress bars (sonoray prints its own), and
    no per-operator reservation (below)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("SONORAY_PROGRESS_BARS", "0") == "1"
    ctx.print_on_execution_start = False
    # Ray Data reserves each operator a share of the cluster; on a small cluster that held the
    # frame stream's one decode operator to one task at a time on 2 CPUs (POCUS, 224 px, 3 fps,
    # cold workers: 160 frames/s with the reservation, 231 without). The resource-budget
    # backpressure still bounds what the stream holds in memory.
    ctx.op_resource_reservation_enabled = False


def _describe() -> str:
    res = ray.cluster_resources()
    return f"Ray cluster: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))
