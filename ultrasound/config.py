"""Typed settings from YAML and the command line: one base model for every job's config.

USCL's, MSML's and the simulator's configs are pydantic v2 models (:class:`Settings`): frozen,
unknown keys refused (``extra="forbid"``) with a "did you mean" hint and the valid keys, and
each value converted to its field's type the way a YAML file or a command line needs (YAML reads
``3e-4`` as text, ``--set`` gives strings): ``"3e-4"`` -> ``0.0003``, ``"5"`` or ``5.0`` -> ``5``,
``"false"`` -> ``False``. A value that does not convert, or a setting a model refuses, fails in
one line naming the key and the value (pydantic's multi-line report is never shown). A field's
``description`` is its help text, and its default is what the command line says it falls back to.

Example:
    >>> class Demo(Settings):
    ...     what = "demo"
    ...     lr: float = 1e-3
    ...     epochs: int = 1
    >>> Demo.parse({"lr": "3e-4", "epochs": 5.0}).to_dict()
    {'lr': 0.0003, 'epochs': 5}
    >>> Demo.parse({"epochs": "two"})
    Traceback (most recent call last):
    ValueError: demo config key 'epochs' needs an int, got 'two'
"""
from __future__ import annotations

from collections.abc import Mapping
import types
import typing
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, ValidationInfo, field_validator

_KINDS = {"int": "an int", "float": "a float", "bool": "a bool", "string": "a str"}


def field_types(annotation: Any) -> set[type]:
    """The plain types a field annotation admits: ``int | str | None`` -> ``{int, str,
    NoneType}``, ``Names | None`` -> ``{tuple, NoneType}``, ``Any`` -> ``set()``."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return field_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(field_types(arg) for arg in typing.get_args(annotation)))
    if origin is not None:
        return {origin}  # tuple[str, ...] -> tuple
    return {annotation} if isinstance(annotation, type) else set()


def split_names(value: Any) -> Any:
    """``"a, b"`` (a command line's or a ``--set`` list) -> ``("a", "b")``; other values pass."""
    return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else value


#: a list of names, also written as one comma-separated string
Names = Annotated[tuple[str, ...], BeforeValidator(split_names)]


class Settings(BaseModel):
    """Base of the typed configs: build with :meth:`parse` (or keywords), change with
    :meth:`replace` (validated again), write with :meth:`to_dict`. ``what`` names the config in
    error messages ("USCL", "MSML", "simulation")."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    what: ClassVar[str] = "settings"

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_not_switches(cls, value: Any, info: ValidationInfo) -> Any:
        """A number field refuses a switch (pydantic would read ``true`` as 1), and a whole
        number written as text in float form (``"1e3"``, ``"5.0"``) is read as that int."""
        kinds = field_types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError("needs a number, not a switch")
        if isinstance(value, str) and int in kinds and float not in kinds:
            try:
                number = float(value)
            except ValueError:
                return value
            if number.is_integer():
                return int(number)
        return value

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ValueError(one_line(err, type(self))) from None

    @classmethod
    def parse(cls, values: Mapping[str, Any], base: "Settings | None" = None):
        """``base`` (default: the defaults) with ``values`` applied and validated."""
        return cls(**{**(base.to_dict() if base is not None else {}), **dict(values)})

    def replace(self, **changes: Any):
        """A copy with ``changes``, validated like a new config (pydantic's ``model_copy`` is not)."""
        return type(self).parse(changes, base=self)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists): what YAML, JSON and checkpoints hold."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_dump().items()}

    @classmethod
    def valid_keys(cls) -> list[str]:
        return list(cls.model_fields)

    @classmethod
    def default_of(cls, name: str) -> Any:
        return cls.model_fields[name].default


def one_line(err: ValidationError, cls: type[Settings]) -> str:
    """The first problem of a pydantic report as one line: unknown keys (all of them, with a
    "did you mean" hint and the valid keys), else the key, what it needs and the value given."""
    what = cls.what
    errors = err.errors(include_url=False)
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return (f"unknown {what} config key(s) {unknown}{did_you_mean(unknown, cls.model_fields)}; "
                f"valid keys: {sorted(cls.model_fields)}")
    first = errors[0]
    key = first["loc"][0] if first["loc"] else None
    message = first["msg"].removeprefix("Value error, ")
    if key is None:  # a check across fields (a model validator): its own message
        return message
    kind = next((text for prefix, text in _KINDS.items() if first["type"].startswith(prefix)), None)
    if kind:  # int_parsing, int_from_float, float_parsing, bool_parsing, string_type, ...
        return f"{what} config key {key!r} needs {kind}, got {first['input']!r}"
    return f"{what} config key {key!r}: {message[:1].lower() + message[1:]}, got {first['input']!r}"


def did_you_mean(unknown: list[str], valid) -> str:
    """`` (did you mean 'lr'?)`` for the closest valid names of misspelt keys, else ``""``."""
    import difflib

    hints = [match[0] for key in unknown if (match := difflib.get_close_matches(str(key), list(valid), n=1))]
    return f" (did you mean {', '.join(repr(h) for h in hints)}?)" if hints else ""
