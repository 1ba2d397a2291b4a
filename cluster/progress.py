"""Counted progress: a line that also carries its counts, so a terminal can draw it as a bar.

Long work (experiments, videos, epochs) reports through the jobs' ``on_progress(str)`` callbacks.
A :class:`Count` *is* that string (``"simulate: 40/120 experiments, 3.1 rounds/s, ETA 2m10s"``), so
every callback that prints or collects strings keeps working; :func:`jobs.output.progress` sees
the counts and draws a tqdm bar with ETA on a terminal, and prints the plain line otherwise.
"""
from __future__ import annotations

import time


def format_eta(seconds: float) -> str:
    """``"45s"``, ``"2m10s"``, ``"1h05m"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Count(str):
    """``task: done/total unit[, note][, ETA ...]``, with ``task``, ``done``, ``total``, ``unit``,
    ``note`` as attributes. ``started`` (a ``time.perf_counter()`` value) gives the ETA: the
    elapsed time per unit done, times the units left.

    Example:
        >>> str(Count("ingest", 5, 10, "videos"))
        'ingest: 5/10 videos'
    """

    task: str
    done: int
    total: int
    unit: str
    note: str

    def __new__(cls, task: str, done: int, total: int, unit: str = "", note: str = "",
                started: float | None = None) -> "Count":
        parts = [f"{task}: {done}/{total}" + (f" {unit}" if unit else "")]
        if note:
            parts.append(note)
        if started is not None and 0 < done < total:
            parts.append(f"ETA {format_eta((time.perf_counter() - started) / done * (total - done))}")
        self = super().__new__(cls, ", ".join(parts))
        self.task, self.done, self.total, self.unit, self.note = task, int(done), int(total), unit, note
        return self
