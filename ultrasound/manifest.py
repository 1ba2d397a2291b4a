"""Video manifests: which videos a data set holds and what is known of each.

Two inputs are understood, both validated here with messages that name the file, row, column and
value at fault:

* the generic layout: a folder of videos plus a CSV with a ``path`` column (relative to the
  folder), optional ``video_id``, a patient column, a class-label column and 0/1 finding columns;
* the upstream POCUS layout (``dataset_metadata.csv`` + ``videos/{convex,linear}/``), quirks
  included: malformed rows and rows for absent files are reported and skipped, never fatal.

Pure Python: no object storage here (cluster/ingest.py uploads what this module accepts).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mpeg", ".mpg", ".gif", ".mkv", ".webm", ".m4v")

POCUS_FINDINGS = (
    "Effusion",
    "Consolidations",
    "B-lines",
    "A-lines",
    "Pleural line irregularities",
    "Air bronchogram",
)
POCUS_CLASSES = {
    "covid-19": "covid",
    "bacterial pneumonia": "pneumonia",
    "regular": "regular",
    "viral pneumonia": "viral",
}
_TRUE = {"1", "yes", "true"}
_FALSE = {"0", "no", "false"}


class ManifestError(ValueError):
    """A manifest that cannot be read as it stands; the message says where and why."""


@dataclass(frozen=True)
class VideoRecord:
    """One video accepted into a data set.

    ``path`` is relative to the video folder (POSIX form); it becomes the object key under the
    data set's ``videos/`` prefix.
    """

    video_id: str
    path: str
    patient_id: str | None = None
    label: str | None = None
    findings: dict[str, int] = field(default_factory=dict)
    probe: str | None = None
    row: int | None = None  # line in the source CSV (header = line 1)


@dataclass(frozen=True)
class SkippedRow:
    row: int
    path: str
    reason: str

    def as_dict(self) -> dict:
        return {"row": self.row, "path": self.path, "reason": self.reason}


def parse_finding(value: str, *, file: str | Path, row: int, column: str) -> int:
    """Read a finding cell: 1/0, yes/no, true/false, any case, spaces ignored."""
    text = (value or "").strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise ManifestError(
        f"{file}: row {row}, column {column!r}: value {value!r} is not a finding value "
        f"(use 1/0, yes/no or true/false)"
    )


def safe_relative_path(path: str, root: Path, *, file: str | Path, row: int) -> str:
    """Return ``path`` as a POSIX path relative to ``root``, refusing any escape from it."""
    text = (path or "").strip()
    if not text:
        raise ManifestError(f"{file}: row {row}, column 'path': empty path")
    posix = PurePosixPath(text.replace("\\", "/"))
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", text):
        raise ManifestError(
            f"{file}: row {row}, column 'path': {path!r} is absolute; paths must be relative "
            f"to the video folder {root}"
        )
    if ".." in posix.parts:
        raise ManifestError(
            f"{file}: row {row}, column 'path': {path!r} escapes the video folder {root} ('..')"
        )
    resolved = (root / posix).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ManifestError(
            f"{file}: row {row}, column 'path': {path!r} resolves outside the video folder {root}"
        )
    return posix.as_posix().removeprefix("./")


def check_video_id(video_id: str, *, file: str | Path, row: int) -> str:
    """``video_id`` if it is safe as a name: no ``..`` part, not absolute, no control characters;
    else ManifestError naming file, row and value."""
    problem = video_id_problem(video_id)
    if problem:
        raise ManifestError(f"{file}: row {row}, column 'video_id': {video_id!r} {problem}")
    return video_id


def video_id_problem(video_id: str) -> str | None:
    """Why ``video_id`` is unsafe to store or to build a path from, or None."""
    if any(ord(c) < 32 or ord(c) == 127 for c in video_id):
        return "contains a control character"
    if video_id.startswith(("/", "\\")) or (len(video_id) > 2 and video_id[1] == ":" and video_id[2] in "/\\"):
        return "is an absolute path"
    if ".." in PurePosixPath(video_id.replace("\\", "/")).parts:
        return "has a '..' part"
    return None


def safe_file_name(video_id: str) -> str:
    """A single file-name component derived from ``video_id``: every character other than
    letters, digits, ``-``, ``_`` and ``.`` becomes ``_``, and no leading dot remains."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in video_id)
    return cleaned.lstrip(".") or "_"


