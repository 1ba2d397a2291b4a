"""Ingest against the real loopback S3 server."""
import csv
import shutil

import pytest

from cluster.dataset import load_dataset
from cluster.storage import parse_uri
from jobs.cli import main
from tests.conftest import run_cli
from ultrasound import phantom


def test_phantom_ingest_writes_manifest_with_labels(phantom_dir, phantom_uri, storage):
    data = load_dataset(phantom_uri, storage)
    with open(phantom_dir / "manifest.csv", newline="") as handle:
        expected = {row["video_id"]: row for row in csv.DictReader(handle)}
    assert data.findings == list(phantom.FINDINGS)
    assert len(data.rows) == len(expected) == 8
    for row in data.rows:
        src = expected[row["video_id"]]
        assert row["label"] == src["label"] and row["patient_id"] == src["patient_id"]
        assert {f: row[f] for f in phantom.FINDINGS} == {f: int(src[f] == "yes") for f in phantom.FINDINGS}
        assert row["frame_count"] > 0 and len(row["sha256"]) == 64
        assert storage.stored_sha256(data.video_location(row)) == row["sha256"]


def test_reingest_uploads_nothing_and_a_changed_video_once(tmp_path, phantom_dir, s3_server):
    folder = tmp_path / "clips"
    shutil.copytree(phantom_dir, folder)
    args = ["ingest", str(folder), "--manifest", str(folder / "manifest.csv"), "--to",
            "s3://sonoray-test/reingest", "--json"]
    code, first = run_cli(main, args)
    assert code == 0 and first["uploaded"] == first["ingested"] == 8
    code, second = run_cli(main, args)
    assert code == 0 and second["uploaded"] == 0 and second["ingested"] == 8
    victim = sorted((folder / "videos").iterdir())[0]
    other = sorted((folder / "videos").iterdir())[1]
    shutil.copyfile(other, victim)
    code, third = run_cli(main, args)
    assert code == 0 and third["uploaded"] == 1


