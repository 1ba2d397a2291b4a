"""MSML multi-label training on Ray Train: the per-worker loop and the driver around it.

The science is in ultrasound/ (``ultrasound.msml``: the network, losses and training step;
``ultrasound.multilabel_metrics``: mAP and F1; ``ultrasound.gradcam``: attention maps). This
module wires it to the cluster:

- :func:`split_videos`: train / validation split by patient (by video where the patient is
  unknown), never by frame (``ultrasound.evaluation.carve_validation``).
- the training frames stream from object storage through Ray Data (``cluster.frames``) and are
  split across the data-parallel workers; the validation frames are few, so the driver
  materialises them once (:func:`materialise_frames`) and rank 0 scores them after every epoch.
- :func:`msml_train_loop` runs on every worker (``cluster.train.fit``): one epoch over its
  shard, the loss averaged over all ranks, the validation mAP / macro-F1 on rank 0, a
  checkpoint (model, optimiser, epoch, config, findings, split ids, history) per epoch, and a
  resume from the last checkpoint after ``--resume`` or a worker failure.
- :func:`run_msml` (the driver): split, positive weights from the training split's video labels,
  the run, then the final model (``<out>/model.pt``), the validation report
  (``<out>/report.json``) and Grad-CAM overlays (``<out>/gradcam/*.png``).

The reported model is the last epoch's: the validation split is what the report measures, so it
is not also used to pick an epoch.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
import ray

from cluster.claim import claim_out
from cluster.completion import FinalFiles
from cluster.dataset import IngestedDataset
from cluster.frames import StreamSpec, collect_frames, frame_stream
from cluster.storage import Location, Storage, parse_uri
from cluster.tracking import TrackedRun, TrackerSpec
from cluster.train import (
    MAX_FAILED_FRACTION,
    Method,
    ScaleSpec,
    TrainingError,
    check_run_slot,
    export_final,
    final_state,
    fit,
    load_init_backbone,
    prepare_model,
    raise_if_aborted,
    resume_point,
    run_epochs,
    unwrap,
    worker_context,
)
from ultrasound.evaluation import carve_validation
from ultrasound.export import msml_files
from ultrasound.gradcam import grad_cam, overlay
from ultrasound.manifest import safe_file_name
from ultrasound.msml import (
    MSMLConfig,
    MSMLNet,
    build_loss,
    build_optimizer,
    msml_predict,
    msml_train_step,
    positive_weights,
    prepare_images,
)
from ultrasound.multilabel_metrics import multilabel_report
from ultrasound.split_unit import split_units, unit_kind
from ultrasound.video import FrameFormat, FrameSampling

RUN_FILE = "msml_run.json"  # config + split of the run under --out, read back by --resume
REPORT_FILE = "report.json"
GRADCAM_FOLDER = "gradcam"
SHUFFLE_BUFFER_FRAMES = 1024  # frames of several videos meet in a batch (the stream yields a video's frames together)
KEEP_CHECKPOINTS = 2  # resuming needs the last; one more in case the last write was cut short


# -- split ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoSplit:
    """Video ids of the training and validation splits; no patient (group) is in both.

    ``group_by`` says what the groups were: ``"patient"`` when every video names its patient,
    ``"patient/video"`` when some do (the others are their own group), ``"video"`` when none do.
    """

    train: tuple[str, ...]
    validation: tuple[str, ...]
    group_by: str

    def as_dict(self) -> dict:
        return {"train": list(self.train), "validation": list(self.validation), "group_by": self.group_by}

    @classmethod
    def from_dict(cls, values: dict) -> "VideoSplit":
        return cls(tuple(values["train"]), tuple(values["validation"]), values["group_by"])


def split_videos(data: IngestedDataset, fraction: float, seed: int) -> VideoSplit:
    """Carve about ``fraction`` of the patients into validation, stratified by class label.

    Groups are patients where the manifest names them, else single videos: frames of one patient
    (or of one video) never land on both sides.
    """
    rows = data.rows
    patients = [r.get("patient_id") for r in rows]
    groups = split_units(patients, [r["video_id"] for r in rows])
    labels = np.array([str(r.get("label") or "") for r in rows])
    group_by = unit_kind(patients)
    train_idx, val_idx = carve_validation(np.arange(len(rows)), groups, labels, fraction, seed=seed)
    ids = [r["video_id"] for r in rows]
    return VideoSplit(tuple(ids[i] for i in train_idx), tuple(ids[i] for i in val_idx), group_by)


# -- frames ---------------------------------------------------------------------------------
@dataclass
class LabelledFrames:
    """Frames held in memory with their targets.

    Shape: ``images`` ``(N, S, S, C)`` uint8, ``targets`` ``(N, L)`` int64, ``video_ids`` and
    ``frame_index`` ``(N,)``.
    """

    images: np.ndarray
    targets: np.ndarray
    video_ids: np.ndarray
    frame_index: np.ndarray
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def materialise_frames(data: IngestedDataset, spec: StreamSpec) -> LabelledFrames:
    """Stream every sampled frame of ``data`` and keep them in memory (a small split only);
    videos that yield no frame are in ``skipped`` (:func:`cluster.frames.collect_frames`)."""
    stream = frame_stream(data, spec)
    try:
        got = collect_frames(stream, data, ["image", "findings"])
    except ValueError as err:
        raise TrainingError(f"the validation split: {err}") from None
    return LabelledFrames(
        images=got["image"].astype(np.uint8),
        targets=np.rint(got["findings"]).astype(np.int64).reshape(len(got), -1),
        video_ids=got["video_id"],
        frame_index=got["frame_index"],
        skipped=got.failed,
    )


# -- metrics --------------------------------------------------------------------------------
def validation_report(targets: np.ndarray, probs: np.ndarray, findings: list[str],
                      trained: list[bool]) -> dict:
    """``multilabel_report`` restricted to the findings the model could learn.

    A finding without a positive in the training split (``trained[l]`` False) is left out of
    ``map``, ``per_finding_ap`` and ``macro_f1``, as is one without a positive in validation;
    both are listed in ``excluded``. ``micro_f1`` and ``hamming_loss`` pool every finding, as
    ``multilabel_report`` does. ``chance_map`` is what a random scorer gets on average: the mean
    validation prevalence of the findings in ``map``.

    Shape: targets ``(N, L)`` 0/1, probs ``(N, L)``, findings and trained ``L``.
    """
    targets = np.asarray(targets)
    probs = np.asarray(probs)
    if len(findings) != targets.shape[1] or len(trained) != targets.shape[1]:
        raise ValueError(f"{targets.shape[1]} target columns, {len(findings)} findings, {len(trained)} flags")
    pooled = multilabel_report(targets, probs, findings)
    kept = [j for j, ok in enumerate(trained) if ok]
    if kept:
        scored = multilabel_report(targets[:, kept], probs[:, kept], [findings[j] for j in kept])
        ap, macro, no_val = scored["per_finding_ap"], scored["macro_f1"], set(scored["excluded"])
    else:
        ap, macro, no_val = {}, float("nan"), set()
    no_train = {findings[j] for j, ok in enumerate(trained) if not ok}
    in_map = [j for j in kept if findings[j] in ap]
    return {
        "map": float(np.mean(list(ap.values()))) if ap else float("nan"),
        "per_finding_ap": ap,
        "macro_f1": macro,
        "micro_f1": pooled["micro_f1"],
        "hamming_loss": pooled["hamming_loss"],
        "excluded": [f for f in findings if f in no_train or f in no_val],
        "no_training_positives": [f for f in findings if f in no_train],
        "no_validation_positives": [f for f in findings if f in no_val],
        "chance_map": float(np.mean(targets[:, in_map].mean(axis=0))) if in_map else float("nan"),
        "n_frames": int(targets.shape[0]),
    }


# -- the per-worker loop --------------------------------------------------------------------
def msml_train_loop(loop_config: dict) -> None:
    """One data-parallel MSML worker (``cluster.train.fit`` runs it on every rank): the network,
    its step and its validation, run by :func:`cluster.train.run_epochs`.

    ``loop_config``: ``config`` (MSMLConfig.to_dict()), ``train_video_labels`` (the training
    split's video-level targets, for the positive weights), ``trained`` (per finding: has a
    training positive), ``split``, ``validation`` (ObjectRef of :class:`LabelledFrames`),
    ``init_backbone`` (ObjectRef of a backbone state dict, or None).
    """
    ctx = worker_context(loop_config)
    config = MSMLConfig.from_dict(loop_config["config"])
    findings = list(config.findings)
    model = MSMLNet(config)
    resumed = resume_point()
    if resumed.state is not None:
        model.load_state_dict(resumed.state["model"])
    elif loop_config.get("init_backbone") is not None:
        model.backbone.load_state_dict(ray.get(loop_config["init_backbone"]))
    model = prepare_model(model)
    model.config = config  # msml_train_step reads model.config; DDP wraps the MSMLNet
    optimizer = build_optimizer(model, config)
    if resumed.state is not None:
        optimizer.load_state_dict(resumed.state["optimizer"])
    loss_fn = build_loss(config, np.asarray(loop_config["train_video_labels"], dtype=np.int64)).to(ctx.device)
    validation = ray.get(loop_config["validation"]) if ctx.rank == 0 else None
    augment: np.random.Generator | None = None  # seeded per epoch by begin_epoch

    def begin_epoch(epoch: int) -> dict:
        nonlocal augment
        augment = np.random.default_rng([config.seed, epoch, ctx.rank])
        return {}

    def step(batch: dict, epoch: int) -> tuple[float, float]:
        images = np.array(batch["image"])  # a writable copy: torch refuses read-only arrays
        targets = np.asarray(batch["findings"]).reshape(len(images), -1)
        loss = msml_train_step(model, optimizer, images, targets, loss_fn, config.image_size, augment_rng=augment)
        return loss * len(images), float(len(images))  # the epoch's loss: the mean over frames

    def evaluate() -> dict:
        probs = msml_predict(unwrap(model), validation.images, config.image_size)
        report = validation_report(validation.targets, probs, findings, loop_config["trained"])
        return {"val_map": report["map"], "val_macro_f1": report["macro_f1"]}

    def checkpoint(epochs_done: int, history: list[dict]) -> dict:
        return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epochs_done,
                "config": config.to_dict(), "findings": findings, "split": loop_config["split"],
                "trained": loop_config["trained"], "history": history}

    if ctx.rank == 0 and resumed.state is not None:
        sys.stderr.write(f"msml: resumed after epoch {resumed.start}\n")  # print() would show twice
        sys.stderr.flush()                                                  # under Ray Train's print patch
    run_epochs(Method(
        job="msml", epochs=config.epochs, seed=config.seed, batch_rows=max(2, config.batch_size // ctx.world_size),
        shuffle_rows=SHUFFLE_BUFFER_FRAMES, min_rows=2,  # BatchNorm needs two samples
        step=step, checkpoint=checkpoint, begin_epoch=begin_epoch, evaluate=evaluate,
        describe=lambda m: f" val mAP {m['val_map']:.3f} macro-F1 {m['val_macro_f1']:.3f} ({m['images']} frames)"),
        ctx, loop_config, resumed)


# -- the driver -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MSMLRunOptions:
    """Job settings that are not part of the model's config.

    ``max_per_video`` caps training frames per video; validation frames are capped at
    ``val_max_per_video`` (they are held in memory). ``gradcam`` is how many overlays to save at
    most (one per finding with a positive validation frame).
    """

    out_uri: str
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    fps: float | None = None
    max_per_video: int | None = None
    val_max_per_video: int | None = 32
    val_fraction: float = 0.2
    split_seed: int = 0
    init_uri: str | None = None
    resume: bool = False
    gradcam: int = 6
    cache: bool = True
    max_failed_fraction: float = MAX_FAILED_FRACTION
    tracker: TrackerSpec | None = None


def run_msml(data: IngestedDataset, config: MSMLConfig, options: MSMLRunOptions, storage: Storage | None = None,
             on_progress: Callable[[str], None] = lambda message: None) -> dict:
    """:func:`run_msml_claimed` while holding the exclusive claim on ``options.out_uri``."""
    storage = storage or data.storage
    with claim_out(parse_uri(options.out_uri), storage, resume=options.resume):
        return run_msml_claimed(data, config, options, storage, on_progress)


def run_msml_claimed(
    data: IngestedDataset,
    config: MSMLConfig,
    options: MSMLRunOptions,
    storage: Storage | None = None,
    on_progress: Callable[[str], None] = lambda message: None,
) -> dict:
    """Train MSML on ``data`` and write the model, the validation report and Grad-CAM overlays.

    ``config.findings`` must be finding columns of ``data``. With ``options.resume`` the split and
    config come from the run under ``options.out_uri`` (only ``epochs`` may change). Returns the
    job's summary: ``{"epochs", "loss", "map", "per_finding_ap", "macro_f1", "micro_f1",
    "hamming_loss", "excluded", "chance_map", "checkpoint", "report", "gradcam", ...}``.
    """
    storage = storage or data.storage
    out = parse_uri(options.out_uri)
    unknown = [f for f in config.findings if f not in data.findings]
    if unknown:
        raise ValueError(f"finding(s) {unknown} are not in the data set; it has {data.findings}")
    data = dataclasses.replace(data, findings=list(config.findings))  # targets in config order
    backbone_state, init_missing = None, None
    if options.init_uri:  # checked before anything is written under --out
        backbone_state, init_missing = load_init_backbone(options.init_uri, config.channels, storage)
        on_progress(f"msml: backbone initialised from {options.init_uri} "
                    f"({len(init_missing)} backbone tensors left at random init)")
    config, split = _config_and_split(data, config, options, storage, out)
    on_progress(f"msml: split by {split.group_by}: {len(split.train)} training videos, "
                f"{len(split.validation)} validation videos")

    train_data, val_data = data.select(split.train), data.select(split.validation)
    video_labels = train_data.finding_matrix().astype(np.int64)
    weights = positive_weights(video_labels, config.max_pos_weight)
    trained = [j not in weights.no_positives for j in range(config.num_findings)]
    for j in weights.no_positives:
        on_progress(f"msml: finding {config.findings[j]!r} has no positive video in the training split: "
                    f"excluded from the metrics")

    fmt = FrameFormat(channels=config.channels, size=config.image_size)
    cpus_per_task = 1.0 if options.scale.gpu else 0.5
    val_spec = StreamSpec(sampling=FrameSampling(fps=options.fps, max_per_video=_cap(options)), fmt=fmt,
                          seed=config.seed, cpus_per_task=cpus_per_task, cache=options.cache)
    validation = materialise_frames(val_data, val_spec)
    on_progress(f"msml: {len(validation)} validation frames in memory")
    train_spec = StreamSpec(sampling=FrameSampling(fps=options.fps, max_per_video=options.max_per_video),
                            fmt=fmt, seed=config.seed, cpus_per_task=cpus_per_task, cache=options.cache,
                            order_seed=config.seed)
    stream = frame_stream(train_data, train_spec)
    train_stream = stream.dataset.select_columns(["image", "findings"])

    loop_config = {
        "config": config.to_dict(),
        "train_video_labels": video_labels.tolist(),
        "trained": trained,
        "split": split.as_dict(),
        "validation": ray.put(validation),
        "init_backbone": None if backbone_state is None else ray.put(backbone_state),
        "stream_log": stream.log,
        "n_videos": len(train_data.rows),
        "max_failed_fraction": float(options.max_failed_fraction),
    }
    on_progress(f"msml: training {config.epochs} epochs on {options.scale.workers} worker(s)"
                f"{' with GPUs' if options.scale.gpu else ''}, writing to {out.uri}")
    params = {"job": "msml", "config": config.to_dict(), "data": data.root.uri, "init": options.init_uri,
              "fps": options.fps, "max_per_video": options.max_per_video, "workers": options.scale.workers}
    with TrackedRun(options.tracker, params) as tracked:
        result = fit(msml_train_loop, loop_config, {"train": train_stream}, out.uri, options.scale,
                     resume=options.resume, storage=storage, keep_checkpoints=KEEP_CHECKPOINTS,
                     tracking=tracked.spec)
        raise_if_aborted(stream, out.uri)
        skipped = stream.skipped_videos() + [{**v, "split": "validation"} for v in validation.skipped]
        final = final_state(result, out.uri)
        history = final["history"]
        files = FinalFiles(out, storage)
        checkpoint_uri = export_final(result, files, history, exclude=("optimizer",))
        model = MSMLNet(config)
        model.load_state_dict(final["model"])
        probs = msml_predict(model, validation.images, config.image_size)
        report = validation_report(validation.targets, probs, list(config.findings), trained)
        report.update(epochs=int(final["epoch"]), config=config.to_dict(), split=split.as_dict(),
                      positive_weights=dict(zip(config.findings, weights.weights.tolist())),
                      init=options.init_uri, init_missing=init_missing, skipped_videos=skipped)
        report_uri = files.write(REPORT_FILE, json.dumps(report, indent=1).encode())
        for name, blob in msml_files(model.state_dict(), config.to_dict()).items():
            files.write(name, blob)
        gradcams = save_gradcams(model, validation, probs, report, config, files, limit=options.gradcam)
        files.complete()
        tracked.attach(files)
    on_progress(f"msml: validation mAP {report['map']:.3f} (chance {report['chance_map']:.3f}), "
                f"macro-F1 {report['macro_f1']:.3f}, micro-F1 {report['micro_f1']:.3f}, "
                f"hamming {report['hamming_loss']:.3f}; {len(gradcams)} Grad-CAM overlays")
    return {
        "epochs": int(final["epoch"]),
        "loss": [h["loss"] for h in history],
        "val_map_per_epoch": [h.get("val_map") for h in history],
        "map": report["map"],
        "per_finding_ap": report["per_finding_ap"],
        "macro_f1": report["macro_f1"],
        "micro_f1": report["micro_f1"],
        "hamming_loss": report["hamming_loss"],
        "excluded": report["excluded"],
        "chance_map": report["chance_map"],
        "checkpoint": checkpoint_uri,
        "report": report_uri.uri,
        "gradcam": gradcams,
        "init_missing": init_missing,
        "skipped_videos_per_epoch": [int(h.get("skipped_videos", 0)) for h in history],
        "skipped_videos": skipped,
    }


def _cap(options: MSMLRunOptions) -> int | None:
    caps = [c for c in (options.max_per_video, options.val_max_per_video) if c is not None]
    return min(caps) if caps else None


def _config_and_split(data: IngestedDataset, config: MSMLConfig, options: MSMLRunOptions,
                      storage: Storage, out: Location) -> tuple[MSMLConfig, VideoSplit]:
    """A new run writes its config and split to ``<out>/msml_run.json``; a resumed run reads them
    back (the same videos on each side) and accepts a change of ``epochs`` only."""
    run_file = out.join(RUN_FILE)
    check_run_slot(out.uri, storage, options.resume)
    if not options.resume:
        storage.check(out, create_bucket=True)
        split = split_videos(data, options.val_fraction, options.split_seed)
        record = {"config": config.to_dict(), "split": split.as_dict()}
        storage.write_bytes(run_file, json.dumps(record, indent=1).encode())
        return config, split
    if not storage.exists(run_file):
        raise TrainingError(f"--resume: no MSML run to resume under {out.uri}")
    saved = json.loads(storage.read_bytes(run_file))
    before = MSMLConfig.from_dict(saved["config"])
    changed = sorted(k for k, v in before.to_dict().items() if k != "epochs" and config.to_dict()[k] != v)
    if changed:
        raise ValueError(f"--resume: the run under {out.uri} was started with other settings for {changed} "
                         f"(only epochs may change); saved: "
                         + ", ".join(f"{k}={before.to_dict()[k]!r}" for k in changed))
    split = VideoSplit.from_dict(saved["split"])
    known = {r["video_id"] for r in data.rows}
    lost = [v for v in split.train + split.validation if v not in known]
    if lost:
        raise ValueError(f"--resume: {len(lost)} video(s) of the saved split are not in the data set, "
                         f"e.g. {lost[:3]}")
    saved["config"]["epochs"] = config.epochs
    storage.write_bytes(run_file, json.dumps(saved, indent=1).encode())
    return config, split


def save_gradcams(model: MSMLNet, frames: LabelledFrames, probs: np.ndarray, report: dict,
                  config: MSMLConfig, files: FinalFiles, limit: int = 6) -> list[str]:
    """Grad-CAM overlays (PNG, under ``gradcam/`` of the run) for up to ``limit`` validation
    frames, one per finding that has a positive validation frame: the positive frame the model
    scores highest for that finding. Returns the URIs written."""
    written = []
    scored = [f for f in config.findings if f in report["per_finding_ap"]]
    others = [f for f in config.findings if f not in scored]
    for name in scored + others:  # evaluated findings first
        if len(written) >= limit:
            break
        j = config.findings.index(name)
        positives = np.flatnonzero(frames.targets[:, j] == 1)
        if len(positives) == 0:
            continue
        pick = int(positives[np.argmax(probs[positives, j])])
        image = frames.images[pick]
        heat = grad_cam(model, prepare_images(image[None], config.image_size, config.channels), j)
        gray = image[..., 0] if image.shape[-1] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        ok, png = cv2.imencode(".png", overlay(np.ascontiguousarray(gray), heat))
        if not ok:
            raise TrainingError(f"could not encode the Grad-CAM overlay of {name}")
        file_name = f"{name}_{safe_file_name(frames.video_ids[pick])}_f{int(frames.frame_index[pick]):05d}.png"
        written.append(files.write(f"{GRADCAM_FOLDER}/{file_name}", png.tobytes()).uri)
    return written