def _read_csv(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ManifestError(f"{csv_path}: the file is empty (no header row)")
            # Row numbers as a spreadsheet shows them (header = row 1): a quoted cell may span
            # several physical lines, so reader.line_num would disagree with the sheet.
            rows = [(n, row) for n, row in enumerate(reader, start=2) if any(c.strip() for c in row)]
    except UnicodeDecodeError as err:
        raise ManifestError(f"{csv_path}: not a UTF-8 CSV file ({err})") from err
    return [h.strip() for h in header], rows


AUTO = "auto"  # findings=AUTO: every column whose values are all finding values


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A Parquet manifest as :func:`_read_csv` gives a CSV: header, then (row, cells as text).
    Rows count from 1 (a Parquet file has no header row); nulls read as empty cells, booleans as
    true/false and whole floats (1.0, what pandas writes for a column with gaps) as integers."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ManifestError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None

    def text(value) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    columns = table.to_pydict()
    header = [str(name).strip() for name in table.column_names]
    rows = [(n + 1, [text(columns[name][n]) for name in table.column_names]) for n in range(table.num_rows)]
    return header, [(n, row) for n, row in rows if any(c.strip() for c in row)]


def read_manifest_table(path: str | Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and rows of a CSV or Parquet (``.parquet``/``.pq``) manifest, cells as text."""
    path = Path(path)
    return _read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else _read_csv(path)


def finding_columns(header: list[str], rows: list[tuple[int, list[str]]], exclude: set[str]) -> list[str]:
    """``--labels auto``: the columns (other than ``exclude``) with at least one value and
    every non-empty value a finding value (0/1, yes/no, true/false), in header order."""
    found = []
    for i, name in enumerate(header):
        if name in exclude:
            continue
        values = [row[i].strip().lower() for _, row in rows if i < len(row) and row[i].strip()]
        if values and all(v in _TRUE or v in _FALSE for v in values):
            found.append(name)
    return found


def parse_generic_manifest(
    csv_path: str | Path,
    video_dir: str | Path,
    *,
    findings: list[str] | str | None = None,
    label_col: str = "label",
    patient_col: str = "patient_id",
    remote: bool = False,
) -> tuple[list[VideoRecord], list[SkippedRow], list[str]]:
    """Read a generic manifest, CSV or Parquet (the same columns either way).

    ``remote=True``: ``video_dir`` names a bucket prefix (``ingest --in-place``), so paths are
    checked for escapes only and the caller looks the objects up.

    Returns ``(records, skipped, finding_names)``. Rows whose video file is missing are skipped
    and reported; a bad finding value, a path escaping ``video_dir``, a duplicate video or an
    unknown column is an error (``ManifestError``) naming file, row, column and value.
    ``findings=None`` takes no finding columns; ``findings="auto"`` takes every column whose
    values are all finding values (:func:`finding_columns`).
    """
    csv_path, root = Path(csv_path), Path(video_dir)
    if not csv_path.is_file():
        raise ManifestError(f"manifest {csv_path} does not exist")
    if remote:
        root = Path("/", PurePosixPath(str(video_dir)).name or "bucket")  # only to check paths against
    elif not root.is_dir():
        raise ManifestError(f"video folder {root} does not exist")
    header, rows = read_manifest_table(csv_path)
    columns = {name: i for i, name in enumerate(header)}
    if "path" not in columns:
        raise ManifestError(f"{csv_path}: no 'path' column (columns: {', '.join(header)})")
    if findings == AUTO:
        findings = finding_columns(header, rows, {"path", "video_id", label_col, patient_col, "probe"})
        if not findings:
            raise ManifestError(f"{csv_path}: --labels auto found no finding column (one whose values are all "
                                f"0/1, yes/no or true/false); columns: {', '.join(header)}")
    finding_names = list(findings or [])
    for name in finding_names:
        if name not in columns:
            raise ManifestError(
                f"{csv_path}: finding column {name!r} not found (columns: {', '.join(header)})"
            )
    has_label = label_col in columns
    has_patient = patient_col in columns

    def cell(row: list[str], name: str) -> str:
        i = columns[name]
        return row[i].strip() if i < len(row) else ""

    records: list[VideoRecord] = []
    skipped: list[SkippedRow] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        rel = safe_relative_path(cell(row, "path"), root, file=csv_path, row=line)
        values = {
            name: parse_finding(cell(row, name), file=csv_path, row=line, column=name)
            for name in finding_names
        }
        if not remote and not (root / rel).is_file():
            skipped.append(SkippedRow(line, rel, "video file not found"))
            continue
        video_id = cell(row, "video_id") if "video_id" in columns else ""
        video_id = check_video_id(video_id or str(PurePosixPath(rel).with_suffix("")), file=csv_path, row=line)
        if video_id in seen:
            raise ManifestError(
                f"{csv_path}: row {line}: video_id {video_id!r} already used on row {seen[video_id]}"
            )
        seen[video_id] = line
        records.append(
            VideoRecord(
                video_id=video_id,
                path=rel,
                patient_id=(cell(row, patient_col) or None) if has_patient else None,
                label=(cell(row, label_col) or None) if has_label else None,
                findings=values,
                row=line,
            )
        )
    return records, skipped, finding_names


def parse_pocus(video_dir: str | Path) -> tuple[list[VideoRecord], list[SkippedRow], list[str]]:
    """Read the upstream POCUS layout: ``dataset_metadata.csv`` and ``videos/<probe>/<file>``.

    Every sheet row is either accepted or reported in ``skipped`` with its line number and a
    reason: not a video, file absent, malformed finding or label cell, duplicate file name. Video
    files with no sheet row are reported too (row 0). Classes: covid / pneumonia / regular / viral.
    """
    root = Path(video_dir)
    sheet = root / "dataset_metadata.csv"
    if not sheet.is_file():
        raise ManifestError(f"{root}: no dataset_metadata.csv (is this the POCUS layout?)")
    header, rows = _read_csv(sheet)
    columns = {name: i for i, name in enumerate(header)}
    required = ["Filename", "Label", "Probe", *POCUS_FINDINGS]
    missing = [c for c in required if c not in columns]
    if missing:
        raise ManifestError(f"{sheet}: missing columns {missing}")

    files: dict[str, str] = {}
    for path in sorted((root / "videos").rglob("*")):
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            files.setdefault(path.stem, path.relative_to(root).as_posix())

    records: list[VideoRecord] = []
    skipped: list[SkippedRow] = []
    used: dict[str, int] = {}
    for line, row in rows:
        if len(row) != len(header):
            skipped.append(SkippedRow(line, "", f"malformed row: {len(row)} cells, header has {len(header)}"))
            continue
        get = lambda name: row[columns[name]].strip()  # noqa: E731
        name = get("Filename")
        rel = files.get(name)
        if not name:
            skipped.append(SkippedRow(line, "", "malformed row: empty Filename"))
            continue
        if rel is None:
            kind = get("Type").lower() if "Type" in columns else ""
            reason = "not a video (Type = image)" if kind == "image" else "video file absent"
            skipped.append(SkippedRow(line, name, reason))
            continue
        if name in used:
            skipped.append(SkippedRow(line, rel, f"duplicate Filename (first on row {used[name]})"))
            continue
        label = POCUS_CLASSES.get(get("Label").lower())
        if label is None:
            skipped.append(SkippedRow(line, rel, f"malformed Label {get('Label')!r}"))
            continue
        bad = [(f, get(f)) for f in POCUS_FINDINGS if get(f).lower() not in _TRUE | _FALSE]
        if bad:
            column, value = bad[0]
            skipped.append(SkippedRow(line, rel, f"malformed finding {column!r}: value {value!r}"))
            continue
        values = {f: int(get(f).lower() in _TRUE) for f in POCUS_FINDINGS}
        used[name] = line
        patient = get("Patient ID / Name") if "Patient ID / Name" in columns else ""
        records.append(
            VideoRecord(
                video_id=PurePosixPath(rel).stem,
                path=rel,
                patient_id=f"pocus-{patient}" if patient else None,
                label=label,
                findings=values,
                probe=get("Probe").lower() or None,
                row=line,
            )
        )
    for name, rel in files.items():
        if name not in used and not any(s.path == rel for s in skipped):
            skipped.append(SkippedRow(0, rel, "video file has no row in dataset_metadata.csv"))
    return records, skipped, list(POCUS_FINDINGS)


def parse_video_folder(video_dir: str | Path) -> list[VideoRecord]:
    """Every video file under ``video_dir`` (recursively, by suffix), no labels: what
    ``sonoray predict --data VIDEO_DIR`` scores. ``video_id`` is the relative path without its
    suffix, ``/`` written as ``__`` (unique within the folder). Raises ManifestError when the
    folder holds no video."""
    root = Path(video_dir)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder")
    records = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES and not path.name.startswith("."):
            rel = path.relative_to(root).as_posix()
            video_id = rel.rsplit(".", 1)[0].replace("/", "__")
            records.append(VideoRecord(video_id=check_video_id(video_id, file=root, row=len(records) + 1), path=rel))
    if not records:
        raise ManifestError(f"{root}: no video file ({', '.join(VIDEO_SUFFIXES)}) in it")
    return records


def parse_label_sheet(csv_path: str | Path, findings: list[str] | tuple[str, ...],
                      known_video_ids: set[str] | frozenset[str]) -> dict[str, list[int]]:
    """The annotators' answers: a CSV with ``video_id`` and one column per finding (1/0,
    yes/no, true/false), as ``sonoray query --labelled`` takes it back. Other columns (notes,
    an annotation tool's own) are ignored.

    Returns video_id -> the finding values in ``findings`` order. A missing column, an unknown
    or repeated video, or a value that is not a finding value raises ManifestError naming the
    file, the row, the column and the value.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such file")
    header, rows = _read_csv(path)
    columns = {name: i for i, name in enumerate(header)}
    missing = [c for c in ("video_id", *findings) if c not in columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; it needs video_id and one column per finding "
                            f"({', '.join(findings)})")
    out: dict[str, list[int]] = {}
    for line, row in rows:
        cells = row + [""] * (len(header) - len(row))
        video_id = cells[columns["video_id"]].strip()
        if video_id not in known_video_ids:
            raise ManifestError(f"{path}: row {line}, column 'video_id': {video_id!r} is not a video of the data set")
        if video_id in out:
            raise ManifestError(f"{path}: row {line}, column 'video_id': {video_id!r} is labelled twice")
        out[video_id] = [parse_finding(cells[columns[f]], file=path, row=line, column=f) for f in findings]
    return out
