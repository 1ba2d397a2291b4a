"""Data-parallel training on Ray Train: the one place that builds TorchTrainer runs, and the one
epoch loop every training job shares.

Jobs (pretrain, msml) hand ``fit`` a per-worker loop, its config and their Ray Datasets. The
per-worker loop builds its model, reads :func:`resume_point` and hands :func:`run_epochs` a
:class:`Method`: its step and checkpoint functions, and optionally a per-epoch set-up
(learning rate) and a rank-0 evaluation (validation metrics): the shape of solo-learn's
``BaseMethod`` (the method gives ``training_step``, the harness owns the loop). The harness owns
the epoch order, the all-reduce of the epoch's sums, the failure check of the frame stream, the
history, the checkpoint per epoch (written by rank 0 only; every rank reports) and the progress
line, so a resumed or retried run continues from the last saved epoch the same way in every job.

Epochs are counted the same way everywhere: a history entry's ``epoch`` and a checkpoint's
``epoch`` are the number of epochs finished (1 after the first); the index a method's
``begin_epoch`` and ``step`` receive is 0-based (the learning-rate schedule's).

Checkpoints live under ``<out>/ray/<name>``; the final model is copied to ``<out>/model.pt`` and
the per-epoch metrics to ``<out>/metrics.json``, and ``complete.json``, written last, says the
run's final files are all there (:mod:`cluster.completion`).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster.claim import claim_out
from cluster.completion import FinalFiles, check_model_file, clear_complete
from cluster.progress import format_eta
from cluster.storage import Location, Storage, parse_uri
from cluster.tracking import TrackerSpec, log_epoch, worker_tracker
from ultrasound.backbone import ResNet18Backbone, adopt_weights, read_state, state_channels
from ultrasound.checkpoint import load_state, save_state
from ultrasound.export import BACKBONE_FILE, backbone_safetensors

CHECKPOINT_FILE = "state.pt"
RUN_NAME = "run"
MAX_FAILED_FRACTION = 0.1  # a job stops when more than this share of its videos cannot be read


class TrainingError(RuntimeError):
    """A training run that failed or cannot start; the message says why."""


@dataclass(frozen=True)
class ScaleSpec:
    """How a run is spread: ``workers`` data-parallel ranks, on GPUs with ``gpu``.

    ``cpus_per_worker=None`` picks a share that leaves one CPU for Ray Data on a CPU cluster
    (on 2 CPUs, 2 workers x 1 CPU would starve the frame stream and hang).
    """

    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float | None = None
    max_failures: int = 1

    def resources(self, cluster_cpus: float) -> dict:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        cpus = self.cpus_per_worker
        if cpus is None:
            cpus = 1.0 if self.gpu else max(0.25, min(1.0, (cluster_cpus - 1) / self.workers))
        return {"CPU": cpus}


def run_location(out_uri: str) -> Location:
    return parse_uri(out_uri).join("ray")


def fit(
    train_loop: Callable[[dict], None],
    loop_config: dict,
    datasets: dict[str, ray.data.Dataset],
    out_uri: str,
    scale: ScaleSpec,
    *,
    resume: bool = False,
    storage: Storage | None = None,
    keep_checkpoints: int | None = None,
    tracking: TrackerSpec | None = None,
) -> ray.train.Result:
    """Run ``train_loop`` on ``scale.workers`` ranks; returns Ray Train's Result.

    ``tracking``: a run opened with :func:`cluster.tracking.start_run`; rank 0 logs every
    epoch's metrics to it (:func:`report_epoch`), the caller closes it.

    Without ``resume`` an ``out_uri`` that already holds a run is refused (Ray would silently
    resume it); with ``resume`` the loop finds the last checkpoint through ``restore_state``.
    The run holds the exclusive claim on ``out_uri`` (:mod:`cluster.claim`) while it lasts.
    """
    storage = storage or Storage()
    out = parse_uri(out_uri)
    extras = {"_tracker": tracking.as_dict() if tracking else None,
              "_run_id": uuid.uuid4().hex[:12]}  # tells this invocation's epochs from a resumed one's
    with claim_out(out, storage, resume=resume):
        return _fit_claimed(train_loop, {**loop_config, **extras}, datasets, out, scale, resume, storage,
                            keep_checkpoints)


def check_run_slot(out_uri: str, storage: Storage, resume: bool) -> None:
    """Refuse a new run where ``out_uri`` already holds one (Ray Train would silently resume it),
    and a ``resume`` where it holds none. Jobs call it before they write anything under ``out``."""
    out = parse_uri(out_uri)
    exists = storage.exists(run_location(out.uri).join(RUN_NAME))
    if exists and not resume:
        raise TrainingError(f"{out.uri} already holds a training run: pass --resume to continue it, "
                            f"or choose another --out")
    if resume and not exists:
        raise TrainingError(f"--resume: no run to resume under {out.uri}")


def _fit_claimed(train_loop: Callable[[dict], None], loop_config: dict, datasets: dict[str, ray.data.Dataset],
                 out: Location, scale: ScaleSpec, resume: bool, storage: Storage,
                 keep_checkpoints: int | None) -> ray.train.Result:
    """``fit`` once this process holds the claim on ``out``."""
    out_uri = out.uri
    runs = run_location(out_uri)
    check_run_slot(out_uri, storage, resume)
    if resume:
        verify_checkpoints(runs.join(RUN_NAME), storage)
    clear_complete(out, storage)  # complete again only once this run has written its final files
    if not runs.is_s3:
        Path(runs.key).mkdir(parents=True, exist_ok=True)
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
    resources = scale.resources(cluster_cpus)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**loop_config, "_cpus_per_worker": resources["CPU"]},
        scaling_config=ScalingConfig(num_workers=scale.workers, use_gpu=scale.gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=runs.fs_path,
            storage_filesystem=storage.filesystem(runs),
            failure_config=FailureConfig(max_failures=scale.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=tune_report_callbacks(),
        ),
        datasets=datasets,
        dataset_config=ordered_data_config(),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # TrainingFailedError and friends: keep the cause, name the run
        raise TrainingError(f"training run under {out.uri} failed: {err}") from err
    if result.error:
        raise TrainingError(f"training run under {out.uri} failed: {result.error}")
    return result


def ordered_data_config() -> DataConfig:
    """Train's default ingest options with the stream's order preserved, so that a seeded epoch
    order (``epoch_batches``) is the same on every run with one worker."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def verify_checkpoints(run: Location, storage: Storage) -> None:
    """Load the checkpoint state a resume restores safely, in the driver, before any worker
    starts, so that a tampered file is refused (CheckpointError naming it).

    That is the latest checkpoint Ray Train's snapshot of the run registers (it restores that one
    only). A checkpoint folder it does not register is an upload a killed run left half done (Ray
    Train copies a checkpoint into storage file by file and registers it once whole): Ray never
    restores it, so it is not read. Without a readable snapshot every state file is checked.
    Reading only the restored checkpoint matters on S3: an MSML state with its Adam moments is
    about 135 MB, and checking both kept checkpoints took two minutes against the test server."""
    latest = _latest_registered_checkpoint(run, storage)
    for name in storage.list_files(run):
        if name == CHECKPOINT_FILE or name.endswith("/" + CHECKPOINT_FILE):
            folder = name.rsplit("/", 2)[-2] if "/" in name else ""
            if latest is not None and folder != latest:
                continue
            location = run.join(name)
            load_state(storage.read_bytes(location), location.uri)


RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints


def _latest_registered_checkpoint(run: Location, storage: Storage) -> str | None:
    """The folder name of the checkpoint Ray Train's snapshot of ``run`` will restore, or None
    without a readable snapshot (or one that registers none)."""
    try:
        snapshot = json.loads(storage.read_bytes(run.join(RAY_SNAPSHOT_FILE)))
        name = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def tune_report_callbacks() -> list:
    """Inside a Ray Tune trial (``sonoray sweep``), forward every epoch's report to Tune, so its
    scheduler (ASHA) can stop a bad trial early; outside Tune, nothing."""
    from ray.tune.integration.ray_train import TuneReportCallback

    try:
        return [TuneReportCallback()]
    except RuntimeError:  # "must be used in a Tune session": a plain training run
        return []


def final_state(result: ray.train.Result, out_uri: str) -> dict:
    """The state of the run's last checkpoint (what ``model.pt`` is made of)."""
    if result.checkpoint is None:
        raise TrainingError(f"training under {out_uri} produced no checkpoint")
    with result.checkpoint.as_directory() as folder:
        return read_checkpoint_folder(folder)


def export_final(result: ray.train.Result, files: FinalFiles, history: list[dict],
                 exclude: tuple[str, ...] = ()) -> str:
    """Write the last checkpoint's state as ``model.pt``, its trunk as ``backbone.safetensors``
    (torchvision's key names: :mod:`ultrasound.export`) and the history as ``metrics.json``
    through ``files`` (the job adds its own records, then calls ``files.complete()``); returns
    the model URI. ``exclude`` drops top-level keys of the state (e.g. ``("optimizer",)``: what
    resuming needs but a finished model does not)."""
    if result.checkpoint is None:
        raise TrainingError(f"training under {files.out.uri} produced no checkpoint")
    with result.checkpoint.as_directory() as folder:
        data = (Path(folder) / CHECKPOINT_FILE).read_bytes()
    state = load_state(data, f"{files.out.uri} (last checkpoint)")
    if exclude:
        data = save_state({k: v for k, v in state.items() if k not in exclude})
    files.write("metrics.json", json.dumps(history, indent=1).encode())
    uri = files.write("model.pt", data).uri
    if isinstance(state.get("model"), dict):
        files.write(BACKBONE_FILE, backbone_safetensors(state["model"]))
    return uri


