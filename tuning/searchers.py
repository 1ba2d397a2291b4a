"""Searchers and schedulers of a sweep: Optuna behind Ray Tune's ``OptunaSearch``, ASHA or none.

Every searcher is an Optuna sampler, so every sweep, whatever its searcher, leaves an Optuna
study (SQLite under --out by default, any SQLAlchemy URL by flag) that a user can open with
``optuna-dashboard`` or ``optuna.load_study``:

- ``tpe``: ``TPESampler`` (multivariate, grouped for conditional spaces, constant liar for the
  trials that run in parallel); with two metrics, Optuna's multi-objective TPE.
- ``random``: ``RandomSampler``.
- ``grid``: every point of :meth:`SearchSpace.grid` enqueued in the study (conditional
  parameters expanded only where they apply), then drawn in order.

The searcher's own checkpoint (written by Tune into the experiment directory, over and over) is
JSON (:meth:`SweepOptunaSearch.save`), and neither it nor the searcher object Tune pickles into
``tuner.pkl`` keeps a storage handle: a SQLAlchemy URL may carry a password. A resumed driver
re-attaches the storage with :func:`attach_storage` before ``Tuner.restore``. Ray Tune's own
experiment files (``tuner.pkl``, ``trainable.pkl``, ``search_gen_state-*.pkl``, the trials in
``experiment_state-*.json``) are cloudpickles that ``Tuner.restore`` unpickles: that is Tune's
design and cannot be switched off, so a sweep's ``--out`` must be writable by trusted users only.

Trials stopped early by ASHA are told to Optuna as PRUNED (with the values they reported per
step), not as complete: TPE then ranks them below every full-length trial instead of mistaking a
one-epoch score for a final one.
"""
from __future__ import annotations

import json
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from tuning.spec import SweepSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)

ITERATION = "training_iteration"
TUNE_TRIAL_ATTR = "tune_trial_id"

_ATTACHED_STORAGES: dict[str, optuna.storages.BaseStorage] = {}


