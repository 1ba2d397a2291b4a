"""The `sonoray` Python API loads what the jobs write, without the CLI."""
from __future__ import annotations

import torch

import sonoray
from ultrasound.backbone import ResNet18Backbone
from ultrasound.checkpoint import save_state
from ultrasound.export import backbone_safetensors, msml_files
from ultrasound.msml import MSMLConfig, MSMLNet


def test_load_backbone_reads_safetensors_and_model_pt_alike(tmp_path):
    torch.manual_seed(0)
    source = ResNet18Backbone(in_channels=1).eval()
    (tmp_path / "backbone.safetensors").write_bytes(backbone_safetensors(source.state_dict()))
    (tmp_path / "model.pt").write_bytes(save_state({"model": {f"backbone.{k}": v for k, v in source.state_dict().items()}}))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        for name in ("backbone.safetensors", "model.pt"):
            net = sonoray.load_backbone(str(tmp_path / name))
            assert net.in_channels == 1 and not net.training
            assert torch.allclose(net(x), source(x), atol=1e-6), name


def test_load_msml_from_the_exported_files_and_open_dataset(tmp_path, phantom_uri, storage):
    config = MSMLConfig(findings=("a_lines", "b_lines"), image_size=32, channels=1, seed=4)
    model = MSMLNet(config).eval()
    for name, data in msml_files(model.state_dict(), config.to_dict()).items():
        (tmp_path / name).write_bytes(data)
    loaded = sonoray.load_msml(str(tmp_path / "msml.safetensors"))
    assert loaded.config == config
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    data = sonoray.open_dataset(phantom_uri, storage)
    assert len(data.rows) == 8 and "b_lines" in data.findings
