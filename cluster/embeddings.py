"""The sample table the labelling-budget simulator runs on: one row per sampled frame.

Frames are sampled from every video of an ingested data set (default 3 per second, at most 30
per video) and streamed through Ray Data (cluster/frames.py). In ``embeddings`` mode a frozen
ResNet-18 trunk (random init, or a USCL / any backbone checkpoint through ``init``) embeds them
ONCE, in a Ray Data ``map_batches`` over an autoscaling actor pool (each actor builds the model
once in its constructor); ``finetune`` mode keeps the resized frames instead.

The result is cached at ``<cache>/<kind>-<key>.npz`` through :class:`Storage` (local or S3),
where the key hashes what decides its content: the data set (manifest checksums), the
checkpoint's bytes, the sampling and the image format. A rerun with the same inputs reads the
cache and skips Ray Data entirely.

Rows are sorted by (manifest order of the video, frame index), so a row's position (the
"global index" the oracle and the experiments use) does not depend on Ray Data's scheduling.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import ray

from cluster.completion import check_model_file
from cluster.dataset import IngestedDataset
from cluster.frames import StreamSpec, collect_frames, frame_stream
from cluster.storage import Location, Storage, parse_uri
from ultrasound.checkpoint import load_state
from ultrasound.split_unit import split_units
from ultrasound.video import FrameFormat, FrameSampling

KINDS = ("embeddings", "images")
CACHE_VERSION = 1


@dataclass(frozen=True)
class SampleSpec:
    """How the sample table is built.

    Attributes:
        kind: ``"embeddings"`` (frozen-trunk features, ``(N, 512)`` float32) or ``"images"``
            (the resized frames, ``(N, S, S, C)`` uint8, for finetune mode).
        fps: frames kept per second of video (``None``: every frame).
        max_per_video: cap on frames per video (evenly thinned), ``None`` for no cap.
        size: square side frames are resized to (the trunk's input size).
        channels: 1 (grayscale) or 3 (gray repeated, as USCL trains).
        init: URI of a backbone checkpoint (a USCL ``model.pt`` whose state dict sits under
            ``"model"`` with ``backbone.`` keys, or any ResNet-18 state dict); ``None`` = random
            init from ``seed``.
        seed: seed of the random init (ignored with ``init``).
        batch_size: frames per forward pass.
        workers: maximum embedding actors (``None``: one per CPU left after the decoders, or
            one per GPU with ``gpu``).
        gpu: embed on GPUs (one per actor).
        frame_cache: read (and fill) the decoded-frame cache beside the data set; not part of
            the table's key (cached frames equal decoded ones).
    """

    kind: str = "embeddings"
    fps: float | None = 3.0
    max_per_video: int | None = 30
    size: int = 224
    channels: int = 3
    init: str | None = None
    seed: int = 0
    batch_size: int = 32
    workers: int | None = None
    gpu: bool = False
    frame_cache: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32 (ResNet-18 downsamples 32x), got {self.size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        FrameSampling(fps=self.fps, max_per_video=self.max_per_video)  # validates
        FrameFormat(channels=self.channels, size=self.size)


@dataclass(frozen=True, eq=False)
class SampleTable:
    """One row per sampled frame, sorted by (video in manifest order, frame index).

    Attributes:
        key: the cache key (data + checkpoint + sampling + format).
        findings: finding names, the column order of ``labels``.
        video_id, patient_id: ``(N,)`` str (``patient_id`` is "" when unknown).
        frame_index: ``(N,)`` int64.
        labels: ``(N, L)`` uint8 ground truth (the video's findings).
        features: ``(N, 512)`` float32 embeddings, or ``(N, S, S, C)`` uint8 frames.
        kind: ``"embeddings"`` or ``"images"``.
        skipped: videos the stream could not decode (key + reason).
    """

    key: str
    findings: tuple[str, ...]
    video_id: np.ndarray
    patient_id: np.ndarray
    frame_index: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    kind: str = "embeddings"
    skipped: tuple[dict, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def groups(self) -> np.ndarray:
        """``(N,)`` split unit: the patient, or the video when the patient is unknown
        (:func:`ultrasound.split_unit.split_units`)."""
        return split_units(self.patient_id, self.video_id)

    def select_findings(self, names: list[str] | tuple[str, ...] | None) -> "SampleTable":
        """The same rows with only the finding columns ``names`` (in that order)."""
        if names is None:
            return self
        unknown = [n for n in names if n not in self.findings]
        if unknown or not names:
            raise ValueError(f"unknown finding column(s) {unknown}; the data set has {list(self.findings)}")
        columns = [self.findings.index(n) for n in names]
        return replace(self, findings=tuple(names), labels=self.labels[:, columns])


def manifest_digest(data: IngestedDataset) -> str:
    """A digest of what the data set holds: its root and every video's checksum and labels."""
    h = hashlib.sha256(data.root.uri.encode())
    h.update(json.dumps(list(data.findings)).encode())
    for row in data.rows:
        h.update(json.dumps([row["video_id"], row.get("sha256"), row.get("patient_id") or "",
                             [row[f] for f in data.findings]]).encode())
    return h.hexdigest()


def cache_key(data: IngestedDataset, spec: SampleSpec, checkpoint_sha256: str | None) -> str:
    decisive = {
        "version": CACHE_VERSION, "data": manifest_digest(data), "kind": spec.kind, "fps": spec.fps,
        "max_per_video": spec.max_per_video, "size": spec.size, "channels": spec.channels,
        "init": checkpoint_sha256, "seed": None if checkpoint_sha256 or spec.kind == "images" else spec.seed,
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:20]


def load_samples(
    data: IngestedDataset,
    spec: SampleSpec,
    cache: Location,
    storage: Storage,
    on_progress: Callable[[str], None] = lambda message: None,
) -> tuple[SampleTable, bool]:
    """The sample table, from the cache or computed (and cached); returns ``(table, cached)``."""
    checkpoint = storage.read_bytes(parse_uri(spec.init)) if spec.init else None
    if checkpoint is not None:  # refuse an unfinished run's model, or one that is not plain
        check_model_file(parse_uri(spec.init), checkpoint, storage)  # data, before any work
        load_state(checkpoint, spec.init)
    checkpoint_sha = hashlib.sha256(checkpoint).hexdigest() if checkpoint is not None else None
    key = cache_key(data, spec, checkpoint_sha)
    location = cache.join(f"{spec.kind}-{key}.npz")
    if storage.exists(location):
        on_progress(f"samples: reusing {location.uri}")
        return read_table(storage.read_bytes(location)), True
    started = time.perf_counter()
    table = compute_samples(data, spec, key, checkpoint)
    storage.write_bytes(location, table_bytes(table))
    on_progress(f"samples: {len(table)} frames from {len(np.unique(table.video_id))} videos "
                f"({spec.kind}) in {time.perf_counter() - started:.1f} s -> {location.uri}")
    return table, False


def compute_samples(data: IngestedDataset, spec: SampleSpec, key: str, checkpoint: bytes | None) -> SampleTable:
    """Run the Ray Data pipeline (needs a connected Ray)."""
    stream_spec = StreamSpec(
        sampling=FrameSampling(fps=spec.fps, max_per_video=spec.max_per_video),
        fmt=FrameFormat(channels=spec.channels, size=spec.size),
        cpus_per_task=0.5,
        cache=spec.frame_cache,
    )
    stream = frame_stream(data, stream_spec)
    ds = stream.dataset
    if spec.kind == "embeddings":
        cpus = float(ray.cluster_resources().get("CPU", 1))
        gpus = int(ray.cluster_resources().get("GPU", 0)) if spec.gpu else 0
        if spec.gpu and gpus == 0:
            raise ValueError("gpu=True but the Ray cluster has no GPU")
        workers = spec.workers or (gpus if spec.gpu else max(1, int(cpus) - 1))
        resources = {"num_gpus": 1} if spec.gpu else {"num_cpus": 1}
        ds = ds.map_batches(
            FrameEmbedder,
            fn_constructor_kwargs=dict(checkpoint=checkpoint, channels=spec.channels, size=spec.size,
                                       seed=spec.seed, device="cuda" if spec.gpu else "cpu"),
            batch_size=spec.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
            **resources,
        )
        column = "embedding"
    else:
        column = "image"
    got = collect_frames(stream, data, ["patient_id", "findings", column], dataset=ds)
    return SampleTable(
        key=key,
        findings=tuple(data.findings),
        video_id=got["video_id"],
        patient_id=got["patient_id"].astype(str),
        frame_index=got["frame_index"],
        labels=np.rint(got["findings"]).astype(np.uint8).reshape(len(got), len(data.findings)),
        features=got[column].astype(np.float32) if spec.kind == "embeddings" else got[column].astype(np.uint8),
        kind=spec.kind,
        skipped=tuple(got.failed),
    )


class FrameEmbedder:
    """Ray Data actor UDF: a frozen ResNet-18 trunk built once per actor.

    Shape: batch ``image`` ``(B, S, S, C)`` uint8 -> ``embedding`` ``(B, 512)`` float32.
    """

    def __init__(self, checkpoint: bytes | None, channels: int, size: int, seed: int, device: str = "cpu") -> None:
        import torch

        from ultrasound.backbone import ResNet18Backbone, adopt_weights, read_state

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = ResNet18Backbone(in_channels=channels)
        if checkpoint is not None:
            adopt_weights(self.model, read_state(checkpoint, "the --init checkpoint"), "the --init checkpoint")
        self.model.eval().to(device)
        self.device, self.size, self.channels = device, size, channels

    def __call__(self, batch: dict) -> dict:
        import torch

        from ultrasound.msml import prepare_images

        with torch.no_grad():
            x = prepare_images(np.array(batch["image"]), self.size, self.channels).to(self.device)
            embedding = self.model(x).float().cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "image"}
        out["embedding"] = embedding
        return out


def principal_components(features: np.ndarray, dims: int) -> np.ndarray:
    """Project embeddings on their top ``dims`` principal components (unsupervised: all rows,
    no labels, as pool-based active learning may use the unlabelled pool).

    Deterministic, so a resumed run projects bit for bit the same: the ``D x D`` covariance is
    decomposed with ``eigh`` in float64 on one BLAS thread, and each component's sign is fixed
    so that its largest loading is positive.

    Shape: ``(N, D)`` -> ``(N, dims)`` float32, centred.

    Example:
        >>> x = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
        >>> principal_components(x, 1)[:, 0].tolist()
        [-2.0, 0.0, 2.0]
    """
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {x.shape}")
    if not 1 <= dims <= x.shape[1]:
        raise ValueError(f"dims must be in [1, {x.shape[1]}], got {dims}")
    centred = x - x.mean(axis=0)
    with threadpool_limits(limits=1, user_api="blas"):
        values, vectors = np.linalg.eigh(centred.T @ centred / (x.shape[0] - 1))
        top = vectors[:, np.argsort(values, kind="stable")[::-1][:dims]]
        top = top * np.sign(top[np.abs(top).argmax(axis=0), np.arange(dims)])
        return (centred @ top).astype(np.float32)


def table_bytes(table: SampleTable) -> bytes:
    """Serialise to an ``.npz`` (no pickles: strings are stored as fixed-width unicode)."""
    meta = {"key": table.key, "findings": list(table.findings), "kind": table.kind,
            "skipped": list(table.skipped), "version": CACHE_VERSION}
    sink = io.BytesIO()
    np.savez(sink, meta=np.array(json.dumps(meta)), video_id=table.video_id.astype(str),
             patient_id=table.patient_id.astype(str), frame_index=table.frame_index,
             labels=table.labels, features=table.features)
    return sink.getvalue()


def read_table(data: bytes) -> SampleTable:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        return SampleTable(
            key=meta["key"], findings=tuple(meta["findings"]), video_id=npz["video_id"],
            patient_id=npz["patient_id"], frame_index=npz["frame_index"], labels=npz["labels"],
            features=npz["features"], kind=meta["kind"], skipped=tuple(meta["skipped"]),
        )


def spec_dict(spec: SampleSpec) -> dict:
    return asdict(spec)
