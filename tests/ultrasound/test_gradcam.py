"""Grad-CAM: shape and range, peaks in the quadrant whose content drives the logit (constructed
case: input zero outside one patch, head = mean of all channels), zero map when nothing pushes
the logit up, and the PNG overlay."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from ultrasound.gradcam import grad_cam, overlay, save_overlay_png
from ultrasound.msml import MSMLConfig, MSMLNet

torch.set_num_threads(1)


def constructed_model(sign: float = 1.0) -> MSMLNet:
    net = MSMLNet(MSMLConfig(findings=("x", "y"), attention_lambda=0.0, dropout=0.0, seed=0))
    with torch.no_grad():
        net.head.classifier.weight.fill_(sign / 512)
        net.head.classifier.bias.zero_()
    return net.eval()


def test_shape_range_and_mode_restored():
    net = MSMLNet(MSMLConfig(findings=("x", "y"), image_size=64, seed=1))
    net.train()
    image = torch.randn(1, 3, 64, 48)
    cam = grad_cam(net, image, 1)
    assert cam.shape == (64, 48) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() <= 1.0
    assert net.training
    positive = grad_cam(constructed_model(), image.abs(), 1)
    assert positive.min() >= 0 and positive.max() == pytest.approx(1.0)
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="label_index"):
        grad_cam(net, image, 2)
    with pytest.raises(ValueError, match="\\(1, C, H, W\\)"):
        grad_cam(net, torch.zeros(2, 3, 64, 64), 0)


@pytest.mark.parametrize("quadrant", [(0, 1), (1, 0)])
def test_peaks_where_the_evidence_is(quadrant):
    # BatchNorm at its initial running stats and bias-free convs map zero input to zero
    # features, so the logit (mean of all feature channels) is driven by the patch alone
    net = constructed_model()
    r, c = quadrant
    image = torch.zeros(1, 3, 128, 128)
    image[:, :, r * 64 + 16:r * 64 + 48, c * 64 + 16:c * 64 + 48] = torch.rand(
        1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 4
    cam = grad_cam(net, image, 0)
    peak = np.unravel_index(int(cam.argmax()), cam.shape)
    assert (peak[0] // 64, peak[1] // 64) == quadrant
    inside = cam[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64].sum() / cam.sum()
    assert inside > 0.3  # the quadrant is a quarter of the image


def test_nothing_pushes_the_logit_up():
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert not grad_cam(constructed_model(sign=-1.0), image, 0).any()


def test_overlay_png(tmp_path):
    gray = np.full((40, 50), 100, np.uint8)
    heat = np.zeros((10, 10), np.float32)
    heat[:5, :5] = 1.0
    blended = overlay(gray, heat, alpha=0.5)
    assert blended.shape == (40, 50, 3) and blended.dtype == np.uint8
    # JET: 1.0 is dark red (B, G, R ~ 0, 0, 128), 0.0 is dark blue (~128, 0, 0), blended with gray 100
    assert blended[2, 2, 2] > blended[2, 2, 0] and blended[38, 48, 0] > blended[38, 48, 2]
    path = save_overlay_png(gray, heat, tmp_path / "cams" / "frame0_b_lines.png")
    assert path.is_file() and cv2.imread(str(path)).shape == (40, 50, 3)
    with pytest.raises(ValueError, match=".png"):
        save_overlay_png(gray, heat, tmp_path / "x.jpg")
