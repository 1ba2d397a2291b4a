"""`sonoray query` on a data set: embed its frames (cached), then one TSAL step
(:func:`ultrasound.active.query.next_videos`), written as ``next.csv`` for annotation tools.

``next.csv`` columns: ``video_id, key, stream, rank, score, confidence``, then per finding
``<finding>`` (the proposed machine label, 0/1, on ``machine`` rows; empty for ``human`` rows)
and ``<finding>_p`` (the video's mean frame probability, every row). ``human`` rows are the
videos to label, best first; ``machine`` rows are proposals a human confirms (tsal,
self_training). Fill the finding columns in and pass the sheet back as ``--labelled``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cluster.dataset import IngestedDataset
from cluster.embeddings import SampleSpec, load_samples
from cluster.storage import Location, Storage
from ultrasound.active.query import HUMAN, VideoPick, next_videos
from ultrasound.active.sim_config import SimulationConfig
from ultrasound.manifest import parse_label_sheet


def query_data(data: IngestedDataset, labelled_csv: str | Path, budget: int, strategy: str, *,
               spec: SampleSpec, cache: Location, storage: Storage, seed: int = 0,
               config: SimulationConfig = SimulationConfig(),
               on_progress: Callable[[str], None] = lambda message: None) -> tuple[pd.DataFrame, dict]:
    """``(next.csv as a DataFrame, summary)``; needs a connected Ray unless the embeddings are
    cached. ManifestError / ValueError name what was wrong in the sheet or the request."""
    if not data.findings:
        raise ValueError(f"{data.root.uri} has no finding columns: ingest with --labels COL,.. first")
    answers = parse_label_sheet(labelled_csv, data.findings, frozenset(str(r["video_id"]) for r in data.rows))
    table, _ = load_samples(data, spec, cache, storage, on_progress)
    labelled = {video: np.array(values, dtype=np.uint8) for video, values in answers.items()}
    picks = next_videos(table.features, table.video_id, labelled, budget, strategy, config=config, seed=seed)
    frame = picks_frame(picks, list(data.findings), {str(r["video_id"]): r["key"] for r in data.rows})
    humans = [p.video_id for p in picks if p.stream == HUMAN]
    summary = {"strategy": strategy, "budget": budget, "labelled_videos": len(labelled),
               "pool_videos": len(set(table.video_id.tolist()) - set(labelled)), "next": humans,
               "machine_proposals": len(picks) - len(humans), "skipped_videos": list(table.skipped)}
    return frame, summary


def picks_frame(picks: list[VideoPick], findings: list[str], keys: dict[str, str]) -> pd.DataFrame:
    """The ``next.csv`` table of ``picks`` (see the module docstring)."""
    rows = []
    for p in picks:
        human = p.stream == HUMAN
        row = {"video_id": p.video_id, "key": keys.get(p.video_id, ""), "stream": p.stream, "rank": p.rank,
               "score": round(p.score, 6) if human else None, "confidence": None if human else round(p.score, 6)}
        for j, name in enumerate(findings):
            row[name] = None if p.labels is None else int(p.labels[j])
        for j, name in enumerate(findings):
            row[f"{name}_p"] = round(float(p.probs[j]), 6)
        rows.append(row)
    frame = pd.DataFrame(rows)
    for name in findings:
        frame[name] = frame[name].astype("Int64")  # empty for human rows, 0/1 for proposals
    return frame
