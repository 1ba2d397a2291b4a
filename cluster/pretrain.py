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
``labelled_video_ids``, ``holdout``, ``epoch`` (0-based, last finished), ``history`` (one dict per
epoch: epoch, loss, images_per_s, lr, seconds, session_start, run_id).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from cluster.claim import claim_out
from cluster.completion import FinalFiles
from cluster.dataset import IngestedDataset
from cluster.evaluate import HoldoutSpec
from cluster.frames import StreamSpec, frame_stream
from cluster.progress import format_eta
from cluster.storage import Storage, parse_uri
from cluster.tracking import TrackedRun, TrackerSpec
from cluster.train import (
    MAX_FAILED_FRACTION,
    RUN_NAME,
    ScaleSpec,
    TrainingError,
    check_epoch_inputs,
    dataset_shard,
    epoch_batches,
    export_final,
    fit,
    raise_if_aborted,
    stop_run,
    prepare_model,
    read_checkpoint_folder,
    report_epoch,
    restore_state,
    run_location,
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
    cfg = dataclasses.replace(cfg, num_classes=len(plan.classes) if plan.class_of else 0)
    out = parse_uri(out_uri)
    exists = storage.exists(run_location(out_uri).join(RUN_NAME))
    if exists and not resume:
        raise TrainingError(f"{out.uri} already holds a training run: pass --resume to continue "
                            f"it, or choose another --out")
    if resume and not exists:
        raise TrainingError(f"--resume: no run to resume under {out.uri}")
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
        "run_id": uuid.uuid4().hex[:12],  # tells this invocation's epochs from a resumed one's
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
        with result.checkpoint.as_directory() as folder:
            final = read_checkpoint_folder(folder)
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
def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max) of per-worker numbers over all workers; the numbers themselves alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def _maybe_crash(config: Mapping[str, Any], rank: int, world: int, epoch: int) -> None:
    """Fault injection for tests: with ``_crash_once_marker`` set, the last rank (rank 1 with two
    workers) dies at the start of epoch ``_crash_epoch`` (default 1) unless the marker exists.
    It first waits a few seconds so Ray Train has registered the previous epoch's checkpoint."""
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
    """The per-worker loop: restore, then one pass over the shard per epoch, reporting each."""
    cfg = USCLConfig.from_dict(config["uscl"])
    ctx = worker_context(config)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = USCLModel.from_config(cfg)
    init_state = config.get("init_state")
    if init_state is not None:
        model.backbone.load_state_dict(ray.get(init_state))
    model = prepare_model(model)
    optimizer = make_optimizer(model, cfg)
    history: list[dict] = []
    labelled = set(config["class_of"])
    start = 0
    restored = restore_state()
    if restored is not None:
        unwrap(model).load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optimizer"])
        history = [h for h in restored["history"] if h["epoch"] <= restored["epoch"]]
        labelled |= set(restored.get("labelled_video_ids", []))  # provenance accumulates
        start = int(restored["epoch"]) + 1
    augment = make_augment(cfg)
    ntxent, ce = make_losses(cfg)
    autocast = torch.bfloat16 if ctx.device.type == "cuda" else None
    class_of: dict[str, int] = config["class_of"]
    local_batch = max(1, cfg.batch_videos // ctx.world_size)
    shard = dataset_shard("train")
    log, seen = config.get("stream_log"), 0
    for epoch in range(start, cfg.epochs):
        _maybe_crash(config, ctx.rank, ctx.world_size, epoch)
        lr = lr_at_epoch(epoch, cfg)
        set_learning_rate(optimizer, lr)
        rng = np.random.default_rng([cfg.seed, ctx.rank, epoch])
        loss_sum, steps, images = 0.0, 0, 0
        began = time.perf_counter()
        for batch in epoch_batches(shard, local_batch, seed=cfg.seed, epoch=epoch,
                                   shuffle_rows=2 * local_batch):
            n = len(batch["n_frames"])
            if n * ctx.world_size < 2:  # NT-Xent needs a negative; shards are equal, so every
                continue                # rank skips the same step
            batch = {"frames": np.require(batch["frames"], requirements="W"),  # torch wants
                     "n_frames": np.require(batch["n_frames"], requirements="W"),  # writable
                     "class_index": np.array([class_of.get(str(v), -1) for v in batch["video_id"]],
                                             dtype=np.int64)}
            loss_sum += train_step(model, optimizer, batch, augment, cfg, rng, ntxent=ntxent,
                                   ce=ce, autocast_dtype=autocast)
            steps += 1
            images += VIEWS_PER_VIDEO * n
        seconds = time.perf_counter() - began
        loss_sum, steps, images = _all_reduce([loss_sum, float(steps), float(images)], ctx.device)
        (seconds,) = _all_reduce([seconds], ctx.device, op="max")
        inputs = check_epoch_inputs(log, seen, int(config.get("n_videos", 0)), int(steps), epoch + 1,
                                    float(config.get("max_failed_fraction", 1.0)))
        seen = inputs.seen
        if inputs.abort:
            stop_run(log, f"pretrain: {inputs.abort}", ctx.rank)
            return
        metrics = {
            "epoch": epoch,
            "loss": loss_sum / steps,
            "images_per_s": images / seconds if seconds > 0 else 0.0,
            "lr": lr,
            "skipped_videos": inputs.skipped,
        }
        history.append({**metrics, "seconds": seconds, "session_start": start,
                        "run_id": config["run_id"]})
        state = {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "config": cfg.to_dict(),
            "classes": list(config["classes"]),
            "labelled_video_ids": sorted(labelled),
            "holdout": config.get("holdout"),
            "epoch": epoch,
            "history": history,
        }
        report_epoch(metrics, state, ctx.rank)
        if ctx.rank == 0:  # the worker's stderr reaches the driver's (print would log it twice)
            skipped = f", {inputs.skipped} video(s) skipped" if inputs.skipped else ""
            left = cfg.epochs - epoch - 1
            eta = f", ETA {format_eta(seconds * left)}" if left else ""
            sys.stderr.write(f"pretrain: epoch {epoch + 1}/{cfg.epochs} loss {metrics['loss']:.4f} "
                             f"{metrics['images_per_s']:.1f} images/s lr {lr:.2e}{skipped}{eta}\n")
            sys.stderr.flush()
    if restored is not None and start >= cfg.epochs:  # resumed a finished run: nothing to train,
        last = restored["history"][-1]               # report its state again so it is the result
        report_epoch({k: last[k] for k in ("epoch", "loss", "images_per_s", "lr") if k in last}, restored,
                     ctx.rank)
