"""Labelling-budget simulations: many active-learning experiments in parallel on Ray.

One experiment = (strategy, budget schedule, seed, data set). It splits the samples by patient
(by video when the patient is unknown) with its seed, labels an initial random share of the
training pool through the :class:`~cluster.oracle.Oracle` actor, then runs ``rounds`` rounds of
the pure TSAL/baseline round (``ultrasound.active``): fit the model on the labelled set, score
the unlabelled pool, ask the oracle, apply its answers. After the initial set and after every
round the model is evaluated on the held-out test split (mAP, macro-F1, ...).

Where the work runs: each experiment is a Ray task with a fractional CPU (0.5 by default). The
sample table (embeddings or frames) goes into the object store once and every task reads it
zero-copy; the oracle is one actor shared by all experiments. The full-data reference (the same
model trained on every training label) runs as one task per seed.

Persistence and resume: every completed round is written at once to
``<out>/experiments/<experiment_id>/round_<r>.parquet`` (the round's new label records as rows;
the round's metrics and the experiment's settings as JSON in the schema metadata) through
:class:`Storage`, so ``s3://`` works. A task that dies (worker crash, killed actor, preempted
node) is retried by Ray, and a command that is run again picks up from disk: the experiment
rebuilds its :class:`ALState` from the records of rounds ``0..k``, rebuilds the oracle's ledger
from them, refits the (deterministic) model on round k's labelled set, and continues with round
``k + 1``; :func:`round_rng` makes every later draw identical to an uninterrupted run. An
experiment whose rounds are all on disk is skipped. Ray's ActorPool drops dead actors, so we do
not keep state in actors: the files are the state.

Experiment ids hash everything that decides their results (sample table, findings, split,
budget schedule, strategy settings, model settings; not the number of rounds, so a longer run
extends a shorter one), so runs with different settings never mix in one folder, and sweeps
over TSAL settings reuse the baselines they share.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from cluster.embeddings import SampleTable, principal_components
from cluster.oracle import Oracle, OracleBook, OracleClient
from cluster.storage import Location, Storage, parse_uri
from ultrasound.config import coerce_fields
from ultrasound.active import (
    ALState,
    ConfidenceConfig,
    RoundPlan,
    StrategyContext,
    apply_answers,
    make_strategy,
    predict_head,
    round_rng,
    train_head,
    tsal_round,
)
from ultrasound.active.head import positive_weights as head_positive_weights
from ultrasound.al_report import round_metrics, strategy_entries

STRATEGY_CHOICES = ("tsal", "mlm", "self_training", "random", "least_margin", "mean_entropy", "lci", "adaptive")
MACHINE_STREAM = ("tsal", "self_training")  # the kinds that accept confidence-validated machine labels
# bumped when a change of the experiment logic changes results: old folders never resume into new runs
SIMULATOR_VERSION = 2
DEFAULT_STRATEGIES = ("tsal", "random", "least_margin", "mean_entropy", "lci", "adaptive")
MODES = ("embeddings", "finetune")
SPLIT_STREAM = 2_147_483_647  # the split's generator is default_rng([seed, SPLIT_STREAM])
ROUND_FILE = re.compile(r"^round_(\d+)\.parquet$")
META_KEY = b"sonoray.round"
ORACLE_LOG = "oracle_log.parquet"
ORACLE_ACTOR_PREFIX = "sonoray-oracle-"

# fields of SimulationConfig that decide a result, by who reads them
_COMMON_FIELDS = ("initial", "per_round", "mode", "test_fraction", "noise", "cost_unit", "query_unit")
_MODEL_FIELDS = {
    "embeddings": ("head_l2", "head_pos_weight", "head_max_iter"),
    "finetune": ("finetune_epochs", "finetune_batch_size", "finetune_lr"),
}
_MACHINE_FIELDS = ("confidence", "rule_confidence", "min_dependence", "max_machine_per_round", "audit",
                   "audit_cost", "audit_gate", "machine_weight")
_STRATEGY_FIELDS = {
    "tsal": ("correlation_weight", "smallest") + _MACHINE_FIELDS,
    "self_training": _MACHINE_FIELDS,
    "mlm": ("correlation_weight", "smallest"),
    "adaptive": ("adaptive_beta",),
}


@dataclass(frozen=True)
class SimulationConfig:
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
            every frame of a picked video at one video's cost; needs ``cost_unit: video``).
        confidence: TSAL's per-finding confidence threshold for machine labels.
        rule_confidence, min_dependence: co-occurrence rules of the validation (docs/tsal.md).
        max_machine_per_round: cap on newly accepted machine labels per round: ``"budget"``
            (default: as many as the round's human queries), a number, or ``None`` (no cap).
        audit: share of accepted machine labels the oracle audits.
        audit_cost: cost of one audit (1 = as much as labelling a frame).
        audit_gate: drop a round's unaudited machine labels when the audited error rate exceeds
            it (``None``: never).
        machine_weight: training weight of an unaudited machine label (human labels weigh 1).
        correlation_weight, smallest: MLM's correlation adjustment and number of margins averaged.
        adaptive_beta: Adaptive's trade-off between max-margin and cardinality inconsistency.
        embedding_dims: project the embeddings on their top principal components first
            (unsupervised, all frames; ``None``: use them as they are). Embeddings mode only.
        head_l2, head_pos_weight, head_max_iter: the embeddings-mode head (``train_head``).
        finetune_epochs, finetune_batch_size, finetune_lr: the finetune-mode MSML training.
    """

    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    seeds: int = 3
    initial: float = 0.05
    per_round: float = 0.05
    rounds: int = 9
    mode: str = "embeddings"
    labels: tuple[str, ...] | None = None
    test_fraction: float = 0.25
    noise: float = 0.0
    cost_unit: str = "frame"
    query_unit: str = "frame"
    confidence: float = 0.9
    rule_confidence: float = 0.9
    min_dependence: float = 0.2
    max_machine_per_round: int | str | None = "budget"
    audit: float = 0.1
    audit_cost: float = 0.5
    audit_gate: float | None = None
    machine_weight: float = 0.5
    correlation_weight: float = 0.5
    smallest: int = 2
    adaptive_beta: float = 0.5
    embedding_dims: int | None = None
    head_l2: float = 1e-3
    head_pos_weight: str = "auto"
    head_max_iter: int = 100
    finetune_epochs: int = 3
    finetune_batch_size: int = 32
    finetune_lr: float = 1e-4

    def __post_init__(self) -> None:
        strategies = tuple(self.strategies)
        object.__setattr__(self, "strategies", strategies)
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))
        bad = [s for s in strategies if s not in STRATEGY_CHOICES]
        if not strategies or bad or len(set(strategies)) != len(strategies):
            raise ValueError(f"strategies must be distinct names from {list(STRATEGY_CHOICES)}, got {list(strategies)}")
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
             or (isinstance(self.max_machine_per_round, int) and self.max_machine_per_round >= 0),
             f"max_machine_per_round must be 'budget', a number >= 0 or none, got {self.max_machine_per_round!r}"),
            (self.audit_gate is None or 0 <= self.audit_gate <= 1, f"audit_gate must be in [0, 1], got {self.audit_gate}"),
            (self.machine_weight >= 0, f"machine_weight must be >= 0, got {self.machine_weight}"),
            (self.head_pos_weight in ("auto", "none"), f"head_pos_weight must be auto or none, got {self.head_pos_weight!r}"),
            (self.head_l2 >= 0 and self.head_max_iter >= 1, "head_l2 must be >= 0 and head_max_iter >= 1"),
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

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "SimulationConfig | None" = None) -> "SimulationConfig":
        """``base`` (default: the defaults) with ``values`` applied; unknown keys are rejected,
        naming the valid ones; numbers written as text are converted. Lists may be given as
        comma-separated strings."""
        kwargs = coerce_fields(cls, values, "simulation")  # YAML's "3e-4" is text: converted
        cap = kwargs.get("max_machine_per_round")
        if isinstance(cap, str) and cap.strip().lower() in ("none", "null", ""):
            kwargs["max_machine_per_round"] = None
        for key in ("strategies", "labels"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = tuple(v.strip() for v in kwargs[key].split(",") if v.strip())
        return dataclasses.replace(base or cls(), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["strategies"] = list(self.strategies)
        out["labels"] = list(self.labels) if self.labels is not None else None
        return out

    def confidence_config(self, budget_per_round: int = 1) -> ConfidenceConfig:
        """The machine stream's settings; ``"budget"`` caps it at ``budget_per_round``."""
        cap = budget_per_round if self.max_machine_per_round == "budget" else self.max_machine_per_round
        return ConfidenceConfig(threshold=self.confidence, rule_confidence=self.rule_confidence,
                                min_dependence=self.min_dependence, max_per_round=cap)

    def strategy(self, name: str):
        """The query strategy of an experiment kind (``tsal`` queries with MLM, ``self_training``
        at random)."""
        if name == "self_training":
            return make_strategy("random")
        if name in ("tsal", "mlm"):
            return make_strategy("mlm", correlation_weight=self.correlation_weight, smallest=self.smallest)
        if name == "adaptive":
            return make_strategy("adaptive", beta=self.adaptive_beta)
        return make_strategy(name)

    def experiment_settings(self, strategy: str) -> dict[str, Any]:
        """The fields that decide an experiment's results (the experiment id hashes them)."""
        names = _COMMON_FIELDS + _MODEL_FIELDS[self.mode] + _STRATEGY_FIELDS.get(strategy, ())
        return {"strategy": strategy, "version": SIMULATOR_VERSION, **{name: getattr(self, name) for name in names},
                **self._projection()}

    def reference_settings(self) -> dict[str, Any]:
        names = ("mode", "test_fraction") + _MODEL_FIELDS[self.mode]
        return {**{name: getattr(self, name) for name in names}, **self._projection()}

    def _projection(self) -> dict[str, Any]:
        # only when set, so the ids of runs without a projection stay what they were
        if self.mode == "embeddings" and self.embedding_dims is not None:
            return {"embedding_dims": self.embedding_dims}
        return {}


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment of a run. ``rounds`` is the target; the id does not include it."""

    experiment_id: str
    strategy: str
    seed: int
    rounds: int
    reference_id: str
    settings: Mapping[str, Any] = field(hash=False, compare=False, default_factory=dict)


@dataclass(frozen=True)
class FaultInjection:
    """Testing and crash drills: the process running ``experiment_id`` exits abruptly
    (``os._exit``) right after round ``after_round`` is written, once: the first crash writes
    ``marker_uri`` and a later attempt that finds it runs on."""

    experiment_id: str
    after_round: int
    marker_uri: str


@dataclass(frozen=True, eq=False)
class Split:
    """Global sample indices of one seed's split, and the test labels (the experiment sees
    pool labels only through the oracle). ``pool_groups`` ``(len(train),)`` int: the video of
    each pool sample, numbered ``0..pool_videos-1`` (queries take one frame per video a round)."""

    seed: int
    train: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    pool_videos: int = 0
    pool_groups: np.ndarray | None = None


def split_by_group(groups: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` sorted global indices; whole groups (patients or videos) go to one side.

    ``round(test_fraction * G)`` of the ``G`` groups (at least 1, at most ``G - 1``) are drawn
    with ``default_rng([seed, SPLIT_STREAM])`` for the test split.
    """
    groups = np.asarray(groups).astype(str)
    unique = np.unique(groups)
    if unique.size < 2:
        raise ValueError(f"need at least 2 patients/videos to split, got {unique.size}")
    n_test = min(max(1, int(round(test_fraction * unique.size))), unique.size - 1)
    rng = np.random.default_rng([int(seed), SPLIT_STREAM])
    test_groups = rng.choice(unique, size=n_test, replace=False)
    in_test = np.isin(groups, test_groups)
    return np.flatnonzero(~in_test).astype(np.int64), np.flatnonzero(in_test).astype(np.int64)


def _digest(payload: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:n]


def plan_experiments(table: SampleTable, config: SimulationConfig) -> list[ExperimentSpec]:
    """One spec per (strategy, seed), in seed-major order."""
    specs = []
    for seed in range(config.seeds):
        ref = f"ref-seed{seed}-{_digest([table.key, table.findings, config.reference_settings(), seed])}"
        for strategy in config.strategies:
            settings = config.experiment_settings(strategy)
            digest = _digest([table.key, table.findings, settings])
            specs.append(ExperimentSpec(f"{strategy}-seed{seed}-{digest}", strategy, seed, config.rounds, ref,
                                        settings))
    return specs


# -- models: the per-round learner --------------------------------------------------------------
class HeadModel:
    """Embeddings mode: ``train_head`` / ``predict_head`` on rows of the embedding matrix."""

    def __init__(self, features: np.ndarray, config: SimulationConfig, seed: int) -> None:
        self.features, self.config = features, config

    def fit(self, idx: np.ndarray, labels: np.ndarray, weights: np.ndarray, verified: np.ndarray | None = None):
        """``verified`` ``(M,)`` bool marks the human labels: positive weights count only those
        (machine labels of a flooded stream must not decide a finding's prevalence)."""
        c = self.config
        pos_weight = None if c.head_pos_weight == "none" else human_positive_weights(labels, verified)
        # blas_threads=None: the caller (run_experiment / run_reference) already holds BLAS at
        # one thread; entering threadpoolctl again costs more than a small fit
        return train_head(self.features[idx], labels, weights, l2=c.head_l2, max_iter=c.head_max_iter,
                          pos_weight=pos_weight, blas_threads=None)

    def predict(self, fitted, idx: np.ndarray) -> np.ndarray:
        if idx.size == 0:
            return np.zeros((0, fitted.weight.shape[1]), np.float32)
        return predict_head(fitted, self.features[idx])


class FinetuneModel:
    """Finetune mode: MSML (``ultrasound.msml``) trained from its initial weights (seeded, plus
    the backbone checkpoint if any) on the labelled frames every round. Deterministic on CPU for
    a given labelled set, so a resumed experiment refits exactly; on GPUs kernels may not be."""

    def __init__(self, images: np.ndarray, config: SimulationConfig, seed: int, findings: tuple[str, ...],
                 init_backbone: bytes | None = None, device: str | None = None) -> None:
        import torch

        self.images, self.config, self.seed, self.findings = images, config, seed, findings
        self.init_backbone = init_backbone
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def _net(self):
        from ultrasound.backbone import adopt_weights, read_state
        from ultrasound.msml import MSMLConfig, MSMLNet

        c = self.config
        msml = MSMLConfig(findings=self.findings, image_size=int(self.images.shape[1]),
                          channels=int(self.images.shape[3]), lr=c.finetune_lr, epochs=c.finetune_epochs,
                          batch_size=c.finetune_batch_size, seed=self.seed)
        net = MSMLNet(msml)
        if self.init_backbone is not None:
            adopt_weights(net.backbone, read_state(self.init_backbone, "the --init checkpoint"),
                          "the --init checkpoint")
        return net.to(self.device)

    def fit(self, idx: np.ndarray, labels: np.ndarray, weights: np.ndarray, verified: np.ndarray | None = None):
        import torch

        from ultrasound.msml import build_loss, build_optimizer, msml_train_step

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = self._net()
            loss_fn = build_loss(net.config, labels if verified is None else labels[verified]).to(self.device)
            optimizer = build_optimizer(net, net.config)
            rng = np.random.default_rng([self.seed, idx.size])
            batch = net.config.batch_size
            for _ in range(net.config.epochs):
                order = rng.permutation(idx.size)
                for start in range(0, idx.size, batch):
                    part = order[start:start + batch]
                    if part.size < 2:  # batch norm needs two samples
                        continue
                    msml_train_step(net, optimizer, self.images[idx[part]], labels[part], loss_fn,
                                    net.config.image_size, sample_weight=weights[part], augment_rng=rng)
        return net

    def predict(self, fitted, idx: np.ndarray) -> np.ndarray:
        from ultrasound.msml import msml_predict

        if idx.size == 0:
            return np.zeros((0, len(self.findings)), np.float32)
        return msml_predict(fitted, self.images[idx], fitted.config.image_size)


def human_positive_weights(labels: np.ndarray, verified: np.ndarray | None) -> np.ndarray | str:
    """``#neg/#pos`` per finding over the human labels only (``train_head``'s ``"auto"`` rule on
    the verified rows); ``"auto"`` over every row when ``verified`` is None or selects none."""
    if verified is None or not np.asarray(verified).any():
        return "auto"
    return head_positive_weights("auto", np.asarray(labels, np.float32)[np.asarray(verified, bool)])


def make_model(config: SimulationConfig, features: np.ndarray, seed: int, findings: tuple[str, ...],
               init_backbone: bytes | None = None):
    if config.mode == "embeddings":
        return HeadModel(features, config, seed)
    return FinetuneModel(features, config, seed, findings, init_backbone)


# -- persistence ---------------------------------------------------------------------------------
RECORD_SCHEMA = pa.schema([
    ("index", pa.int64()), ("global_index", pa.int64()), ("round", pa.int32()), ("source", pa.string()),
    ("cost", pa.float64()), ("labels", pa.list_(pa.uint8())), ("machine_labels", pa.list_(pa.uint8())),
    ("audit", pa.string()),
])


def round_table(records: list[dict], pool: np.ndarray, meta: dict) -> pa.Table:
    rows = [{**r, "global_index": int(pool[r["index"]])} for r in records]
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    return table.replace_schema_metadata({META_KEY: json.dumps(meta, default=_json_default).encode()})


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def completed_rounds(files: list[str]) -> int:
    """Rounds ``0..k`` all present among ``files`` (names relative to the experiment folder):
    returns ``k + 1`` (0 when round 0 is missing)."""
    present = {int(m.group(1)) for name in files if (m := ROUND_FILE.match(name))}
    count = 0
    while count in present:
        count += 1
    return count


def read_round(storage: Storage, location: Location) -> tuple[list[dict], dict]:
    table = storage.read_parquet(location)
    meta = json.loads(table.schema.metadata[META_KEY])
    return table.to_pylist(), meta


# What reading a torn, truncated or foreign round file raises (ArrowInvalid is a ValueError;
# missing metadata a TypeError or KeyError).
UNREADABLE_ROUND = (OSError, ValueError, KeyError, TypeError, pa.ArrowException)


def readable_rounds(storage: Storage, exp: Location, count: int) -> int:
    """How many of rounds ``0..count-1`` of the experiment at ``exp`` parse, from round 0: the
    first that does not is recomputed (with every later one) instead of trusted."""
    for r in range(count):
        try:
            read_round_meta(storage, exp.join(f"round_{r}.parquet"))
        except UNREADABLE_ROUND:
            return r
    return count


def read_round_meta(storage: Storage, location: Location) -> dict:
    data = storage.read_bytes(location)
    schema = pq.ParquetFile(io.BytesIO(data)).schema_arrow
    return json.loads(schema.metadata[META_KEY])


def _write_marker_and_exit(storage: Storage, fault: FaultInjection) -> None:
    marker = parse_uri(fault.marker_uri)
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"crashed\n")
    os._exit(17)


