"""ResNet-18 feature extractor shared by USCL pretraining and the MSML classifier.

USCL (Chen et al., MICCAI 2021) and TSAL's MSML network both start from a torchvision ResNet-18.
Weights are never downloaded: the backbone is randomly initialised unless the user passes a
state dict they obtained themselves (:func:`adopt_weights`).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from ultrasound.checkpoint import load_state

FEATURE_DIM = 512


class ResNet18Backbone(nn.Module):
    """ResNet-18 trunk without its classifier.

    Args:
        in_channels: 1 (grayscale ultrasound) or 3.

    Shape:
        - Input: ``(N, in_channels, H, W)`` float, any H, W >= 32.
        - Output: ``(N, 512)`` globally pooled features.

    Example:
        >>> net = ResNet18Backbone(in_channels=1)
        >>> net(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 512])
    """

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        net = resnet18(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.in_channels = in_channels
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.layer4 = net.layer4  # the "last residual block" that fine-tuning unfreezes
        self.pool = nn.AdaptiveAvgPool2d(1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, 512, H/32, W/32)``: the map Grad-CAM reads."""
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x)).flatten(1)


def read_state(raw: bytes, source: str = "the checkpoint") -> object:
    """A torch-saved object from bytes (a state dict or a checkpoint dict), tensors on CPU.

    Loaded with ``weights_only=True`` only (:func:`ultrasound.checkpoint.load_state`): a file that
    needs more than plain data raises CheckpointError naming ``source``; it never runs code."""
    return load_state(raw, source)


def state_channels(state: object, default: int = 3) -> int:
    """Input channels of the ResNet-18 first conv in ``state`` (a state dict, or a checkpoint
    dict with a ``"model"`` entry; ``conv1.weight`` or ``stem.0.weight`` keys, any prefix):
    1 or 3; ``default`` when there is none."""
    weights = state.get("model", state) if isinstance(state, dict) else {}
    if not isinstance(weights, dict):
        return default
    first = next((v for k, v in weights.items() if isinstance(k, str) and k.endswith(("conv1.weight", "stem.0.weight"))
                  and getattr(v, "ndim", 0) == 4 and v.shape[0] == 64 and v.shape[2] == 7), None)
    return int(first.shape[1]) if first is not None else default


def adopt_weights(backbone: ResNet18Backbone, state: object, source: str) -> list[str]:
    """Copy the backbone tensors of ``state`` into ``backbone``; returns the names of backbone
    parameters that stayed at random init.

    Accepted: torchvision ResNet-18 keys, ``backbone.``/``module.`` prefixed keys of a sonoray
    model, or a checkpoint dict whose ``"model"`` entry is one of those (a USCL ``model.pt``;
    its projection and classifier are ignored). A first conv with 3 input channels is averaged to
    1 channel when the backbone is grayscale. ``source`` names the file in errors.
    """
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: not a state dict (nor a checkpoint with a 'model' state dict)")
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = value
    first = renamed.get("stem.0.weight")
    if first is not None and first.shape[1] == 3 and backbone.in_channels == 1:
        renamed["stem.0.weight"] = first.mean(dim=1, keepdim=True)
    own = backbone.state_dict()
    usable = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{source}: no parameter matches a ResNet-18 backbone")
    backbone.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))
