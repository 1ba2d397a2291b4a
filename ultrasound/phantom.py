"""Synthetic lung-ultrasound clips with known findings: the embedded default data set.

A phantom clip imitates what a convex probe shows over the lung (Lichtenstein's BLUE-protocol
signs): a fan-shaped sector, multiplicative speckle, soft tissue above a bright pleural line, and
lung sliding (the texture below the pleura moves laterally over time while the tissue above it
stays still). Five findings can be switched on independently and each one changes its own part of
the image:

- ``a_lines``: horizontal reverberations of the pleural line at multiples of its depth.
- ``b_lines``: vertical comet-tail rays from the pleura to the bottom of the sector, moving with
  lung sliding.
- ``consolidation``: a tissue-like (hepatised) hypoechoic patch under the pleura with bright
  spots (air bronchograms).
- ``effusion``: an anechoic (near black) region at the bottom of the sector.
- ``pleural_irregularity``: a thickened, jagged, broken pleural line.

The image is composed in polar coordinates (rows = depth in pixels from the probe face,
columns = scan lines) where every finding is axis-aligned, then resampled onto the Cartesian fan
with ``cv2.remap``: the static layers (soft tissue, pleura, effusion) once per clip, the wider
lung layer once per frame at a sub-pixel lateral offset that swings with the breathing cycle
(lung sliding). A 48-frame 128 x 128 clip renders in about 20 ms on one CPU.

Randomness comes only from the ``np.random.Generator`` passed in. The numbers drawn do not depend
on which findings are switched on, so the same generator state renders the *same* clip with and
without a finding (what the tests compare).

Example:
    >>> rng = np.random.default_rng(0)
    >>> clip = render_clip({"b_lines": True}, n_frames=8, height=64, width=64, rng=rng)
    >>> clip.shape, clip.dtype
    ((8, 64, 64), dtype('uint8'))
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np

FINDINGS = ("a_lines", "b_lines", "consolidation", "effusion", "pleural_irregularity")
CLASSES = ("covid", "pneumonia", "regular")

# P(finding present | class). Regular lungs show A-lines and rarely anything else; COVID-19
# shows B-lines and an irregular pleura, sometimes small subpleural consolidations; bacterial
# pneumonia shows consolidation, often with a parapneumonic effusion, and some B-lines.
FINDING_PROBABILITIES: Mapping[str, Mapping[str, float]] = {
    "covid": {"a_lines": 0.25, "b_lines": 0.85, "consolidation": 0.35, "effusion": 0.10,
              "pleural_irregularity": 0.75},
    "pneumonia": {"a_lines": 0.20, "b_lines": 0.40, "consolidation": 0.85, "effusion": 0.60,
                  "pleural_irregularity": 0.30},
    "regular": {"a_lines": 0.90, "b_lines": 0.10, "consolidation": 0.03, "effusion": 0.03,
                "pleural_irregularity": 0.05},
}

MAX_B_LINES = 4
MAX_BRONCHOGRAMS = 24
MIN_SIZE = 32


class VideoWriteError(RuntimeError):
    """OpenCV could not write (or read back) an mp4 file."""


# --------------------------------------------------------------------------------------------
# Clip geometry


@dataclass(frozen=True, eq=False)
class ClipGeometry:
    """Where the convex-probe sector lies in the image and where the pleura lies in the sector.

    The probe face is an arc of radius ``probe_radius`` around a virtual apex above the image;
    depth is measured in pixels from that arc along each scan line.

    Attributes:
        height, width: image size in pixels.
        top: image row of the probe face at the centre scan line.
        probe_radius: radius of the probe face arc (pixels).
        depth: imaging depth (pixels), i.e. the number of polar rows minus one.
        half_angle: half the sector's opening angle (radians).
        pleura_depth: mean depth of the pleural line (pixels from the probe face).
    """

    height: int
    width: int
    top: int
    probe_radius: float
    depth: int
    half_angle: float
    pleura_depth: float

    @property
    def polar_shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the polar image: one row per pixel of depth, one column per
        scan line (``width`` scan lines)."""
        return self.depth + 1, self.width

    def cartesian_maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per image pixel: depth (pixels from the probe face), lateral position (-1 at the left
        edge of the sector, +1 at the right) and whether the pixel lies inside the sector.

        Shape:
            - Each output: ``(height, width)``; float32, float32, bool.
        """
        ys, xs = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        apex_y = self.top - self.probe_radius
        dx = xs - (self.width - 1) / 2.0
        dy = ys - apex_y
        depth = np.hypot(dx, dy) - self.probe_radius
        lateral = np.arctan2(dx, dy) / self.half_angle
        inside = (depth >= 0) & (depth <= self.depth) & (np.abs(lateral) <= 1.0)
        return depth.astype(np.float32), lateral.astype(np.float32), inside


def draw_geometry(height: int, width: int, rng: np.random.Generator) -> ClipGeometry:
    """Draw a clip's sector and pleura placement (probe curvature, opening angle, depth,
    pleura depth vary from clip to clip)."""
    _check_size(height, width)
    top = int(rng.integers(1, max(2, round(0.06 * height)) + 1))
    bottom_margin = int(rng.integers(1, max(2, round(0.05 * height)) + 1))
    depth = height - 1 - top - bottom_margin
    probe_radius = float(rng.uniform(0.35, 0.7) * height)
    wanted_half = math.radians(rng.uniform(28.0, 40.0))
    # The fan's widest point (its bottom corners) must fit in the image.
    fit = (width / 2.0 - 1.5) / (probe_radius + depth)
    half_angle = float(min(wanted_half, math.asin(min(fit, 0.99))))
    pleura_depth = float(rng.uniform(0.16, 0.27) * depth)
    return ClipGeometry(height=height, width=width, top=top, probe_radius=probe_radius,
                        depth=depth, half_angle=half_angle, pleura_depth=pleura_depth)


# --------------------------------------------------------------------------------------------
# Findings


def draw_label(rng: np.random.Generator) -> str:
    """A class name, uniformly from ``CLASSES``."""
    return CLASSES[int(rng.integers(len(CLASSES)))]


def draw_findings(label: str, rng: np.random.Generator) -> dict[str, bool]:
    """Findings of one clip of class ``label``, each drawn from ``FINDING_PROBABILITIES``."""
    if label not in FINDING_PROBABILITIES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    probs = FINDING_PROBABILITIES[label]
    draws = rng.random(len(FINDINGS))
    return {name: bool(u < probs[name]) for name, u in zip(FINDINGS, draws)}


def _check_findings(findings: Mapping[str, bool]) -> dict[str, bool]:
    unknown = sorted(set(findings) - set(FINDINGS))
    if unknown:
        raise ValueError(f"unknown findings {unknown}; valid names are {list(FINDINGS)}")
    return {name: bool(findings.get(name, False)) for name in FINDINGS}


def _check_size(height: int, width: int) -> None:
    if int(height) != height or int(width) != width or height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(f"height and width must be integers >= {MIN_SIZE}, "
                         f"got {height} x {width}")


# --------------------------------------------------------------------------------------------
# Rendering


def _smooth_noise(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """A smooth random curve of length ``n``, zero mean, unit peak (about ``n / scale`` bumps)."""
    sigma = max(float(scale), 0.5)
    half = int(math.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    raw = rng.standard_normal(n + 2 * half)
    curve = np.convolve(raw, kernel / kernel.sum(), mode="valid")
    curve = curve - curve.mean()
    return curve / (np.abs(curve).max() + 1e-9)


def _speckle(rng: np.random.Generator, shape: tuple[int, int], sigma_rows: float,
             sigma_cols: float) -> np.ndarray:
    """Multiplicative speckle: Rayleigh amplitude, blurred to a cell size, mean 1."""
    field = rng.rayleigh(1.0, size=shape).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=sigma_cols, sigmaY=sigma_rows)
    field /= field.mean()
    # Blurring lowers speckle contrast; stretch it back towards Rayleigh's (std/mean ~ 0.52).
    return np.clip(1.0 + 1.6 * (field - 1.0), 0.05, None)


def _row_bands(rows: np.ndarray, centres: np.ndarray, sigma: float) -> np.ndarray:
    """Sum of Gaussian bands along depth: ``(rows, 1)`` x ``(k,)`` -> ``(rows, 1)``."""
    if centres.size == 0:
        return np.zeros_like(rows, dtype=np.float32)
    return np.exp(-0.5 * ((rows - centres[None, :]) / sigma) ** 2).sum(axis=1, keepdims=True)


def render_clip(findings: Mapping[str, bool], n_frames: int, height: int, width: int,
                rng: np.random.Generator) -> np.ndarray:
    """Render one grayscale phantom clip.

    Draws the clip geometry (``draw_geometry``) then renders it (``render_with_geometry``).

    Args:
        findings: finding name -> present; names from ``FINDINGS``, missing ones are absent.
        n_frames: number of frames (>= 1).
        height, width: frame size in pixels (>= 32).
        rng: the only source of randomness.

    Shape:
        - Output: ``(n_frames, height, width)`` uint8; 0 outside the sector.
    """
    geometry = draw_geometry(height, width, rng)
    return render_with_geometry(findings, n_frames, geometry, rng)


def render_with_geometry(findings: Mapping[str, bool], n_frames: int, geometry: ClipGeometry,
                         rng: np.random.Generator) -> np.ndarray:
    """Render a clip for a given geometry; see ``render_clip``.

    Shape:
        - Output: ``(n_frames, geometry.height, geometry.width)`` uint8.
    """
    on = _check_findings(findings)
    if int(n_frames) != n_frames or n_frames < 1:
        raise ValueError(f"n_frames must be a positive integer, got {n_frames}")
    n_frames = int(n_frames)
    g = geometry
    rows_n, cols_n = g.polar_shape
    rows = np.arange(rows_n, dtype=np.float32)[:, None]
    z = rows / g.depth  # 0 at the probe face, 1 at the bottom of the sector

    # ---- clip-level appearance (drawn whatever the findings, so the stream stays aligned)
    gain = rng.uniform(0.85, 1.15)
    attenuation = rng.uniform(0.1, 0.4)
    tissue_level = rng.uniform(0.26, 0.36)
    lung_level = rng.uniform(0.2, 0.28)
    slide_amplitude = rng.uniform(5.0, 9.0)
    slide_period = rng.uniform(10.0, 20.0)
    slide_phase = rng.uniform(0.0, 2 * np.pi)
    pad = int(math.ceil(slide_amplitude)) + 1 + cols_n // 4  # B-lines may sit beyond the view
    wide_n = cols_n + 2 * pad

    # Soft tissue above the pleura: speckle with a few bright fascia bands.
    fascia_depths = rng.uniform(0.2, 0.8, size=3) * g.pleura_depth
    fascia_gain = rng.uniform(0.12, 0.25)
    tissue_speckle = _speckle(rng, (rows_n, cols_n), 0.7, 1.2)
    lung_speckle = _speckle(rng, (rows_n, wide_n), 0.8, 1.1)

    # Pleural line: a smooth, slightly undulating bright band; irregularity makes it jagged,
    # thick and broken.
    undulation = _smooth_noise(rng, cols_n, cols_n / 6.0) * 0.8
    jag = _smooth_noise(rng, cols_n, 1.5) * rng.uniform(3.0, 4.5)
    n_gaps = int(rng.integers(3, 6))
    gap_centres = rng.uniform(0.1, 0.9, size=5) * cols_n
    gap_widths = rng.uniform(0.05, 0.1, size=5) * cols_n
    pleura_brightness = rng.uniform(0.9, 1.05)

    # A-lines.
    a_line_level = rng.uniform(0.6, 0.8)
    a_line_decay = rng.uniform(0.65, 0.8)

    # B-lines: positions in wide-layer columns, widths, brightness.
    n_b_lines = int(rng.integers(1, MAX_B_LINES + 1))
    b_positions = pad + rng.uniform(0.1, 0.9, size=MAX_B_LINES) * cols_n
    b_widths = rng.uniform(2.0, 3.2, size=MAX_B_LINES)
    b_levels = rng.uniform(0.75, 0.95, size=MAX_B_LINES)

    # Consolidation: lateral span and an irregular (shred) deep border.
    cons_centre = pad + rng.uniform(0.3, 0.7) * cols_n
    cons_half_width = rng.uniform(0.15, 0.25) * cols_n
    cons_height = rng.uniform(0.18, 0.3) * g.depth
    cons_border = _smooth_noise(rng, wide_n, 2.0) * 0.25 * cons_height
    cons_level = rng.uniform(0.45, 0.55)
    cons_speckle = _speckle(rng, (rows_n, wide_n), 1.2, 1.8)
    bronch_rows = rng.uniform(0.1, 0.9, size=MAX_BRONCHOGRAMS)
    bronch_cols = rng.uniform(-0.85, 0.85, size=MAX_BRONCHOGRAMS)

    # Effusion: anechoic bottom region with a wavy top border.
    effusion_top = rng.uniform(0.68, 0.8) * g.depth
    effusion_wave = _smooth_noise(rng, cols_n, cols_n / 5.0) * 0.05 * g.depth
    effusion_rim = rng.uniform(0.45, 0.6)

    noise_sigma = 0.004
    frame_noise = rng.standard_normal((n_frames, g.height, g.width)).astype(np.float32)
    frame_noise *= noise_sigma

    # ---- pleura (static layer, polar columns)
    cols = np.arange(cols_n, dtype=np.float32)
    pleura_row = g.pleura_depth + undulation
    thickness = 1.3
    brightness = np.full(cols_n, pleura_brightness, dtype=np.float32)
    if on["pleural_irregularity"]:
        pleura_row = pleura_row + jag
        thickness = 2.4
        gaps = np.ones(cols_n, dtype=np.float32)
        for centre, half in zip(gap_centres[:n_gaps], gap_widths[:n_gaps]):
            gaps *= 1.0 - 0.9 * np.exp(-0.5 * ((cols - centre) / half) ** 4)
        brightness = brightness * gaps
    pleura = brightness[None, :] * np.exp(-0.5 * ((rows - pleura_row[None, :]) / thickness) ** 2)
    below_pleura = rows > (pleura_row + 1.5 * thickness)[None, :]  # (rows, cols)

    # ---- soft tissue above the pleura
    tissue = tissue_level + fascia_gain * _row_bands(rows, fascia_depths, 0.9)
    static = np.where(below_pleura, 0.0, tissue * tissue_speckle) + pleura * 1.0

    # ---- lung layer (wide, slides laterally)
    wide_cols = np.arange(wide_n, dtype=np.float32)[None, :]
    depth_below = np.clip(rows - g.pleura_depth, 0.0, None)
    lung = np.broadcast_to(lung_level * np.exp(-0.5 * depth_below / g.depth), (rows_n, wide_n))
    lung = lung.astype(np.float32).copy()
    if on["a_lines"]:
        k = np.arange(2, 8, dtype=np.float32)
        centres = k * g.pleura_depth
        centres = centres[centres < g.depth]
        levels = a_line_level * a_line_decay ** (np.arange(centres.size))
        bands = (levels[None, :] * np.exp(
            -0.5 * ((rows - centres[None, :]) / 1.4) ** 2)).sum(axis=1, keepdims=True)
        lung = np.maximum(lung, bands)
    lung = lung * lung_speckle
    if on["b_lines"]:
        pos = b_positions[:n_b_lines]
        rays = (b_levels[:n_b_lines] * np.exp(
            -0.5 * ((wide_cols.T - pos[None, :]) / b_widths[:n_b_lines]) ** 2)).sum(axis=1)
        fade = 1.0 - 0.25 * depth_below / g.depth
        # Comet tails are coherent reverberations: much less speckle than the lung around them.
        ray_texture = 0.8 + 0.2 * lung_speckle
        lung = np.maximum(lung, rays[None, :] * fade * ray_texture)
    if on["consolidation"]:
        rel = (wide_cols - cons_centre) / cons_half_width  # (1, wide)
        bottom = g.pleura_depth + cons_height * np.sqrt(np.clip(1 - rel ** 2, 0, None)) \
            + cons_border[None, :]
        region = (np.abs(rel) < 1.0) & (rows <= bottom)
        patch = cons_level * cons_speckle
        # Air bronchograms: bright dots scattered inside the patch.
        spot_rows = g.pleura_depth + 2.0 + bronch_rows * 0.8 * cons_height
        spot_cols = cons_centre + bronch_cols * 0.8 * cons_half_width
        dist2 = (rows[:, :, None] - spot_rows) ** 2 + (wide_cols[:, :, None] - spot_cols) ** 2
        spots = np.exp(-0.5 * dist2 / 0.9**2).max(axis=2)  # dots ~2 px across
        patch = np.maximum(patch, spots * 1.3)
        lung = np.where(region, patch, lung)

    # ---- envelope: gain, depth attenuation and the effusion's anechoic region (static)
    envelope = np.broadcast_to(gain * np.exp(-attenuation * z), (rows_n, cols_n))
    rim = np.zeros((rows_n, cols_n), dtype=np.float32)
    if on["effusion"]:
        border = effusion_top + effusion_wave[None, :]
        envelope = envelope * (0.04 + 0.96 / (1.0 + np.exp((rows - border) / 1.5)))
        # The lung (or diaphragm) surface that bounds the fluid: an echogenic rim on its top.
        rim = effusion_rim * gain * np.exp(-0.5 * ((rows - border + 2.0) / 1.2) ** 2)

    # ---- scan conversion: static layers once, the sliding lung layer once per frame with a
    # sub-pixel lateral offset (lung sliding: to-and-fro with the breathing cycle)
    depth_map, lateral_map, inside = g.cartesian_maps()
    map_x = ((lateral_map + 1.0) * 0.5 * (cols_n - 1)).astype(np.float32)
    map_y = depth_map

    def to_cartesian(image: np.ndarray, offset: float = 0.0) -> np.ndarray:
        return cv2.remap(np.ascontiguousarray(image, dtype=np.float32), map_x + np.float32(offset),
                         map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0.0)

    envelope_xy = to_cartesian(envelope)
    static_xy = to_cartesian(static) * envelope_xy
    rim_xy = to_cartesian(rim)
    lung_xy_weight = to_cartesian(below_pleura.astype(np.float32)) * envelope_xy
    t = np.arange(n_frames, dtype=np.float64)
    shifts = slide_amplitude * np.sin(2 * np.pi * t / slide_period + slide_phase)
    frames = frame_noise  # reuse the buffer: frames = noise + image
    for i in range(n_frames):
        lung_xy = to_cartesian(lung, pad + shifts[i])
        frames[i] += np.maximum(static_xy + lung_xy_weight * lung_xy, rim_xy)
    frames *= inside[None]
    return np.clip(frames * 255.0 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Files


def write_clip(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Write grayscale frames ``(T, H, W)`` uint8 as an mp4 (MPEG-4 part 2, fourcc ``mp4v``)
    and check that OpenCV reads it back with the same frame count and size.

    Raises:
        ValueError: bad frames or fps.
        VideoWriteError: the codec is unavailable or the file does not read back.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"frames must be a non-empty (T, H, W) uint8 array, got "
                         f"{frames.dtype} {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    n, height, width = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"mp4v needs even frame sizes, got {height} x {width}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps),
                             (width, height), False)
    if not writer.isOpened():
        raise VideoWriteError(f"OpenCV cannot open an mp4v writer for {path}: this OpenCV build "
                              "lacks an MPEG-4 encoder (FFmpeg backend)")
    try:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame))
    finally:
        writer.release()
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise VideoWriteError(f"wrote {path} but OpenCV cannot open it again")
        got = (int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
               int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
               int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
        ok, _ = capture.read()
    finally:
        capture.release()
    if not ok or got != (n, height, width):
        raise VideoWriteError(f"wrote {path} with {n} frames of {height} x {width} but it reads "
                              f"back as {got[0]} frames of {got[1]} x {got[2]}")
    return path


@dataclass(frozen=True)
class PhantomClipSpec:
    """Everything that determines one clip of a phantom data set."""

    index: int
    video_id: str
    patient_id: str
    label: str
    findings: Mapping[str, bool]
    n_frames: int
    size: int
    seed: tuple[int, int]

    @property
    def relative_path(self) -> str:
        return f"videos/{self.video_id}.mp4"

    def render(self) -> np.ndarray:
        """The clip's frames, ``(n_frames, size, size)`` uint8 (deterministic)."""
        rng = np.random.default_rng(list(self.seed))
        return render_clip(self.findings, self.n_frames, self.size, self.size, rng)


