"""The real active-learning step: which unlabelled videos should annotators label next?

One round of TSAL (two-stream semi-supervised active learning) on a partly labelled pool, at video
level because a clinician labels a clip, not a frame:

1. the head (:class:`~ultrasound.active.learners.HeadModel`, the simulator's, same settings) is
   trained on every frame of the labelled videos, each frame carrying its video's labels;
2. the strategy (any simulator kind: ``tsal``, ``mlm``, ``least_margin``, ``random``, ...) scores
   every frame of the unlabelled videos; a video's score is the mean of its frames' scores (what the
   simulator's ``query_unit="video"`` does), and the ``budget`` best videos go to the annotators;
3. for kinds with the machine stream (``tsal``, ``self_training``), the other unlabelled videos
   whose mean probabilities clear confidence validation (every finding confident, no co-occurrence
   rule of the labelled set broken) are proposed with machine labels, the most confident first, at
   most ``budget`` of them: proposals a human confirms, never labels taken as given.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ultrasound.active.confidence import confidence_validate
from ultrasound.active.learners import HeadModel
from ultrasound.active.sim_config import KINDS, SimulationConfig
from ultrasound.active.strategies import StrategyContext, group_means, select_top

HUMAN, MACHINE = "human", "machine"


@dataclass(frozen=True)
class VideoPick:
    """One row of ``next.csv``.

    Attributes:
        video_id: the video.
        stream: ``"human"`` (label it) or ``"machine"`` (confirm the proposed labels).
        rank: 1-based within its stream.
        score: the strategy's video score (human) or the confidence, the smallest ``|p - 0.5|``
            over findings (machine).
        probs: ``(L,)`` the video's mean frame probabilities.
        labels: ``(L,)`` 0/1 proposed machine labels, None for a human query.
    """

    video_id: str
    stream: str
    rank: int
    score: float
    probs: np.ndarray
    labels: np.ndarray | None = None


def next_videos(features: np.ndarray, video_ids: np.ndarray, labelled: Mapping[str, np.ndarray], budget: int,
                strategy: str = "tsal", *, config: SimulationConfig = SimulationConfig(),
                seed: int = 0) -> list[VideoPick]:
    """The next ``budget`` videos to label (and, for machine-stream kinds, up to ``budget``
    machine-label proposals), best first.

    Shape:
        - features: ``(N, D)`` frame embeddings; video_ids ``(N,)`` the frame's video.
        - labelled: video_id -> ``(L,)`` 0/1 labels of the videos annotated so far.

    Raises ValueError for an unknown strategy, a labelled video without frames, no labelled or
    no unlabelled video, or ``budget < 1``.
    """
    if strategy not in KINDS:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(KINDS)}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    video_ids = np.asarray(video_ids).astype(str)
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != video_ids.shape[0]:
        raise ValueError(f"features must be (N, D) with N = {video_ids.shape[0]} frames, got {features.shape}")
    present = set(video_ids.tolist())
    missing = sorted(set(labelled) - present)
    if missing:
        raise ValueError(f"{len(missing)} labelled video(s) have no frame in the data set: {missing[:5]}")
    if not labelled:
        raise ValueError("no labelled video: label a few first (e.g. a random handful)")
    is_labelled = np.isin(video_ids, list(labelled))
    pool = np.flatnonzero(~is_labelled)
    if pool.size == 0:
        raise ValueError("every video is labelled: nothing left to query")
    train = np.flatnonzero(is_labelled)
    labels = np.stack([np.asarray(labelled[v], dtype=np.uint8) for v in video_ids[train]])
    model = HeadModel(features, config, seed)
    fitted = model.fit(train, labels, np.ones(train.size, np.float32), np.ones(train.size, bool))
    probs = model.predict(fitted, pool)

    kind = KINDS[strategy]
    rng = np.random.default_rng(seed)
    video_labels = np.stack([np.asarray(v, dtype=np.uint8) for v in labelled.values()])
    context = StrategyContext(labelled_labels=video_labels, rng=rng, embeddings=features[pool])
    frame_scores = np.asarray(kind.build(config).score(probs, context), dtype=np.float64)
    names, _, video_scores = group_means(frame_scores, video_ids[pool])
    _, _, video_probs = group_means(probs, video_ids[pool])
    chosen = select_top(video_scores, min(budget, names.size), rng)
    picks = [VideoPick(str(names[i]), HUMAN, rank + 1, float(video_scores[i]), video_probs[i])
             for rank, i in enumerate(chosen)]
    if kind.machine_stream:
        rest = np.setdiff1d(np.arange(names.size), chosen)
        check = confidence_validate(video_probs[rest], video_labels, config.confidence_config())
        accepted = np.flatnonzero(check.accepted)
        order = accepted[select_top(check.confidence[accepted], min(budget, accepted.size), rng)]
        picks += [VideoPick(str(names[rest[i]]), MACHINE, rank + 1, float(check.confidence[i]),
                            video_probs[rest[i]], check.labels[i]) for rank, i in enumerate(order)]
    return picks
