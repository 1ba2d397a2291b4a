"""A run's final files and complete.json, local and on the loopback S3 server."""
import hashlib
import json

import pytest

from cluster.completion import COMPLETE_FILE, FinalFiles, check_model_file, clear_complete, read_complete
from cluster.storage import Storage, parse_uri
from ultrasound.checkpoint import CheckpointError


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path, storage):
    if request.param == "s3":
        location = parse_uri(f"s3://sonoray-test/completion/{tmp_path.name}")
        storage.check(location, create_bucket=True)
        return location
    return parse_uri(str(tmp_path / "run"))


def test_the_marker_names_every_final_file_with_its_digest_and_is_cleared_on_restart(out, storage):
    files = FinalFiles(out, storage)
    files.write("model.pt", b"weights")
    files.write("gradcam/a.png", b"png")
    assert read_complete(out, storage) is None  # not complete until the marker is written
    files.complete()
    marker = read_complete(out, storage)
    assert marker["files"] == {
        "gradcam/a.png": {"bytes": 3, "sha256": hashlib.sha256(b"png").hexdigest()},
        "model.pt": {"bytes": 7, "sha256": hashlib.sha256(b"weights").hexdigest()},
    }
    assert storage.read_bytes(out.join("gradcam", "a.png")) == b"png"
    clear_complete(out, storage)
    assert read_complete(out, storage) is None
    clear_complete(out, storage)  # absent already is fine


def test_a_model_of_an_unfinished_or_changed_run_is_refused_naming_it(out, storage):
    storage.write_bytes(out.join("ray", "run", "checkpoint_0", "state.pt"), b"state")
    model = out.join("model.pt")
    storage.write_bytes(model, b"weights")
    with pytest.raises(CheckpointError, match=r"model\.pt: its run did not finish \(no complete\.json"):
        check_model_file(model, b"weights", storage)
    files = FinalFiles(out, storage)
    files.write("model.pt", b"weights")
    files.complete()
    check_model_file(model, b"weights", storage)  # finished and unchanged
    with pytest.raises(CheckpointError, match=r"model\.pt: changed after its run finished"):
        check_model_file(model, b"swapped", storage)


def test_a_model_outside_any_run_folder_passes(tmp_path):
    storage = Storage()
    path = tmp_path / "downloaded.pt"
    path.write_bytes(b"weights")
    check_model_file(parse_uri(str(path)), b"weights", storage)


def test_a_marker_that_does_not_parse_counts_as_absent(tmp_path):
    storage = Storage()
    out = parse_uri(str(tmp_path))
    (tmp_path / COMPLETE_FILE).write_text("{torn")
    assert read_complete(out, storage) is None
    (tmp_path / COMPLETE_FILE).write_text(json.dumps({"files": {}}))
    assert read_complete(out, storage) == {"files": {}}