def plan_dataset(n_videos: int, *, seed: int = 0, n_frames: int = 48, size: int = 128,
                 videos_per_patient: int = 2) -> list[PhantomClipSpec]:
    """Decide class, findings and length of every clip, without rendering.

    Consecutive videos share a patient (``videos_per_patient`` each) and the patient's class;
    findings are drawn per video from the class's probabilities; lengths vary by +-25% around
    ``n_frames``. Deterministic for a seed.
    """
    if int(n_videos) != n_videos or n_videos < 1:
        raise ValueError(f"n_videos must be a positive integer, got {n_videos}")
    if int(n_frames) != n_frames or n_frames < 2:
        raise ValueError(f"n_frames must be an integer >= 2, got {n_frames}")
    if int(size) != size or size < MIN_SIZE or size % 2:
        raise ValueError(f"size must be an even integer >= {MIN_SIZE}, got {size}")
    if int(videos_per_patient) != videos_per_patient or videos_per_patient < 1:
        raise ValueError(f"videos_per_patient must be a positive integer, got "
                         f"{videos_per_patient}")
    rng = np.random.default_rng(seed)
    specs: list[PhantomClipSpec] = []
    label = CLASSES[0]
    for index in range(int(n_videos)):
        patient = index // videos_per_patient
        if index % videos_per_patient == 0:
            label = draw_label(rng)
        findings = draw_findings(label, rng)
        length = max(2, int(round(n_frames * rng.uniform(0.75, 1.25))))
        specs.append(PhantomClipSpec(
            index=index, video_id=f"phantom_{index:04d}", patient_id=f"patient_{patient:04d}",
            label=label, findings=findings, n_frames=length, size=int(size),
            seed=(int(seed), index)))
    return specs