def attach_storage(study_name: str, storage: optuna.storages.BaseStorage) -> None:
    """Make ``storage`` the one a searcher of ``study_name`` uses when Tune restores it."""
    _ATTACHED_STORAGES[study_name] = storage


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna storage at a SQLAlchemy URL (``sqlite:///path.db``, ``postgresql://...``)."""
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    except Exception as err:  # bad URL, driver missing, server down: name the URL
        raise ValueError(f"--storage {url!r}: cannot open the Optuna storage: {err}") from err


def _engine_kwargs(url: str) -> dict[str, Any]:
    # The driver is the only writer; a generous timeout rides over a slow shared disk.
    return {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}


def study_exists(storage: optuna.storages.BaseStorage, study_name: str) -> bool:
    return any(s.study_name == study_name for s in storage.get_all_studies())


def startup_trials(spec: SweepSpec, trials: int) -> int:
    """Random trials before TPE models the space: the SPEC's value, else a third of the
    budget between 2 and 10."""
    if spec.searcher.startup_trials is not None:
        return spec.searcher.startup_trials
    return max(2, min(10, trials // 3))


def make_sampler(spec: SweepSpec, trials: int) -> optuna.samplers.BaseSampler:
    if spec.searcher.name == "tpe":
        return optuna.samplers.TPESampler(
            seed=spec.seed,
            n_startup_trials=startup_trials(spec, trials),
            multivariate=True,
            group=any(p.conditional for p in spec.space.params),
            constant_liar=True,
        )
    return optuna.samplers.RandomSampler(seed=spec.seed)


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    return spec.space.grid(default_points=spec.searcher.grid_points)


def make_searcher(spec: SweepSpec, trials: int, storage: optuna.storages.BaseStorage, max_steps: int) -> "SweepOptunaSearch":
    """The Tune searcher of ``spec``: OptunaSearch over the define-by-run space."""
    points = grid_points(spec)[:trials] if spec.searcher.name == "grid" else None
    return SweepOptunaSearch(
        space=spec.space.suggest,
        metric=list(spec.metrics) if spec.multi_objective else spec.metric,
        mode=list(spec.modes) if spec.multi_objective else spec.mode,
        points_to_evaluate=points,
        sampler=make_sampler(spec, trials),
        study_name=spec.name,
        storage=storage,
        max_steps=max_steps,
    )


def make_scheduler(spec: SweepSpec, max_steps: int) -> ASHAScheduler | None:
    """ASHA over epochs/rounds on the primary metric, rungs at ``grace * factor^k`` strictly
    before the last step: a trial is only ever stopped early, never at its last step, and one
    that gets there ends by itself (stopping it would kill its job's final work, e.g. a Train
    job exporting its model after the last epoch's report). None when no step is early enough."""
    if spec.scheduler.name == "none" or max_steps <= spec.scheduler.grace_period:
        return None
    return ASHAScheduler(
        time_attr=ITERATION,
        metric=spec.metric,
        mode=spec.mode,
        max_t=max_steps - 1,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
        stop_last_trials=False,
    )


SEARCHER_STATE_FORMAT = "sonoray-optuna-search/1"
_RNG_OWNERS = ("", "_random_sampler")  # the sampler itself and TPE's fallback random sampler


def sampler_rng_states(sampler: optuna.samplers.BaseSampler) -> dict[str, list]:
    """The numpy RandomState of ``sampler`` (and of its inner random sampler) as JSON lists."""
    states = {}
    for owner_name in _RNG_OWNERS:
        owner = getattr(sampler, owner_name, None) if owner_name else sampler
        rng = getattr(getattr(owner, "_rng", None), "rng", None)
        if rng is not None:
            name, keys, pos, has_gauss, cached = rng.get_state()
            states[owner_name or "sampler"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return states


def set_sampler_rng_states(sampler: optuna.samplers.BaseSampler, states: dict[str, list]) -> None:
    """Undo :func:`sampler_rng_states`."""
    import numpy as np

    for owner_name in _RNG_OWNERS:
        state = states.get(owner_name or "sampler")
        owner = getattr(sampler, owner_name, None) if owner_name else sampler
        rng = getattr(getattr(owner, "_rng", None), "rng", None)
        if state is not None and rng is not None:
            name, keys, pos, has_gauss, cached = state
            rng.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


class SweepOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial stopped before ``max_steps`` was PRUNED, tags each
    Optuna trial with its Tune trial id, and saves its state without the storage handle."""

    def __init__(self, *args, max_steps: int, **kwargs) -> None:
        self._max_steps = max_steps
        super().__init__(*args, **kwargs)
        attach_storage(self._study_name, self._storage)

    @property
    def study(self) -> optuna.Study:
        if self._ot_study is None:
            raise RuntimeError(f"the Optuna storage of study {self._study_name!r} was not re-attached "
                               f"(tuning.searchers.attach_storage) before the sweep was restored")
        return self._ot_study

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return params

    # -- state without the storage: Tune pickles searchers into the experiment directory ----
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_storage"] = None
        state["_ot_study"] = None
        state["_ot_trials"] = {tid: t._trial_id for tid, t in self._ot_trials.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        trial_ids = state["_ot_trials"]
        self.__dict__.update(state)
        self._ot_trials = {}
        storage = _ATTACHED_STORAGES.get(self._study_name)
        if storage is None:
            return  # unusable until attached; ``study`` says so
        self._storage = storage
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=storage,
                                           sampler=self._sampler, pruner=optuna.pruners.NopPruner())
        self._ot_trials = {tid: optuna.trial.Trial(self._ot_study, storage_id) for tid, storage_id in trial_ids.items()}

    # -- the searcher checkpoint Tune writes each step: JSON, not a pickle ------------------
    def save(self, checkpoint_path: str) -> None:
        """The searcher's progress as JSON (no storage handle, no code): which Optuna trial each
        Tune trial is, which are complete, the grid points left, the samplers' RNG states."""
        state = {
            "format": SEARCHER_STATE_FORMAT,
            "study_name": self._study_name,
            "points_to_evaluate": self._points_to_evaluate,
            "evaluated_rewards": self._evaluated_rewards,
            "completed_trials": sorted(self._completed_trials),
            "ot_trials": {tid: t._trial_id for tid, t in self._ot_trials.items()},
            "rng": sampler_rng_states(self._sampler),
        }
        with open(checkpoint_path, "w") as handle:
            json.dump(state, handle)

    def restore(self, checkpoint_path: str) -> None:
        """Continue from :meth:`save`'s JSON in the study of the attached storage."""
        with open(checkpoint_path) as handle:
            try:
                state = json.load(handle)
            except ValueError as err:
                raise ValueError(f"{checkpoint_path}: not a sonoray searcher state (JSON): {err}") from None
        if not isinstance(state, dict) or state.get("format") != SEARCHER_STATE_FORMAT:
            raise ValueError(f"{checkpoint_path}: not a sonoray searcher state ({SEARCHER_STATE_FORMAT})")
        self._points_to_evaluate = state["points_to_evaluate"]
        self._evaluated_rewards = state["evaluated_rewards"]
        self._completed_trials = set(state["completed_trials"])
        set_sampler_rng_states(self._sampler, state["rng"])
        self.__setstate__({**self.__dict__, "_study_name": state["study_name"], "_ot_trials": state["ot_trials"]})

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric not in result:
            return  # a per-epoch report of a job whose metric comes once, at the end
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and not isinstance(self.metric, list):
            # a trial restarted by a resume reports its first steps again: Optuna keeps the first
            reported = self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values
            if int(result.get(ITERATION, 0)) in reported:
                return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = (result is not None and not error
                         and int(result.get(ITERATION, self._max_steps)) < self._max_steps)
        if not stopped_early or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        except Exception as err:  # e.g. told before a resume: the study already has it
            optuna.logging.get_logger(__name__).warning(str(err))
        self._completed_trials.add(trial_id)
