"""Apply a trained MSML classifier to videos: per-frame and per-video finding probabilities.

``sonoray predict`` streams every sampled frame of an ingested data set through the frame stream
(and its decoded-frame cache), scores the frames on Ray Data actors (one model per actor, GPU with
``gpu=True``), and writes under ``out``:

- ``frames.parquet``: ``video_id, frame_index, timestamp`` and one probability column per finding;
- ``videos.parquet`` and ``videos.csv``: one row per video, ``video_id, key, n_frames``, one column
  per finding (the video's score: the mean of its frames' probabilities) and ``<finding>_max``;
- ``gradcam/``: Grad-CAM overlays of the top-scoring frames, each the frame (decoded again from
  the video at ``DISPLAY_SIZE`` or the model's size, whichever is larger) beside its overlay;
- ``complete.json`` last (:mod:`cluster.completion`): the outputs are whole.

A video that yields no frame is listed in the result's ``skipped_videos``, never dropped silently.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
import ray

from cluster.completion import FinalFiles, check_model_file, parent
from cluster.dataset import IngestedDataset
from cluster.frames import StreamSpec, collect_frames, frame_stream
from cluster.storage import Location, Storage, parse_uri
from ultrasound.checkpoint import load_state
from ultrasound.export import MSML_FILE, MSML_META_FILE
from ultrasound.gradcam import grad_cam, overlay
from ultrasound.manifest import safe_file_name
from ultrasound.msml import MSMLConfig, MSMLNet, prepare_images
from ultrasound.video import FrameFormat, FrameSampling, decode_bytes

FRAMES_FILE = "frames.parquet"
VIDEOS_FILE = "videos.parquet"
VIDEOS_CSV = "videos.csv"
GRADCAM_FOLDER = "gradcam"
DISPLAY_SIZE = 224  # Grad-CAM overlays are at least this many pixels a side
MODEL_FILE = "model.pt"


class PredictError(ValueError):
    """A model or data set predict cannot use; the message names which and why."""


@dataclass
class LoadedMSML:
    """A trained MSML network (eval mode, CPU) and the config it was built from."""

    model: MSMLNet
    config: MSMLConfig
    source: str


def load_msml(uri: str, storage: Storage | None = None) -> LoadedMSML:
    """An MSML classifier from a run folder (its ``model.pt``, else ``msml.safetensors`` +
    ``msml.json``), a ``model.pt``, or a ``msml.safetensors`` (with ``msml.json`` beside it);
    local path or s3://. Loading never runs code (``weights_only`` / safetensors)."""
    storage = storage or Storage()
    location = parse_uri(uri)
    if not location.key.endswith((".pt", ".safetensors")):
        run = location
        location = run.join(MODEL_FILE)
        if not storage.exists(location):
            location = run.join(MSML_FILE)
    if not storage.exists(location):
        raise PredictError(f"--model: no MSML model at {uri} (expected a `sonoray msml` run folder, "
                           f"its {MODEL_FILE}, or its {MSML_FILE})")
    data = storage.read_bytes(location)
    check_model_file(location, data, storage)
    state = load_state(data, location.uri)
    if location.key.endswith(".safetensors"):
        meta_at = parent(location)[0].join(MSML_META_FILE)
        if not storage.exists(meta_at):
            raise PredictError(f"{location.uri}: {MSML_META_FILE} is missing beside it (it says how to build the network)")
        config_dict, weights = json.loads(storage.read_bytes(meta_at))["config"], state
    else:
        if not (isinstance(state, dict) and isinstance(state.get("model"), dict) and "config" in state):
            raise PredictError(f"{location.uri}: not an MSML model (a `sonoray msml` model.pt holds 'model' "
                               f"and 'config'; for a backbone use evaluate or simulate --init)")
        config_dict, weights = state["config"], state["model"]
    try:
        config = MSMLConfig.from_dict(config_dict)
        model = MSMLNet(config)
        model.load_state_dict(weights)
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        raise PredictError(f"{location.uri}: not an MSML model this version can build: {str(err).splitlines()[0]}") from None
    return LoadedMSML(model.eval(), config, location.uri)


