"""Job settings, read the same way by every job: the defaults, then a ``--config`` YAML file (a
local path or ``s3://...``), then ``--set KEY=VALUE`` overrides, then the flags given.

The typed config models (``USCLConfig``, ``MSMLConfig``, ``SimulationConfig``: pydantic models on
:class:`ultrasound.config.Settings`) check the merged mapping: an unknown key is refused with a
"did you mean" hint and the valid keys, a number written as text (YAML reads ``3e-4`` as a
string) is converted. Their fields also declare the jobs' flags (``jobs.common.add_settings_flags``). Errors here are one line naming
the file, the key or the value (:class:`ConfigError`, exit status 2 on the command line).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from cluster.storage import LocationError, Storage, StorageError, parse_uri


class ConfigError(ValueError):
    """A config file, ``--set`` item or setting that cannot be used: one line, what and where."""


def read_config_file(source: str, storage: Storage | None = None, *, section: str | None = None,
                     what: str = "settings") -> dict[str, Any]:
    """The mapping a YAML file at ``source`` (path or ``s3://``) holds; an empty file is ``{}``.

    ``section``: a file holding only ``{section: {...}}`` (e.g. ``uscl:``) is read as its inside.
    """
    storage = storage or Storage()
    try:
        text = storage.read_bytes(parse_uri(source)).decode()
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {source}") from None
    except (OSError, StorageError, LocationError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {source}: cannot read it ({err})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {source}: not valid YAML: {' '.join(str(err).split())}") from None
    if values is None:
        return {}
    if section and isinstance(values, dict) and set(values) == {section} and isinstance(values[section], dict):
        values = values[section]
    if not isinstance(values, dict):
        raise ConfigError(f"--config {source}: expected a mapping of {what}, got {type(values).__name__}")
    return values


def parse_set_items(items: Iterable[str] | None) -> dict[str, Any]:
    """``["lr=3e-4", "epochs=5"]`` -> ``{"lr": "3e-4", "epochs": 5}``: each value read as YAML
    (numbers as text are converted by the config class, like a YAML file's)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: not a YAML value") from None
    return out


def layered(file: str | None, sets: Iterable[str] | None, flags: Mapping[str, Any], *,
            base: Mapping[str, Any] | None = None, storage: Storage | None = None,
            section: str | None = None, what: str = "settings") -> dict[str, Any]:
    """``base`` <- the ``--config`` file <- ``--set`` items <- ``flags`` (None values skipped)."""
    values: dict[str, Any] = dict(base or {})
    if file:
        values.update(read_config_file(file, storage, section=section, what=what))
    values.update(parse_set_items(sets))
    values.update({k: v for k, v in flags.items() if v is not None})
    return values

