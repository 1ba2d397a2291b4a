"""An exclusive claim on a run's ``--out``: one training run writes there at a time.

The claim is a small JSON file, ``<out>/.sonoray-claim.json`` (host, pid, start and heartbeat
times), created only if absent: ``O_CREAT | O_EXCL`` locally, a conditional PUT
(``If-None-Match: *``) on S3, so two runs started at once cannot both get it. While the run lives a
background thread refreshes the heartbeat every ``HEARTBEAT_S``; the claim is deleted when the run
ends, however it ends. A claim whose heartbeat is older than ``STALE_S`` (its driver was killed)
may be taken over by a run started with ``--resume``; a fresh one is refused, unless it was made on
this host by a process that no longer exists (then nobody can be writing).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

from cluster.storage import Location, Storage

CLAIM_FILE = ".sonoray-claim.json"
HEARTBEAT_S = 30.0
STALE_S = 120.0

_held = threading.local()  # out URIs this thread holds: fit() inside pretrain() nests


class ClaimError(RuntimeError):
    """``--out`` is claimed by another live run; the message names it."""


@contextlib.contextmanager
def claim_out(out: Location, storage: Storage, *, resume: bool = False,
              stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Hold the exclusive claim on ``out`` for the ``with`` block (re-entrant in one thread)."""
    held = getattr(_held, "uris", None)
    if held is None:
        held = _held.uris = set()
    if out.uri in held:
        yield
        return
    location = out.join(CLAIM_FILE)
    storage.check(out, create_bucket=True)
    created_folder = not out.is_s3 and not os.path.exists(out.key)
    _acquire(location, storage, resume, stale_s)
    held.add(out.uri)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(location, storage, stop, heartbeat_s),
                            name="sonoray-claim-heartbeat", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join(timeout=10)
        held.discard(out.uri)
        storage.delete(location)
        if created_folder:  # a run refused before it wrote anything leaves no empty --out behind
            with contextlib.suppress(OSError):
                os.rmdir(out.key)


def _record(started: float | None = None) -> bytes:
    now = time.time()
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": started or now, "heartbeat": now}).encode()


def _acquire(location: Location, storage: Storage, resume: bool, stale_s: float) -> None:
    """Create the claim, or take over a stale one with ``resume``; else raise ClaimError."""
    if storage.create_exclusive(location, _record()):
        return
    try:
        held = json.loads(storage.read_bytes(location))
        age = time.time() - float(held["heartbeat"])
    except (OSError, ValueError, KeyError, TypeError):  # torn or vanished: treat as stale
        held, age = {}, float("inf")
    who = f"host {held.get('host', '?')} pid {held.get('pid', '?')}"
    if _owner_is_gone(held):  # its driver died on this machine: nobody is writing
        age, resume = float("inf"), True
    if age <= stale_s:
        raise ClaimError(f"{location.uri}: another run ({who}, heartbeat {age:.0f} s ago) is writing "
                         f"to this --out; wait for it to end or choose another --out")
    if not resume:
        raise ClaimError(f"{location.uri}: a run ({who}) stopped without releasing this --out "
                         f"{age:.0f} s ago; pass --resume to take it over and continue it")
    storage.delete(location)  # two takers: the conditional create below admits only one
    if not storage.create_exclusive(location, _record()):
        raise ClaimError(f"{location.uri}: another run took this --out over at the same time")


def _owner_is_gone(held: dict) -> bool:
    """True when the claim was made on this host by a process that no longer exists."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _heartbeat(location: Location, storage: Storage, stop: threading.Event, every_s: float) -> None:
    started = time.time()
    while not stop.wait(every_s):
        with contextlib.suppress(Exception):  # a missed beat only ages the claim
            storage.write_bytes(location, _record(started))