def test_generic_manifest_with_yes_no_findings(tmp_path, phantom_dir, s3_server, storage):
    folder = tmp_path / "generic"
    (folder / "v").mkdir(parents=True)
    clips = sorted((phantom_dir / "videos").iterdir())[:3]
    for clip in clips:
        shutil.copyfile(clip, folder / "v" / clip.name)
    with open(folder / "list.csv", "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["path", "subject", "diagnosis", "B-lines", "Effusion"])
        w.writerow([f"v/{clips[0].name}", "s1", "covid", " YES ", "no"])
        w.writerow([f"v/{clips[1].name}", "s1", "covid", "True", "FALSE"])
        w.writerow([f"v/{clips[2].name}", "s2", "regular", "0", "1"])
        w.writerow(["v/missing.mp4", "s3", "regular", "0", "0"])
    code, result = run_cli(main, [
        "ingest", str(folder), "--manifest", str(folder / "list.csv"), "--to", "s3://sonoray-test/generic",
        "--labels", "B-lines,Effusion", "--label-col", "diagnosis", "--patient-col", "subject", "--json"])
    assert code == 0
    assert result["ingested"] == 3 and result["uploaded"] == 3
    assert result["skipped"] == [{"row": 5, "path": "v/missing.mp4", "reason": "video file not found"}]
    assert result["manifest"] == "s3://sonoray-test/generic/manifest.parquet"
    data = load_dataset("s3://sonoray-test/generic", storage)
    got = [(r["patient_id"], r["label"], r["B-lines"], r["Effusion"]) for r in data.rows]
    assert got == [("s1", "covid", 1, 0), ("s1", "covid", 1, 0), ("s2", "regular", 0, 1)]


def test_bad_finding_value_fails_naming_file_row_value(tmp_path, phantom_dir, s3_server, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    clip = sorted((phantom_dir / "videos").iterdir())[0]
    shutil.copyfile(clip, folder / "a.mp4")
    (folder / "m.csv").write_text("path,B\na.mp4,yes\na.mp4,perhaps\n")
    code, _ = run_cli(main, ["ingest", str(folder), "--manifest", str(folder / "m.csv"), "--labels", "B",
                             "--to", "s3://sonoray-test/bad"])
    err = capsys.readouterr().err
    assert code == 2
    assert "m.csv: row 3, column 'B': value 'perhaps'" in err


def test_manifest_path_escaping_the_folder_is_refused(tmp_path, s3_server, storage, capsys):
    folder = tmp_path / "inside"
    folder.mkdir()
    (tmp_path / "secret.mp4").write_bytes(b"x")
    (folder / "m.csv").write_text("path\n../secret.mp4\n")
    code, _ = run_cli(main, ["ingest", str(folder), "--manifest", str(folder / "m.csv"),
                             "--to", "s3://sonoray-test/escape"])
    assert code == 2
    assert "escapes the video folder" in capsys.readouterr().err
    assert not storage.exists(parse_uri("s3://sonoray-test/escape/manifest.parquet"))


@pytest.mark.timeout(60)
def test_unreachable_endpoint_fails_naming_it(phantom_dir, capsys):
    from cluster.s3server import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    code, _ = run_cli(main, ["ingest", str(phantom_dir), "--manifest", str(phantom_dir / "manifest.csv"),
                             "--to", "s3://sonoray-test/x", "--endpoint-url", endpoint])
    assert code == 2
    assert endpoint in capsys.readouterr().err


def test_pocus_ingest_reports_exactly_the_rows_it_skipped(pocus_uri_result):
    result = pocus_uri_result
    assert result["ingested"] == 129
    skipped = {s["row"]: s["reason"] for s in result["skipped"]}
    assert len(skipped) == len(result["skipped"])  # one report per row
    assert skipped[113].startswith("malformed finding 'Effusion'")
    assert skipped[124] == "malformed finding 'Effusion': value ''"
    assert {skipped[r] for r in (294, 373, 374, 375)} == {"video file absent"}
    assert all(reason for reason in skipped.values())


def test_a_parquet_manifest_ingests_like_its_csv_twin_and_labels_auto_finds_the_findings(
        tmp_path, phantom_dir, phantom_uri, s3_server, storage):
    import pandas as pd

    twin = tmp_path / "manifest.parquet"
    table = pd.read_csv(phantom_dir / "manifest.csv", dtype=str)
    table.to_parquet(twin, index=False)
    code, result = run_cli(main, ["ingest", str(phantom_dir), "--manifest", str(twin), "--labels", "auto",
                                  "--to", "s3://sonoray-test/parquet-twin", "--json"])
    assert code == 0 and result["ingested"] == 8
    from_csv = load_dataset(phantom_uri, storage)
    from_parquet = load_dataset("s3://sonoray-test/parquet-twin", storage)
    assert from_parquet.findings == list(phantom.FINDINGS) == from_csv.findings
    assert from_parquet.rows == from_csv.rows
    # a typed Parquet file (booleans, nullable floats) reads the same
    typed = table.copy()
    for name in phantom.FINDINGS:
        typed[name] = typed[name] == "yes"
    typed.to_parquet(twin, index=False)
    code, _ = run_cli(main, ["ingest", str(phantom_dir), "--manifest", str(twin), "--labels", "auto",
                             "--to", "s3://sonoray-test/parquet-typed", "--json"])
    assert code == 0 and load_dataset("s3://sonoray-test/parquet-typed", storage).rows == from_csv.rows


def test_in_place_ingest_registers_bucket_videos_without_copying_a_byte(phantom_dir, s3_server, storage):
    """Videos already in a bucket: --in-place streams each object once to hash it and count its
    frames, and PUTs nothing but the manifest (counted at a proxy in front of the server)."""
    from cluster.storage import file_sha256
    from tests.s3proxy import s3_proxy

    source = parse_uri("s3://sonoray-test/already-there")
    storage.check(source, create_bucket=True)
    for clip in sorted((phantom_dir / "videos").rglob("*.mp4")):
        rel = clip.relative_to(phantom_dir).as_posix()
        storage.upload_file(clip, source.join(rel), file_sha256(clip))
    with s3_proxy(s3_server.endpoint_url) as (endpoint, state):
        code, result = run_cli(main, ["ingest", source.uri, "--in-place", "--manifest",
                                      str(phantom_dir / "manifest.csv"), "--labels", "auto",
                                      "--to", "s3://sonoray-test/in-place", "--endpoint-url", endpoint, "--json"])
    assert code == 0 and result["ingested"] == 8 and result["uploaded"] == 0
    assert dict(state.puts) == {"sonoray-test/in-place/manifest.parquet": 1}
    data = load_dataset("s3://sonoray-test/in-place", storage)
    with open(phantom_dir / "manifest.csv", newline="") as handle:
        paths = {row["video_id"]: row["path"] for row in csv.DictReader(handle)}
    for row in data.rows:
        assert row["key"] == source.join(paths[row["video_id"]]).uri  # where it already was
        assert row["sha256"] == file_sha256(phantom_dir / paths[row["video_id"]]) and row["frame_count"] > 0
        assert data.video_location(row) == source.join(paths[row["video_id"]])
    assert data.findings == list(phantom.FINDINGS)
    code, _ = run_cli(main, ["ingest", source.uri, "--manifest", str(phantom_dir / "manifest.csv"),
                             "--to", "s3://sonoray-test/in-place-2"])
    assert code == 2  # a bucket prefix without --in-place is refused, not copied
