"""USCL image augmentations, applied frame by frame before sample pair generation.

USCL (Chen et al., "USCL: Pretraining Deep Ultrasound Image Diagnosis Model through Video
Contrastive Representation Learning", MICCAI 2021) augments every sampled frame independently
with the authors' pipeline: Resize to the model size, RandomResizedCrop(scale 0.8-1.0, ratio
0.8-1.25), horizontal flip (p 0.5), ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) applied always, and
Normalize(mean 0.5, std 0.25). The authors resize then crop; here the crop box is drawn in the
resized square exactly as torchvision does and mapped back onto the source frame, so one
interpolation does both (same geometry, less work).

Grayscale frames (1 channel) get brightness and contrast only: the authors converted gray frames
to RGB, on which saturation and hue change nothing.

Randomness comes only from the ``torch.Generator`` passed to each call, so a seeded generator
reproduces the views exactly.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

NORMALIZE_MEAN = 0.5
NORMALIZE_STD = 0.25
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (0.8, 1.25)

#: The signature every per-frame augmentation follows: ``(frame (C,H,W) float in [0,1],
#: generator) -> (C,S,S) float``; :class:`USCLAugment` is one, an identity is another (tests).
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def to_float_chw(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 channels-last frames -> float channels-first in [0, 1].

    Shape:
        - Input: ``(..., H, W, C)`` uint8 (any leading dims: one frame, a video, a batch).
        - Output: ``(..., C, H, W)`` float32.

    Example:
        >>> to_float_chw(np.full((2, 4, 4, 1), 255, np.uint8)).shape
        torch.Size([2, 1, 4, 4])
    """
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim < 3:
        raise ValueError(f"frames must be (..., H, W, C), got shape {tuple(frames.shape)}")
    return frames.movedim(-1, -3).to(torch.float32).div_(255.0)


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """``(x - 0.5) / 0.25`` per channel (the USCL normalisation), on ``(..., C, H, W)``."""
    return (frames - NORMALIZE_MEAN) / NORMALIZE_STD


def resize_and_normalize(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """The deterministic evaluation transform: resize to ``image_size`` square, then normalise.

    Shape:
        - Input: ``(N, C, H, W)`` float in [0, 1].
        - Output: ``(N, C, image_size, image_size)``.
    """
    return normalize_frames(resize_square(frames, image_size))


def resize_square(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear, antialiased resize to ``image_size`` square (a no-op at that size already).

    Shape:
        - Input: ``(N, C, H, W)`` float.
        - Output: ``(N, C, image_size, image_size)``.
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be (N, C, H, W), got shape {tuple(frames.shape)}")
    if tuple(frames.shape[-2:]) != (image_size, image_size):
        frames = TF.resize(frames, [image_size, image_size], antialias=True)
    return frames


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high_inclusive: int) -> int:
    return int(torch.randint(low, high_inclusive + 1, (), generator=generator))


def random_resized_crop_box(
    size: int, generator: torch.Generator,
    scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(top, left, height, width)`` in a ``size`` square.

    Ten tries at a box of area ``scale * size**2`` and log-uniform aspect ``ratio``; falls back to
    the central crop, as torchvision does.
    """
    area = float(size * size)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, log_lo, log_hi))
        width = int(round(math.sqrt(target_area * aspect)))
        height = int(round(math.sqrt(target_area / aspect)))
        if 0 < width <= size and 0 < height <= size:
            top = _randint(generator, 0, size - height)
            left = _randint(generator, 0, size - width)
            return top, left, height, width
    in_ratio = 1.0
    if in_ratio < ratio[0]:
        width, height = size, int(round(size / ratio[0]))
    elif in_ratio > ratio[1]:
        height, width = size, int(round(size * ratio[1]))
    else:
        width = height = size
    return (size - height) // 2, (size - width) // 2, height, width


class USCLAugment:
    """The USCL per-frame augmentation (see the module docstring for the authors' pipeline).

    Args:
        image_size: output side S (224 in the paper; smaller for CPU runs).
        channels: 1 (grayscale) or 3.
        strength: colour-jitter strength s (1.0 in the paper; 0 switches jitter off).

    Shape:
        - Input: ``(C, H, W)`` float in [0, 1], any H, W.
        - Output: ``(C, S, S)`` float, normalised with mean 0.5, std 0.25.

    Example:
        >>> aug = USCLAugment(image_size=32, channels=1)
        >>> aug(torch.rand(1, 48, 64), torch.Generator().manual_seed(0)).shape
        torch.Size([1, 32, 32])
    """

    def __init__(self, image_size: int, channels: int, strength: float = 1.0) -> None:
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not 0.0 <= strength <= 2.5:
            raise ValueError(
                f"strength must be in [0, 2.5] (hue shift 0.2*s <= 0.5), got {strength}")
        self.image_size = int(image_size)
        self.channels = channels
        self.strength = float(strength)

    def __repr__(self) -> str:
        return (f"USCLAugment(image_size={self.image_size}, channels={self.channels}, "
                f"strength={self.strength})")

    def __call__(self, frame: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if frame.ndim != 3 or frame.shape[0] != self.channels:
            raise ValueError(
                f"frame must be ({self.channels}, H, W) float, got shape {tuple(frame.shape)}")
        if not frame.is_floating_point():
            raise TypeError(f"frame must be float in [0, 1] (see to_float_chw), got {frame.dtype}")
        out = self._crop(frame, generator)
        if float(torch.rand((), generator=generator)) < 0.5:
            out = TF.horizontal_flip(out)
        if self.strength > 0:
            out = self._jitter(out, generator)
        return normalize_frames(out)

    def _crop(self, frame: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        size = self.image_size
        top, left, height, width = random_resized_crop_box(size, generator)
        src_h, src_w = frame.shape[-2:]
        # map the box drawn in the resized size x size square back onto the source frame
        y0, y1 = round(top * src_h / size), round((top + height) * src_h / size)
        x0, x1 = round(left * src_w / size), round((left + width) * src_w / size)
        y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
        return TF.resized_crop(frame, y0, x0, y1 - y0, x1 - x0, [size, size], antialias=True)

    def _jitter(self, frame: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = self.strength
        factor_range = (max(0.0, 1.0 - 0.8 * s), 1.0 + 0.8 * s)
        ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
        brightness = _uniform(generator, *factor_range)
        contrast = _uniform(generator, *factor_range)
        ops.append(lambda x: TF.adjust_brightness(x, brightness))
        ops.append(lambda x: TF.adjust_contrast(x, contrast))
        if self.channels == 3:
            saturation = _uniform(generator, *factor_range)
            hue = _uniform(generator, -0.2 * s, 0.2 * s)
            ops.append(lambda x: TF.adjust_saturation(x, saturation))
            ops.append(lambda x: TF.adjust_hue(x, hue))
        for index in torch.randperm(len(ops), generator=generator).tolist():  # random order
            frame = ops[index](frame)
        return frame
