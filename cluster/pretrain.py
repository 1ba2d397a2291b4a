"""USCL pretraining as a data-parallel Ray Train job fed by the frame stream.

USCL (Chen et al., MICCAI 2021): one training item is one video; each epoch the frame stream
(``cluster.frames``, clips mode, unseeded) samples ``frames_per_video`` fresh frames of every
video, and each worker turns its shard's videos into sample pairs and trains with NT-Xent (whose
negatives are gathered from every worker) plus the semi-supervised cross-entropy on the videos
whose class label may be used. ``batch_videos`` is the global batch: each of W workers takes
``batch_videos // W`` videos per step.

Which labels may be used is decided on the driver (:func:`plan_labels`): none with
``unlabelled`` or plain SimCLR; otherwise every labelled video except the test and validation
videos of a held-out fold (:class:`cluster.evaluate.HoldoutSpec`), so that the checkpoint can be
evaluated on that fold without its test labels having leaked into pretraining, nor its validation
labels into model selection. The checkpoint records the ids of the videos whose labels were used
(``labelled_video_ids``) and ``sonoray evaluate`` refuses a checkpoint whose ids meet the test or
validation videos of a fold.

Checkpoint state (``<out>/model.pt`` without the optimizer): ``model`` (USCLModel state dict:
``backbone.*``, ``projection.*``, ``classifier.*``), ``config`` (USCLConfig as a dict), ``classes``,
``labelled_video_ids``, ``holdout``, ``epoch`` (epochs finished), ``history`` (one dict per
epoch, loss, images, images_per_s, lr, skipped_videos, seconds, session_start, run_id:
:func:`cluster.train.run_epochs`; ``epoch`` counts the epochs finished).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from cluster.claim import claim_out
from cluster.completion import FinalFiles
from cluster.dataset import IngestedDataset
from cluster.evaluate import HoldoutSpec
from cluster.frames import StreamSpec, frame_stream
from cluster.storage import Storage, parse_uri
from cluster.tracking import TrackedRun, TrackerSpec
from cluster.train import (
    MAX_FAILED_FRACTION,
    Method,
    ScaleSpec,
    check_run_slot,
    export_final,
    final_state,
    fit,
    prepare_model,
    raise_if_aborted,
    resume_point,
    run_epochs,
    unwrap,
    worker_context,
)
from ultrasound.uscl import (
    USCLConfig,
    USCLModel,
    lr_at_epoch,
    make_augment,
    make_losses,
    make_optimizer,
    set_learning_rate,
    train_step,
)
from ultrasound.video import FrameFormat, FrameSampling

RUN_SPEC_FILE = "pretrain.json"
KEEP_CHECKPOINTS = 2  # model + Adam state is ~3x the model: keep the last two epochs only
VIEWS_PER_VIDEO = 2  # images per video per step: the two SPG views


@dataclass(frozen=True)
class LabelPlan:
    """The class labels pretraining may use.

    ``class_of`` maps the video ids whose labels are used to class indices into ``classes``;
    every other video (unlabelled, masked, or all of them without labels) trains with -1.
    """

    classes: tuple[str, ...]
    class_of: Mapping[str, int] = field(default_factory=dict)
    masked_video_ids: tuple[str, ...] = ()

    @property
    def labelled_video_ids(self) -> list[str]:
        return sorted(self.class_of)


def plan_labels(data: IngestedDataset, *, use_labels: bool,
                holdout: HoldoutSpec | None = None) -> LabelPlan:
    """Classes are the sorted labels of the manifest; with ``use_labels`` every labelled video
    keeps its class except the test and validation videos of ``holdout``'s fold (their labels are
    never used: the test labels would leak into the score, the validation labels into the choice
    of the probe's C / the fine-tuning epoch).
    """
    classes = tuple(data.classes)
    masked = tuple(holdout.masked_video_ids(data)) if holdout is not None else ()
    if not use_labels:
        return LabelPlan(classes, {}, masked)
    index = {c: i for i, c in enumerate(classes)}
    hidden = set(masked)
    class_of = {str(r["video_id"]): index[r["label"]] for r in data.rows
                if r.get("label") and str(r["video_id"]) not in hidden}
    return LabelPlan(classes, class_of, masked)


@dataclass(frozen=True)
class PretrainResult:
    history: list[dict]
    checkpoint_uri: str
    images_per_s: float
    classes: list[str]
    labelled_video_ids: list[str]
    skipped_videos: list[dict] = field(default_factory=list)
    cache: dict | None = None

    def as_json(self) -> dict:
        """The job's --json object."""
        return {
            "epochs": len(self.history),
            "loss": [round(float(h["loss"]), 6) for h in self.history],
            "images_per_s": round(self.images_per_s, 2),
            "skipped_videos_per_epoch": [int(h.get("skipped_videos", 0)) for h in self.history],
            "skipped_videos": self.skipped_videos,
            "cache": self.cache,
            "checkpoint": self.checkpoint_uri,
            "classes": self.classes,
            "labelled_videos": len(self.labelled_video_ids),
        }


