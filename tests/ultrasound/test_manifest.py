import csv
from pathlib import Path

import pytest

from ultrasound.manifest import (
    ManifestError,
    parse_finding,
    parse_generic_manifest,
    parse_pocus,
    safe_relative_path,
)


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("value,expected", [
    ("1", 1), ("0", 0), (" Yes ", 1), ("no", 0), ("TRUE", 1), ("False", 0), ("  yEs", 1),
])
def test_finding_values_accept_the_documented_spellings(value, expected):
    assert parse_finding(value, file="m.csv", row=2, column="b_lines") == expected


@pytest.mark.parametrize("value", ["maybe", "", "2", "n/A", "y"])
def test_bad_finding_value_names_file_row_column_and_value(value):
    with pytest.raises(ManifestError) as err:
        parse_finding(value, file="m.csv", row=7, column="b_lines")
    text = str(err.value)
    assert "m.csv" in text and "row 7" in text and "'b_lines'" in text and repr(value) in text


@pytest.mark.parametrize("path", ["../outside.mp4", "a/../../x.mp4", "/etc/passwd", "C:\\x.mp4"])
def test_paths_escaping_the_video_folder_are_refused(tmp_path, path):
    with pytest.raises(ManifestError, match="row 3"):
        safe_relative_path(path, tmp_path, file="m.csv", row=3)


def test_symlink_escaping_the_folder_is_refused(tmp_path):
    inside = tmp_path / "videos"
    inside.mkdir()
    (inside / "link.mp4").symlink_to(tmp_path.parent)
    with pytest.raises(ManifestError, match="outside"):
        safe_relative_path("link.mp4/x", inside, file="m.csv", row=2)


def test_generic_manifest_reads_yes_no_findings_and_reports_missing_files(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.mp4").write_bytes(b"x")
    csv_path = write_manifest(tmp_path, [
        {"path": "a.mp4", "patient_id": "p1", "label": "covid", "B": " Yes", "C": "no"},
        {"path": "sub/b.mp4", "patient_id": "", "label": "regular", "B": "false", "C": "TRUE"},
        {"path": "gone.mp4", "patient_id": "p2", "label": "regular", "B": "0", "C": "1"},
    ])
    records, skipped, findings = parse_generic_manifest(csv_path, tmp_path, findings=["B", "C"])
    assert findings == ["B", "C"]
    assert [(r.video_id, r.patient_id, r.label, r.findings) for r in records] == [
        ("a", "p1", "covid", {"B": 1, "C": 0}),
        ("sub/b", None, "regular", {"B": 0, "C": 1}),
    ]
    assert [(s.row, s.path, s.reason) for s in skipped] == [(4, "gone.mp4", "video file not found")]


def test_generic_manifest_errors_name_the_place(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    csv_path = write_manifest(tmp_path, [{"path": "a.mp4", "B": "maybe"}])
    with pytest.raises(ManifestError, match=r"manifest.csv: row 2, column 'B': value 'maybe'"):
        parse_generic_manifest(csv_path, tmp_path, findings=["B"])
    with pytest.raises(ManifestError, match="finding column 'Z' not found"):
        parse_generic_manifest(csv_path, tmp_path, findings=["Z"])
    escape = write_manifest(tmp_path, [{"path": "../a.mp4"}])
    with pytest.raises(ManifestError, match="escapes"):
        parse_generic_manifest(escape, tmp_path)


def test_pocus_sheet_rows_are_each_accepted_or_reported(pocus_dir):
    records, skipped, findings = parse_pocus(pocus_dir)
    with open(pocus_dir / "dataset_metadata.csv", newline="") as handle:
        n_rows = sum(1 for _ in csv.reader(handle)) - 1
    accepted_rows = {r.row for r in records}
    skipped_rows = [s.row for s in skipped if s.row > 0]
    # Every data row (2..n+1) is either accepted or skipped, exactly once.
    assert sorted(accepted_rows | set(skipped_rows)) == list(range(2, n_rows + 2))
    assert not accepted_rows & set(skipped_rows) and len(skipped_rows) == len(set(skipped_rows))
    reasons = {s.row: s.reason for s in skipped}
    # The two malformed finding cells of the upstream sheet: a URL shifted into Effusion, a blank.
    assert reasons[113].startswith("malformed finding 'Effusion'") and "dropbox" in reasons[113]
    assert reasons[124] == "malformed finding 'Effusion': value ''"
    # The four large upstream videos that are listed but not shipped.
    for row in (294, 373, 374, 375):
        assert reasons[row] == "video file absent"
    assert all(r.label in {"covid", "pneumonia", "regular", "viral"} for r in records)
    assert len(records) == 129 and findings[2] == "B-lines"
    video_files = [p for p in (pocus_dir / "videos").rglob("*") if p.is_file()]
    assert len(records) + sum("malformed" in s.reason for s in skipped) == len(video_files)


@pytest.mark.parametrize(("video_id", "problem"), [
    ("../../x", "has a '..' part"), ("a/../../b", "has a '..' part"), ("/etc/passwd", "is an absolute path"),
    ("C:\\\\x", "is an absolute path"), ("clip\n1", "contains a control character"),
])
def test_an_unsafe_video_id_is_refused_at_ingest_naming_the_row(tmp_path, video_id, problem):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "b.mp4").write_bytes(b"")
    csv_path = write_manifest(tmp_path, [{"path": "a.mp4", "video_id": "fine"},
                                         {"path": "b.mp4", "video_id": video_id}])
    with pytest.raises(ManifestError) as err:
        parse_generic_manifest(csv_path, tmp_path, findings=[])
    assert str(err.value) == f"{csv_path}: row 3, column 'video_id': {video_id!r} {problem}"


def test_file_names_from_video_ids_stay_one_component():
    from ultrasound.manifest import safe_file_name

    assert safe_file_name("../../x") == "_.._x"
    assert "/" not in safe_file_name("a/b\\c") and safe_file_name("a/b\\c") == "a_b_c"
    assert safe_file_name("patient 7:clip") == "patient_7_clip"


def test_a_stored_key_with_dotdot_is_refused_when_joined():
    from cluster.storage import parse_uri

    with pytest.raises(ValueError, match=r"refusing to join 'videos/\.\./\.\./x': it has a '\.\.' part"):
        parse_uri("s3://b/data").join("videos/../../x")
    assert parse_uri("s3://b/data").join("videos", "a..b.mp4").uri == "s3://b/data/videos/a..b.mp4"
