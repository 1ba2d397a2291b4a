"""SPEC.yaml: what a sweep tunes, parsed and checked before any trial starts.

A SPEC is a YAML mapping with these keys (only ``job``, ``space`` and ``metric`` are required)::

    job: simulate                 # pretrain | evaluate-after-pretrain | msml | simulate
    name: tsal-threshold          # the study / experiment name (default: the SPEC file's stem)
    fixed: {data: s3://b/pocus, mode: embeddings, rounds: 4}   # the job's arguments, not tuned
    space:                        # see tuning/space.py
      confidence_threshold: {uniform: [0.6, 0.99]}
    metric: aulc                  # or two metrics: [aulc, labels_used] (multi-objective)
    mode: max                     # or [max, min]; default: the job's natural direction per metric
    searcher: tpe                 # tpe | random | grid, or {name: tpe, startup_trials: 4}
    scheduler: asha               # asha | none, or {name: asha, grace_period: 1, reduction_factor: 3}
    trials: 16                    # default trial budget (the --trials flag wins)
    concurrency: 2                # default: derived from the resources each trial needs
    resources: {cpu: 1, gpu: 0.25}   # per trial; default: what the job asks for
    seed: 0

Every error raises :class:`SpecError` naming the key (``space.lr.loguniform``, ``metric``...) and
the valid choices, so a typo fails at once instead of after an hour of trials.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ultrasound.config import did_you_mean

from tuning.space import SearchSpace, SpaceError, parse_space

SPEC_KEYS = ("job", "name", "fixed", "space", "metric", "mode", "searcher", "scheduler", "trials",
             "concurrency", "resources", "seed")
SEARCHERS = ("tpe", "random", "grid")
SEARCHER_KEYS = ("name", "startup_trials", "grid_points")
SCHEDULERS = ("asha", "none")
SCHEDULER_KEYS = ("name", "grace_period", "reduction_factor")
RESOURCE_KEYS = ("cpu", "gpu")
MODES = ("max", "min")


class SpecError(ValueError):
    """A SPEC that cannot run; the message names the key and the valid choices."""


@dataclass(frozen=True)
class SearcherSpec:
    """``tpe`` (Optuna's TPE, the default), ``random`` or ``grid`` (every grid point once).

    ``startup_trials``: random trials before TPE starts modelling (default: a third of the
    budget, between 2 and 10). ``grid_points``: points per float parameter without its own
    ``grid:`` (grid searcher only).
    """

    name: str = "tpe"
    startup_trials: int | None = None
    grid_points: int = 3


@dataclass(frozen=True)
class SchedulerSpec:
    """``asha`` (asynchronous successive halving over epochs/rounds, the default) or ``none``."""

    name: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 3.0


@dataclass(frozen=True)
class TrialResources:
    """What one trial holds while it runs (fractional GPUs allowed: ``gpu: 0.25``)."""

    cpu: float = 1.0
    gpu: float = 0.0

    def as_tune(self) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass(frozen=True)
class SweepSpec:
    job: str
    name: str
    space: SearchSpace
    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    searcher: SearcherSpec = SearcherSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    trials: int = 16
    concurrency: int | None = None
    resources: TrialResources | None = None
    seed: int = 0

    @property
    def metric(self) -> str:
        """The primary metric (ASHA and 'best' use it)."""
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    def to_dict(self) -> dict[str, Any]:
        """The resolved SPEC as plain YAML-able data (saved beside the sweep; resume checks it)."""
        space = {}
        for p in self.space.params:
            body: dict[str, Any] = {}
            if p.kind == "choice":
                body["choice"] = list(p.choices)
            else:
                body[p.kind] = [p.low, p.high]
            if p.step:
                body["step"] = p.step
            if p.log:
                body["log"] = True
            if p.grid_points:
                body["grid"] = p.grid_points
            if p.when:
                body["when"] = {parent: list(values) for parent, values in p.when}
            space[p.name] = body
        return {
            "job": self.job,
            "name": self.name,
            "fixed": dict(self.fixed),
            "space": space,
            "metric": list(self.metrics) if self.multi_objective else self.metric,
            "mode": list(self.modes) if self.multi_objective else self.mode,
            "searcher": dataclasses.asdict(self.searcher),
            "scheduler": dataclasses.asdict(self.scheduler),
            "trials": self.trials,
            "concurrency": self.concurrency,
            "resources": dataclasses.asdict(self.resources) if self.resources else None,
            "seed": self.seed,
        }


def load_spec(path: str | Path, adapters: Mapping[str, Any] | None = None,
              fixed: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and check a SPEC file (name defaults to the file's stem); ``fixed`` overrides its
    fixed arguments (``sonoray sweep --data`` and ``--set``) before the check."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"SPEC file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if isinstance(raw, dict) and fixed:
        own = raw.get("fixed") or {}
        if not isinstance(own, dict):
            raise SpecError(f"fixed: must be a mapping of the job's arguments, got {own!r}")
        raw["fixed"] = {**own, **fixed}
    return parse_spec(raw, default_name=path.stem, adapters=adapters)


def parse_spec(raw: Any, default_name: str = "sweep", adapters: Mapping[str, Any] | None = None) -> SweepSpec:
    """Check a SPEC mapping against the job it names; ``adapters`` maps job name -> adapter
    (default: :data:`tuning.adapters.ADAPTERS`)."""
    if adapters is None:
        from tuning.adapters import ADAPTERS as adapters  # noqa: N811
    if not isinstance(raw, Mapping):
        raise SpecError(f"SPEC must be a mapping with keys {', '.join(SPEC_KEYS)}, got {type(raw).__name__}")
    _reject_unknown(raw, SPEC_KEYS, "")
    for required in ("job", "space", "metric"):
        if required not in raw:
            raise SpecError(f"SPEC key {required!r} is missing (required: job, space, metric)")

    job = raw["job"]
    if job not in adapters:
        raise SpecError(f"job: unknown job {job!r}{_did_you_mean(job, adapters)}; valid: {', '.join(adapters)}")
    adapter = adapters[job]

    name = str(raw.get("name") or default_name)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SpecError(f"name: {name!r} must use letters, digits, '-', '_' or '.'")

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, Mapping):
        raise SpecError(f"fixed: must be a mapping of the job's arguments, got {fixed!r}")
    fixed = dict(fixed)
    valid_keys = tuple(adapter.parameters())
    for key in fixed:
        if key not in valid_keys:
            raise SpecError(f"fixed.{key}: unknown argument of job {job!r}{_did_you_mean(key, valid_keys)}; "
                            f"valid: {', '.join(valid_keys)}")

    try:
        space = parse_space(raw["space"])
    except SpaceError as err:
        raise SpecError(str(err)) from None
    tunable = tuple(adapter.tunable())
    for param in space.params:
        if param.name not in tunable:
            raise SpecError(f"space.{param.name}: not a tunable parameter of job {job!r}"
                            f"{_did_you_mean(param.name, tunable)}; valid: {', '.join(tunable)}")
        if param.name in fixed:
            raise SpecError(f"space.{param.name}: also given in fixed; a parameter is either fixed or searched")

    metrics = _as_tuple(raw["metric"], "metric")
    if len(metrics) > 2:
        raise SpecError(f"metric: give one metric, or two for a multi-objective sweep; got {len(metrics)}")
    if len(set(metrics)) != len(metrics):
        raise SpecError(f"metric: the two metrics must differ, got {list(metrics)}")
    known = adapter.metrics
    for metric in metrics:
        if metric not in known:
            raise SpecError(f"metric: {metric!r} is not a metric of job {job!r}{_did_you_mean(metric, known)}; "
                            f"valid: {', '.join(known)}")
    if "mode" in raw and raw["mode"] is not None:
        modes = _as_tuple(raw["mode"], "mode")
        if len(modes) != len(metrics):
            raise SpecError(f"mode: give one mode per metric ({len(metrics)}), got {list(modes)}")
        for mode in modes:
            if mode not in MODES:
                raise SpecError(f"mode: {mode!r} is not a mode; valid: {', '.join(MODES)}")
    else:
        modes = tuple(known[m].mode for m in metrics)

    searcher = _parse_searcher(raw.get("searcher", "tpe"))
    scheduler = _parse_scheduler(raw.get("scheduler", "asha"))
    if searcher.name == "grid" and scheduler.name == "asha" and "scheduler" not in raw:
        scheduler = SchedulerSpec(name="none")  # a grid compares every point at full length
    if scheduler.name == "asha" and not adapter.reports_every_step(metrics[0]):
        raise SpecError(f"scheduler: asha needs {metrics[0]!r} reported every {adapter.step_name}, but job "
                        f"{job!r} reports it once at the end; valid here: none")

    trials = _positive_int(raw.get("trials", 16), "trials")
    concurrency = raw.get("concurrency")
    if concurrency is not None:
        concurrency = _positive_int(concurrency, "concurrency")
    resources = _parse_resources(raw.get("resources"))
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError(f"seed: must be an integer, got {seed!r}")

    spec = SweepSpec(job=job, name=name, space=space, metrics=metrics, modes=modes, fixed=fixed,
                     searcher=searcher, scheduler=scheduler, trials=trials, concurrency=concurrency,
                     resources=resources, seed=seed)
    try:
        adapter.check(spec)
    except (ValueError, TypeError) as err:
        if isinstance(err, SpecError):
            raise
        raise SpecError(str(err)) from err
    return spec


def _parse_searcher(raw: Any) -> SearcherSpec:
    body = _named_section(raw, "searcher", SEARCHERS, SEARCHER_KEYS)
    startup = body.get("startup_trials")
    if startup is not None:
        startup = _positive_int(startup, "searcher.startup_trials")
    grid_points = _positive_int(body.get("grid_points", 3), "searcher.grid_points")
    if body["name"] != "tpe" and startup is not None:
        raise SpecError("searcher.startup_trials: only the tpe searcher takes it")
    return SearcherSpec(name=body["name"], startup_trials=startup, grid_points=grid_points)


def _parse_scheduler(raw: Any) -> SchedulerSpec:
    body = _named_section(raw, "scheduler", SCHEDULERS, SCHEDULER_KEYS)
    grace = _positive_int(body.get("grace_period", 1), "scheduler.grace_period")
    factor = body.get("reduction_factor", 3)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise SpecError(f"scheduler.reduction_factor: must be a number > 1, got {factor!r}")
    if body["name"] == "none" and len(body) > 1:
        extra = next(k for k in body if k != "name")
        raise SpecError(f"scheduler.{extra}: scheduler none takes no options")
    return SchedulerSpec(name=body["name"], grace_period=grace, reduction_factor=float(factor))


def _named_section(raw: Any, key: str, names: tuple[str, ...], keys: tuple[str, ...]) -> dict:
    if raw is None:
        raw = {"name": names[0]}
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise SpecError(f"{key}: must be one of {', '.join(names)} or a mapping with keys {', '.join(keys)}")
    _reject_unknown(raw, keys, f"{key}.")
    body = dict(raw)
    body.setdefault("name", names[0])
    if body["name"] not in names:
        raise SpecError(f"{key}: unknown {key} {body['name']!r}; valid: {', '.join(names)}")
    return body


def _parse_resources(raw: Any) -> TrialResources | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise SpecError(f"resources: must be a mapping with keys {', '.join(RESOURCE_KEYS)}, got {raw!r}")
    _reject_unknown(raw, RESOURCE_KEYS, "resources.")
    values = {}
    for key in RESOURCE_KEYS:
        value = raw.get(key, 1.0 if key == "cpu" else 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise SpecError(f"resources.{key}: must be a number >= 0, got {value!r}")
        values[key] = float(value)
    if values["cpu"] == 0 and values["gpu"] == 0:
        raise SpecError("resources: a trial needs some cpu or gpu")
    if values["gpu"] > 1 and values["gpu"] != int(values["gpu"]):
        raise SpecError(f"resources.gpu: above 1 it must be a whole number, got {values['gpu']:g}")
    return TrialResources(**values)


def _reject_unknown(raw: Mapping, valid: tuple[str, ...], prefix: str) -> None:
    for key in raw:
        if key not in valid:
            raise SpecError(f"{prefix}{key}: unknown key{_did_you_mean(str(key), valid)}; valid: {', '.join(valid)}")


def _did_you_mean(word: Any, options) -> str:
    return did_you_mean([str(word)], [str(o) for o in options])


def _as_tuple(raw: Any, key: str) -> tuple[str, ...]:
    values = raw if isinstance(raw, (list, tuple)) else [raw]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise SpecError(f"{key}: must be a name or a list of names, got {raw!r}")
    return tuple(values)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{key}: must be a positive integer, got {value!r}")
    return value