class FrameScorer:
    """Ray Data actor UDF: the MSML network built once per actor.

    Shape: batch ``image`` ``(B, S, S, C)`` uint8 -> ``probs`` ``(B, L)`` float32 (sigmoid)."""

    def __init__(self, config: dict, state: dict, device: str = "cpu") -> None:
        import os

        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.config = MSMLConfig.from_dict(config)
        self.model = MSMLNet(self.config)
        self.model.load_state_dict(state)
        self.model.eval().to(device)
        self.device = device

    def __call__(self, batch: dict) -> dict:
        import torch

        with torch.no_grad():
            x = prepare_images(np.asarray(batch["image"]), self.config.image_size, self.config.channels)
            probs = torch.sigmoid(self.model(x.to(self.device))).float().cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "image"}
        out["probs"] = probs
        return out


@dataclass
class Predictions:
    """Per-frame scores (``frames``) and per-video scores (``videos``) as DataFrames."""

    frames: pd.DataFrame
    videos: pd.DataFrame
    findings: list[str]
    skipped: list[dict]


def score_frames(data: IngestedDataset, loaded: LoadedMSML, sampling: FrameSampling, *, gpu: bool = False,
                 cache: bool = True, workers: int | None = None) -> Predictions:
    """Stream and score every sampled frame of ``data`` (needs a connected Ray)."""
    config = loaded.config
    spec = StreamSpec(sampling=sampling, fmt=FrameFormat(channels=config.channels, size=config.image_size),
                      mode="frames", seed=0, cpus_per_task=0.5, cache=cache)
    stream = frame_stream(data, spec)
    resources = ray.cluster_resources()
    if gpu and not resources.get("GPU"):
        raise PredictError("--gpu: the Ray cluster has no GPU")
    size = workers or (int(resources.get("GPU", 1)) if gpu else max(1, int(resources.get("CPU", 1)) - 1))
    scored = stream.dataset.map_batches(
        FrameScorer,
        fn_constructor_kwargs=dict(config=config.to_dict(), state=loaded.model.state_dict(),
                                   device="cuda" if gpu else "cpu"),
        batch_size=64, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size),
        **({"num_gpus": 1} if gpu else {"num_cpus": 1}))
    try:
        got = collect_frames(stream, data, ["timestamp", "probs"], dataset=scored)
    except ValueError as err:
        raise PredictError(str(err)) from None
    return tabulate(data, got["video_id"], got["frame_index"], got["timestamp"], got["probs"],
                    list(config.findings), got.failed)


def tabulate(data: IngestedDataset, video_ids: np.ndarray, frame_index: np.ndarray, timestamps: np.ndarray,
             probs: np.ndarray, findings: list[str], skipped: list[dict]) -> Predictions:
    """The frame and video tables of scored frames. A video's score per finding is the mean of
    its frames' probabilities; ``<finding>_max`` is beside it.

    Shape: video_ids, frame_index, timestamps ``(N,)``; probs ``(N, L)``."""
    frames = pd.DataFrame({"video_id": video_ids, "frame_index": frame_index, "timestamp": timestamps})
    for j, name in enumerate(findings):
        frames[name] = probs[:, j].astype(np.float32)
    grouped = frames.groupby("video_id", sort=False)
    videos = grouped.size().rename("n_frames").to_frame()
    for name in findings:
        videos[name] = grouped[name].mean()
        videos[f"{name}_max"] = grouped[name].max()
    keys = {str(r["video_id"]): r["key"] for r in data.rows}
    videos = videos.reset_index()
    videos.insert(1, "key", [keys[v] for v in videos["video_id"]])
    return Predictions(frames, videos, findings, skipped)


def top_frames(predictions: Predictions, limit: int) -> list[tuple[str, int, str, float]]:
    """Up to ``limit`` (video_id, frame_index, finding, probability): the highest-scoring frame of
    each finding in turn (its best, then its second best, ...), no frame twice for one finding."""
    frames = predictions.frames
    ranked = {f: frames.sort_values(f, ascending=False, kind="stable").index.tolist() for f in predictions.findings}
    picks: list[tuple[str, int, str, float]] = []
    for rank in range(len(frames)):
        for name in predictions.findings:
            if len(picks) >= limit:
                return picks
            row = frames.loc[ranked[name][rank]]
            picks.append((str(row["video_id"]), int(row["frame_index"]), name, float(row[name])))
    return picks


