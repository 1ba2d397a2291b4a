"""USCL augmentations: shapes, normalisation, crop geometry, seeding, gray handling."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ultrasound.augment import (USCLAugment, normalize_frames, random_resized_crop_box,
                                resize_and_normalize, to_float_chw)

torch.set_num_threads(1)


def test_to_float_chw_moves_channels_and_scales():
    frames = np.zeros((2, 3, 4, 5, 3), np.uint8)
    frames[..., 1] = 255
    frames[0, 0, 2, 3, 2] = 51
    out = to_float_chw(frames)
    assert out.shape == (2, 3, 3, 4, 5) and out.dtype == torch.float32
    assert torch.all(out[:, :, 1] == 1.0) and torch.all(out[:, :, 0] == 0.0)
    assert out[0, 0, 2, 2, 3] == pytest.approx(0.2)
    with pytest.raises(TypeError):
        to_float_chw(np.zeros((4, 4, 1), np.float32))


def test_normalisation_is_mean_half_std_quarter():
    x = torch.tensor([0.0, 0.5, 0.75, 1.0])
    assert normalize_frames(x).tolist() == [-2.0, 0.0, 1.0, 2.0]
    frames = torch.full((2, 1, 10, 12), 0.25)
    out = resize_and_normalize(frames, 8)
    assert out.shape == (2, 1, 8, 8) and torch.allclose(out, torch.full_like(out, -1.0))


@pytest.mark.parametrize("channels", [1, 3])
def test_constant_frame_without_jitter_stays_constant(channels):
    # crop, flip and resize of a constant image are the identity on its value
    aug = USCLAugment(image_size=16, channels=channels, strength=0.0)
    frame = torch.full((channels, 30, 40), 0.6)
    out = aug(frame, torch.Generator().manual_seed(3))
    assert out.shape == (channels, 16, 16)
    assert torch.allclose(out, torch.full_like(out, (0.6 - 0.5) / 0.25), atol=1e-5)


def test_crop_box_follows_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    size = 200
    for _ in range(300):
        top, left, h, w = random_resized_crop_box(size, g)
        assert 0 <= top and top + h <= size and 0 <= left and left + w <= size
        assert 0.8 - 0.02 <= h * w / size**2 <= 1.0
        assert 0.8 - 0.02 <= w / h <= 1.25 + 0.02


def test_seeded_generator_reproduces_and_seeds_differ():
    aug = USCLAugment(image_size=24, channels=3)
    frame = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    a = aug(frame, torch.Generator().manual_seed(7))
    b = aug(frame, torch.Generator().manual_seed(7))
    c = aug(frame, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_flip_happens_about_half_the_time():
    aug = USCLAugment(image_size=32, channels=1, strength=0.0)
    frame = torch.zeros(1, 32, 32)
    frame[..., :16] = 1.0  # bright left half
    flipped = 0
    for seed in range(60):
        out = aug(frame, torch.Generator().manual_seed(seed))
        flipped += int(out[..., :8].mean() < out[..., -8:].mean())
    assert 15 <= flipped <= 45


def test_gray_content_stays_gray_in_rgb_and_jitter_changes_values():
    aug = USCLAugment(image_size=16, channels=3, strength=1.0)
    gray = torch.rand(1, 20, 20, generator=torch.Generator().manual_seed(2)).repeat(3, 1, 1)
    out = aug(gray, torch.Generator().manual_seed(5))
    assert torch.allclose(out[0], out[1], atol=1e-4) and torch.allclose(out[1], out[2], atol=1e-4)
    plain = USCLAugment(image_size=16, channels=3, strength=0.0)(
        gray, torch.Generator().manual_seed(5))
    assert not torch.allclose(out, plain)


def test_gray_jitter_is_brightness_and_contrast_only():
    # a constant gray frame: contrast keeps it (blend with its own mean), brightness scales it,
    # so the output is the value times the brightness factor, within the 0.2-1.8 range
    aug = USCLAugment(image_size=8, channels=1, strength=1.0)
    values = set()
    for seed in range(20):
        out = aug(torch.full((1, 10, 10), 0.4), torch.Generator().manual_seed(seed))
        value = float(out.mean() * 0.25 + 0.5)
        assert torch.allclose(out, out.mean().expand_as(out), atol=1e-5)
        assert 0.4 * 0.2 - 1e-5 <= value <= min(1.0, 0.4 * 1.8) + 1e-5
        values.add(round(value, 4))
    assert len(values) > 10


def test_argument_validation():
    with pytest.raises(ValueError, match="channels"):
        USCLAugment(32, 2)
    with pytest.raises(ValueError, match="strength"):
        USCLAugment(32, 1, strength=-1)
    aug = USCLAugment(32, 1)
    with pytest.raises(ValueError, match="frame must be"):
        aug(torch.zeros(3, 10, 10), torch.Generator())
    with pytest.raises(TypeError):
        aug(torch.zeros(1, 10, 10, dtype=torch.uint8), torch.Generator())
    assert math.isclose(aug.strength, 1.0)