# -- one experiment --------------------------------------------------------------------------------
def run_experiment(*args: Any, **kwargs: Any) -> dict:
    """Run (or resume) one experiment to ``spec.rounds`` with BLAS limited to one thread (many
    experiments share the CPUs); see :func:`_run_experiment` for the arguments."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _run_experiment(*args, **kwargs)


def _run_experiment(
    spec: ExperimentSpec,
    config: SimulationConfig,
    features: np.ndarray,
    split: Split,
    findings: tuple[str, ...],
    oracle,
    storage: Storage,
    out: Location,
    *,
    init_backbone: bytes | None = None,
    fault: FaultInjection | None = None,
    on_round: Callable[[], None] = lambda: None,
) -> dict:
    """Run (or resume) one experiment to ``spec.rounds``; returns counts of computed and resumed
    rounds and the final metrics. ``oracle`` is an :class:`OracleBook` or an :class:`OracleClient`."""
    exp = out.join("experiments", spec.experiment_id)
    pool = split.train
    num_labels = len(findings)
    asker = spec.experiment_id
    cost_scale = float(split.pool_videos if config.cost_unit == "video" else pool.size)
    by_video = config.query_unit == "video"
    if by_video and split.pool_groups is None:
        raise ValueError("query_unit video needs the video of every pool sample (Split.pool_groups)")
    units = split.pool_videos if by_video else pool.size  # what the budget shares count
    k_initial = min(units, max(1, int(round(config.initial * units))))
    k_round = max(1, int(round(config.per_round * units)))
    frames_per_unit = pool.size / units if by_video else 1.0
    strategy = config.strategy(spec.strategy)
    machine_stream = spec.strategy in MACHINE_STREAM
    confidence = config.confidence_config(int(round(k_round * frames_per_unit))) if machine_stream else None
    audit_fraction = config.audit if machine_stream else 0.0
    model = make_model(config, features, spec.seed, findings, init_backbone)

    oracle.register(asker, pool, noise_key=spec.seed)
    on_disk = completed_rounds(storage.list_files(exp))
    done = on_disk
    state, meta = None, None
    if done:
        by_index: dict[int, dict] = {}
        for r in range(done):
            try:
                rows, meta = read_round(storage, exp.join(f"round_{r}.parquet"))
            except UNREADABLE_ROUND:  # torn or corrupt: recompute it and every later round
                done = on_disk = r
                break
            for index in meta.get("revoked", []):  # machine labels this round took back
                by_index.pop(int(index), None)
            by_index.update({int(row["index"]): row for row in rows})
        records = list(by_index.values())
    if done:
        globals_ = {row["index"]: row["global_index"] for row in records}
        state = ALState.from_records([{k: v for k, v in row.items() if k != "global_index"} for row in records],
                                     num_labels=num_labels)
        oracle.restore(asker, _answers_of(state, globals_))
    base = {"experiment_id": spec.experiment_id, "strategy": spec.strategy, "seed": spec.seed,
            "reference_id": spec.reference_id, "findings": list(findings), "settings": dict(spec.settings),
            "pool_size": int(pool.size), "test_size": int(split.test.size), "cost_scale": cost_scale,
            "budget_initial": k_initial, "budget_per_round": k_round}
    computed = 0
    fitted = None
    total_keys = ("machine_accepted_total", "machine_vectors_correct", "machine_labels_correct", "machine_labels_total")
    totals = {k: 0 if meta is None else int(meta.get(k, 0)) for k in total_keys}

    def fit_and_write(r: int, state: ALState, started: float, plan: RoundPlan | None,
                      grade: dict | None = None) -> dict:
        nonlocal fitted, totals
        if plan is not None and plan.machine_indices.size:
            kept = [i for i in plan.machine_indices if i in state and state.record(i).source == "machine"
                    and state.record(i).round == r]
            if kept and len(kept) != plan.machine_indices.size:  # the audit gate dropped some: regrade
                proposals = np.array([state.record(i).machine_labels for i in kept], dtype=np.uint8)
                grade = oracle.grade(asker, pool[np.asarray(kept)], proposals)
            if kept and grade is not None:
                totals = {"machine_accepted_total": totals["machine_accepted_total"] + len(kept),
                          "machine_vectors_correct": totals["machine_vectors_correct"] + grade["vectors_correct"],
                          "machine_labels_correct": totals["machine_labels_correct"] + grade["labels_correct"],
                          "machine_labels_total": totals["machine_labels_total"] + grade["labels_total"]}
        fit_started = time.perf_counter()
        fitted = _fit(model, state, pool, config.machine_weight)
        fit_seconds = time.perf_counter() - fit_started
        metrics = round_metrics(split.test_labels, model.predict(fitted, split.test), list(findings))
        summary = state.round_summary(r)
        machine = [rec for rec in state.records if rec.source == "machine"]
        meta = {**base, "round": r, "rounds_target": spec.rounds,
                "labelled": len(state), "human": int(state.verified_indices().size),
                "machine": len(machine), "machine_new": summary["machine"],
                "audited": sum(rec.audit != "none" for rec in machine),
                "audit_agreed": sum(rec.audit == "agreed" for rec in machine),
                "queried_new": summary["oracle"], "cost_round": summary["cost"],
                "cost_total": state.total_cost, "fraction": state.total_cost / cost_scale,
                "human_fraction": state.verified_indices().size / pool.size,
                **totals,
                "map": metrics["map"], "macro_f1": metrics["macro_f1"], "micro_f1": metrics["micro_f1"],
                "hamming_loss": metrics["hamming_loss"], "per_finding_ap": metrics["per_finding_ap"],
                "excluded": metrics["excluded"],
                "rejected_inconsistent": plan.rejected_inconsistent if plan is not None else 0,
                "revoked": plan.revoked.tolist() if plan is not None else [],
                "machine_revoked": int(plan.revoked.size) if plan is not None else 0,
                "fit_seconds": round(fit_seconds, 4), "round_seconds": round(time.perf_counter() - started, 4)}
        new = [rec.to_dict() for rec in state.records if rec.round == r]
        storage.write_parquet(round_table(new, pool, meta), exp.join(f"round_{r}.parquet"))
        on_round()
        if fault is not None and fault.experiment_id == spec.experiment_id and fault.after_round == r:
            _write_marker_and_exit(storage, fault)
        return meta

    if state is None:
        started = time.perf_counter()
        rng = round_rng(spec.seed, 0)
        if by_video:  # every frame of k_initial random videos
            videos = rng.choice(split.pool_videos, size=k_initial, replace=False)
            picks = np.flatnonzero(np.isin(split.pool_groups, videos)).astype(np.int64)
        else:
            picks = np.sort(rng.choice(pool.size, size=k_initial, replace=False)).astype(np.int64)
        labels, costs = oracle.query(asker, 0, pool[picks])
        state = ALState(num_labels).with_labels(picks, labels, source="initial", round=0, costs=costs)
        meta = fit_and_write(0, state, started, None)
        computed += 1
        done = 1
    elif done <= spec.rounds:
        fitted = _fit(model, state, pool, config.machine_weight)

    for r in range(done, spec.rounds + 1):
        started = time.perf_counter()
        rng = round_rng(spec.seed, r)
        unlabelled = state.unlabelled_indices(pool.size)
        verified = state.verified_indices()
        context = StrategyContext(labelled_labels=state.labels_of(verified), rng=rng)
        plan = None
        if unlabelled.size:  # every round with a pool queries >= 1 sample, so it adds records
            probs = model.predict(fitted, pool[unlabelled])
            groups = split.pool_groups[unlabelled] if split.pool_groups is not None else None
            held = state.unverified_indices()
            probs_held = model.predict(fitted, pool[held]) if confidence is not None else None
            plan = tsal_round(probs, unlabelled, state, k_round, strategy, context, confidence, audit_fraction, rng,
                              groups=groups, probs_machine=probs_held, whole_groups=by_video)
            if plan.round != r:
                raise RuntimeError(f"{asker}: round {r} planned as round {plan.round} (a round without records?)")
            # one round trip: the queries, the audits, and the grading of the machine proposals
            answer = oracle.answer_round(asker, r, pool[plan.queries], pool[plan.audits],
                                         pool[plan.machine_indices], plan.machine_labels)
            state = apply_answers(state, plan, answer["labels"], answer["audit_labels"],
                                  query_costs=answer["costs"],
                                  audit_costs=answer["audit_costs"] if plan.audits.size else 1.0,
                                  audit_gate=config.audit_gate)
            grade = answer["grade"]
        else:  # the whole pool is labelled; the round is still evaluated and written (no records)
            grade = None
        meta = fit_and_write(r, state, started, plan, grade)
        computed += 1

    log = oracle.log(asker)
    storage.write_parquet(pa.table({"round": log["round"], "kind": log["kind"], "index": log["index"],
                                    "labels": pa.array(list(log["labels"]), type=pa.list_(pa.uint8())),
                                    "cost": log["cost"]}), exp.join(ORACLE_LOG))
    return {"experiment_id": spec.experiment_id, "computed": computed,
            "resumed": on_disk,
            "map": meta["map"], "macro_f1": meta["macro_f1"], "cost_total": meta["cost_total"]}


def _fit(model, state: ALState, pool: np.ndarray, machine_weight: float):
    idx, labels, verified = state.training_arrays()
    weights = np.where(verified, 1.0, machine_weight).astype(np.float32)
    if weights.sum() <= 0:  # only unweighted machine labels: fall back to the human ones
        weights = verified.astype(np.float32)
    return model.fit(pool[idx], labels, weights, verified)


def _answers_of(state: ALState, global_index: Mapping[int, int]) -> list[dict]:
    """The oracle answers recorded in a state: queries (initial + oracle) and audits."""
    out = []
    for rec in state.records:
        if rec.source in ("initial", "oracle"):
            out.append({"index": global_index[rec.index], "round": rec.round, "kind": "query",
                        "labels": rec.labels, "cost": rec.cost})
        elif rec.audit != "none":
            out.append({"index": global_index[rec.index], "round": rec.round, "kind": "audit",
                        "labels": rec.labels, "cost": rec.cost})
    return out


# -- the full-data reference -------------------------------------------------------------------------
def run_reference(*args: Any, **kwargs: Any) -> dict:
    """The same model trained on every training label of the split, BLAS on one thread; see
    :func:`_run_reference`."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _run_reference(*args, **kwargs)


