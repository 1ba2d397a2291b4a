"""What the sweep framework needs to know about a job, one small adapter per job.

The framework (spec, space, searchers, driver, results) only talks to :class:`JobAdapter`; each
adapter turns a trial's config into a call of its job's public functions and forwards the
job's per-epoch / per-round metrics to a ``report`` callback, which is what lets ASHA stop bad
trials early. Adapters live in their own modules and are looked up by
job name in :data:`ADAPTERS`, imported lazily (tuning/job_train.py, tuning/job_simulate.py).

A trial's config is flat: ``{"lr": 3e-4, "confidence.threshold": 0.9}``; dotted names reach
nested keys of the job's YAML config (:func:`nest`).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tuning.spec import TrialResources

Report = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class MetricInfo:
    """A metric a job reports: its natural direction and, for the table, what it means."""

    mode: str
    description: str
    every_step: bool = True


@dataclass(frozen=True)
class TrialOutcome:
    """What a finished trial hands back: its last metrics and where its job wrote output."""

    metrics: dict[str, float]
    out_uri: str


class JobAdapter:
    """Base class: one subclass per tunable job.

    Subclasses set ``name``, ``step_name`` ("epoch" / "round"), ``metrics`` and implement
    :meth:`parameters`, :meth:`run_trial` and :meth:`job_config`.
    """

    name: str = ""
    step_name: str = "step"
    metrics: Mapping[str, MetricInfo] = {}
    # a metric counting the work a trial did so far (e.g. "rounds"), and its unit; None: the
    # steps reported (epochs) are the compute
    compute_metric: str | None = None
    compute_unit: str | None = None

    # -- what a SPEC may say ------------------------------------------------------------
    def parameters(self) -> Mapping[str, str]:
        """Every key ``fixed:`` may set, with a one-line description."""
        raise NotImplementedError

    def tunable(self) -> tuple[str, ...]:
        """Keys ``space:`` may search (default: every parameter except data / output
        locations and switches that change what the trial measures)."""
        return tuple(self.parameters())

    def reports_every_step(self, metric: str) -> bool:
        return self.metrics[metric].every_step

    def check(self, spec) -> None:
        """Reject fixed values the job would refuse (raise ValueError with the key); called
        by :func:`tuning.spec.parse_spec` before any trial starts."""

    # -- how a trial runs --------------------------------------------------------------
    def max_steps(self, fixed: Mapping[str, Any]) -> int:
        """Epochs / rounds of a full-length trial (ASHA's ``max_t``)."""
        raise NotImplementedError

    def resources(self, fixed: Mapping[str, Any]) -> TrialResources:
        """What one trial holds while it runs (the SPEC's ``resources:`` overrides it)."""
        return TrialResources(cpu=1.0, gpu=0.0)

    def extra_resources(self, fixed: Mapping[str, Any]) -> TrialResources:
        """Resources a trial starts beside its own (e.g. the Ray Train workers it launches),
        counted when the driver derives how many trials fit at once."""
        return TrialResources(cpu=0.0, gpu=0.0)

    def prepare(self, fixed: Mapping[str, Any], work_uri: str, storage) -> dict[str, Any]:
        """Run once in the sweep driver before any trial (e.g. compute shared embeddings);
        returns extra fixed values every trial receives. Must be idempotent (resume calls it
        again)."""
        return {}

    def run_trial(self, config: Mapping[str, Any], out_uri: str, report: Report, storage) -> TrialOutcome:
        """Run one trial of the job with ``config`` (fixed + sampled + prepared), its output under
        ``out_uri``; call ``report(metrics)`` after every epoch / round."""
        raise NotImplementedError

    def job_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The YAML mapping that ``sonoray <job> --config FILE`` accepts as is, for ``config``."""
        raise NotImplementedError

    def command_hint(self, config: Mapping[str, Any]) -> str | None:
        """A command line that runs the job with the best config (written as a YAML comment)."""
        return None

    def load_job_config(self, path: str) -> Any:
        """Load a config file through the job's own ``--config`` path (for round-trip checks)."""
        raise NotImplementedError


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": 2}`` -> ``{"a": {"b": 1}, "c": 2}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"config key {key!r} clashes with a value at {part!r}")
        node[parts[-1]] = value
    return out


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of :func:`nest`."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class _LazyAdapters(Mapping):
    """Job name -> adapter instance, importing an adapter's module on first use."""

    def __init__(self, table: Mapping[str, str]) -> None:
        self._table = dict(table)
        self._loaded: dict[str, JobAdapter] = {}

    def __getitem__(self, name: str) -> JobAdapter:
        if name not in self._table:
            raise KeyError(name)
        if name not in self._loaded:
            module_name, _, attr = self._table[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module_name), attr)()
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


ADAPTERS: Mapping[str, JobAdapter] = _LazyAdapters({
    "pretrain": "tuning.job_train:PretrainJob",
    "evaluate-after-pretrain": "tuning.job_train:EvaluateAfterPretrainJob",
    "msml": "tuning.job_train:MSMLJob",
    "simulate": "tuning.job_simulate:SimulateJob",
})
