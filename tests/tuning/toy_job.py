"""A synthetic job for framework tests: a known objective of its parameters, one report per
step, no data. ``score`` at step t is ``-(x - 0.3)^2 - 0.1 * [kind == 'b'] + 0.01 * t``."""
from __future__ import annotations

import time

from tuning.adapters import JobAdapter, MetricInfo, TrialOutcome
from tuning.spec import TrialResources


def toy_score(x: float, kind: str = "a", step: int = 4) -> float:
    return -(x - 0.3) ** 2 - (0.1 if kind == "b" else 0.0) + 0.01 * step


class ToyJob(JobAdapter):
    name = "toy"
    step_name = "step"
    metrics = {
        "score": MetricInfo("max", "synthetic objective"),
        "cost": MetricInfo("min", "x itself"),
        "final_only": MetricInfo("max", "reported at the end only", every_step=False),
    }

    def parameters(self):
        return {"x": "a float", "kind": "a choice", "gamma": "used with kind b", "steps": "steps per trial",
                "sleep": "seconds per step"}

    def tunable(self):
        return ("x", "kind", "gamma")

    def check(self, spec):
        steps = spec.fixed.get("steps", 4)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"fixed.steps: must be a positive integer, got {steps!r}")

    def max_steps(self, fixed):
        return int(fixed.get("steps", 4))

    def resources(self, fixed):
        return TrialResources(cpu=0.5)

    def run_trial(self, config, out_uri, report, storage):
        steps = self.max_steps(config)
        metrics = {}
        for t in range(1, steps + 1):
            time.sleep(float(config.get("sleep", 0.0)))
            metrics = {"score": toy_score(config["x"], config.get("kind", "a"), t), "cost": config["x"]}
            report(metrics)
        return TrialOutcome(metrics, out_uri)

    def job_config(self, config):
        return {k: config[k] for k in ("x", "kind", "gamma", "steps") if k in config}
