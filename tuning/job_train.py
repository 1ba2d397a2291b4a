"""Sweep adapters of the Ray Train jobs: `sonoray pretrain`, pretrain-then-`evaluate`, `sonoray msml`.

A trial of these jobs is the Tune function trainable of tuning/sweep.py calling the job's own
driver function (:func:`cluster.pretrain.pretrain`, :func:`cluster.msml_train.run_msml`), which
builds and fits the TorchTrainer inside the trial; ``cluster.train.fit`` adds Ray's
``TuneReportCallback`` when it runs inside a Tune trial, so every epoch's report reaches Tune
(and ASHA) as it happens. This is the pattern Ray documents for Train V2 under Tune. The trial
function itself holds a tenth of a CPU; its Train workers (and their frame stream) hold the rest,
which the driver counts when it derives how many trials fit at once.

A trial restarted by ``sonoray sweep --resume`` trains again from epoch 0 in a fresh folder
(``job/attempt-<n>``): Tune counts epochs from 1 in a restarted trial, and a Train run resumed at
epoch k would report fewer epochs than a full trial.

Best configs are the flat YAML mappings ``sonoray pretrain --config`` (USCLConfig keys) and
``sonoray msml --config`` (MSMLConfig keys) read.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tuning.adapters import JobAdapter, MetricInfo, TrialOutcome
from tuning.spec import TrialResources

DRIVER_CPU = 0.1  # the trial function only waits on its TorchTrainer


def _attempt_dir(out_uri: str, storage) -> str:
    from cluster.storage import parse_uri

    out = parse_uri(out_uri)
    attempts = {p.split("/", 1)[0] for p in storage.list_files(out) if p.startswith("attempt-")}
    return out.join(f"attempt-{len(attempts)}").uri


def _check_values(adapter, spec, build) -> None:
    """Every fixed value, and each searched value at its bounds, must be accepted by ``build``."""
    build(spec.fixed)
    for param in spec.space.params:
        for value in (param.grid_values(2) if param.kind != "choice" else param.choices):
            try:
                build({**spec.fixed, param.name: value})
            except ValueError as err:
                raise ValueError(f"space.{param.name}: value {value!r} is refused by {adapter.name}: {err}") from None


class TrainJob(JobAdapter):
    """Shared parts: data-parallel scale keys, resources, attempts."""

    step_name = "epoch"
    scale_keys = {
        "data": "data set written by `sonoray ingest` (required)",
        "workers": "data-parallel Ray Train workers per trial (default 1)",
        "gpu": "one GPU per worker (default false)",
        "init": "backbone checkpoint to start from (--init)",
        "cpus_per_worker": "CPUs per Train worker (default: up to 1, leaving 1 CPU for the frame stream)",
    }

    def scale(self, config: Mapping[str, Any], cluster_cpus: float | None = None):
        """The trial's ScaleSpec. On CPUs each worker gets at most one CPU and the frame stream
        keeps one CPU of the cluster, after the trial function's own share (ScaleSpec's
        automatic share would count that share for Ray Data and starve the stream)."""
        from cluster.train import ScaleSpec

        workers = int(config.get("workers", 1))
        if workers < 1:
            raise ValueError(f"fixed.workers: must be >= 1, got {workers}")
        gpu = bool(config.get("gpu", False))
        cpus = config.get("cpus_per_worker")
        if cpus is None and not gpu and cluster_cpus is not None:
            cpus = max(0.25, min(1.0, (cluster_cpus - 1.0 - DRIVER_CPU) / workers))
        return ScaleSpec(workers=workers, gpu=gpu, cpus_per_worker=cpus, max_failures=0)

    def trial_scale(self, config: Mapping[str, Any]):
        import ray

        return self.scale(config, float(ray.cluster_resources().get("CPU", 1)))

    def resources(self, fixed: Mapping[str, Any]) -> TrialResources:
        return TrialResources(cpu=DRIVER_CPU, gpu=0.0)

    def extra_resources(self, fixed: Mapping[str, Any]) -> TrialResources:
        scale = self.scale(fixed)
        per_worker = scale.cpus_per_worker or 1.0
        # the workers, and one CPU the frame stream keeps
        return TrialResources(cpu=scale.workers * per_worker + 1.0, gpu=float(scale.workers) if scale.gpu else 0.0)

    def command_hint(self, config: Mapping[str, Any]) -> str:
        """The command that trains the best config: ``sonoray <job> --data ... [--workers N]
        [--gpu] [the job's switches] --config best_config.yaml --out URI``."""
        flags = [f"--data {config['data']}"]
        if config.get("workers", 1) != 1:
            flags.append(f"--workers {config['workers']}")
        if config.get("gpu"):
            flags.append("--gpu")
        flags += [f"--{switch}" for switch in self.hint_switches if config.get(switch)]
        return f"sonoray {self.cli_command} {' '.join(flags)} --config best_config.yaml --out URI"

    cli_command: str = ""  # the sonoray command that trains a best config
    hint_switches: tuple[str, ...] = ()  # boolean job flags a best config carries (pretrain's unlabelled)

    def prepare(self, fixed: Mapping[str, Any], work_uri: str, storage) -> dict[str, Any]:
        from cluster.storage import parse_uri

        # trials run in their own working directory: pin local paths now
        pinned = {k: parse_uri(fixed[k]).uri for k in ("data", "init") if fixed.get(k)}
        return pinned


class PretrainJob(TrainJob):
    """`sonoray pretrain`: USCL pretraining; metric ``loss`` every epoch."""

    name = "pretrain"
    metrics = {
        "loss": MetricInfo("min", "USCL training loss (NT-Xent + lambda x CE) of the epoch"),
        "images_per_s": MetricInfo("max", "training throughput of the epoch"),
    }
    run_keys = {
        "unlabelled": "pretrain without any class label (default false)",
        "simclr": "the authors' SimCLR baseline: two augmentations of one frame, no cross-entropy "
                  "(default false)",
    }
    tunable_keys = ("lr", "weight_decay", "warmup_epochs", "temperature", "mixup_alpha", "ce_weight",
                    "batch_videos", "aug_strength", "frames_per_video", "pairs", "semi_supervised")

    def config_keys(self) -> list[str]:
        from ultrasound.uscl import USCLConfig

        return [name for name in USCLConfig.valid_keys() if name != "num_classes"]

    def parameters(self) -> dict[str, str]:
        return {**self.scale_keys, **self.run_keys,
                **{k: "USCL setting (sonoray pretrain --config key)" for k in self.config_keys()}}

    def tunable(self) -> tuple[str, ...]:
        return self.tunable_keys

    def settings(self, config: Mapping[str, Any]):
        from ultrasound.uscl import USCLConfig

        cfg = USCLConfig.from_dict({k: v for k, v in config.items() if k in self.config_keys()})
        return cfg.plain_simclr() if config.get("simclr") else cfg

    def check(self, spec) -> None:
        if "data" not in spec.fixed:
            raise ValueError("fixed.data: required (the URI of a data set written by `sonoray ingest`)")

        def build(values):
            cfg = self.settings(values)
            if cfg.batch_videos < self.scale(values).workers:
                raise ValueError(f"batch_videos ({cfg.batch_videos}) must be >= workers")
            return cfg

        _check_values(self, spec, build)

    def max_steps(self, fixed: Mapping[str, Any]) -> int:
        return self.settings(fixed).epochs

    def pretrain_once(self, config: Mapping[str, Any], out_uri: str, storage, holdout=None,
                      unlabelled: bool | None = None):
        from cluster.dataset import load_dataset
        from cluster.pretrain import pretrain
        from cluster.train import load_init_backbone

        cfg = self.settings(config)
        init_state = None
        if config.get("init"):
            init_state, _ = load_init_backbone(config["init"], cfg.channels, storage)
        flag = bool(config.get("unlabelled", False)) if unlabelled is None else unlabelled
        return pretrain(load_dataset(config["data"], storage), out_uri, cfg, self.trial_scale(config),
                        unlabelled=flag, holdout=holdout, init_state=init_state, storage=storage)

    def run_trial(self, config: Mapping[str, Any], out_uri: str, report, storage) -> TrialOutcome:
        # every epoch reaches Tune through cluster.train.fit's TuneReportCallback
        result = self.pretrain_once(config, _attempt_dir(out_uri, storage), storage)
        last = result.history[-1]
        return TrialOutcome({"loss": float(last["loss"]), "images_per_s": float(last["images_per_s"])},
                            result.checkpoint_uri)

    def job_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        values = self.settings(config).to_dict()
        switched = ("pairs", "semi_supervised") if config.get("simclr") else ()
        return {k: values[k] for k in self.config_keys() if k in config or k in switched}

    cli_command = "pretrain"  # also for evaluate-after-pretrain: its best config is a pretraining's
    hint_switches = ("unlabelled",)

    def load_job_config(self, path: str):
        """What ``sonoray pretrain --config path`` starts from (the one config loader)."""
        from cluster.job_config import read_config_file
        from ultrasound.uscl import USCLConfig

        return USCLConfig.from_dict(read_config_file(str(path), section="uscl", what="USCL settings"))


class EvaluateAfterPretrainJob(PretrainJob):
    """Pretrain, then `sonoray evaluate` (K-fold, linear probe by default) the checkpoint; the
    evaluation's accuracy / macro-F1 arrive once, after the last epoch (scheduler: none, or
    ASHA on the per-epoch ``loss``).

    ``labels: none`` (default) pretrains without class labels, so one checkpoint is valid for
    every fold; ``labels: per_fold`` pretrains once per fold with that fold's test labels held
    out (what the semi-supervised cross-entropy, and sweeping ``ce_weight``, needs; K times the
    compute)."""

    name = "evaluate-after-pretrain"
    step_name = "step"  # the epochs of every pretraining, then the evaluation
    metrics = {
        "macro_f1": MetricInfo("max", "evaluation macro-F1, mean over folds", every_step=False),
        "accuracy": MetricInfo("max", "evaluation accuracy, mean over folds", every_step=False),
        "video_accuracy": MetricInfo("max", "per-video majority-vote accuracy", every_step=False),
        "loss": MetricInfo("min", "USCL training loss of the epoch"),
    }
    eval_keys = {
        "labels": "none (unlabelled pretraining) or per_fold (one pretrain per fold, its test labels held out)",
        "eval_mode": "linear (default) or finetune",
        "folds": "evaluation folds (default 3)",
        "split_seed": "seed of the fold split (default 0)",
        "classes": "classes evaluate keeps (default: all labels)",
        "probe": "probe evaluate keeps, e.g. convex",
        "fps": "evaluation frames per second (default 3)",
        "max_per_video": "evaluation frames per video at most (default 30)",
        "eval_epochs": "fine-tuning epochs of the evaluation (default 100, the authors')",
        "eval_lr": "fine-tuning learning rate of the evaluation (default 0.01, the authors')",
    }

    def parameters(self) -> dict[str, str]:
        return {**super().parameters(), **self.eval_keys}

    def check(self, spec) -> None:
        labels = spec.fixed.get("labels", "none")
        if labels not in ("none", "per_fold"):
            raise ValueError(f"fixed.labels: must be none or per_fold, got {labels!r}")
        if spec.fixed.get("eval_mode", "linear") not in ("linear", "finetune"):
            raise ValueError(f"fixed.eval_mode: must be linear or finetune, got {spec.fixed['eval_mode']!r}")
        folds = spec.fixed.get("folds", 3)
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ValueError(f"fixed.folds: must be an integer >= 2, got {folds!r}")
        if labels == "none":
            for name in ("ce_weight", "semi_supervised"):
                if name in spec.space.names:
                    raise ValueError(f"space.{name}: has no effect when pretraining uses no label "
                                     f"(fixed.labels: none); set labels: per_fold to tune it")
        super().check(spec)

    def pretrain_runs(self, config: Mapping[str, Any]) -> int:
        return int(config.get("folds", 3)) if config.get("labels", "none") == "per_fold" else 1

    def max_steps(self, fixed: Mapping[str, Any]) -> int:
        return self.pretrain_runs(fixed) * self.settings(fixed).epochs + 1  # + the evaluation

    def run_trial(self, config: Mapping[str, Any], out_uri: str, report, storage) -> TrialOutcome:
        from cluster.evaluate import HoldoutSpec
        from cluster.storage import parse_uri
        from cluster.evaluate import evaluate_summary

        folds = int(config.get("folds", 3))
        seed = int(config.get("split_seed", 0))
        classes = config.get("classes")
        classes = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else classes
        attempt = parse_uri(_attempt_dir(out_uri, storage))
        if config.get("labels", "none") == "per_fold":
            loss = 0.0
            for fold in range(folds):
                holdout = HoldoutSpec(fold, folds, seed, tuple(classes) if classes else None, config.get("probe"))
                result = self.pretrain_once(config, attempt.join(f"fold{fold}").uri, storage,
                                            holdout=holdout, unlabelled=False)
                loss += float(result.history[-1]["loss"]) / folds
            checkpoint = attempt.join("fold{fold}", "model.pt").uri
        else:
            result = self.pretrain_once(config, attempt.join("pretrain").uri, storage, unlabelled=True)
            loss = float(result.history[-1]["loss"])
            checkpoint = result.checkpoint_uri
        cfg = self.settings(config)
        summary = evaluate_summary(
            config["data"], checkpoint, mode=config.get("eval_mode", "linear"), folds=folds, split_seed=seed,
            classes=classes, probe=config.get("probe"), image_size=cfg.image_size, channels=cfg.channels,
            fps=config.get("fps", 3.0) or None, max_per_video=config.get("max_per_video", 30) or None,
            epochs=None if config.get("eval_epochs") is None else int(config["eval_epochs"]),
            lr=None if config.get("eval_lr") is None else float(config["eval_lr"]),
            device="cuda" if config.get("gpu") else "cpu", storage=storage)
        metrics = {"macro_f1": float(summary["macro_f1"]), "accuracy": float(summary["accuracy"]),
                   "video_accuracy": float(summary["video_accuracy"]), "loss": loss}
        report(metrics)
        return TrialOutcome(metrics, attempt.uri)


class MSMLJob(TrainJob):
    """`sonoray msml`: the multi-label classifier; ``val_map`` / ``val_macro_f1`` every epoch on
    the job's validation split."""

    name = "msml"
    cli_command = "msml"
    metrics = {
        "val_map": MetricInfo("max", "validation mAP of the epoch"),
        "val_macro_f1": MetricInfo("max", "validation macro-F1 of the epoch"),
        "loss": MetricInfo("min", "training loss of the epoch"),
    }
    run_keys = {
        "fps": "training frames per second (default: every frame)",
        "max_per_video": "training frames per video at most",
        "val_max_per_video": "validation frames per video at most (default 32)",
        "val_fraction": "share of videos held out for validation (default 0.2)",
        "split_seed": "seed of the train/validation split (default 0)",
    }
    tunable_keys = ("lr", "weight_decay", "batch_size", "loss", "pos_weight", "dropout", "attention_lambda",
                    "attention_temperature", "max_pos_weight")

    def config_keys(self) -> list[str]:
        from ultrasound.msml import MSMLConfig

        return MSMLConfig.valid_keys()

    def parameters(self) -> dict[str, str]:
        return {**self.scale_keys, **self.run_keys,
                **{k: "MSML setting (sonoray msml --config key)" for k in self.config_keys()}}

    def tunable(self) -> tuple[str, ...]:
        return self.tunable_keys

    def settings(self, config: Mapping[str, Any]):
        from ultrasound.msml import MSMLConfig

        values = {k: v for k, v in config.items() if k in self.config_keys()}
        values.setdefault("findings", config.get("_findings") or ("placeholder",))
        return MSMLConfig.from_dict(values)

    def check(self, spec) -> None:
        if "data" not in spec.fixed:
            raise ValueError("fixed.data: required (the URI of a data set written by `sonoray ingest`)")
        _check_values(self, spec, self.settings)

    def prepare(self, fixed: Mapping[str, Any], work_uri: str, storage) -> dict[str, Any]:
        from cluster.dataset import load_dataset

        pinned = super().prepare(fixed, work_uri, storage)
        findings = fixed.get("findings")
        data = load_dataset(pinned["data"], storage)
        if findings is None:
            findings = list(data.findings)  # as `sonoray msml` does: every finding column
        elif isinstance(findings, str):
            findings = [f.strip() for f in findings.split(",") if f.strip()]
        unknown = [f for f in findings if f not in data.findings]
        if unknown:
            raise ValueError(f"fixed.findings: {unknown} not in the data set; it has {list(data.findings)}")
        return {**pinned, "_findings": list(findings)}

    def max_steps(self, fixed: Mapping[str, Any]) -> int:
        return self.settings(fixed).epochs

    def run_trial(self, config: Mapping[str, Any], out_uri: str, report, storage) -> TrialOutcome:
        from cluster.dataset import load_dataset
        from cluster.msml_train import MSMLRunOptions, run_msml

        values = dict(config)
        values["findings"] = config.get("findings") or config["_findings"]
        options = MSMLRunOptions(
            out_uri=_attempt_dir(out_uri, storage), scale=self.trial_scale(config), fps=config.get("fps"),
            max_per_video=config.get("max_per_video"), val_max_per_video=config.get("val_max_per_video", 32),
            val_fraction=float(config.get("val_fraction", 0.2)), split_seed=int(config.get("split_seed", 0)),
            init_uri=config.get("init"), gradcam=0)
        summary = run_msml(load_dataset(config["data"], storage), self.settings(values), options, storage)
        return TrialOutcome({"val_map": float(summary["map"]), "val_macro_f1": float(summary["macro_f1"]),
                             "loss": float(summary["loss"][-1])}, summary["checkpoint"])

    def job_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        values = dict(config)
        values["findings"] = config.get("findings") or config.get("_findings")
        settings = self.settings(values).to_dict()
        return {k: settings[k] for k in self.config_keys() if k in config or k == "findings"}


    def load_job_config(self, path: str):
        """What ``sonoray msml --config path`` reads (its findings checked against the data set
        when a job runs)."""
        from cluster.job_config import read_config_file
        from ultrasound.msml import MSMLConfig

        return MSMLConfig.from_dict(read_config_file(str(path), what="MSML settings"))
