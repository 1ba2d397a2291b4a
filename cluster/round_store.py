"""Where a simulation's rounds live: one Parquet file per experiment round, through
:class:`~cluster.storage.Storage` (local paths or ``s3://``).

Layout under the run folder ``out``:

- ``experiments/<experiment_id>/round_<r>.parquet``: the round's new label records as rows
  (:data:`RECORD_SCHEMA`), its metrics and the experiment's settings as JSON in the schema
  metadata (:data:`META_KEY`); every write is atomic, so a crash leaves whole rounds only;
- ``experiments/<experiment_id>/oracle_log.parquet``: what the oracle answered, written last;
- ``reference/<reference_id>.parquet``: the full-data reference of one split.

:class:`ParquetRoundStore` is the :class:`~ultrasound.active.experiment.RoundStore` the
experiment loop writes through.
"""
from __future__ import annotations

import io
import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.storage import Location, Storage
from ultrasound.active.experiment import UnreadableRound

ROUND_FILE = re.compile(r"^round_(\d+)\.parquet$")
META_KEY = b"sonoray.round"
REFERENCE_KEY = b"sonoray.reference"
ORACLE_LOG = "oracle_log.parquet"


RECORD_SCHEMA = pa.schema([
    ("index", pa.int64()), ("global_index", pa.int64()), ("round", pa.int32()), ("source", pa.string()),
    ("cost", pa.float64()), ("labels", pa.list_(pa.uint8())), ("machine_labels", pa.list_(pa.uint8())),
    ("audit", pa.string()),
])


def round_table(records: list[dict], meta: dict) -> pa.Table:
    """Records (with ``global_index``) and the round's metadata as one table."""
    table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
    return table.replace_schema_metadata({META_KEY: json.dumps(meta, default=json_default).encode()})


def json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def completed_rounds(files: list[str]) -> int:
    """Rounds ``0..k`` all present among ``files`` (names relative to the experiment folder):
    returns ``k + 1`` (0 when round 0 is missing)."""
    present = {int(m.group(1)) for name in files if (m := ROUND_FILE.match(name))}
    count = 0
    while count in present:
        count += 1
    return count


def read_round(storage: Storage, location: Location) -> tuple[list[dict], dict]:
    table = storage.read_parquet(location)
    meta = json.loads(table.schema.metadata[META_KEY])
    return table.to_pylist(), meta


# What reading a torn, truncated or foreign round file raises (ArrowInvalid is a ValueError;
# missing metadata a TypeError or KeyError).
UNREADABLE_ROUND = (OSError, ValueError, KeyError, TypeError, pa.ArrowException)


def readable_rounds(storage: Storage, exp: Location, count: int) -> int:
    """How many of rounds ``0..count-1`` of the experiment at ``exp`` parse, from round 0: the
    first that does not is recomputed (with every later one) instead of trusted."""
    for r in range(count):
        try:
            read_round_meta(storage, exp.join(f"round_{r}.parquet"))
        except UNREADABLE_ROUND:
            return r
    return count


def read_round_meta(storage: Storage, location: Location) -> dict:
    data = storage.read_bytes(location)
    schema = pq.ParquetFile(io.BytesIO(data)).schema_arrow
    return json.loads(schema.metadata[META_KEY])



class ParquetRoundStore:
    """The rounds of experiment ``experiment_id`` under the run folder ``out``."""

    def __init__(self, storage: Storage, out: Location, experiment_id: str) -> None:
        self.storage, self.folder = storage, out.join("experiments", experiment_id)

    def completed(self) -> int:
        return completed_rounds(self.storage.list_files(self.folder))

    def read(self, round: int) -> tuple[list[dict], dict]:
        try:
            return read_round(self.storage, self.folder.join(f"round_{round}.parquet"))
        except UNREADABLE_ROUND as err:
            raise UnreadableRound(f"{self.folder.join(f'round_{round}.parquet').uri}: {err}") from err

    def write(self, round: int, records: list[dict], meta: dict) -> None:
        self.storage.write_parquet(round_table(records, meta), self.folder.join(f"round_{round}.parquet"))

    def write_log(self, log: dict) -> None:
        self.storage.write_parquet(pa.table({
            "round": log["round"], "kind": log["kind"], "index": log["index"],
            "labels": pa.array(list(log["labels"]), type=pa.list_(pa.uint8())), "cost": log["cost"],
        }), self.folder.join(ORACLE_LOG))


def progress_files(storage: Storage, out: Location) -> dict[str, list[str]]:
    """Files of every experiment folder: ``{experiment_id: [names]}``."""
    files: dict[str, list[str]] = {}
    for path in storage.list_files(out.join("experiments")):
        exp_id, _, name = path.partition("/")
        files.setdefault(exp_id, []).append(name)
    return files


def finished(storage: Storage, out: Location, experiment_id: str, rounds: int, files: list[str]) -> bool:
    """Every round ``0..rounds`` and the oracle log are stored, and every round parses."""
    return (completed_rounds(files) >= rounds + 1 and ORACLE_LOG in files
            and readable_rounds(storage, out.join("experiments", experiment_id), rounds + 1) == rounds + 1)


def write_reference(storage: Storage, out: Location, row: dict, meta: dict) -> None:
    table = pa.Table.from_pylist([row]).replace_schema_metadata({REFERENCE_KEY: json.dumps(meta).encode()})
    storage.write_parquet(table, out.join("reference", f"{row['reference_id']}.parquet"))


def read_references(storage: Storage, out: Location) -> dict[str, dict]:
    refs = {}
    for name in storage.list_files(out.join("reference")):
        if name.endswith(".parquet"):
            row = storage.read_parquet(out.join("reference", name)).to_pylist()[0]
            refs[row["reference_id"]] = row
    return refs