def _run_reference(reference_id: str, seed: int, config: SimulationConfig, features: np.ndarray, split: Split,
                   train_labels: np.ndarray, findings: tuple[str, ...], storage: Storage, out: Location,
                   init_backbone: bytes | None = None) -> dict:
    """Fit on every training label of the split; written to ``<out>/reference/<reference_id>.parquet``."""
    model = make_model(config, features, seed, findings, init_backbone)
    started = time.perf_counter()
    fitted = model.fit(split.train, train_labels, np.ones(split.train.size, np.float32))
    metrics = round_metrics(split.test_labels, model.predict(fitted, split.test), list(findings))
    row = {"reference_id": reference_id, "seed": seed, "map": metrics["map"], "macro_f1": metrics["macro_f1"],
           "micro_f1": metrics["micro_f1"], "hamming_loss": metrics["hamming_loss"],
           "train_size": int(split.train.size), "test_size": int(split.test.size),
           "seconds": round(time.perf_counter() - started, 3)}
    table = pa.Table.from_pylist([row]).replace_schema_metadata(
        {b"sonoray.reference": json.dumps({**row, "per_finding_ap": metrics["per_finding_ap"],
                                           "settings": config.reference_settings(),
                                           "findings": list(findings)}).encode()})
    storage.write_parquet(table, out.join("reference", f"{reference_id}.parquet"))
    return row


