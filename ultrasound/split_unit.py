"""The unit no split may cut: the patient when the manifest names one, else the video.

Frames of one video are near-duplicates and videos of one patient share the patient's lungs, so
every train/validation/test split in sonoray (evaluate's folds, MSML's validation carve, the
simulator's test split) keeps a unit whole. One rule, one key scheme: ``patient:<id>`` or
``video:<id>`` (the prefixes keep a patient named like a video apart from it).

Example:
    >>> split_unit("p01", "v7"), split_unit("", "v7")
    ('patient:p01', 'video:v7')
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def split_unit(patient_id: str | None, video_id: str) -> str:
    """``patient:<patient_id>`` when it is given (non-blank), else ``video:<video_id>``."""
    patient = str(patient_id or "").strip()
    return f"patient:{patient}" if patient else f"video:{video_id}"


def split_units(patient_ids: Sequence | np.ndarray, video_ids: Sequence | np.ndarray) -> np.ndarray:
    """:func:`split_unit` of every (patient, video) pair. Shape: ``(N,)``, ``(N,)`` -> ``(N,)`` str."""
    return np.array([split_unit(p, str(v)) for p, v in zip(patient_ids, video_ids)], dtype=str)


def unit_kind(patient_ids: Sequence) -> str:
    """What the units were: ``"patient"`` (every video names its patient), ``"video"`` (none
    does) or ``"patient/video"`` (some do)."""
    known = sum(1 for p in patient_ids if str(p or "").strip())
    return "patient" if known == len(patient_ids) else ("video" if known == 0 else "patient/video")
