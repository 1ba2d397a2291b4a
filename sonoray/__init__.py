"""sonoray from Python: the same pieces the CLI drives, for notebooks and scripts.

>>> import sonoray
>>> net = sonoray.load_backbone("runs/pretrain/backbone.safetensors")   # a ResNet18Backbone
>>> msml = sonoray.load_msml("runs/msml")                                # an MSMLNet, eval mode
>>> data = sonoray.open_dataset("s3://bucket/lung")                      # an ingested data set
>>> stream = sonoray.frame_stream(data, fps=3, size=224)                 # frames on Ray Data
>>> sonoray.predict("runs/msml", data, "runs/predicted")                 # frames/videos tables

Everything here is a thin wrapper: the science lives in ``ultrasound/``, the Ray and object-storage
code in ``cluster/``. docs/python.md has the details.
"""
from __future__ import annotations

from typing import Any

__all__ = ["load_backbone", "load_msml", "open_dataset", "frame_stream", "predict", "__version__"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sonoray")
    except PackageNotFoundError:
        return "unknown"


__version__ = _version()


def load_backbone(path: str, channels: int | None = None, storage: Any = None):
    """A :class:`ultrasound.backbone.ResNet18Backbone` (eval mode) with the weights of ``path``:
    ``backbone.safetensors``, a ``sonoray pretrain``/``msml`` ``model.pt``, or a torchvision
    ResNet-18 state dict; local or s3://. ``channels`` defaults to the file's first conv."""
    from cluster.train import init_backbone

    backbone, _ = init_backbone(path, channels, storage)
    return backbone.eval()


def load_msml(path: str, storage: Any = None):
    """The :class:`ultrasound.msml.MSMLNet` (eval mode; ``.config`` says its findings, size and
    channels) of a ``sonoray msml`` run folder, its ``model.pt`` or its ``msml.safetensors``."""
    from cluster.predict import load_msml as load

    return load(path, storage).model


def open_dataset(uri: str, storage: Any = None):
    """An ingested data set (``sonoray ingest --to URI``): ``.rows`` (the manifest), ``.findings``."""
    from cluster.dataset import load_dataset

    return load_dataset(uri, storage)


def frame_stream(data, *, fps: float | None = None, max_per_video: int | None = None, size: int = 224,
                 channels: int = 1, cache: bool = True, seed: int = 0):
    """The frames of ``data`` as a lazy Ray Dataset (``.dataset``: rows of video_id, frame_index,
    timestamp, findings, image ``(size, size, channels)`` uint8), decoded once and cached beside
    the data set. Starts a local Ray when none is connected."""
    from cluster.frames import StreamSpec, frame_stream as stream
    from cluster.runtime import connect
    from ultrasound.video import FrameFormat, FrameSampling

    connect()
    spec = StreamSpec(sampling=FrameSampling(fps=fps, max_per_video=max_per_video),
                      fmt=FrameFormat(channels=channels, size=size), mode="frames", seed=seed, cache=cache)
    return stream(data, spec)


def predict(model: str, data, out: str, *, fps: float | None = None, max_per_video: int | None = None,
            gradcam: int = 6, gpu: bool = False, storage: Any = None) -> dict:
    """``sonoray predict`` from Python: score every video of ``data`` (an :func:`open_dataset`
    result or its URI) with the MSML run ``model``; writes frames.parquet, videos.parquet/.csv and
    gradcam/ under ``out`` and returns the summary. Starts a local Ray when none is connected."""
    from cluster.dataset import load_dataset
    from cluster.predict import predict as run
    from cluster.runtime import connect
    from ultrasound.video import FrameSampling

    connect()
    if isinstance(data, str):
        data = load_dataset(data, storage)
    return run(data, model, out, sampling=FrameSampling(fps=fps, max_per_video=max_per_video), gradcam=gradcam,
               gpu=gpu, storage=storage)
