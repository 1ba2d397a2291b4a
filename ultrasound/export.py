"""Weights other tools can load: safetensors files with torchvision's key names.

sonoray's own checkpoints (``model.pt``) carry a training run's whole state under sonoray's names
(``backbone.stem.0.weight``). Every finished pretrain and msml run also writes
``backbone.safetensors``: the ResNet-18 trunk alone, under torchvision's names, so that

    >>> net = torchvision.models.resnet18()
    >>> missing, unexpected = net.load_state_dict(load_file("backbone.safetensors"), strict=False)
    >>> sorted(missing), unexpected
    (['fc.bias', 'fc.weight'], [])

for a 3-channel trunk; a 1-channel trunk keeps ``conv1.weight`` of shape ``(64, 1, 7, 7)``, so
replace ``net.conv1`` with a 1-channel ``Conv2d(1, 64, 7, 2, 3, bias=False)`` first. MSML runs
also write ``msml.safetensors`` (the whole classifier, sonoray's names, for ``load_msml``) and
``msml.json`` (findings, image size, channels, normalisation: what a user needs to feed it).

safetensors holds tensors and a string map only, so loading one can never run code (unlike a
pickle); :func:`ultrasound.checkpoint.load_state` reads both formats.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors.torch import save as save_safetensors

from ultrasound.augment import NORMALIZE_MEAN, NORMALIZE_STD

BACKBONE_FILE = "backbone.safetensors"
MSML_FILE = "msml.safetensors"
MSML_META_FILE = "msml.json"
_TO_TORCHVISION = (("stem.0.", "conv1."), ("stem.1.", "bn1."))


def torchvision_backbone_state(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ResNet-18 trunk of a sonoray model state, under torchvision's key names.

    ``model_state`` is a USCL or MSML model state dict (keys ``backbone.*``) or a bare
    :class:`ultrasound.backbone.ResNet18Backbone` state dict; projection, head and classifier keys
    are left out. ``stem.0`` -> ``conv1``, ``stem.1`` -> ``bn1``; ``layer1``-``layer4`` keep
    their names. Tensors are detached, contiguous CPU copies.
    """
    prefixed = any(key.startswith("backbone.") for key in model_state)
    out: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        if prefixed:
            if not key.startswith("backbone."):
                continue
            key = key.removeprefix("backbone.")
        for ours, theirs in _TO_TORCHVISION:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        if key.split(".", 1)[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
            out[key] = value.detach().to("cpu").contiguous().clone()
    if "conv1.weight" not in out:
        raise ValueError("the model state holds no ResNet-18 trunk (no stem.0 / conv1 weight)")
    return out


def backbone_safetensors(model_state: Mapping[str, torch.Tensor]) -> bytes:
    """``backbone.safetensors`` bytes of :func:`torchvision_backbone_state`, with metadata
    ``architecture=resnet18`` and ``in_channels``."""
    state = torchvision_backbone_state(model_state)
    channels = int(state["conv1.weight"].shape[1])
    return save_safetensors(state, metadata={"architecture": "resnet18", "in_channels": str(channels),
                                             "format": "pt"})


def msml_files(model_state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, bytes]:
    """``msml.safetensors`` (the whole MSML network, its own key names) and ``msml.json``:
    ``config`` (an :class:`ultrasound.msml.MSMLConfig` as a dict: findings, image size, channels
    and the head's settings, enough to rebuild the network) plus the input normalisation."""
    state = {key: value.detach().to("cpu").contiguous().clone() for key, value in model_state.items()}
    findings = list(config["findings"])
    meta = {"architecture": "sonoray-msml-resnet18", "findings": findings, "image_size": int(config["image_size"]),
            "channels": int(config["channels"]), "normalize": {"mean": NORMALIZE_MEAN, "std": NORMALIZE_STD},
            "input": "uint8 frames / 255, resized to image_size, then (x - mean) / std",
            "output": "one logit per finding; sigmoid for probabilities", "config": dict(config)}
    return {MSML_FILE: save_safetensors(state, metadata={"format": "pt", "findings": json.dumps(findings)}),
            MSML_META_FILE: json.dumps(meta, indent=1, default=list).encode()}
