"""Exported weights: torchvision's ResNet-18 loads ``backbone.safetensors`` as it is."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import load

from ultrasound.backbone import ResNet18Backbone, adopt_weights
from ultrasound.checkpoint import load_state
from ultrasound.export import backbone_safetensors, msml_files, torchvision_backbone_state
from ultrasound.msml import MSMLConfig, MSMLNet
from ultrasound.uscl import USCLModel


def _trained_looking(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic set away from its init, so a wrong key shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(noise + 0.5 if "running_var" in name else tensor + 0.1 * (noise - 0.5))
    return model.eval()


@pytest.mark.parametrize("channels", [1, 3])
def test_backbone_safetensors_loads_into_torchvision_with_the_same_features(channels):
    uscl = _trained_looking(USCLModel(in_channels=channels, num_classes=3), seed=channels)
    exported = load(backbone_safetensors(uscl.state_dict()))
    assert exported["conv1.weight"].shape == (64, channels, 7, 7)
    net = torchvision.models.resnet18()
    if channels == 1:
        net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    missing, unexpected = net.load_state_dict(exported, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    net.fc = torch.nn.Identity()
    x = torch.randn(2, channels, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), uscl.backbone(x), atol=1e-5)


def test_exported_backbone_reads_back_through_init_unchanged():
    source = _trained_looking(ResNet18Backbone(in_channels=1), seed=5)
    target = ResNet18Backbone(in_channels=1)
    missing = adopt_weights(target, load_state(backbone_safetensors(source.state_dict()), "b"), "b")
    assert missing == []
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_only_the_trunk_is_exported_and_a_state_without_one_is_refused():
    msml = MSMLNet(MSMLConfig(findings=("a", "b"), image_size=32))
    keys = set(torchvision_backbone_state(msml.state_dict()))
    assert keys == set(torchvision.models.resnet18().state_dict()) - {"fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="no ResNet-18 trunk"):
        torchvision_backbone_state({"head.classifier.weight": torch.zeros(2, 512, 1, 1)})


def test_msml_files_round_trip_the_classifier_and_describe_its_input():
    config = MSMLConfig(findings=("a_lines", "b_lines"), image_size=32, channels=1)
    model = _trained_looking(MSMLNet(config), seed=9)
    files = msml_files(model.state_dict(), config.to_dict())
    meta = json.loads(files["msml.json"])
    assert meta["findings"] == ["a_lines", "b_lines"] and (meta["image_size"], meta["channels"]) == (32, 1)
    assert MSMLConfig.from_dict(meta["config"]) == config
    again = MSMLNet(config)
    again.load_state_dict(load_state(files["msml.safetensors"], "msml.safetensors"))
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))
