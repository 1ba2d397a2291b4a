"""Phantom lung-ultrasound clips: geometry, findings, lung sliding, files and manifest."""
from __future__ import annotations

import argparse
import csv
import json
import time

import cv2
import numpy as np
import pytest

from ultrasound import phantom
from ultrasound.phantom import FINDINGS

SIZE = 128
SEEDS = (0, 1, 2, 3)


def render_pair(finding: str, seed: int, n_frames: int = 8):
    """The same clip (same geometry, same random stream) without and with one finding."""
    geometry = phantom.draw_geometry(SIZE, SIZE, np.random.default_rng(seed))
    without = phantom.render_with_geometry({}, n_frames, geometry,
                                           np.random.default_rng(1000 + seed))
    with_it = phantom.render_with_geometry({finding: True}, n_frames, geometry,
                                           np.random.default_rng(1000 + seed))
    depth, lateral, inside = geometry.cartesian_maps()
    return without.astype(np.float64), with_it.astype(np.float64), geometry, depth, lateral, inside


def assert_unchanged(with_it, without, region):
    """Equal up to a rounding flip: a finding leaves this region alone."""
    assert np.abs(with_it[:, region] - without[:, region]).max() <= 1


def lateral_profile(frames: np.ndarray, region: np.ndarray, lateral: np.ndarray, bins: int = 48):
    """Time-averaged brightness of ``region`` in ``bins`` scan-line bins across the sector."""
    image = frames.mean(axis=0)
    index = np.clip(((lateral + 1) / 2 * bins).astype(int), 0, bins - 1)[region]
    sums = np.bincount(index, image[region], bins)
    counts = np.bincount(index, None, bins)
    return sums[counts > 0] / counts[counts > 0]


# ---------------------------------------------------------------------------------------------
# Rendering


def test_render_clip_shape_dtype_and_speed():
    rng = np.random.default_rng(0)
    all_on = {name: True for name in FINDINGS}
    phantom.render_clip(all_on, 4, SIZE, SIZE, rng)  # warm-up (imports, allocations)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        clip = phantom.render_clip(all_on, 48, SIZE, SIZE, rng)
        best = min(best, time.perf_counter() - start)
    assert clip.shape == (48, SIZE, SIZE) and clip.dtype == np.uint8
    assert best < 0.2, f"48-frame {SIZE}x{SIZE} clip took {best:.3f} s"


def test_rectangular_frames_keep_the_sector_inside_the_image():
    clip = phantom.render_clip({}, 3, 96, 160, np.random.default_rng(5))
    assert clip.shape == (3, 96, 160)
    geometry = phantom.draw_geometry(96, 160, np.random.default_rng(5))
    _, _, inside = geometry.cartesian_maps()
    # The fan touches neither the left nor the right image border.
    assert not inside[:, 0].any() and not inside[:, -1].any()
    assert inside.sum() > 0.3 * inside.size


