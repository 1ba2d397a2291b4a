"""TSAL active learning, pure and seeded: strategies, label correlation, confidence validation,
the serialisable state, the two-stream round and the fast embeddings head. No Ray here: the
simulator in cluster/ drives these functions (docs/tsal.md explains every choice)."""
from ultrasound.active.confidence import ConfidenceConfig, Validation, confidence_validate
from ultrasound.active.correlation import Cooccurrence, cooccurrence
from ultrasound.active.head import HeadParams, predict_head, train_head
from ultrasound.active.rounds import RoundPlan, apply_answers, round_rng, tsal_round
from ultrasound.active.state import ALState, LabelRecord
from ultrasound.active.strategies import (
    STRATEGIES,
    Strategy,
    StrategyContext,
    make_strategy,
    select_spread,
    select_top,
)

__all__ = [
    "ALState",
    "ConfidenceConfig",
    "Cooccurrence",
    "HeadParams",
    "LabelRecord",
    "RoundPlan",
    "STRATEGIES",
    "Strategy",
    "StrategyContext",
    "Validation",
    "apply_answers",
    "confidence_validate",
    "cooccurrence",
    "make_strategy",
    "predict_head",
    "round_rng",
    "select_spread",
    "select_top",
    "train_head",
    "tsal_round",
]
