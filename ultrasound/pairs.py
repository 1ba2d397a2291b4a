"""USCL sample pair generation (SPG): two positive views from the frames of one video.

USCL (Chen et al., MICCAI 2021), as the authors' code does it: sample 3 distinct frames of a
video, augment each independently, draw ``lam ~ Beta(alpha, alpha)`` (alpha 0.5) and mix around
the shared middle frame ``f2`` (the anchor)::

    x_i = lam * f1 + (1 - lam) * f2
    x_j = lam * f3 + (1 - lam) * f2

A video with 2 frames gives its two augmented frames; a video with 1 frame gives two
augmentations of it. The negatives of a view are the other views of the batch, so every view is
built from the frames of exactly one video.

Three pair modes (``PAIR_MODES``), so that the benchmark's arms differ in the pairs alone:

- ``"uscl"``: the sample pair generation above (USCL);
- ``"frames"``: inter-frame SimCLR, the augmented first and last of the sampled frames unmixed
  (the ``lam = 1`` case of the formula: two different frames when the video has more than one);
- ``"image"``: SimCLR as the authors' baseline runs it, two augmentations of one frame (chosen
  uniformly among the sampled ones), so the positive pair never spans two moments of a video.

Randomness: frame choice and ``lam`` come from a ``np.random.Generator``; augmentations from a
``torch.Generator`` seeded from it, so one seed reproduces a batch exactly.
"""
from __future__ import annotations

import numpy as np
import torch

from ultrasound.augment import Augment, to_float_chw

SPG_FRAMES = 3  # frames per video that USCL mixes
PAIR_MODES = ("uscl", "frames", "image")


def check_pair_mode(mode: str) -> str:
    if mode not in PAIR_MODES:
        raise ValueError(f"pair mode must be one of {', '.join(PAIR_MODES)}, got {mode!r}")
    return mode


def sample_frame_indices(n_frames: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``min(k, n_frames)`` distinct frame indices drawn uniformly, sorted in time.

    Example:
        >>> len(sample_frame_indices(10, 3, np.random.default_rng(0)))
        3
        >>> sample_frame_indices(2, 3, np.random.default_rng(0)).tolist()  # a short video
        [0, 1]
    """
    if int(n_frames) < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    chosen = rng.choice(int(n_frames), size=min(int(k), int(n_frames)), replace=False)
    return np.sort(chosen).astype(np.int64)


def sample_lambda(alpha: float, rng: np.random.Generator) -> float:
    """The mixup weight ``lam ~ Beta(alpha, alpha)`` (USCL: alpha = 0.5)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return float(rng.beta(alpha, alpha))


def generator_from(rng: np.random.Generator) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by the next draw of ``rng``."""
    return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))


def spg_views(
    frames: torch.Tensor, n_real: int, lam: float, augment: Augment,
    generator: torch.Generator, *, mode: str = "uscl",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two positive views of one video.

    Args:
        frames: the video's sampled frames in time order; the first ``n_real`` are real, the rest
            padding copies (ignored).
        n_real: number of real frames, ``1 <= n_real <= K``. With more than 3, three distinct
            ones are drawn from ``generator`` (kept in time order).
        lam: mixup weight in [0, 1] (used by ``mode="uscl"`` with 3 or more real frames only).
        augment: per-frame augmentation ``(frame (C,H,W), generator) -> (C,S,S)``.
        generator: drives ``augment`` (and the choice of frames).
        mode: ``"uscl"``, ``"frames"`` or ``"image"`` (see the module docstring).

    Shape:
        - frames: ``(K, C, H, W)`` float in [0, 1].
        - Output: two ``(C, S, S)`` tensors.

    Example:
        >>> video = torch.stack([torch.full((1, 4, 4), v) for v in (0.1, 0.2, 0.3)])
        >>> x_i, x_j = spg_views(video, 3, 0.25, lambda f, g: f, torch.Generator())
        >>> round(float(x_i[0, 0, 0]), 3), round(float(x_j[0, 0, 0]), 3)
        (0.175, 0.225)
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be (K, C, H, W), got shape {tuple(frames.shape)}")
    n_real = int(n_real)
    if not 1 <= n_real <= frames.shape[0]:
        raise ValueError(f"n_real must be in [1, {frames.shape[0]}], got {n_real}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    check_pair_mode(mode)
    if mode == "image":
        frame = frames[int(torch.randint(n_real, (1,), generator=generator))]
        return augment(frame, generator), augment(frame, generator)
    if n_real > SPG_FRAMES:
        keep = torch.randperm(n_real, generator=generator)[:SPG_FRAMES].sort().values
        frames, n_real = frames[keep], SPG_FRAMES
    if n_real == 1:
        return augment(frames[0], generator), augment(frames[0], generator)
    if n_real == 2 or mode == "frames":
        return augment(frames[0], generator), augment(frames[n_real - 1], generator)
    f1, f2, f3 = (augment(frames[i], generator) for i in range(SPG_FRAMES))
    return lam * f1 + (1.0 - lam) * f2, lam * f3 + (1.0 - lam) * f2


def make_pair_batch(
    frames: torch.Tensor | np.ndarray, n_real: torch.Tensor | np.ndarray, augment: Augment,
    rng: np.random.Generator, alpha: float = 0.5, mode: str = "uscl",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive pairs over a batch of videos: view ``b`` of both outputs comes from video ``b``
    only.

    One ``lam`` per video (drawn only in ``"uscl"`` mode), augmentations from a torch generator
    seeded from ``rng``.

    Shape:
        - frames: ``(B, K, H, W, C)`` uint8 (the data pipeline's layout).
        - n_real: ``(B,)`` int, real frames per video (the rest of the K are copies).
        - Output: ``(x_i, x_j)``, each ``(B, C, S, S)`` float on the frames' device.
    """
    frames = torch.as_tensor(frames)
    n_real = torch.as_tensor(n_real).reshape(-1)
    if frames.ndim != 5:
        raise ValueError(f"frames must be (B, K, H, W, C), got shape {tuple(frames.shape)}")
    if n_real.shape[0] != frames.shape[0]:
        raise ValueError(f"n_real has {n_real.shape[0]} entries for {frames.shape[0]} videos")
    if frames.shape[0] == 0:
        raise ValueError("empty batch")
    check_pair_mode(mode)
    generator = generator_from(rng)
    videos = to_float_chw(frames)  # (B, K, C, H, W)
    views_i, views_j = [], []
    for video, count in zip(videos, n_real.tolist()):
        lam = sample_lambda(alpha, rng) if mode == "uscl" else 1.0
        x_i, x_j = spg_views(video, count, lam, augment, generator, mode=mode)
        views_i.append(x_i)
        views_j.append(x_j)
    return torch.stack(views_i), torch.stack(views_j)