def gradcam_pngs(data: IngestedDataset, loaded: LoadedMSML, predictions: Predictions, sampling: FrameSampling,
                 limit: int) -> dict[str, bytes]:
    """PNG overlays (file name -> bytes) of :func:`top_frames`: the frame at display size on
    the left, the Grad-CAM heatmap of that finding over it on the right. The heatmap is computed
    at the model's input size and upsampled."""
    config = loaded.config
    display = max(DISPLAY_SIZE, config.image_size)
    rows = {str(r["video_id"]): r for r in data.rows}
    decoded: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    raw_of: dict[str, bytes] = {}  # each video is read once; it is decoded at the model's size and at display size
    out: dict[str, bytes] = {}
    for video_id, index, name, prob in top_frames(predictions, limit):
        for size in (config.image_size, display):
            if (video_id, size) not in decoded:
                row = rows[video_id]
                if video_id not in raw_of:
                    raw_of[video_id] = data.storage.read_bytes(data.video_location(row))
                raw = raw_of[video_id]
                decoded[(video_id, size)] = {
                    i: image for i, _, image in decode_bytes(
                        raw, "." + row["key"].rsplit(".", 1)[-1], sampling,
                        FrameFormat(channels=config.channels, size=size),
                        frame_count=int(row.get("frame_count") or 0) or None, fps=float(row.get("fps") or 0) or None)}
        small, big = decoded[(video_id, config.image_size)].get(index), decoded[(video_id, display)].get(index)
        if small is None or big is None:  # the stream sampled a frame this decode did not: no overlay
            continue
        heat = grad_cam(loaded.model, prepare_images(small[None], config.image_size, config.channels),
                        predictions.findings.index(name))
        gray = big[..., 0] if big.shape[-1] == 1 else cv2.cvtColor(big, cv2.COLOR_RGB2GRAY)
        gray = np.ascontiguousarray(gray)
        side_by_side = np.concatenate([cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), overlay(gray, heat)], axis=1)
        ok, png = cv2.imencode(".png", side_by_side)
        if not ok:
            raise PredictError(f"could not encode the Grad-CAM overlay of {video_id} frame {index}")
        out[f"{name}_{prob:.3f}_{safe_file_name(video_id)}_f{index:05d}.png"] = png.tobytes()
    return out


def write_predictions(predictions: Predictions, pngs: dict[str, bytes], out: Location, storage: Storage) -> dict:
    """Write the tables and overlays under ``out``, ``complete.json`` last; returns their URIs."""
    storage.check(out, create_bucket=True)
    files = FinalFiles(out, storage)
    uris = {}
    for name, table in ((FRAMES_FILE, predictions.frames), (VIDEOS_FILE, predictions.videos)):
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        uris[name] = files.write(name, buffer.getvalue()).uri
    uris[VIDEOS_CSV] = files.write(VIDEOS_CSV, predictions.videos.to_csv(index=False).encode()).uri
    uris[GRADCAM_FOLDER] = [files.write(f"{GRADCAM_FOLDER}/{name}", png).uri for name, png in pngs.items()]
    files.complete()
    return uris


def predict(data: IngestedDataset, model: str | LoadedMSML, out_uri: str, *, sampling: FrameSampling = FrameSampling(),
            gradcam: int = 6, gpu: bool = False, cache: bool = True, storage: Storage | None = None,
            on_progress: Callable[[str], None] = lambda message: None) -> dict:
    """Score every video of ``data`` with an MSML run (a URI for :func:`load_msml`, or what it
    returned) and write the results under ``out_uri``; returns a summary (counts, output URIs,
    the top videos per finding, skipped videos)."""
    storage = storage or data.storage
    loaded = model if isinstance(model, LoadedMSML) else load_msml(model, storage)
    out = parse_uri(out_uri)
    on_progress(f"predict: {len(data.rows)} videos with {loaded.source} "
                f"({', '.join(loaded.config.findings)}; {loaded.config.image_size}px)")
    predictions = score_frames(data, loaded, sampling, gpu=gpu, cache=cache)
    on_progress(f"predict: scored {len(predictions.frames)} frames of {len(predictions.videos)} videos"
                + (f"; {len(predictions.skipped)} video(s) yielded no frame" if predictions.skipped else ""))
    pngs = gradcam_pngs(data, loaded, predictions, sampling, gradcam) if gradcam > 0 else {}
    uris = write_predictions(predictions, pngs, out, storage)
    on_progress(f"predict: wrote {out.uri} ({len(pngs)} Grad-CAM overlays)")
    top = {name: predictions.videos.sort_values(name, ascending=False)[["video_id", name]].head(5)
           .rename(columns={name: "score"}).to_dict("records") for name in predictions.findings}
    return {"model": loaded.source, "data": data.root.uri, "out": out.uri, "videos": len(predictions.videos),
            "frames": len(predictions.frames), "findings": predictions.findings, "files": uris,
            "top_videos": top, "skipped_videos": predictions.skipped}
