"""Checkpoints that cannot run code: sonoray saves plain data and loads with ``weights_only``.

A torch checkpoint is a pickle, and unpickling an arbitrary file runs whatever it names. sonoray
therefore loads every checkpoint with ``torch.load(..., weights_only=True)``, which accepts only
tensors, numbers, strings, booleans, None, lists, tuples, dicts and a few torch types, and writes
its own checkpoints from that same vocabulary (:func:`plain`). A file that needs anything more is
refused with :class:`CheckpointError`: ``"<source>: not a plain state dict: <reason>"``.

Example::

    >>> raw = save_state({"model": {"w": torch.zeros(2)}, "epoch": np.int64(3)})
    >>> load_state(raw, "model.pt")["epoch"]
    3
"""
from __future__ import annotations

import io
import pickle
from pathlib import PurePath
from typing import Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that is not plain data (it would run code or needs classes to load)."""


def plain(obj: Any) -> Any:
    """``obj`` with every numpy value turned into its torch / Python equivalent and every path
    into a string, so that it loads with ``weights_only=True``. Containers are copied."""
    if isinstance(obj, np.generic):  # first: np.float64 is also a float
        return obj.item()
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, dict):
        return {plain(key): plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [plain(item) for item in (sorted(obj) if isinstance(obj, (set, frozenset)) else obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj  # anything else is saved as it is; loading will refuse it, naming its type


def save_state(state: Any) -> bytes:
    """``torch.save`` of ``plain(state)``, as bytes."""
    buffer = io.BytesIO()
    torch.save(plain(state), buffer)
    return buffer.getvalue()


def load_state(raw: bytes, source: str) -> Any:
    """The object in a torch-saved ``raw`` (tensors on CPU), loaded with ``weights_only=True``,
    or the tensor dict of a safetensors file (``backbone.safetensors``, ``msml.safetensors``:
    tensors only, so it can never run code either).

    Raises CheckpointError naming ``source`` when the file needs more than plain data (a crafted
    pickle, a checkpoint holding custom classes) or is not a torch file at all.
    """
    if is_safetensors(raw):
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(raw)
        except (SafetensorError, ValueError) as err:
            raise CheckpointError(f"{source}: not a readable safetensors file: {err}") from None
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as err:
        raise CheckpointError(f"{source}: not a plain state dict: {_reason(err)}") from None


def is_safetensors(raw: bytes) -> bool:
    """True for safetensors bytes: an 8-byte little-endian header length, then a JSON header.
    (A torch file is a zip, ``PK...``, or a legacy pickle, ``\\x80...``.)"""
    if len(raw) < 10:
        return False
    size = int.from_bytes(raw[:8], "little")
    return 0 < size <= len(raw) - 8 and raw[8:9] == b"{"


def _reason(err: Exception) -> str:
    """What torch's long weights-only message says it refused, in one sentence."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__
