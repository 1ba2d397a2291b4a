"""What a labelling-budget simulation decides: :class:`SimulationConfig` and the registry of
experiment kinds.

An experiment kind (:class:`ExperimentKind`) is a query strategy (a class of
:mod:`ultrasound.active.strategies`) with its parameters, plus whether TSAL's machine stream
(confidence-validated machine labels, audits) runs beside it. The built-in kinds are TSAL, its
two streams alone (``mlm``, ``self_training``) and the single-stream baselines. A new strategy is
one class and one :func:`register_strategy` call: its parameters are validated there and become
part of every experiment id of that kind.

No Ray and no storage here: ``cluster/simulate.py`` runs what this module describes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from pydantic import Field, field_validator, model_validator

from ultrasound.active.confidence import ConfidenceConfig
from ultrasound.active.strategies import STRATEGIES, Strategy, make_strategy
from ultrasound.config import Names, Settings

# bumped when a change of the experiment logic changes results: old folders never resume into new runs
SIMULATOR_VERSION = 4
MODES = ("embeddings", "finetune")
DEFAULT_STRATEGIES = ("tsal", "random", "least_margin", "mean_entropy", "lci", "adaptive")

# fields of SimulationConfig that decide a result, by who reads them
_COMMON_FIELDS = ("initial", "per_round", "mode", "test_fraction", "noise", "cost_unit", "query_unit")
_MODEL_FIELDS = {
    "embeddings": ("head_l2", "head_pos_weight", "head_max_iter", "head_tol"),
    "finetune": ("finetune_epochs", "finetune_batch_size", "finetune_lr"),
}
_MACHINE_FIELDS = ("confidence", "rule_confidence", "min_dependence", "max_machine_per_round", "audit",
                   "audit_cost", "audit_gate", "machine_weight")


@dataclass(frozen=True)
class ExperimentKind:
    """One kind of experiment.

    Attributes:
        name: what ``strategies`` lists and the report shows.
        strategy: the query strategy's name in :data:`ultrasound.active.strategies.STRATEGIES`.
        machine_stream: whether TSAL's machine stream (validated machine labels + audits) runs.
        config_params: strategy parameter -> the :class:`SimulationConfig` field holding its value
            (e.g. MLM's ``correlation_weight``), so a YAML key or flag sets it.
        params: fixed strategy parameters (a registered strategy's own settings).
        cls: the strategy class of a registered strategy, carried with the kind so that a worker
            process (a Ray task) that never ran the registration can build it.
    """

    name: str
    strategy: str
    machine_stream: bool = False
    config_params: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    cls: type | None = field(default=None, compare=False)

    def build(self, config: "SimulationConfig") -> Strategy:
        """The query strategy with its parameters (config-backed ones read from ``config``)."""
        return make_strategy(self.strategy, self.cls,  # cls: registered in the driver, maybe not here
                             **{p: getattr(config, f) for p, f in self.config_params.items()}, **self.params)


KINDS: dict[str, ExperimentKind] = {}


def register_kind(kind: ExperimentKind) -> ExperimentKind:
    """Add an experiment kind; its strategy must exist and its parameters must be the strategy's."""
    if kind.strategy not in STRATEGIES:
        raise ValueError(f"kind {kind.name!r}: unknown strategy {kind.strategy!r}; valid: {sorted(STRATEGIES)}")
    fields = set(SimulationConfig.model_fields)
    unknown = sorted(set(kind.config_params.values()) - fields)
    if unknown:
        raise ValueError(f"kind {kind.name!r}: config_params name unknown settings {unknown}")
    make_strategy(kind.strategy, **{p: SimulationConfig.default_of(f) for p, f in kind.config_params.items()},
                  **kind.params)  # validates the parameter names and values
    KINDS[kind.name] = kind
    return kind


def register_strategy(cls: type, *, machine_stream: bool = False, **params: Any) -> ExperimentKind:
    """A new query strategy in one call: ``cls`` (a frozen dataclass with a ``name`` field and
    ``score(probs, context)``, see :class:`~ultrasound.active.strategies.Strategy`) joins the
    strategies, and an experiment kind of the same name joins the simulator, with ``params``
    (validated against ``cls``'s fields; part of every experiment id of the kind).

    Example:
        >>> from ultrasound.active.strategies import LeastMargin
        >>> @dataclass(frozen=True)
        ... class Greedy(LeastMargin):
        ...     name: str = field(default="greedy_margin", init=False)
        >>> register_strategy(Greedy).name
        'greedy_margin'
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a class attribute 'name' (the strategy's name)")
    if name in KINDS and KINDS[name].strategy != name:
        raise ValueError(f"{name!r} is already an experiment kind")
    STRATEGIES[name] = cls
    return register_kind(ExperimentKind(name, name, machine_stream, params=dict(params), cls=cls))


class SimulationConfig(Settings):
    """Everything a simulation run decides; YAML keys are these field names.

    Attributes:
        strategies: experiment kinds: ``tsal`` (MLM queries + confidence-validated machine labels
            + audits), its two streams alone, ``mlm`` (MLM queries only) and ``self_training``
            (random queries + the machine stream), and the baselines ``random``,
            ``least_margin``, ``mean_entropy``, ``lci``, ``adaptive``.
        seeds: experiments per strategy, seeds ``0..seeds-1`` (each seed fixes the split, the
            initial set, the annotator's errors and every draw).
        initial, per_round: labelling budget as shares of the training pool: the initial random
            set, then the oracle queries of each round (rounded, at least 1).
        rounds: rounds after the initial set.
        mode: ``embeddings`` (linear head on frozen embeddings) or ``finetune`` (MSML retrained
            from its initial weights every round, on frames).
        labels: finding columns to use (``None``: all of the data set's findings).
        test_fraction: share of patients (videos when unknown) held out for evaluation.
        noise: annotator error, per-label flip probability.
        cost_unit: ``frame`` or ``video`` (see :mod:`cluster.oracle`).
        query_unit: ``frame`` (default: a round queries single frames, at most one per video
            while unqueried videos remain) or ``video`` (the initial set and every round pick
            whole videos, ``initial`` / ``per_round`` then count videos, and the oracle labels
            every frame of a picked video at one video's cost; needs ``cost_unit: video``). The
            machine stream then labels, caps, audits and re-validates whole videos too.
        confidence: TSAL's per-finding confidence threshold for machine labels.
        rule_confidence, min_dependence: co-occurrence rules of the validation (docs/tsal.md).
        max_machine_per_round: cap on newly accepted machine labels per round: ``"budget"``
            (default: as many as the round's human queries), a number, or ``None`` (no cap), in
            the query unit (frames, or videos with ``query_unit: video``).
        audit: share of accepted machine labels (videos with ``query_unit: video``) the oracle
            audits.
        audit_cost: cost of one audit (1 = as much as labelling a frame; with ``cost_unit:
            video``, per audited video and round).
        audit_gate: drop a round's unaudited machine labels when the audited error rate exceeds
            it (``None``: never).
        machine_weight: training weight of an unaudited machine label (human labels weigh 1).
        correlation_weight, smallest: MLM's correlation adjustment and number of margins averaged.
        adaptive_beta: Adaptive's trade-off between max-margin and cardinality inconsistency.
        embedding_dims: project the embeddings on their top principal components first
            (unsupervised, all frames; ``None``: use them as they are). Embeddings mode only.
        head_l2, head_pos_weight, head_max_iter, head_tol: the embeddings-mode head
            (``train_heads``): L2 penalty (3e-3: benchmarks/head_calibration.py, docs/tsal.md),
            positive weights, and the solve's iteration cap and gradient tolerance (1e-5: the
            probabilities within about 3e-3 of the exact optimum's).
        finetune_epochs, finetune_batch_size, finetune_lr: the finetune-mode MSML training.
    """

    what: ClassVar[str] = "simulation"

    strategies: Names = Field(DEFAULT_STRATEGIES, description="experiment kinds, comma-separated")
    seeds: int = Field(3, description="experiments per strategy, seeds 0..S-1")
    initial: float = Field(0.05, description="initial labelled share of the pool")
    per_round: float = Field(0.05, description="oracle queries per round, share of the pool")
    rounds: int = Field(9, description="rounds after the initial set")
    mode: str = Field("embeddings", description="embeddings: head on frozen embeddings; finetune: MSML retrained each round")
    labels: Names | None = Field(None, description="finding columns, comma-separated (default: all)")
    test_fraction: float = Field(0.25, description="held-out share of patients")
    noise: float = Field(0.0, description="annotator error: per-label flip rate")
    cost_unit: str = Field("frame", description="what one label costs: frame or video")
    query_unit: str = Field("frame", description="frame: single frames, one per video a round; video: whole "
                                                 "videos at one video's cost (needs cost_unit video)")
    confidence: float = Field(0.9, description="TSAL machine-label confidence threshold")
    rule_confidence: float = Field(0.9, description="confidence of a co-occurrence rule of the validation")
    min_dependence: float = Field(0.2, description="dependence a co-occurrence rule needs")
    max_machine_per_round: int | str | None = Field(
        "budget", description="new machine labels a round at most (videos with query_unit video): N, budget "
                              "(as many as the round's human queries) or none")
    audit: float = Field(0.1, description="share of machine labels the oracle audits")
    audit_cost: float = Field(0.5, description="cost of one audit (1 = labelling a frame; per video and "
                                             "round with cost_unit video)")
    audit_gate: float | None = Field(None, description="drop a round's unaudited machine labels above this audited error rate")
    machine_weight: float = Field(0.5, description="training weight of machine labels")
    correlation_weight: float = Field(0.5, description="MLM label-correlation weight")
    smallest: int = Field(2, description="margins MLM averages")
    adaptive_beta: float = Field(0.5, description="Adaptive's max-margin vs cardinality trade-off")
    embedding_dims: int | None = Field(None, description="project embeddings on their top principal components first")
    head_l2: float = Field(3e-3, description="L2 penalty of the embeddings-mode head")
    head_pos_weight: str = Field("auto", description="positive weights of the head: auto or none")
    head_max_iter: int = Field(2000, description="iteration cap of the head's solve")
    head_tol: float = Field(1e-5, description="gradient tolerance of the head's solve")
    finetune_epochs: int = Field(3, description="finetune-mode MSML epochs per round")
    finetune_batch_size: int = Field(32, description="finetune-mode MSML batch")
    finetune_lr: float = Field(1e-4, description="finetune-mode MSML learning rate")

    @field_validator("max_machine_per_round", mode="before")
    @classmethod
    def _cap(cls, value: Any) -> Any:
        """``"none"`` / ``"null"`` / ``""`` -> None, ``"12"`` -> 12; a switch is not a number."""
        if isinstance(value, bool):
            raise ValueError("needs 'budget', a number >= 0 or none")
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("none", "null", ""):
                return None
            if text.lstrip("+-").isdigit():
                return int(text)
        return value

    @model_validator(mode="after")
    def _check(self) -> "SimulationConfig":
        strategies = self.strategies
        bad = [s for s in strategies if s not in KINDS]
        if not strategies or bad or len(set(strategies)) != len(strategies):
            raise ValueError(f"strategies must be distinct names from {list(KINDS)}, got {list(strategies)}")
        checks = [
            (self.seeds >= 1, f"seeds must be >= 1, got {self.seeds}"),
            (0 < self.initial <= 1, f"initial must be in (0, 1], got {self.initial}"),
            (0 < self.per_round <= 1, f"per_round must be in (0, 1], got {self.per_round}"),
            (self.rounds >= 0, f"rounds must be >= 0, got {self.rounds}"),
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (0 < self.test_fraction < 1, f"test_fraction must be in (0, 1), got {self.test_fraction}"),
            (0 <= self.noise <= 0.5, f"noise must be in [0, 0.5], got {self.noise}"),
            (self.cost_unit in ("frame", "video"), f"cost_unit must be frame or video, got {self.cost_unit!r}"),
            (self.query_unit in ("frame", "video"), f"query_unit must be frame or video, got {self.query_unit!r}"),
            (self.query_unit == "frame" or self.cost_unit == "video",
             "query_unit video labels whole videos at one video's cost: set cost_unit video too"),
            (0 <= self.audit <= 1, f"audit must be in [0, 1], got {self.audit}"),
            (self.audit_cost >= 0, f"audit_cost must be >= 0, got {self.audit_cost}"),
            (self.max_machine_per_round in (None, "budget")
             or (isinstance(self.max_machine_per_round, int) and not isinstance(self.max_machine_per_round, bool)
                 and self.max_machine_per_round >= 0),
             f"max_machine_per_round must be 'budget', a number >= 0 or none, got {self.max_machine_per_round!r}"),
            (self.audit_gate is None or 0 <= self.audit_gate <= 1, f"audit_gate must be in [0, 1], got {self.audit_gate}"),
            (self.machine_weight >= 0, f"machine_weight must be >= 0, got {self.machine_weight}"),
            (self.head_pos_weight in ("auto", "none"), f"head_pos_weight must be auto or none, got {self.head_pos_weight!r}"),
            (self.head_l2 >= 0 and self.head_max_iter >= 1 and self.head_tol > 0,
             "head_l2 must be >= 0, head_max_iter >= 1 and head_tol > 0"),
            (self.finetune_epochs >= 1 and self.finetune_batch_size >= 2 and self.finetune_lr > 0,
             "finetune_epochs >= 1, finetune_batch_size >= 2 and finetune_lr > 0 are required"),
            (self.labels is None or len(self.labels) > 0, "labels must name at least one finding"),
            (self.embedding_dims is None or self.embedding_dims >= 1,
             f"embedding_dims must be >= 1 or None, got {self.embedding_dims}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.confidence_config()  # validates the threshold and rule settings
        for name in strategies:
            self.strategy(name)  # validates the strategy parameters
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "SimulationConfig | None" = None) -> "SimulationConfig":
        """``base`` (default: the defaults) with ``values`` applied; unknown keys are rejected,
        naming the valid ones; numbers written as text are converted. Lists may be given as
        comma-separated strings."""
        return cls.parse(values, base)

    def confidence_config(self, budget_per_round: int = 1) -> ConfidenceConfig:
        """The machine stream's settings; ``"budget"`` caps it at ``budget_per_round``."""
        cap = budget_per_round if self.max_machine_per_round == "budget" else self.max_machine_per_round
        return ConfidenceConfig(threshold=self.confidence, rule_confidence=self.rule_confidence,
                                min_dependence=self.min_dependence, max_per_round=cap)

    def kind(self, name: str) -> ExperimentKind:
        if name not in KINDS:
            raise ValueError(f"unknown experiment kind {name!r}; valid: {list(KINDS)}")
        return KINDS[name]

    def strategy(self, name: str) -> Strategy:
        """The query strategy of an experiment kind, with its parameters (``tsal`` queries with
        MLM, ``self_training`` at random)."""
        return self.kind(name).build(self)

    def experiment_settings(self, strategy: str) -> dict[str, Any]:
        """The fields that decide an experiment's results (the experiment id hashes them)."""
        kind = self.kind(strategy)
        names = _COMMON_FIELDS + _MODEL_FIELDS[self.mode] + tuple(kind.config_params.values())
        names += _MACHINE_FIELDS if kind.machine_stream else ()
        settings = {"strategy": strategy, "version": SIMULATOR_VERSION, **{n: getattr(self, n) for n in names},
                    **self._projection()}
        if kind.params:
            settings["strategy_params"] = dict(kind.params)
        return settings

    def reference_settings(self) -> dict[str, Any]:
        names = ("mode", "test_fraction") + _MODEL_FIELDS[self.mode]
        return {**{name: getattr(self, name) for name in names}, **self._projection()}

    def _projection(self) -> dict[str, Any]:
        # only when set, so the ids of runs without a projection stay what they were
        if self.mode == "embeddings" and self.embedding_dims is not None:
            return {"embedding_dims": self.embedding_dims}
        return {}



_MLM_PARAMS = {"correlation_weight": "correlation_weight", "smallest": "smallest"}
for _kind in (
    ExperimentKind("tsal", "mlm", machine_stream=True, config_params=_MLM_PARAMS),
    ExperimentKind("mlm", "mlm", config_params=_MLM_PARAMS),
    ExperimentKind("self_training", "random", machine_stream=True),
    ExperimentKind("random", "random"),
    ExperimentKind("least_margin", "least_margin"),
    ExperimentKind("mean_entropy", "mean_entropy"),
    ExperimentKind("lci", "lci"),
    ExperimentKind("adaptive", "adaptive", config_params={"beta": "adaptive_beta"}),
):
    register_kind(_kind)