# -- running many experiments ----------------------------------------------------------------------
@ray.remote(num_cpus=0)
class RoundCounter:
    """Counts completed rounds across experiments (progress lines: rounds per second)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int = 1) -> None:
        self.count += n

    def total(self) -> int:
        return self.count


class ThrottledCount:
    """Adds completed rounds to the :class:`RoundCounter` at most every ``every_s`` seconds (one
    actor call per round cost about as much CPU as the oracle's answers)."""

    def __init__(self, counter, every_s: float = 2.0) -> None:
        self.counter, self.every_s = counter, every_s
        self.pending, self.last = 0, time.monotonic()

    def __call__(self) -> None:
        self.pending += 1
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.counter.add.remote(self.pending)
        self.pending, self.last = 0, time.monotonic()


def _experiment_task(spec, config, features, split, findings, oracle_handle, out_uri, storage_config,
                     init_backbone, fault, counter):
    count = ThrottledCount(counter)
    try:
        return run_experiment(spec, config, features, split, findings, OracleClient(oracle_handle),
                              Storage(storage_config), parse_uri(out_uri), init_backbone=init_backbone,
                              fault=fault, on_round=count)
    finally:
        count.flush()


def _reference_task(reference_id, seed, config, features, split, train_labels, findings, out_uri, storage_config,
                    init_backbone):
    return run_reference(reference_id, seed, config, features, split, train_labels, findings,
                         Storage(storage_config), parse_uri(out_uri), init_backbone)


_experiment_remote = ray.remote(_experiment_task)
_reference_remote = ray.remote(_reference_task)


@dataclass
class SimulationResult:
    """What a run did. ``rounds``: round files written now; ``resumed_rounds``: rounds found on
    disk and not recomputed (finished experiments included); ``skipped``: finished experiments."""

    out_uri: str
    experiments: int
    rounds: int
    resumed_rounds: int
    skipped: int
    failed: list[dict]
    seconds: float
    experiment_ids: list[str]
    report: dict | None = None

    def as_json(self) -> dict:
        strategies = {}
        if self.report is not None:
            strategies = strategy_entries(self.report["summary"])
        return {"experiments": self.experiments, "rounds": self.rounds, "resumed_rounds": self.resumed_rounds,
                "skipped": self.skipped, "failed": len(self.failed), "seconds": round(self.seconds, 2),
                "rounds_per_s": round(self.rounds / self.seconds, 2) if self.seconds > 0 else None,
                "report": self.report["report_uri"] if self.report else None, "strategies": strategies}


def describe_error(err: BaseException) -> str:
    """One line: the original exception of a Ray task error (type and message)."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def make_splits(table: SampleTable, config: SimulationConfig) -> dict[int, Split]:
    groups = table.groups
    splits = {}
    for seed in range(config.seeds):
        train, test = split_by_group(groups, config.test_fraction, seed)
        videos, pool_groups = np.unique(table.video_id[train], return_inverse=True)
        splits[seed] = Split(seed, train, test, table.labels[test], int(videos.size), pool_groups.astype(np.int64))
    return splits


def _progress_files(storage: Storage, out: Location) -> dict[str, list[str]]:
    """Files of every experiment folder: ``{experiment_id: [names]}``."""
    files: dict[str, list[str]] = {}
    for path in storage.list_files(out.join("experiments")):
        exp_id, _, name = path.partition("/")
        files.setdefault(exp_id, []).append(name)
    return files


def simulate_table(
    table: SampleTable,
    config: SimulationConfig,
    out_uri: str,
    storage: Storage,
    *,
    executor: str = "ray",
    cpus_per_experiment: float = 0.5,
    gpus_per_experiment: float = 0.0,
    max_retries: int = 3,
    fault: FaultInjection | None = None,
    init_backbone: bytes | None = None,
    on_progress: Callable[[str], None] = lambda message: None,
    progress_every_s: float = 5.0,
    report: bool = True,
) -> SimulationResult:
    """Run every (strategy, seed) experiment of ``config`` on ``table`` into ``out_uri``.

    ``executor="ray"`` runs them as Ray tasks (``cpus_per_experiment`` each, retried up to
    ``max_retries`` times after a crash) with one :class:`Oracle` actor; ``"serial"`` runs them
    one after the other in this process with an in-process :class:`OracleBook` (the benchmark's
    baseline). Finished experiments are skipped; interrupted ones resume. Failed experiments are
    listed in the result, not raised.
    """
    if executor not in ("ray", "serial"):
        raise ValueError(f"executor must be ray or serial, got {executor!r}")
    if cpus_per_experiment <= 0 or gpus_per_experiment < 0 or max_retries < 0:
        raise ValueError("need cpus_per_experiment > 0, gpus_per_experiment >= 0, max_retries >= 0")
    if config.mode == "embeddings" and table.kind != "embeddings":
        raise ValueError("embeddings mode needs a table of embeddings (SampleSpec(kind='embeddings'))")
    if config.mode == "finetune" and table.kind != "images":
        raise ValueError("finetune mode needs a table of frames (SampleSpec(kind='images'))")
    table = table.select_findings(list(config.labels)) if config.labels else table
    started = time.perf_counter()
    if config.mode == "embeddings" and config.embedding_dims is not None:
        table = dataclasses.replace(table, features=principal_components(table.features, config.embedding_dims))
    out = parse_uri(out_uri)
    storage.check(out, create_bucket=True)
    specs = plan_experiments(table, config)
    splits = make_splits(table, config)
    files = _progress_files(storage, out)
    on_disk = {s.experiment_id: completed_rounds(files.get(s.experiment_id, [])) for s in specs}
    finished = {s.experiment_id for s in specs
                if on_disk[s.experiment_id] >= s.rounds + 1 and ORACLE_LOG in files.get(s.experiment_id, [])
                and readable_rounds(storage, out.join("experiments", s.experiment_id), s.rounds + 1) == s.rounds + 1}
    todo = [s for s in specs if s.experiment_id not in finished]
    references = {s.reference_id: s.seed for s in specs}
    have_refs = set(storage.list_files(out.join("reference")))
    todo_refs = {ref: seed for ref, seed in references.items() if f"{ref}.parquet" not in have_refs}
    on_progress(f"simulate: {len(specs)} experiments ({len(finished)} finished already, "
                f"{sum(1 for s in todo if on_disk[s.experiment_id])} to resume), "
                f"{len(table)} samples, {len(table.findings)} findings, {config.rounds} rounds, out {out.uri}")
    results: list[dict] = []
    failed: list[dict] = []
    if executor == "serial":
        results, failed = _run_serial(table, config, todo, todo_refs, splits, storage, out, fault, init_backbone,
                                      on_progress, progress_every_s, len(specs), len(finished))
    else:
        results, failed = _run_ray(table, config, todo, todo_refs, splits, storage, out, fault, init_backbone,
                                   on_progress, progress_every_s, len(specs), len(finished),
                                   cpus_per_experiment, gpus_per_experiment, max_retries)
    computed = sum(r["computed"] for r in results)
    resumed = sum(r["resumed"] for r in results) + sum(on_disk[e] for e in finished)
    seconds = time.perf_counter() - started
    on_progress(f"simulate: done, {computed} rounds computed, {resumed} resumed, {len(failed)} failed, "
                f"{seconds:.1f} s")
    result = SimulationResult(out.uri, len(specs), computed, resumed, len(finished), failed, seconds,
                              [s.experiment_id for s in specs])
    if report:
        result.report = build_report(storage, out, [s.experiment_id for s in specs], on_progress=on_progress)
    return result


def _run_serial(table, config, todo, todo_refs, splits, storage, out, fault, init_backbone, on_progress,
                progress_every_s, total, finished):
    book = OracleBook(table.labels, table.video_id, cost_unit=config.cost_unit, audit_cost=config.audit_cost,
                      noise=config.noise)
    for ref, seed in todo_refs.items():
        split = splits[seed]
        run_reference(ref, seed, config, table.features, split, table.labels[split.train], table.findings,
                      storage, out, init_backbone)
    results, failed, rounds = [], [], [0]
    start, last = time.perf_counter(), time.perf_counter()
    for spec in todo:
        def bump() -> None:
            rounds[0] += 1
        try:
            results.append(run_experiment(spec, config, table.features, splits[spec.seed], table.findings, book,
                                          storage, out, init_backbone=init_backbone, fault=fault, on_round=bump))
        except Exception as err:  # noqa: BLE001 - one failed experiment must not stop the others
            failed.append({"experiment_id": spec.experiment_id, "error": describe_error(err)})
        if time.perf_counter() - last > progress_every_s:
            last = time.perf_counter()
            elapsed = last - start
            on_progress(f"simulate: {finished + len(results) + len(failed)}/{total} experiments done, "
                        f"{rounds[0] / elapsed:.1f} rounds/s")
    return results, failed


def _run_ray(table, config, todo, todo_refs, splits, storage, out, fault, init_backbone, on_progress,
             progress_every_s, total, finished, cpus, gpus, max_retries):
    from cluster.oracle import UnknownAsker

    if not todo and not todo_refs:
        return [], []
    # named, so that it can be found (dashboard, `ray list actors`, fault tests) and killed
    oracle = Oracle.options(name=f"{ORACLE_ACTOR_PREFIX}{uuid.uuid4().hex[:12]}").remote(
        table.labels, table.video_id, cost_unit=config.cost_unit, audit_cost=config.audit_cost, noise=config.noise)
    counter = RoundCounter.remote()
    features = ray.put(table.features)
    split_refs = {seed: ray.put(split) for seed, split in splits.items()}
    options = dict(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries,
                   retry_exceptions=[UnknownAsker, ray.exceptions.RayActorError])
    pending: dict = {}
    for ref, seed in todo_refs.items():
        split = splits[seed]
        task = _reference_remote.options(**options).remote(
            ref, seed, config, features, split_refs[seed], table.labels[split.train], table.findings, out.uri,
            storage.config, init_backbone)
        pending[task] = ("reference", ref)
    for spec in todo:
        task = _experiment_remote.options(**options).remote(
            spec, config, features, split_refs[spec.seed], table.findings, oracle, out.uri, storage.config,
            init_backbone, fault, counter)
        pending[task] = ("experiment", spec.experiment_id)
    results, failed = [], []
    start = last = time.perf_counter()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for task in ready:
                kind, name = pending.pop(task)
                try:
                    value = ray.get(task)
                    if kind == "experiment":
                        results.append(value)
                except ray.exceptions.RayError as err:
                    failed.append({"experiment_id": name, "error": describe_error(err)})
            now = time.perf_counter()
            if now - last > progress_every_s or not pending:
                last = now
                rounds = ray.get(counter.total.remote())
                on_progress(f"simulate: {finished + len(results) + len(failed)}/{total} experiments done, "
                            f"{rounds} rounds, {rounds / (now - start):.1f} rounds/s")
    finally:
        for task in pending:
            ray.cancel(task, force=True)
        ray.kill(oracle)
        ray.kill(counter)
    return results, failed


# -- the report ------------------------------------------------------------------------------------
def read_rounds(storage: Storage, out: Location, experiment_ids: list[str] | None = None,
                threads: int = 16) -> list[dict]:
    """The metadata row of every completed round (rounds ``0..k`` without a gap) under ``out``."""
    files = _progress_files(storage, out)
    wanted = experiment_ids if experiment_ids is not None else sorted(files)
    locations = []
    for exp_id in wanted:
        for r in range(completed_rounds(files.get(exp_id, []))):
            locations.append(out.join("experiments", exp_id, f"round_{r}.parquet"))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda loc: read_round_meta(storage, loc), locations))


def read_references(storage: Storage, out: Location) -> dict[str, dict]:
    refs = {}
    for name in storage.list_files(out.join("reference")):
        if name.endswith(".parquet"):
            row = storage.read_parquet(out.join("reference", name)).to_pylist()[0]
            refs[row["reference_id"]] = row
    return refs


def strategy_labels(rows: list[dict]) -> dict[str, str]:
    """Experiment id -> the name shown in the report: the strategy, plus a settings digest when
    one folder holds the same strategy under several settings (a sweep)."""
    digests: dict[str, set[str]] = {}
    for row in rows:
        digests.setdefault(row["strategy"], set()).add(row["experiment_id"].rsplit("-", 1)[-1])
    return {row["experiment_id"]: (row["strategy"] if len(digests[row["strategy"]]) == 1
                                   else f"{row['strategy']}@{row['experiment_id'].rsplit('-', 1)[-1][:6]}")
            for row in rows}


def build_report(storage: Storage, out: Location | str, experiment_ids: list[str] | None = None,
                 on_progress: Callable[[str], None] = lambda message: None) -> dict:
    """Learning curves (PNG), table (markdown + JSON) from the Parquet files under ``out``;
    writes ``<out>/report/{learning_curves.png,report.md,report.json}``."""
    from ultrasound.al_report import curves_from_rows, learning_curves_png, markdown_table, summarize

    out = parse_uri(out) if isinstance(out, str) else out
    rows = read_rounds(storage, out, experiment_ids)
    if not rows:
        raise FileNotFoundError(f"no completed experiment round under {out.join('experiments').uri}")
    references = read_references(storage, out)
    curves = curves_from_rows(rows, strategy_labels(rows))
    summary = summarize(curves, references)
    table = markdown_table(summary)
    png = learning_curves_png(curves, summary, title=f"{len(curves)} experiments")
    report_dir = out.join("report")
    storage.write_bytes(report_dir.join("learning_curves.png"), png)
    document = ("# Labelling-budget simulation\n\n"
                f"{len(curves)} experiments, {len(rows)} evaluated rounds, from {out.uri}.\n\n"
                f"{table}\n![learning curves](learning_curves.png)\n")
    storage.write_bytes(report_dir.join("report.md"), document.encode())
    storage.write_bytes(report_dir.join("report.json"),
                        json.dumps({"summary": summary, "experiments": len(curves), "rounds": len(rows)},
                                   indent=2, default=_json_default).encode())
    on_progress(f"report: {report_dir.join('report.md').uri}")
    return {"report_uri": report_dir.join("report.md").uri, "png_uri": report_dir.join("learning_curves.png").uri,
            "summary": summary, "markdown": table, "experiments": len(curves), "rounds": len(rows)}


def simulate(
    data_uri: str,
    config: SimulationConfig,
    out_uri: str,
    storage: Storage,
    sample_spec=None,
    *,
    cache_uri: str | None = None,
    on_progress: Callable[[str], None] = lambda message: None,
    **kwargs: Any,
) -> SimulationResult:
    """Load the data set, build or reuse its sample table (embeddings or frames, cached at
    ``cache_uri``, default ``<out>/cache``), then :func:`simulate_table`. Needs a connected Ray."""
    from cluster.dataset import load_dataset
    from cluster.embeddings import SampleSpec, load_samples

    data = load_dataset(data_uri, storage)
    if config.labels:
        unknown = [name for name in config.labels if name not in data.findings]
        if unknown:
            raise ValueError(f"unknown finding column(s) {unknown}; the data set has {list(data.findings)}")
    spec = sample_spec or SampleSpec()
    spec = dataclasses.replace(spec, kind="embeddings" if config.mode == "embeddings" else "images")
    cache = parse_uri(cache_uri) if cache_uri else parse_uri(out_uri).join("cache")
    table, _ = load_samples(data, spec, cache, storage, on_progress)
    init_backbone = None
    if config.mode == "finetune" and spec.init:
        init_backbone = storage.read_bytes(parse_uri(spec.init))
    return simulate_table(table, config, out_uri, storage, init_backbone=init_backbone, on_progress=on_progress,
                          **kwargs)