# -- inside a worker ---------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device


def worker_context(config: dict) -> WorkerContext:
    """Rank, world size and device of this worker; sizes torch's thread pool to its CPU share."""
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(config.get("_cpus_per_worker", 1))))
    worker_tracker(config.get("_tracker"), ctx.get_world_rank())
    return WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Move to the worker's device and wrap in DDP when there are several workers."""
    return ray.train.torch.prepare_model(model)


def restore_state() -> dict | None:
    """The state saved by the last ``report_epoch`` of this run (resume or retry), or None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return read_checkpoint_folder(folder)


def read_checkpoint_folder(folder: str | os.PathLike) -> dict:
    """The state in a Ray Train checkpoint folder, loaded with ``weights_only=True``."""
    path = Path(folder) / CHECKPOINT_FILE
    return load_state(path.read_bytes(), str(path))


def report_epoch(metrics: dict, state: dict, rank: int) -> None:
    """Every rank reports ``metrics``; rank 0 alone writes ``state`` as the checkpoint (and logs
    the metrics to the run's tracker, when there is one)."""
    if rank == 0:
        log_epoch(metrics)
        with tempfile.TemporaryDirectory(prefix="sonoray-ckpt-") as folder:
            Path(folder, CHECKPOINT_FILE).write_bytes(save_state(state))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
    else:
        ray.train.report(metrics)


def dataset_shard(name: str):
    return ray.train.get_dataset_shard(name)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def init_backbone(uri: str, channels: int | None = None, storage: Storage | None = None
                  ) -> tuple[ResNet18Backbone, list[str]]:
    """The ResNet-18 trunk an ``--init`` file gives (local path or s3://; any format
    :func:`ultrasound.backbone.adopt_weights` accepts), and the backbone keys it left at random
    init. ``channels`` None: the file's first conv decides (:func:`state_channels`)."""
    storage = storage or Storage()
    location = parse_uri(uri)
    if not location.is_s3 and not os.path.isfile(location.key):
        raise FileNotFoundError(f"--init: no file at {uri}")
    data = storage.read_bytes(location)
    check_model_file(location, data, storage)
    state = read_state(data, uri)
    backbone = ResNet18Backbone(in_channels=channels or state_channels(state))
    return backbone, adopt_weights(backbone, state, uri)


def load_init_backbone(uri: str, channels: int, storage: Storage | None = None
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """:func:`init_backbone`'s state dict (what the training loops start from) and missing keys."""
    backbone, missing = init_backbone(uri, channels, storage)
    return backbone.state_dict(), missing


# -- epochs: order and inputs ------------------------------------------------------------------
def epoch_batches(shard, batch_size: int, *, seed: int, epoch: int, shuffle_rows: int,
                  drop_last: bool = False):
    """This epoch's batches (numpy dicts) of ``shard``, in a fresh order seeded by (seed, epoch).

    The stream visits videos in a seeded random order (``StreamSpec.order_seed``) rather than the
    manifest's, and a local shuffle buffer of ``shuffle_rows`` rows, seeded per epoch, changes
    which rows meet in a batch from one epoch to the next. With one worker (stream order
    preserved, :func:`ordered_data_config`) the batches are the same for the same seed.
    ``shuffle_rows=0`` turns the buffer off: every epoch then has the same batches, in stream
    order (the unshuffled regime, kept as a negative control for benchmarks)."""
    epoch_seed = int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])
    buffer = max(int(shuffle_rows), batch_size) if shuffle_rows > 0 else None
    return shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                              local_shuffle_buffer_size=buffer,
                              local_shuffle_seed=epoch_seed if buffer else None)


