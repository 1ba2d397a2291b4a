"""How every job talks to its user: progress on stderr, one JSON object last on stdout; every
line goes through :func:`cluster.redact.redact` first, so no credential reaches the terminal."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO

from cluster.redact import redact


class UserError(Exception):
    """Bad input or an unreachable service: printed as one clear line, exit status 2."""


QUIET_VARIABLE = "SONORAY_QUIET"  # "1": no progress lines (sonoray -q); errors still print


def progress(message: str) -> None:
    """One progress line on stderr, with a wall-clock stamp (none with ``sonoray -q``)."""
    if os.environ.get(QUIET_VARIABLE) == "1":
        return
    print(redact(f"[sonoray {time.strftime('%H:%M:%S')}] {message}"), file=sys.stderr, flush=True)


def human_stream(json_mode: bool) -> TextIO:
    """Where a job prints its human-readable table: stdout, or stderr with ``--json`` (stdout is
    then the one JSON object)."""
    return sys.stderr if json_mode else sys.stdout


def emit_json(obj: Any) -> None:
    """The machine-readable result: one JSON object, the last line on stdout."""
    print(redact(json.dumps(obj, sort_keys=False, default=_default)), flush=True)


def fail(message: str, code: int = 2) -> int:
    print(redact(f"sonoray: error: {message}"), file=sys.stderr, flush=True)
    return code


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
