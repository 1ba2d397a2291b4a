"""Sweep adapter of `sonoray simulate`: one trial = one strategy's experiments (seeds 0..S-1)
with a trial's settings, run in the trial's process against an in-process oracle.

What a trial compares: every trial labels up to the same **budget** (labelled share of the
pool, in the oracle's cost units, audits included; default ``initial + rounds * per_round``), so
that sweeping ``per_round`` does not simply reward the trial that buys the most labels. The
trial reports at ``report_points`` budgets evenly spaced between its initial share and the
budget (default: one per round of the fixed settings); at each it reports, averaged over seeds:

- ``aulc``: normalised area under mAP vs labelled share from the initial share to this point
  (the simulate report's AULC, :func:`ultrasound.al_report.area_under_curve`);
- ``map`` / ``macro_f1``: at this point of the learning curve (interpolated between rounds);
- ``human_fraction``: share of the pool labelled by the oracle; ``machine_precision``: share of
  accepted machine labels that were right; ``rounds``: AL rounds computed so far (compute).

Seeds advance in lockstep, one round at a time, through the job's own resumable
:func:`cluster.simulate.run_experiment` (asked for ``rounds = r``, it resumes from the rounds on
disk and computes round r), so every report averages the same point of every seed. A trial that
restarts (sweep resumed) finds its finished rounds on disk and does not recompute them.

The best config is the YAML ``sonoray simulate --config`` reads (SimulationConfig keys), with
``rounds`` set to what reaches the budget at the chosen ``per_round``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from tuning.adapters import JobAdapter, MetricInfo, TrialOutcome
from tuning.spec import TrialResources

# fixed keys that choose the frames and the trunk (simulate's sampling flags), not settings
SAMPLING_KEYS = {
    "fps": "frames kept per second (simulate --fps; 0 = all)",
    "max_per_video": "frames per video at most (--max-per-video; 0 = no cap)",
    "size": "frame side for the trunk (--size)",
    "channels": "trunk input channels (--channels)",
    "init": "backbone checkpoint URI (--init)",
    "embed_seed": "seed of a random-init trunk (--embed-seed)",
    "cache": "embeddings cache URI (--cache; default <sweep out>/shared/cache)",
}
SWEEP_KEYS = {
    "data": "data set written by `sonoray ingest` (required)",
    "budget": "labelled share every trial runs to (default initial + rounds * per_round)",
    "report_points": "budget points each trial reports at (default: the fixed rounds)",
}
# settings that define the experiment rather than tune it
NOT_TUNABLE = ("strategies", "seeds", "rounds", "mode", "labels", "test_fraction", "noise", "cost_unit")


def _config_cls():
    from cluster.simulate import SimulationConfig

    return SimulationConfig


class SimulateJob(JobAdapter):
    name = "simulate"
    step_name = "budget point"
    compute_metric = "rounds"
    compute_unit = "round"
    metrics = {
        "aulc": MetricInfo("max", "area under mAP vs labelled share, initial share -> this point"),
        "map": MetricInfo("max", "mAP on the held-out split at this point"),
        "macro_f1": MetricInfo("max", "macro-F1 on the held-out split at this point"),
        "human_fraction": MetricInfo("min", "share of the pool labelled by the oracle"),
        "machine_precision": MetricInfo("max", "share of accepted machine labels that were right"),
        "rounds": MetricInfo("min", "active-learning rounds computed (all seeds)"),
    }

    def parameters(self) -> dict[str, str]:
        settings = {name: "simulation setting (sonoray simulate --config key)" for name in _config_cls().valid_keys()}
        return {**SWEEP_KEYS, **settings, **SAMPLING_KEYS}

    def tunable(self) -> tuple[str, ...]:
        return tuple(n for n in _config_cls().valid_keys() if n not in NOT_TUNABLE)

    # -- checks before any trial ---------------------------------------------------------
    def check(self, spec) -> None:
        fixed = spec.fixed
        if "data" not in fixed:
            raise ValueError("fixed.data: required (the URI of a data set written by `sonoray ingest`)")
        config = self.settings(fixed)  # validates every fixed setting
        if len(config.strategies) != 1:
            raise ValueError(f"fixed.strategies: a simulate sweep tunes one strategy, got {list(config.strategies)}")
        for param in spec.space.params:
            probe = dict(fixed)
            for value in (param.grid_values(2) if param.kind != "choice" else param.choices):
                probe[param.name] = value
                try:
                    self.settings(probe)
                except ValueError as err:
                    raise ValueError(f"space.{param.name}: value {value!r} is refused by simulate: {err}") from None
        if "per_round" not in spec.space.names and config.per_round <= 0:
            raise ValueError("fixed.per_round: must be > 0 in a sweep (the trials buy labels round by round)")
        low_initial = spec.space["initial"].low if "initial" in spec.space.names else config.initial
        if self.budget(fixed) <= low_initial:
            raise ValueError(f"fixed.budget: {self.budget(fixed):g} must exceed the initial share {low_initial:g}")
        points = fixed.get("report_points")
        if points is not None and (isinstance(points, bool) or not isinstance(points, int) or points < 1):
            raise ValueError(f"fixed.report_points: must be a positive integer, got {points!r}")

    def settings(self, config: Mapping[str, Any]):
        """The SimulationConfig of a trial config (fixed + sampled keys that are settings)."""
        cls = _config_cls()
        values = {k: v for k, v in config.items() if k in cls.valid_keys()}
        values.setdefault("strategies", ("tsal",))
        return cls.from_mapping(values)

    def budget(self, config: Mapping[str, Any]) -> float:
        """The labelled share trials run to: ``budget``, else ``initial + rounds * per_round`` of
        the fixed settings (:meth:`prepare` pins it, so a sampled ``per_round`` cannot move it)."""
        for key in ("budget", "_budget"):
            if config.get(key) is not None:
                return float(config[key])
        settings = self.settings(config)
        return settings.initial + settings.rounds * settings.per_round

    def max_steps(self, fixed: Mapping[str, Any]) -> int:
        points = fixed.get("report_points")
        return int(points) if points is not None else max(1, self.settings(fixed).rounds)

    def resources(self, fixed: Mapping[str, Any]) -> TrialResources:
        # embeddings mode fits a linear head with one BLAS thread: half a CPU is plenty
        return TrialResources(cpu=0.5 if self.settings(fixed).mode == "embeddings" else 1.0)

    # -- the shared sample table -----------------------------------------------------------
    def sample_spec(self, config: Mapping[str, Any]):
        from cluster.embeddings import SampleSpec

        mode = self.settings(config).mode
        fps = config.get("fps", 3.0)
        cap = config.get("max_per_video", 30)
        return SampleSpec(kind="embeddings" if mode == "embeddings" else "images", fps=fps or None,
                          max_per_video=cap or None, size=int(config.get("size", 224)),
                          channels=int(config.get("channels", 3)), init=config.get("init"),
                          seed=int(config.get("embed_seed", 0)))

    def prepare(self, fixed: Mapping[str, Any], work_uri: str, storage) -> dict[str, Any]:
        """Embed (or sample) the frames once, in the driver; trials read the cache."""
        from cluster.dataset import load_dataset
        from cluster.embeddings import load_samples
        from cluster.storage import parse_uri

        cache = parse_uri(fixed["cache"]) if fixed.get("cache") else parse_uri(work_uri).join("cache")
        data = load_dataset(fixed["data"], storage)
        labels = self.settings(fixed).labels
        unknown = [n for n in labels or () if n not in data.findings]
        if unknown:
            raise ValueError(f"fixed.labels: unknown finding column(s) {unknown}; the data set has {list(data.findings)}")
        load_samples(data, self.sample_spec(fixed), cache, storage)
        return {"_cache": cache.uri, "_budget": self.budget(fixed)}

    # -- one trial -------------------------------------------------------------------------
    def run_trial(self, config: Mapping[str, Any], out_uri: str, report, storage) -> TrialOutcome:
        from cluster.dataset import load_dataset
        from cluster.embeddings import load_samples
        from cluster.oracle import OracleBook
        from cluster.simulate import make_splits, plan_experiments, read_round_meta, run_experiment
        from cluster.storage import parse_uri

        settings = self.settings(config)
        cache = parse_uri(config["_cache"]) if config.get("_cache") else parse_uri(out_uri).join("cache")
        table, _ = load_samples(load_dataset(config["data"], storage), self.sample_spec(config), cache, storage)
        table = self.trial_table(table, settings)
        out = parse_uri(out_uri)
        experiments = plan_experiments(table, settings)
        splits = make_splits(table, settings)
        oracle = OracleBook(table.labels, table.video_id, cost_unit=settings.cost_unit,
                            audit_cost=settings.audit_cost, noise=settings.noise)
        init_backbone = storage.read_bytes(parse_uri(config["init"])) if settings.mode == "finetune" and config.get("init") else None
        budget = self.budget(config)
        cap = self.rounds_to_budget(settings, budget)
        curves = BudgetCurves(len(experiments), budget, self.max_steps(config))
        metrics: dict[str, float] = {}
        for r in range(cap + 1):
            for i, experiment in enumerate(experiments):
                if curves.reached(i):
                    continue
                run_experiment(dataclasses.replace(experiment, rounds=r), settings, table.features,
                               splits[experiment.seed], table.findings, oracle, storage, out,
                               init_backbone=init_backbone)
                curves.add(i, read_round_meta(storage, out.join("experiments", experiment.experiment_id,
                                                                f"round_{r}.parquet")))
            for metrics in curves.ready_reports():
                report(metrics)
            if curves.done or all(curves.reached(i) for i in range(len(experiments))):
                break
        for metrics in curves.ready_reports(final=True):  # a cap hit before the budget: report what is there
            report(metrics)
        return TrialOutcome(metrics, out.uri)

    @staticmethod
    def trial_table(table, settings):
        """What :func:`cluster.simulate.simulate_table` does to the table before its experiments:
        keep the chosen findings, project the embeddings on their top components."""
        from cluster.embeddings import principal_components

        if settings.labels:
            table = table.select_findings(list(settings.labels))
        if settings.mode == "embeddings" and settings.embedding_dims is not None:
            table = dataclasses.replace(table, features=principal_components(table.features, settings.embedding_dims))
        return table

    @staticmethod
    def rounds_to_budget(settings, budget: float) -> int:
        """Rounds after the initial set that buy at least ``budget`` with human queries alone
        (audits make it come sooner); the trial stops as soon as every seed gets there."""
        if settings.per_round <= 0:
            return 0
        return max(1, math.ceil((budget - settings.initial) / settings.per_round - 1e-9))

    # -- the best config -------------------------------------------------------------------
    def job_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        settings = self.settings(config)
        keys = [k for k in _config_cls().valid_keys() if k in config or k in ("strategies", "rounds")]
        values = settings.to_dict()
        values["rounds"] = self.rounds_to_budget(settings, self.budget(config))
        return {k: values[k] for k in keys}

    def command_hint(self, config: Mapping[str, Any]) -> str:
        flags = [f"--data {config['data']}"]
        for key in SAMPLING_KEYS:
            if config.get(key) is not None:
                flags.append(f"--{key.replace('_', '-')} {config[key]}")
        return f"sonoray simulate {' '.join(flags)} --config best_config.yaml --out URI"

    def load_job_config(self, path: str):
        """What ``sonoray simulate --config path`` starts from (the one config loader)."""
        from cluster.job_config import read_config_file
        from cluster.simulate import SimulationConfig

        return SimulationConfig.from_mapping(read_config_file(str(path), what="simulation settings"))


def _mean(values: list[float]) -> float:
    """Mean over seeds of the defined values (NaN: e.g. no machine label accepted yet)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(sum(kept) / len(kept)) if kept else float("nan")