def steady_images_per_s(history: list[dict]) -> float:
    """Median of the per-epoch rates (robust to the first epoch's pipeline start-up)."""
    rates = [float(h["images_per_s"]) for h in history if h.get("images_per_s")]
    return float(np.median(rates)) if rates else 0.0


def read_run_spec(out_uri: str, storage: Storage | None = None) -> dict | None:
    """What an earlier run under ``out_uri`` was started with (config, labels), or None."""
    storage = storage or Storage()
    location = parse_uri(out_uri).join(RUN_SPEC_FILE)
    if not storage.exists(location):
        return None
    return json.loads(storage.read_bytes(location))


def default_decode_cpus(scale: ScaleSpec, cluster_cpus: float) -> float:
    """CPU share of one decode task of the training stream.

    GPU nodes: the stream's default (several decodes per CPU hide each one's object fetch).
    CPU-only clusters, where training and decoding share the cores: one decode task per CPU
    left to Ray Data (at most 1.0, less when less than one CPU is left), so decoding never takes
    a training worker's core (POCUS on 2 CPUs, 1 worker: 224 px 5.1 vs 3.7 images/s with two
    decodes per CPU, 64 px 13.6 vs 11.1)."""
    if scale.gpu:
        return StreamSpec.cpus_per_task
    left = cluster_cpus - scale.workers * scale.resources(cluster_cpus)["CPU"]
    return max(0.25, min(1.0, left))


def stream_spec(cfg: USCLConfig, decode_cpus: float, cache: bool = True) -> StreamSpec:
    """Clips of ``frames_per_video`` frames at the model size, re-sampled every epoch (from the
    decoded-frame cache unless ``cache`` is off), videos visited in an order seeded by ``cfg.seed``."""
    return StreamSpec(
        sampling=FrameSampling(per_video=cfg.frames_per_video),
        fmt=FrameFormat(channels=cfg.channels, size=cfg.image_size),
        mode="clips", seed=None, cpus_per_task=decode_cpus, cache=cache, order_seed=cfg.seed)


def pretrain(data: IngestedDataset, out_uri: str, cfg: USCLConfig, scale: ScaleSpec, *, resume: bool = False,
             storage: Storage | None = None, **kwargs: Any) -> PretrainResult:
    """:func:`pretrain_claimed` while holding the exclusive claim on ``out_uri`` (refused when
    another run holds it; a stale claim is taken over with ``resume``)."""
    storage = storage or Storage()
    with claim_out(parse_uri(out_uri), storage, resume=resume):
        return pretrain_claimed(data, out_uri, cfg, scale, resume=resume, storage=storage, **kwargs)