@pytest.mark.parametrize("seed", SEEDS)
def test_outside_the_sector_is_black_and_inside_is_not(seed):
    geometry = phantom.draw_geometry(SIZE, SIZE, np.random.default_rng(seed))
    clip = phantom.render_with_geometry({name: True for name in FINDINGS}, 4, geometry,
                                        np.random.default_rng(seed))
    _, lateral, inside = geometry.cartesian_maps()
    assert clip[:, ~inside].max() == 0
    assert clip[:, inside].mean() > 20
    # A fan, not a rectangle: the top corners are outside, the bottom centre inside.
    assert not inside[0, 0] and not inside[0, -1] and inside[SIZE - 8, SIZE // 2]
    # The widest part of the fan is near its bottom.
    widths = inside.sum(axis=1)
    assert widths.max() > 1.5 * widths[geometry.top + 1]
    assert widths.argmax() > geometry.top + geometry.depth / 2


def test_render_is_deterministic_for_a_seed_and_varies_across_seeds():
    findings = {"b_lines": True, "effusion": True}
    first = phantom.render_clip(findings, 6, SIZE, SIZE, np.random.default_rng(42))
    again = phantom.render_clip(findings, 6, SIZE, SIZE, np.random.default_rng(42))
    other = phantom.render_clip(findings, 6, SIZE, SIZE, np.random.default_rng(43))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 5


def test_clip_geometry_varies_from_clip_to_clip():
    geometries = [phantom.draw_geometry(SIZE, SIZE, np.random.default_rng(s)) for s in range(8)]
    for attribute in ("probe_radius", "half_angle", "pleura_depth"):
        values = [getattr(g, attribute) for g in geometries]
        assert np.std(values) > 0.05 * np.mean(values), attribute
    masks = [g.cartesian_maps()[2] for g in geometries]
    assert any((masks[0] != m).mean() > 0.02 for m in masks[1:])


def test_findings_are_validated():
    with pytest.raises(ValueError, match="unknown findings.*b_line"):
        phantom.render_clip({"b_line": True}, 2, SIZE, SIZE, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_frames"):
        phantom.render_clip({}, 0, SIZE, SIZE, np.random.default_rng(0))
    with pytest.raises(ValueError, match="height and width"):
        phantom.render_clip({}, 2, 16, SIZE, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# Each finding changes its own region of the image


@pytest.mark.parametrize("seed", SEEDS)
def test_effusion_darkens_the_bottom_of_the_sector_only(seed):
    without, with_it, g, depth, _, inside = render_pair("effusion", seed)
    bottom = inside & (depth > 0.85 * g.depth)
    assert with_it[:, bottom].mean() < 0.15 * without[:, bottom].mean()
    assert with_it[:, bottom].mean() < 4  # near black: anechoic
    upper = inside & (depth < 0.55 * g.depth)
    assert np.abs(with_it[:, upper] - without[:, upper]).max() <= 2


@pytest.mark.parametrize("seed", SEEDS)
def test_a_lines_brighten_rows_at_multiples_of_the_pleura_depth(seed):
    without, with_it, g, depth, _, inside = render_pair("a_lines", seed)
    p = g.pleura_depth
    at_twice = inside & (np.abs(depth - 2 * p) <= 1.5)
    assert with_it[:, at_twice].mean() > without[:, at_twice].mean() + 40
    if 3 * p < 0.9 * g.depth:
        at_thrice = inside & (np.abs(depth - 3 * p) <= 1.5)
        assert with_it[:, at_thrice].mean() > without[:, at_thrice].mean() + 20
    # Between the reverberations, and above the pleura, nothing changes.
    between = inside & (np.abs(depth - 1.5 * p) <= 1.0)
    assert np.abs(with_it[:, between] - without[:, between]).mean() < 2
    above = inside & (depth < p - 4)
    assert_unchanged(with_it, without, above)


@pytest.mark.parametrize("seed", SEEDS)
def test_b_lines_raise_lateral_variance_below_the_pleura(seed):
    without, with_it, g, depth, lateral, inside = render_pair("b_lines", seed)
    lung = inside & (depth > g.pleura_depth + 8) & (depth < 0.6 * g.depth)
    var_without = lateral_profile(without, lung, lateral).var()
    var_with = lateral_profile(with_it, lung, lateral).var()
    assert var_with > 20 * var_without + 50
    # The rays reach the bottom of the sector (comet tails do not fade out).
    deep = inside & (depth > 0.85 * g.depth)
    # (one frame: averaging over frames would smear the rays as they slide)
    assert lateral_profile(with_it[:1], deep, lateral).max() > \
        lateral_profile(without[:1], deep, lateral).max() + 40
    above = inside & (depth < g.pleura_depth - 4)
    assert_unchanged(with_it, without, above)


def test_b_lines_move_with_lung_sliding():
    geometry = phantom.draw_geometry(SIZE, SIZE, np.random.default_rng(7))
    clip = phantom.render_with_geometry({"b_lines": True}, 16, geometry,
                                        np.random.default_rng(7)).astype(np.float64)
    depth, lateral, inside = geometry.cartesian_maps()
    band = inside & (np.abs(depth - 0.5 * geometry.depth) <= 2)
    # Brightness-weighted lateral position of the brightest ray in each frame.
    index = np.clip(((lateral + 1) / 2 * 96).astype(int), 0, 95)[band]
    peaks = [np.argmax(np.bincount(index, frame[band], 96) / np.maximum(
        np.bincount(index, None, 96), 1)) for frame in clip]
    assert max(peaks) - min(peaks) >= 2


@pytest.mark.parametrize("seed", SEEDS)
def test_consolidation_adds_tissue_and_bright_spots_under_the_pleura(seed):
    without, with_it, g, depth, _, inside = render_pair("consolidation", seed)
    p = g.pleura_depth
    subpleural = inside & (depth > p + 4) & (depth < p + 0.12 * g.depth)
    assert with_it[:, subpleural].mean() > without[:, subpleural].mean() + 8
    lung = inside & (depth > p + 4) & (depth < 0.5 * g.depth)
    bright_with = (with_it[:, lung] > 200).sum()
    bright_without = (without[:, lung] > 200).sum()
    assert bright_with >= bright_without + 5
    deep = inside & (depth > 0.7 * g.depth)
    assert_unchanged(with_it, without, deep)


def pleura_peak_depths(frames, depth, lateral, inside, centre, bins=48):
    """Per scan-line bin, the depth of the pleural line: the mean depth of the rows (within
    +-8 px of ``centre``) whose brightness is within 10% of the bin's peak (ties at 255)."""
    image = frames.mean(axis=0)
    band = inside & (np.abs(depth - centre) <= 8)
    rows = np.round(depth[band]).astype(int)
    cols = np.clip(((lateral + 1) / 2 * bins).astype(int), 0, bins - 1)[band]
    row_ids = rows - rows.min()
    sums = np.zeros((bins, row_ids.max() + 1))
    counts = np.zeros_like(sums)
    np.add.at(sums, (cols, row_ids), image[band])
    np.add.at(counts, (cols, row_ids), 1)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), -1)
    near_peak = means >= 0.9 * means.max(axis=1, keepdims=True)
    positions = (near_peak * np.arange(means.shape[1])).sum(axis=1) / near_peak.sum(axis=1)
    return positions[counts.sum(axis=1) > 0]


@pytest.mark.parametrize("seed", SEEDS)
def test_pleural_irregularity_breaks_and_displaces_the_pleural_line(seed):
    without, with_it, g, depth, lateral, inside = render_pair("pleural_irregularity", seed)
    p = g.pleura_depth
    core = inside & (np.abs(depth - p) <= 1)
    assert with_it[:, core].mean() < without[:, core].mean() - 20
    jagged = pleura_peak_depths(with_it, depth, lateral, inside, p).std()
    smooth = pleura_peak_depths(without, depth, lateral, inside, p).std()
    assert jagged > smooth + 0.7
    # Gaps: some scan lines lose most of their pleural brightness.
    peak_with = lateral_profile(with_it, core, lateral)
    peak_without = lateral_profile(without, core, lateral)
    assert peak_with.min() < 0.6 * peak_without.min()
    deep = inside & (depth > p + 16)
    assert_unchanged(with_it, without, deep)


@pytest.mark.parametrize("seed", SEEDS)
def test_lung_sliding_moves_the_texture_below_the_pleura_only(seed):
    geometry = phantom.draw_geometry(SIZE, SIZE, np.random.default_rng(seed))
    clip = phantom.render_with_geometry({}, 24, geometry,
                                        np.random.default_rng(seed)).astype(np.float64)
    depth, _, inside = geometry.cartesian_maps()
    change = np.abs(np.diff(clip, axis=0)).mean(axis=0)
    below = inside & (depth > geometry.pleura_depth + 4)
    above = inside & (depth < geometry.pleura_depth - 4)
    assert change[below].mean() > 2.5 * change[above].mean()
    # Above the pleura only the faint electronic noise changes.
    assert change[above].mean() < 2.5


def test_all_findings_together_render_and_differ_from_none():
    geometry = phantom.draw_geometry(SIZE, SIZE, np.random.default_rng(9))
    none = phantom.render_with_geometry({}, 4, geometry, np.random.default_rng(9))
    every = phantom.render_with_geometry({n: True for n in FINDINGS}, 4, geometry,
                                         np.random.default_rng(9))
    assert np.abs(none.astype(int) - every.astype(int)).mean() > 5


# ---------------------------------------------------------------------------------------------
# Labels


def test_class_conditioned_finding_frequencies():
    rng = np.random.default_rng(0)
    n = 2000
    for label in phantom.CLASSES:
        draws = [phantom.draw_findings(label, rng) for _ in range(n)]
        for name in FINDINGS:
            rate = np.mean([d[name] for d in draws])
            assert abs(rate - phantom.FINDING_PROBABILITIES[label][name]) < 0.04, (label, name)
    probs = phantom.FINDING_PROBABILITIES
    assert probs["regular"]["a_lines"] > 0.8 > probs["covid"]["a_lines"]
    assert probs["covid"]["b_lines"] > probs["pneumonia"]["b_lines"] > probs["regular"]["b_lines"]
    assert probs["covid"]["pleural_irregularity"] > 0.5
    assert probs["pneumonia"]["consolidation"] > 0.5 and probs["pneumonia"]["effusion"] > 0.5
    with pytest.raises(ValueError, match="unknown class"):
        phantom.draw_findings("viral", rng)


def test_plan_groups_videos_by_patient_with_one_class():
    specs = phantom.plan_dataset(30, seed=4, n_frames=40, videos_per_patient=3)
    assert [s.video_id for s in specs] == [f"phantom_{i:04d}" for i in range(30)]
    for start in range(0, 30, 3):
        group = specs[start : start + 3]
        assert len({s.patient_id for s in group}) == 1
        assert len({s.label for s in group}) == 1
    assert len({s.patient_id for s in specs}) == 10
    assert {s.label for s in specs} == set(phantom.CLASSES)
    lengths = [s.n_frames for s in specs]
    assert min(lengths) >= 30 and max(lengths) <= 50 and len(set(lengths)) > 5
    # Same seed, same plan; another seed, another plan.
    assert specs == phantom.plan_dataset(30, seed=4, n_frames=40, videos_per_patient=3)
    assert specs != phantom.plan_dataset(30, seed=5, n_frames=40, videos_per_patient=3)


# ---------------------------------------------------------------------------------------------
# Files


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return np.stack(frames)


def test_write_clip_round_trips_through_opencv(tmp_path):
    clip = phantom.render_clip({"a_lines": True}, 10, 64, 96, np.random.default_rng(3))
    path = phantom.write_clip(tmp_path / "sub" / "clip.mp4", clip, fps=15)
    decoded = read_video(path)
    assert decoded.shape[:3] == (10, 64, 96)
    gray = decoded[..., 0].astype(int) if decoded.ndim == 4 else decoded.astype(int)
    assert np.abs(gray - clip.astype(int)).mean() < 6
    capture = cv2.VideoCapture(str(path))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(15, abs=0.01)
    capture.release()


def test_write_clip_refuses_bad_input(tmp_path):
    good = np.zeros((3, 64, 64), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        phantom.write_clip(tmp_path / "a.mp4", good.astype(np.float32), 12)
    with pytest.raises(ValueError, match="even"):
        phantom.write_clip(tmp_path / "a.mp4", np.zeros((3, 63, 64), np.uint8), 12)
    with pytest.raises(ValueError, match="fps"):
        phantom.write_clip(tmp_path / "a.mp4", good, 0)
    (tmp_path / "taken.mp4").mkdir()
    with pytest.raises(phantom.VideoWriteError):
        phantom.write_clip(tmp_path / "taken.mp4", good, 12)


def read_manifest(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_make_dataset_writes_decodable_clips_and_a_matching_manifest(tmp_path):
    manifest = phantom.make_dataset(tmp_path, 6, seed=11, n_frames=12, size=64,
                                    videos_per_patient=2)
    assert manifest == tmp_path / "manifest.csv"
    rows = read_manifest(manifest)
    with open(manifest, newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["path", "video_id", "patient_id", "label", *FINDINGS]
    specs = phantom.plan_dataset(6, seed=11, n_frames=12, size=64, videos_per_patient=2)
    assert len(rows) == 6 and len({s.n_frames for s in specs}) > 1
    for row, spec in zip(rows, specs):
        assert row["path"] == f"videos/{spec.video_id}.mp4"
        assert row["video_id"] == spec.video_id and row["patient_id"] == spec.patient_id
        assert row["label"] == spec.label in phantom.CLASSES
        for name in FINDINGS:
            assert row[name] == ("yes" if spec.findings[name] else "no")
        decoded = read_video(tmp_path / row["path"])
        assert decoded.shape[:3] == (spec.n_frames, 64, 64)
        # The file holds the rendered clip of these findings (up to mp4 compression) ...
        rendered = spec.render().astype(int)
        error = np.abs(decoded[..., 0].astype(int) - rendered).mean()
        assert error < 6
        # ... and not the same clip with its findings flipped.
        flipped = {name: not value for name, value in spec.findings.items()}
        other = phantom.render_clip(flipped, spec.n_frames, 64, 64,
                                    np.random.default_rng(list(spec.seed))).astype(int)
        assert np.abs(decoded[..., 0].astype(int) - other).mean() > error + 2
    for first, second in zip(rows[0::2], rows[1::2]):
        assert first["patient_id"] == second["patient_id"]
        assert first["label"] == second["label"]


def test_make_dataset_is_deterministic(tmp_path):
    a = phantom.make_dataset(tmp_path / "a", 3, seed=2, n_frames=6, size=48)
    b = phantom.make_dataset(tmp_path / "b", 3, seed=2, n_frames=6, size=48)
    c = phantom.make_dataset(tmp_path / "c", 3, seed=3, n_frames=6, size=48)
    assert a.read_text() == b.read_text()
    for row in read_manifest(a):
        np.testing.assert_array_equal(read_video(a.parent / row["path"]),
                                      read_video(b.parent / row["path"]))
    first = read_manifest(a)[0]["path"]
    frames_a, frames_c = read_video(a.parent / first), read_video(c.parent / first)
    assert frames_a.shape != frames_c.shape or np.abs(
        frames_a.astype(int) - frames_c.astype(int)).mean() > 3


# ---------------------------------------------------------------------------------------------
# The `sonoray phantom` job


def run_job(argv):
    from jobs import phantom as job

    parser = argparse.ArgumentParser()
    job.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_phantom_job_prints_json_and_reports_progress(tmp_path, capsys):
    assert run_job(["phantom", str(tmp_path), "--videos", "3", "--frames", "8", "--size", "48",
                    "--seed", "1", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    specs = phantom.plan_dataset(3, seed=1, n_frames=8, size=48)
    assert result == {"videos": 3, "frames": sum(s.n_frames for s in specs),
                      "manifest": str(tmp_path / "manifest.csv")}
    assert "3/3" in captured.err
    assert len(read_manifest(tmp_path / "manifest.csv")) == 3


def test_phantom_job_rejects_bad_arguments(tmp_path):
    from jobs.output import UserError

    with pytest.raises(UserError, match="--videos"):
        run_job(["phantom", str(tmp_path), "--videos", "0"])
    with pytest.raises(UserError, match="--size"):
        run_job(["phantom", str(tmp_path), "--videos", "1", "--size", "33"])