class BudgetCurves:
    """Per-seed learning curves (labelled share -> metrics) and the budget points reported."""

    def __init__(self, seeds: int, budget: float, points: int) -> None:
        self.rows: list[list[dict]] = [[] for _ in range(seeds)]
        self.budget = budget
        self.points = points
        self.reported = 0
        self.rounds = 0

    def add(self, seed_index: int, meta: Mapping[str, Any]) -> None:
        self.rows[seed_index].append(dict(meta))
        if int(meta["round"]) > 0:
            self.rounds += 1

    def reached(self, seed_index: int) -> bool:
        """The seed's curve got to the budget, or its pool has no unlabelled sample left."""
        rows = self.rows[seed_index]
        if not rows:
            return False
        last = rows[-1]
        return last["fraction"] >= self.budget - 1e-12 or last["labelled"] >= last["pool_size"]

    @property
    def done(self) -> bool:
        return self.reported >= self.points

    def start(self) -> float:
        """The first budget point's origin: the largest initial share over seeds."""
        return max(rows[0]["fraction"] for rows in self.rows)

    def target(self, k: int) -> float:
        start = self.start()
        return start + (self.budget - start) * k / self.points

    def ready_reports(self, final: bool = False) -> list[dict[str, float]]:
        """Reports for every budget point all seeds have reached. ``final``: also the points the
        curves never reached (the pool ran out of unlabelled samples): the curve stays flat at its
        last round there, since more budget cannot buy more labels."""
        from ultrasound.al_report import area_under_curve

        out = []
        if any(not rows for rows in self.rows):
            return out
        while self.reported < self.points:
            k = self.reported + 1
            point = self.target(k)
            if not final and not all(rows[-1]["fraction"] >= point - 1e-12 for rows in self.rows):
                break
            per_seed = [self._at(rows, point, area_under_curve) for rows in self.rows]
            metrics = {name: _mean([s[name] for s in per_seed]) for name in per_seed[0]}
            metrics["fraction"] = float(point)
            metrics["rounds"] = float(self.rounds)
            out.append(metrics)
            self.reported = k
        return out

    def _at(self, rows: list[dict], point: float, area_under_curve) -> dict[str, float]:
        import numpy as np

        if rows[-1]["fraction"] < point:  # flat beyond the last round (see ready_reports)
            rows = [*rows, {**rows[-1], "fraction": point}]
        x = np.array([r["fraction"] for r in rows], float)
        start = self.start()
        curve = {}
        for name in ("map", "macro_f1", "human_fraction"):
            y = np.array([r[name] for r in rows], float)
            curve[name] = float(np.interp(point, x, y))
            if name == "map":
                lo = min(max(start, x[0]), point)
                curve["aulc"] = area_under_curve(x, y, lo, point) if point > lo else float(np.interp(point, x, y))
        last = max((r for r in rows if r["fraction"] <= point + 1e-12), key=lambda r: r["round"], default=rows[0])
        total = last.get("machine_labels_total", 0)
        curve["machine_precision"] = float(last.get("machine_labels_correct", 0) / total) if total else float("nan")
        return curve