def pretrain_claimed(
    data: IngestedDataset, out_uri: str, cfg: USCLConfig, scale: ScaleSpec, *,
    unlabelled: bool = False, holdout: HoldoutSpec | None = None,
    init_state: Mapping[str, torch.Tensor] | None = None, resume: bool = False,
    storage: Storage | None = None, loop_extras: Mapping[str, Any] | None = None,
    datasets: Mapping[str, ray.data.Dataset] | None = None, decode_cpus: float | None = None,
    cache: bool = True, max_failed_fraction: float = MAX_FAILED_FRACTION,
    tracker: TrackerSpec | None = None,
) -> PretrainResult:
    """Pretrain on every video of ``data``; returns the per-epoch history and ``<out>/model.pt``.

    Args:
        cfg: the resolved USCLConfig; ``num_classes`` is set here from the manifest's classes
            (0 when no label is used).
        init_state: backbone state dict to start from (``--init``); ignored when a checkpoint
            is restored.
        resume: continue the run under ``out_uri`` from its last checkpoint.
        loop_extras: extra keys for the worker loop (``_crash_once_marker``, for tests).
        datasets: replaces the frame stream (``{"train": ds}`` with columns frames, n_frames,
            video_id); for benchmarks.
        decode_cpus: CPU share of one decode task (default: :func:`default_decode_cpus`).
        cache: read (and fill) the decoded-frame cache beside the data set.
        max_failed_fraction: stop when an epoch loses more than this share of the videos.
        tracker: log the settings, every epoch and the final files to MLflow / TensorBoard.
    """
    storage = storage or Storage()
    if cfg.batch_videos < scale.workers:
        raise ValueError(f"batch_videos ({cfg.batch_videos}) must be >= workers ({scale.workers})")
    plan = plan_labels(data, use_labels=not unlabelled and cfg.semi_supervised, holdout=holdout)
    cfg = cfg.replace(num_classes=len(plan.classes) if plan.class_of else 0)
    out = parse_uri(out_uri)
    check_run_slot(out.uri, storage, resume)
    spec = {"config": cfg.to_dict(), "unlabelled": bool(unlabelled),
            "holdout": holdout.as_dict() if holdout else None, "data": data.root.uri}
    storage.check(out, create_bucket=True)
    storage.write_bytes(out.join(RUN_SPEC_FILE), json.dumps(spec, indent=1).encode())
    stream = None
    if datasets is None:
        if decode_cpus is None:
            decode_cpus = default_decode_cpus(scale, float(ray.cluster_resources().get("CPU", 1)))
        stream = frame_stream(data, stream_spec(cfg, decode_cpus, cache))
        datasets = {"train": stream.dataset.select_columns(["video_id", "frames", "n_frames"])}
    loop_config = {
        "uscl": cfg.to_dict(),
        "class_of": dict(plan.class_of),
        "classes": list(plan.classes),
        "holdout": spec["holdout"],
        "init_state": ray.put(dict(init_state)) if init_state is not None else None,
        "stream_log": stream.log if stream is not None else None,
        "n_videos": len(data.rows),
        "max_failed_fraction": float(max_failed_fraction),
        **dict(loop_extras or {}),
    }
    with TrackedRun(tracker, {"job": "pretrain", **spec}) as tracked:
        result = fit(pretrain_loop, loop_config, dict(datasets), out_uri, scale, resume=resume,
                     storage=storage, keep_checkpoints=KEEP_CHECKPOINTS, tracking=tracked.spec)
        raise_if_aborted(stream, out.uri)
        final = final_state(result, out.uri)
        history = list(final["history"])
        files = FinalFiles(out, storage)
        uri = export_final(result, files, history, exclude=("optimizer",))
        skipped = stream.skipped_videos() if stream is not None else []
        files.write(RUN_SPEC_FILE, json.dumps({**spec, "skipped_videos": skipped}, indent=1).encode())
        files.complete()
        tracked.attach(files)
    return PretrainResult(history, uri, steady_images_per_s(history), list(final["classes"]),
                          list(final["labelled_video_ids"]), skipped,
                          stream.cache_stats() if stream is not None and stream.cache_uri else None)


