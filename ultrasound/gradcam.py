"""Grad-CAM class-activation maps for the MSML classifier.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017: with ``A_k`` the channels of the last convolutional feature map
(ResNet-18 ``layer4``) and ``y_l`` the logit of finding ``l``,
``alpha_k = mean_{x} d y_l / d A_k(x)`` and ``cam = ReLU(sum_k alpha_k A_k)``, upsampled to the
input size and scaled to [0, 1]. TSAL shows such attention maps per symptom; the MSML job saves a
handful as PNG overlays next to its results.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn import functional as F


def grad_cam(model: torch.nn.Module, image: torch.Tensor, label_index: int) -> np.ndarray:
    """Grad-CAM heatmap of one finding for one image.

    Args:
        model: an :class:`ultrasound.msml.MSMLNet` (anything with ``backbone.feature_map`` and a
            ``head`` mapping the feature map to ``(N, L)`` logits).
        image: ``(1, C, H, W)`` normalised input (see :func:`ultrasound.msml.prepare_images`).
        label_index: which finding's logit to explain.

    Returns:
        ``(H, W)`` float32 in [0, 1]; all zeros when no position pushes the logit up.

    The model is put in eval mode for the call and restored afterwards; parameters get no
    gradient.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, H, W), got shape {tuple(image.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            feature_map = model.backbone.feature_map(image)
            logits = model.head(feature_map)
            if logits.ndim != 2 or not 0 <= label_index < logits.shape[1]:
                raise ValueError(f"label_index must be in [0, {logits.shape[1]}), got {label_index}")
            (gradient,) = torch.autograd.grad(logits[0, label_index], feature_map)
    finally:
        model.train(was_training)
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # (1, K, 1, 1)
    cam = F.relu((weights * feature_map.detach()).sum(dim=1, keepdim=True))  # (1, 1, h, w)
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    if peak <= 0:
        return np.zeros(tuple(image.shape[-2:]), dtype=np.float32)
    return (cam / peak).clamp_(0.0, 1.0).cpu().numpy().astype(np.float32)


def overlay(gray_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a JET-coloured heatmap over a grayscale frame.

    Shape: gray ``(H, W)`` uint8, heatmap ``(h, w)`` in [0, 1] (resized to H, W) ->
    ``(H, W, 3)`` uint8 BGR.
    """
    gray = np.asarray(gray_uint8)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"gray_uint8 must be (H, W) uint8, got {gray.shape} {gray.dtype}")
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be (H, W), got shape {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if heat.shape != gray.shape:
        heat = cv2.resize(heat, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.clip(heat * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(colour, alpha, base, 1.0 - alpha, 0.0)


def save_overlay_png(gray_uint8: np.ndarray, heatmap: np.ndarray, path: str | Path, alpha: float = 0.4) -> Path:
    """Write :func:`overlay` as a PNG (parent folders created); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), overlay(gray_uint8, heatmap, alpha)):
        raise OSError(f"could not write {path}")
    return path
