"""Checkpoints that would run code are refused by every job that loads one, before any work.

The crafted file's ``__reduce__`` creates a marker file when unpickled; each job must exit with
one error line naming the file ("<uri>: not a plain state dict: ...") and the marker must never
appear.
"""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from tests.cluster.test_pretrain import ingest_phantom16
from tests.conftest import run_cli
from ultrasound.checkpoint import CheckpointError, load_state, save_state

SMALL = ["--image-size", "32", "--channels", "1"]


class MakesMarker:
    """Unpickling this runs ``open(marker, "w")``: the code a crafted checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A file that looks like a sonoray model.pt whose "model" entry runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"model": {"stem.0.weight": torch.zeros(1)}, "config": MakesMarker(str(marker)),
                "epoch": 0, "history": []}, buffer)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def phantom16_uri(ray_cluster, tmp_path_factory) -> str:
    return ingest_phantom16(tmp_path_factory.mktemp("phantom16"))


def argv_for(job: str, data: str, evil: Path, out: Path) -> list[str]:
    if job == "evaluate":
        return ["evaluate", "--data", data, "--checkpoint", str(evil), "--folds", "2", *SMALL]
    if job == "msml":
        return ["msml", "--data", data, "--out", str(out), "--init", str(evil), "--epochs", "1", *SMALL]
    if job == "pretrain":
        return ["pretrain", "--data", data, "--out", str(out), "--init", str(evil), "--epochs", "1", *SMALL]
    if job == "simulate":
        return ["simulate", "--data", data, "--out", str(out), "--init", str(evil), "--cache", str(out / "cache"),
                "--fps", "0", "--max-per-video", "4", "--size", "32", "--channels", "1", "--rounds", "1"]
    assert job == "pretrain --resume"  # a run folder whose checkpoint was replaced
    return ["pretrain", "--data", data, "--out", str(out), "--resume", "--epochs", "1", *SMALL]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("job", ["evaluate", "msml", "pretrain", "simulate", "pretrain --resume"])
def test_a_checkpoint_that_runs_code_is_refused_and_never_unpickled(job, phantom16_uri, tmp_path, capsys):
    marker = tmp_path / "marker"
    out = tmp_path / "out"
    if job == "pretrain --resume":
        evil = crafted_checkpoint(out / "ray" / "run" / "checkpoint_2026-01-01_00-00-00.000000" / "state.pt",
                                  marker)
    else:
        evil = crafted_checkpoint(tmp_path / "evil.pt", marker)
    code, _ = run_cli(main, argv_for(job, phantom16_uri, evil, out))
    err = capsys.readouterr().err
    assert code in (1, 2)
    errors = [line for line in err.splitlines() if line.startswith("sonoray: error:")]
    assert errors == [f"sonoray: error: {evil}: not a plain state dict: Unsupported global: "
                      f"GLOBAL io.open was not an allowed global by default"], err
    assert "epoch 1/" not in err  # refused before any training
    assert not marker.exists()
    if job != "pretrain --resume":
        assert not (out / "ray").exists()


def test_sonoray_state_round_trips_with_numpy_values_and_paths():
    import numpy as np

    state = {"model": {"w": torch.ones(2)}, "history": [{"loss": np.float64(0.5), "n": np.int64(3)}],
             "ids": ("a", "b"), "where": Path("/x"), "probs": np.zeros(2, dtype=np.float32)}
    loaded = load_state(save_state(state), "s.pt")
    assert loaded["history"] == [{"loss": 0.5, "n": 3}] and type(loaded["history"][0]["n"]) is int
    assert loaded["ids"] == ("a", "b") and loaded["where"] == "/x"
    assert torch.equal(loaded["probs"], torch.zeros(2)) and torch.equal(loaded["model"]["w"], torch.ones(2))


def test_a_file_that_is_not_a_torch_file_is_refused_naming_it():
    with pytest.raises(CheckpointError, match=r"^junk\.pt: not a plain state dict: "):
        load_state(b"not a checkpoint", "junk.pt")


def test_safetensors_weights_load_and_a_broken_one_is_refused_naming_it():
    from safetensors.torch import save

    from ultrasound.checkpoint import is_safetensors

    raw = save({"conv1.weight": torch.arange(6.0).reshape(2, 3)})
    assert is_safetensors(raw) and not is_safetensors(save_state({"w": torch.ones(1)}))
    assert torch.equal(load_state(raw, "b.safetensors")["conv1.weight"], torch.arange(6.0).reshape(2, 3))
    with pytest.raises(CheckpointError, match=r"^b\.safetensors: not a readable safetensors file: "):
        load_state(raw[:-4], "b.safetensors")  # truncated: the header promises more bytes