# -- inside a worker ---------------------------------------------------------------------------
def _maybe_crash(config: Mapping[str, Any], rank: int, world: int, epoch: int) -> None:
    """Fault injection for tests: with ``_crash_once_marker`` set, the last rank (rank 1 with two
    workers) dies at the start of the 0-based epoch ``_crash_epoch`` (default 1) unless the marker
    exists. It first waits a few seconds so Ray Train has registered the previous epoch's checkpoint."""
    marker = config.get("_crash_once_marker")
    if not marker or rank != world - 1 or epoch != int(config.get("_crash_epoch", 1)):
        return
    if os.path.exists(marker):
        return
    with open(marker, "w") as handle:
        handle.write(f"rank {rank} died at epoch {epoch}\n")
    time.sleep(float(config.get("_crash_delay_s", 5.0)))
    os._exit(1)


def pretrain_loop(config: dict) -> None:
    """The per-worker loop: the USCL model and its step, run by :func:`cluster.train.run_epochs`."""
    cfg = USCLConfig.from_dict(config["uscl"])
    ctx = worker_context(config)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = USCLModel.from_config(cfg)
    init_state = config.get("init_state")
    if init_state is not None:
        model.backbone.load_state_dict(ray.get(init_state))
    model = prepare_model(model)
    optimizer = make_optimizer(model, cfg)
    labelled = set(config["class_of"])
    fed: set[str] = set()  # the videos whose labels this rank's loss received
    resumed = resume_point()
    if resumed.state is not None:
        unwrap(model).load_state_dict(resumed.state["model"])
        optimizer.load_state_dict(resumed.state["optimizer"])
        labelled |= set(resumed.state.get("labelled_video_ids", []))  # provenance accumulates
        fed |= set(resumed.state.get("labels_fed_video_ids", []))
    augment = make_augment(cfg)
    ntxent, ce = make_losses(cfg)
    autocast = torch.bfloat16 if ctx.device.type == "cuda" else None
    class_of: dict[str, int] = config["class_of"]
    rng: np.random.Generator | None = None  # the views' augmentation, seeded per epoch by begin_epoch

    def begin_epoch(epoch: int) -> dict:
        nonlocal rng
        _maybe_crash(config, ctx.rank, ctx.world_size, epoch)
        lr = lr_at_epoch(epoch, cfg)
        set_learning_rate(optimizer, lr)
        rng = np.random.default_rng([cfg.seed, ctx.rank, epoch])
        return {"lr": lr}

    def step(batch: dict, epoch: int) -> tuple[float, float]:
        videos = [str(v) for v in batch["video_id"]]
        class_index = np.array([class_of.get(v, -1) for v in videos], dtype=np.int64)
        fed.update(v for v, c in zip(videos, class_index) if c >= 0)
        batch = {"frames": np.require(batch["frames"], requirements="W"),  # torch wants writable
                 "n_frames": np.require(batch["n_frames"], requirements="W"),  # arrays
                 "class_index": class_index}  # what the cross-entropy term receives (-1: no label)
        loss = train_step(model, optimizer, batch, augment, cfg, rng, ntxent=ntxent, ce=ce,
                          autocast_dtype=autocast)
        return loss, 1.0  # the epoch's loss: the mean over steps

    def checkpoint(epochs_done: int, history: list[dict]) -> dict:
        return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "config": cfg.to_dict(), "classes": list(config["classes"]),
                "labelled_video_ids": sorted(labelled), "labels_fed_video_ids": sorted(fed),
                "holdout": config.get("holdout"),
                "epoch": epochs_done, "history": history}

    run_epochs(Method(
        job="pretrain", epochs=cfg.epochs, seed=cfg.seed, batch_rows=max(1, cfg.batch_videos // ctx.world_size),
        # ``_fixed_batches`` (benchmarks/uscl_budget.py's control): the same batches every epoch
        shuffle_rows=0 if config.get("_fixed_batches") else 2 * max(1, cfg.batch_videos // ctx.world_size),
        min_rows=2 if ctx.world_size == 1 else 1,  # NT-Xent needs a negative among all ranks' videos
        images_per_row=VIEWS_PER_VIDEO, step=step, checkpoint=checkpoint, begin_epoch=begin_epoch,
        describe=lambda metrics: f" lr {metrics['lr']:.2e}"), ctx, config, resumed)