@dataclass(frozen=True)
class EpochInputs:
    """What the stream lost in one epoch: ``skipped`` distinct videos (``keys``), the log's length
    after it (``seen``), and ``abort``: why the job must stop, or None."""

    skipped: int
    keys: tuple[str, ...]
    seen: int
    abort: str | None


def check_epoch_inputs(log, seen_before: int, n_videos: int, steps: int, epoch: int,
                       max_failed_fraction: float = MAX_FAILED_FRACTION) -> EpochInputs:
    """Read the stream's failure log after an epoch (every rank gets the same answer: the ranks
    have just synchronised). An epoch with no step, or one that lost more than
    ``max_failed_fraction`` of the videos, is a reason to stop."""
    items = ray.get(log.items.remote()) if log is not None else []
    new = items[seen_before:]
    reasons = {item["key"]: item["reason"] for item in new}
    keys = tuple(sorted(reasons))
    examples = "; ".join(f"{k}: {reasons[k]}" for k in keys[:3]) + (" ..." if len(keys) > 3 else "")
    abort = None
    if steps == 0:
        abort = (f"epoch {epoch}: no training step ran" +
                 (f" ({len(keys)} of {n_videos} videos could not be read: {examples})" if keys else
                  " (the stream yielded too few items for one batch)"))
    elif n_videos and len(keys) > max_failed_fraction * n_videos:
        abort = (f"epoch {epoch}: {len(keys)} of {n_videos} videos ({len(keys) / n_videos:.0%}) could not be "
                 f"read, over the limit of {max_failed_fraction:.0%} (--max-failed-fraction): {examples}")
    return EpochInputs(len(keys), keys, len(items), abort)


def stop_run(log, message: str, rank: int) -> None:
    """Leave the reason a run stopped for the driver (``raise_if_aborted``); the loop then returns
    without a checkpoint for the failed epoch, so every earlier epoch stays resumable."""
    if rank == 0 and log is not None:
        ray.get(log.abort.remote(message))
    if rank == 0:
        sys.stderr.write(f"stopping: {message}\n")
        sys.stderr.flush()


def raise_if_aborted(stream, out_uri: str) -> None:
    message = stream.aborted() if stream is not None else None
    if message:
        raise TrainingError(f"{message}. Checkpoints of the epochs before are kept under {out_uri}: "
                            f"fix or remove those videos and pass --resume")


# -- the shared epoch loop ---------------------------------------------------------------------
def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max) of per-worker numbers over all workers; the numbers themselves alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=on)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


@dataclass(frozen=True)
class Resumed:
    """Where a worker starts: ``start`` epochs already finished, their ``history``, and the
    checkpoint ``state`` they left (None on a fresh run)."""

    start: int = 0
    history: list[dict] = field(default_factory=list)
    state: dict | None = None


def resume_point() -> Resumed:
    """The last checkpoint of this run (after ``--resume`` or a worker retry), or a fresh start."""
    state = restore_state()
    if state is None:
        return Resumed()
    history = [dict(h) for h in state.get("history", [])]
    done = int(state["epoch"])
    if history and min(int(h["epoch"]) for h in history) == 0:
        # a pretraining checkpoint from before the shared loop: 0-based epochs, "epoch" the index
        # of the last one finished. Read in today's terms (epochs finished) so it resumes in place
        # (session_start, the epochs done when a session began, means the same in both).
        done += 1
        for entry in history:
            entry["epoch"] = int(entry["epoch"]) + 1
        state = {**state, "epoch": done, "history": history}
    return Resumed(done, [h for h in history if int(h["epoch"]) <= done], state)


def _no_extras(epoch: int) -> dict:
    return {}


def _no_text(metrics: Mapping) -> str:
    return ""


@dataclass(frozen=True)
class Method:
    """What a training method gives :func:`run_epochs` (solo-learn's split: the method owns its
    step, the harness owns the loop).

    Args:
        job: names the progress lines and a stop message ("pretrain", "msml").
        epochs: epochs in all (a resumed run continues up to it).
        seed: seeds every epoch's batch order (:func:`epoch_batches`).
        batch_rows: rows per step on this worker; ``shuffle_rows``: the local shuffle buffer.
        min_rows: a batch with fewer rows is skipped (every rank gets the same sizes, so every
            rank skips the same step): NT-Xent needs a negative, BatchNorm two samples.
        images_per_row: images a row gives (2 SPG views per video in USCL; 1 frame in MSML).
        step: ``(numpy batch, 0-based epoch) -> (loss x weight, weight)``: one optimiser step;
            the epoch's loss is the sum over ranks and steps of the first over that of the second.
        checkpoint: ``(epochs finished, history) -> state`` saved for that epoch.
        begin_epoch: ``0-based epoch -> extra metrics``, before its first batch (the learning rate).
        evaluate: ``() -> extra metrics`` on rank 0 after each epoch (validation scores).
        describe: ``metrics -> text`` for the progress line, after the loss.
    """

    job: str
    epochs: int
    seed: int
    batch_rows: int
    shuffle_rows: int
    step: Callable[[dict, int], tuple[float, float]]
    checkpoint: Callable[[int, list[dict]], dict]
    min_rows: int = 1
    images_per_row: int = 1
    begin_epoch: Callable[[int], dict] = _no_extras
    evaluate: Callable[[], dict] | None = None
    describe: Callable[[Mapping], str] = _no_text


