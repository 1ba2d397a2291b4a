"""Sample pair generation: every view is a mix of frames of one video (checked with constant
frames of known values and an identity augmentation)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ultrasound.augment import USCLAugment
from ultrasound.pairs import make_pair_batch, sample_frame_indices, sample_lambda, spg_views

torch.set_num_threads(1)


def identity(frame: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return frame.clone()


def constant_video(values, channels=1, size=6) -> torch.Tensor:
    """(K, C, H, W) float frames, frame k constant at values[k] / 255."""
    return torch.stack([torch.full((channels, size, size), v / 255.0) for v in values])


def value_of(view: torch.Tensor) -> float:
    assert torch.allclose(view, view.flatten()[0].expand_as(view))
    return float(view.flatten()[0]) * 255.0


def test_three_frames_mix_around_the_middle_frame():
    video = constant_video([10, 20, 30])
    for lam in (0.0, 0.3, 0.77, 1.0):
        x_i, x_j = spg_views(video, 3, lam, identity, torch.Generator())
        assert torch.allclose(x_i, lam * video[0] + (1 - lam) * video[1], atol=1e-7)
        assert torch.allclose(x_j, lam * video[2] + (1 - lam) * video[1], atol=1e-7)
        assert value_of(x_i) == pytest.approx(lam * 10 + (1 - lam) * 20, abs=1e-4)
        assert value_of(x_j) == pytest.approx(lam * 30 + (1 - lam) * 20, abs=1e-4)


def test_short_video_fallbacks_ignore_padding():
    video = constant_video([10, 20, 255])  # 255: a padding copy that must never show up
    x_i, x_j = spg_views(video, 2, 0.4, identity, torch.Generator())
    assert (value_of(x_i), value_of(x_j)) == pytest.approx((10, 20), abs=1e-4)
    video = constant_video([10, 255, 255])
    x_i, x_j = spg_views(video, 1, 0.4, identity, torch.Generator())
    assert (value_of(x_i), value_of(x_j)) == pytest.approx((10, 10), abs=1e-4)


def test_one_frame_gives_two_different_augmentations():
    frame = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    x_i, x_j = spg_views(frame, 1, 0.5, USCLAugment(32, 1), torch.Generator().manual_seed(1))
    assert x_i.shape == x_j.shape == (1, 32, 32)
    assert not torch.allclose(x_i, x_j)


def test_frames_mode_takes_first_and_last_frame_unmixed():
    video = constant_video([10, 20, 30])
    x_i, x_j = spg_views(video, 3, 0.3, identity, torch.Generator(), mode="frames")
    assert (value_of(x_i), value_of(x_j)) == pytest.approx((10, 30), abs=1e-4)


def test_image_mode_pairs_one_frame_with_itself_and_visits_every_real_frame():
    video = constant_video([10, 20, 30, 255])  # 255: a padding copy
    picked = set()
    for seed in range(40):
        x_i, x_j = spg_views(video, 3, 0.3, identity, torch.Generator().manual_seed(seed), mode="image")
        assert value_of(x_i) == pytest.approx(value_of(x_j), abs=1e-4)
        picked.add(round(value_of(x_i)))
    assert picked == {10, 20, 30}
    # with a real augmentation the two views of the one frame differ
    frame = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    x_i, x_j = spg_views(frame, 1, 0.5, USCLAugment(32, 1), torch.Generator().manual_seed(1), mode="image")
    assert not torch.allclose(x_i, x_j)


def test_batch_pairs_in_every_mode_come_from_their_own_video():
    values = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]])
    frames = np.repeat(values[:, :, None, None, None], 6, axis=2).repeat(6, axis=3).astype(np.uint8)
    n_real = np.array([3, 3, 3])
    for mode, expect in (("uscl", None), ("frames", lambda v: (v[0], v[2])), ("image", None)):
        x_i, x_j = make_pair_batch(frames, n_real, identity, np.random.default_rng(3), mode=mode)
        for b, video in enumerate(values.tolist()):
            vi, vj = value_of(x_i[b]), value_of(x_j[b])
            assert min(video) - 1e-3 <= vi <= max(video) + 1e-3 and min(video) - 1e-3 <= vj <= max(video) + 1e-3
            if expect is not None:
                assert (vi, vj) == pytest.approx(expect(video), abs=1e-4)
            if mode == "image":
                assert vi == pytest.approx(vj, abs=1e-4) and round(vi) in video
    with pytest.raises(ValueError, match="pair mode must be one of"):
        make_pair_batch(frames, n_real, identity, np.random.default_rng(3), mode="mixup")


def test_more_than_three_real_frames_mix_three_of_them_in_time_order():
    video = constant_video([10, 20, 30, 40, 50, 255])
    lam = 0.25
    seen = set()
    for seed in range(30):
        x_i, x_j = spg_views(video, 5, lam, identity, torch.Generator().manual_seed(seed))
        vi, vj = value_of(x_i), value_of(x_j)
        # solve for the anchor f2 from x_i = lam f1 + (1-lam) f2 over candidate f1 < f2 < f3
        found = [(a, b, c) for a in range(10, 60, 10) for b in range(10, 60, 10)
                 for c in range(10, 60, 10) if a < b < c
                 and abs(lam * a + (1 - lam) * b - vi) < 1e-3
                 and abs(lam * c + (1 - lam) * b - vj) < 1e-3]
        assert len(found) == 1
        seen.add(found[0])
    assert len(seen) > 3


def test_batch_views_never_mix_two_videos():
    b, k = 5, 3
    values = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 250], [120, 250, 250]])
    n_real = np.array([3, 3, 3, 2, 1])
    frames = np.zeros((b, k, 6, 6, 1), np.uint8)
    frames[...] = values[:, :, None, None, None]
    x_i, x_j = make_pair_batch(frames, n_real, identity, np.random.default_rng(0))
    assert x_i.shape == x_j.shape == (b, 1, 6, 6)
    lams = []
    for v in range(3):  # three real frames: one lam in (0, 1) explains both views of video v
        f1, f2, f3 = values[v]
        vi, vj = value_of(x_i[v]), value_of(x_j[v])
        lam_i, lam_j = (vi - f2) / (f1 - f2), (vj - f2) / (f3 - f2)
        assert 0 <= lam_i <= 1 and lam_i == pytest.approx(lam_j, abs=1e-3)
        lams.append(lam_i)
    assert len(set(np.round(lams, 4))) == 3  # one lam per video
    assert (value_of(x_i[3]), value_of(x_j[3])) == pytest.approx((100, 110), abs=1e-4)
    assert (value_of(x_i[4]), value_of(x_j[4])) == pytest.approx((120, 120), abs=1e-4)


def test_batch_lambdas_follow_the_rng():
    frames = np.zeros((2, 3, 4, 4, 1), np.uint8)
    frames[:, 0], frames[:, 1], frames[:, 2] = 0, 200, 100
    x_i, _ = make_pair_batch(frames, np.array([3, 3]), identity, np.random.default_rng(4),
                             alpha=0.5)
    rng = np.random.default_rng(4)
    rng.integers(0, 2**63 - 1)  # the augmentation seed is drawn first
    expected = [rng.beta(0.5, 0.5) for _ in range(2)]
    got = [(value_of(x_i[v]) - 200) / (0 - 200) for v in range(2)]
    assert got == pytest.approx(expected, abs=1e-4)


def test_batch_is_reproducible_with_real_augmentation():
    frames = np.random.default_rng(0).integers(0, 256, (3, 3, 40, 40, 1), dtype=np.uint8)
    aug = USCLAugment(32, 1)
    a = make_pair_batch(frames, np.array([3, 2, 1]), aug, np.random.default_rng(9))
    b = make_pair_batch(frames, np.array([3, 2, 1]), aug, np.random.default_rng(9))
    c = make_pair_batch(frames, np.array([3, 2, 1]), aug, np.random.default_rng(10))
    assert a[0].shape == (3, 1, 32, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])


def test_sample_lambda_is_beta():
    rng = np.random.default_rng(0)
    draws = np.array([sample_lambda(0.5, rng) for _ in range(4000)])
    assert draws.min() >= 0 and draws.max() <= 1
    assert draws.mean() == pytest.approx(0.5, abs=0.03)
    assert draws.var() == pytest.approx(1 / 8, abs=0.01)  # Beta(a, a): 1 / (4 (2a + 1))
    with pytest.raises(ValueError):
        sample_lambda(0.0, rng)


def test_frame_indices_distinct_sorted_uniform():
    rng = np.random.default_rng(0)
    counts = np.zeros(10)
    for _ in range(2000):
        idx = sample_frame_indices(10, 3, rng)
        assert len(idx) == 3 and len(set(idx.tolist())) == 3 and np.all(np.diff(idx) > 0)
        assert idx.min() >= 0 and idx.max() < 10
        counts[idx] += 1
    assert np.allclose(counts / 2000, 0.3, atol=0.04)
    assert sample_frame_indices(2, 3, rng).tolist() == [0, 1]
    assert sample_frame_indices(1, 3, rng).tolist() == [0]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 3, rng)


def test_argument_validation():
    video = constant_video([10, 20, 30])
    with pytest.raises(ValueError, match="n_real"):
        spg_views(video, 0, 0.5, identity, torch.Generator())
    with pytest.raises(ValueError, match="n_real"):
        spg_views(video, 4, 0.5, identity, torch.Generator())
    with pytest.raises(ValueError, match="lam"):
        spg_views(video, 3, 1.5, identity, torch.Generator())
    with pytest.raises(ValueError, match="n_real has"):
        make_pair_batch(np.zeros((2, 3, 4, 4, 1), np.uint8), np.array([3]), identity,
                        np.random.default_rng(0))
