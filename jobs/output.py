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


_BARS: dict[str, Any] = {}


def progress(message: str) -> None:
    """One progress line on stderr, with a wall-clock stamp (none with ``sonoray -q``). A
    :class:`cluster.progress.Count` becomes a tqdm bar with ETA when stderr is a terminal (one
    bar per task, closed when it is done) and stays a plain line otherwise (logs, pipes, CI)."""
    if os.environ.get(QUIET_VARIABLE) == "1":
        return
    if hasattr(message, "total") and hasattr(message, "task") and sys.stderr.isatty():
        _draw_bar(message)
        return
    print(redact(f"[sonoray {time.strftime('%H:%M:%S')}] {message}"), file=sys.stderr, flush=True)


def _draw_bar(count) -> None:
    from tqdm import tqdm

    bar = _BARS.get(count.task)
    if bar is None or bar.total != count.total:
        import shutil

        bar = _BARS[count.task] = tqdm(total=count.total, desc=redact(count.task), unit=f" {count.unit}".rstrip(),
                                       file=sys.stderr, ncols=shutil.get_terminal_size((100, 20)).columns, leave=True)
    bar.n = count.done
    bar.set_postfix_str(redact(count.note), refresh=False)
    bar.refresh()
    if count.done >= count.total:
        bar.close()
        del _BARS[count.task]


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