def _rows(batch: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def run_epochs(method: Method, ctx: WorkerContext, config: Mapping, resumed: Resumed) -> None:
    """Train ``method`` from ``resumed.start`` to ``method.epochs`` on this worker's shard.

    Per epoch: ``begin_epoch``, a pass of ``step`` over the seeded batches, the sums of loss,
    weight, steps and images over all ranks (seconds: the slowest rank's), the stream's failure
    check (a stop leaves every earlier checkpoint resumable), rank 0's ``evaluate``, one history
    entry (``epoch`` finished, ``loss``, ``images``, ``images_per_s`` = images over
    ``train_seconds``, the slowest rank's time in the steps, the extras, ``skipped_videos``,
    ``seconds``, rank 0's whole epoch with the checks and the evaluation, ``session_start``,
    ``run_id``), the checkpoint, and a progress line with the ETA on rank 0. A resumed run that
    is already finished reports its restored state again, so that the result is that state.
    """
    history = list(resumed.history)
    if resumed.state is not None and resumed.start >= method.epochs:
        last = history[-1] if history else {"epoch": resumed.start}
        report_epoch({k: v for k, v in last.items() if isinstance(v, (int, float))}, resumed.state, ctx.rank)
        return
    shard = dataset_shard("train")
    log, seen = config.get("stream_log"), 0
    n_videos, limit = int(config.get("n_videos", 0)), float(config.get("max_failed_fraction", 1.0))
    for epoch in range(resumed.start, method.epochs):
        extras = method.begin_epoch(epoch)
        began = time.perf_counter()
        loss, weight, steps, images = 0.0, 0.0, 0, 0
        for batch in epoch_batches(shard, method.batch_rows, seed=method.seed, epoch=epoch,
                                   shuffle_rows=method.shuffle_rows):
            rows = _rows(batch)
            if rows < method.min_rows:
                continue
            value, w = method.step(batch, epoch)
            loss, weight, steps, images = loss + value, weight + w, steps + 1, images + rows * method.images_per_row
        seconds = time.perf_counter() - began
        loss, weight, steps, images = all_reduce([loss, weight, steps, images], ctx.device)
        (seconds,) = all_reduce([seconds], ctx.device, op="max")
        inputs = check_epoch_inputs(log, seen, n_videos, int(steps), epoch + 1, limit)
        seen = inputs.seen
        if inputs.abort:
            stop_run(log, f"{method.job}: {inputs.abort}", ctx.rank)
            return
        metrics = {"epoch": epoch + 1, "loss": loss / weight, "images": int(images),
                   "images_per_s": images / seconds if seconds > 0 else 0.0, "train_seconds": round(seconds, 3),
                   **extras, "skipped_videos": inputs.skipped}
        if ctx.rank == 0 and method.evaluate is not None:
            metrics.update(method.evaluate())
        metrics["seconds"] = round(time.perf_counter() - began, 3)
        history.append({**metrics, "session_start": resumed.start, "run_id": config.get("_run_id")})
        report_epoch(metrics, method.checkpoint(epoch + 1, history), ctx.rank)
        if ctx.rank == 0:  # the worker's stderr reaches the driver's (print would log it twice)
            skipped = f", {inputs.skipped} video(s) skipped" if inputs.skipped else ""
            left = method.epochs - epoch - 1
            eta = f", ETA {format_eta(metrics['seconds'] * left)}" if left else ""
            sys.stderr.write(f"{method.job}: epoch {epoch + 1}/{method.epochs} loss {metrics['loss']:.4f}"
                             f"{method.describe(metrics)}, {metrics['images_per_s']:.1f} images/s"
                             f"{skipped}{eta}\n")
            sys.stderr.flush()