MANIFEST_COLUMNS = ("path", "video_id", "patient_id", "label", *FINDINGS)


def make_dataset(out_dir: str | Path, n_videos: int, *, seed: int = 0, n_frames: int = 48,
                 size: int = 128, fps: float = 12, videos_per_patient: int = 2,
                 on_clip=None) -> Path:
    """Write ``n_videos`` phantom clips to ``out_dir/videos/`` and ``out_dir/manifest.csv``.

    The manifest has columns ``path`` (relative to ``out_dir``), ``video_id``, ``patient_id``,
    ``label`` (class name) and one ``yes``/``no`` column per finding: the generic manifest that
    ``sonoray ingest`` accepts. ``on_clip(spec)``, if given, is called after each clip is written.

    Returns:
        The manifest's path.
    """
    specs = plan_dataset(n_videos, seed=seed, n_frames=n_frames, size=size,
                         videos_per_patient=videos_per_patient)
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    for spec in specs:
        write_clip(out_dir / spec.relative_path, spec.render(), fps)
        if on_clip is not None:
            on_clip(spec)
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for spec in specs:
            writer.writerow([spec.relative_path, spec.video_id, spec.patient_id, spec.label,
                             *("yes" if spec.findings[name] else "no" for name in FINDINGS)])
    return manifest
