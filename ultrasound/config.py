"""Typed settings from YAML and the command line: one conversion rule for every config class.

YAML reads ``3e-4`` as text and a command line gives strings, so a frozen dataclass config
converts each value to its field's declared type (``int``, ``float``, ``bool``) before it
validates: ``"3e-4"`` -> ``0.0003``, ``"5"`` or ``5.0`` -> ``5``, ``"false"`` -> ``False``.
A value that does not convert fails naming the key and the value.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     lr: float = 1e-3
    ...     epochs: int = 1
    >>> coerce_fields(Demo, {"lr": "3e-4", "epochs": 5.0}, "demo")
    {'lr': 0.0003, 'epochs': 5}
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

_KINDS = {"int": int, "float": float, "bool": bool}


def coerce_value(name: str, annotation: Any, value: Any, what: str) -> Any:
    """``value`` converted to the field type ``annotation`` (as a class or, with postponed
    annotations, its name; ``int | None`` converts like ``int`` and lets None pass, ``int | str``
    keeps a word that is not a number); other types pass unchanged."""
    names = [part.strip() for part in str(getattr(annotation, "__name__", annotation)).split("|")]
    if value is None and "None" in names:
        return None
    kind = next((_KINDS[n] for n in names if n in _KINDS), None)
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind is int:
            number = float(value)
            if number != int(number) or isinstance(value, bool):
                raise ValueError
            return int(number)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except (TypeError, ValueError):
        if "str" in names:  # ``int | str``: a word is a valid value of its own
            return value
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise ValueError(f"{what} config key {name!r} needs {article} {kind.__name__}, got {value!r}") from None
    return value


def coerce_fields(cls: type, values: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The keyword arguments for dataclass ``cls`` from ``values``: unknown keys rejected naming
    the valid ones, every known one converted to its field's type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {what} config key(s) {unknown}{did_you_mean(unknown, fields)}; "
                         f"valid keys: {sorted(fields)}")
    return {name: coerce_value(name, fields[name].type, value, what) for name, value in values.items()}


def did_you_mean(unknown: list[str], valid) -> str:
    """`` (did you mean 'lr'?)`` for the closest valid names of misspelt keys, else ``""``."""
    import difflib

    hints = [match[0] for key in unknown if (match := difflib.get_close_matches(str(key), list(valid), n=1))]
    return f" (did you mean {', '.join(repr(h) for h in hints)}?)" if hints else ""
