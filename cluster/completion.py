"""A training run's final files, and the marker written last that says they are all there.

A run ends by writing its final files one by one (``model.pt``, ``metrics.json``, the job's own
records), each atomically (:meth:`cluster.storage.Storage.write_bytes`), and then
``complete.json``: the name, size and sha256 of every one of them. Each file alone is whole or
absent; the marker makes the set whole: a folder with ``complete.json`` holds a finished run, one
with a model but no marker holds a run whose driver died while exporting, which ``--resume``
finishes. A run that starts or resumes removes the marker first.

Loading a model from a run folder checks it against the marker (:func:`check_model_file`): a
model of an unfinished run, or one changed after its run finished, is refused with the reason.

``complete.json``::

    {"files": {"model.pt": {"bytes": 45_000_000, "sha256": "..."}, ...}, "finished": 1764633600.0}
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import PurePosixPath

from cluster.storage import Location, Storage
from ultrasound.checkpoint import CheckpointError

COMPLETE_FILE = "complete.json"
RUN_FOLDER = "ray/run"  # where Ray Train keeps a run's checkpoints (cluster.train)


class FinalFiles:
    """Writes a run's final files under ``out`` and remembers their digests for the marker."""

    def __init__(self, out: Location, storage: Storage) -> None:
        self.out, self.storage = out, storage
        self.files: dict[str, dict] = {}

    def write(self, name: str, data: bytes) -> Location:
        target = self.out.join(name)
        self.storage.write_bytes(target, data)
        self.files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return target

    def complete(self) -> Location:
        """Write ``complete.json`` (last: every file it names is already whole)."""
        marker = self.out.join(COMPLETE_FILE)
        body = {"files": dict(sorted(self.files.items())), "finished": time.time()}
        self.storage.write_bytes(marker, json.dumps(body, indent=1).encode())
        return marker


def clear_complete(out: Location, storage: Storage) -> None:
    """A run that (re)starts under ``out`` is not complete until it writes the marker again."""
    storage.delete(out.join(COMPLETE_FILE))


def read_complete(out: Location, storage: Storage) -> dict | None:
    """The marker of the run under ``out``, or None when it has none (or it does not parse)."""
    marker = out.join(COMPLETE_FILE)
    if not storage.exists(marker):
        return None
    try:
        body = json.loads(storage.read_bytes(marker))
        return body if isinstance(body, dict) and isinstance(body.get("files"), dict) else None
    except ValueError:
        return None


def parent(location: Location) -> tuple[Location, str]:
    """(the folder holding ``location``, its file name)."""
    path = PurePosixPath(location.key)
    return Location(location.scheme, location.bucket, str(path.parent).lstrip(".") if location.is_s3
                    else str(path.parent)), path.name


def check_model_file(location: Location, data: bytes, storage: Storage) -> None:
    """Refuse a model file that belongs to a sonoray run which is not finished, or that no longer
    matches what its run wrote. A file outside any run folder (a downloaded checkpoint) passes."""
    folder, name = parent(location)
    marker = read_complete(folder, storage)
    if marker is None:
        if storage.exists(folder.join(RUN_FOLDER)):
            raise CheckpointError(f"{location.uri}: its run did not finish (no {COMPLETE_FILE} beside it): "
                                  f"finish it with --resume, or pass the model of a finished run")
        return
    entry = marker["files"].get(name)
    if entry is not None and entry.get("sha256") != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"{location.uri}: changed after its run finished (its sha256 is not the one "
                              f"{COMPLETE_FILE} records)")
