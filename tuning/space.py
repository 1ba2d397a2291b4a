"""Search spaces of a sweep: the `space:` section of a SPEC, parsed into typed parameters.

Each parameter is one of (YAML form on the right)::

    uniform      lr: {uniform: [0.1, 1.0]}
    loguniform   lr: {loguniform: [1.0e-5, 1.0e-2]}
    int          batch_videos: {int: [8, 64], step: 8}        (``log: true`` samples on a log scale)
    choice       loss: {choice: [bce, asymmetric]}
    conditional  any of the above plus ``when: {loss: asymmetric}`` (or ``when: {loss: [a, b]}``):
                 sampled only in trials whose ``loss`` (a choice parameter) takes one of those values

Float parameters may carry ``grid: N`` (N points, evenly spaced on their scale) for the grid
searcher. A parameter name may be dotted (``confidence.threshold``) to reach a nested key of the
job's config.

The space turns into what Optuna wants: :meth:`SearchSpace.suggest` is a define-by-run function
(``trial -> params``) for ``OptunaSearch``, which is how conditional parameters are expressed;
:meth:`SearchSpace.grid` lists every grid point for the grid searcher.

Example:
    >>> space = parse_space({"loss": {"choice": ["bce", "asymmetric"]},
    ...                      "gamma": {"uniform": [1, 4], "when": {"loss": "asymmetric"}}})
    >>> [p.name for p in space.params]
    ['loss', 'gamma']
    >>> len(space.grid(default_points=2))
    3
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = ("uniform", "loguniform", "int", "choice")
OPTION_KEYS = ("step", "log", "when", "grid")
DEFAULT_GRID_POINTS = 3


class SpaceError(ValueError):
    """A malformed `space:` entry; the message names the key (``space.<param>...``)."""


@dataclass(frozen=True)
class Param:
    """One searchable parameter.

    ``low``/``high`` bound ``uniform``/``loguniform``/``int`` (inclusive); ``choices`` lists a
    ``choice``; ``when`` maps a parent choice parameter to the values that switch this one on.
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    log: bool = False
    choices: tuple = ()
    when: tuple[tuple[str, tuple], ...] = ()
    grid_points: int | None = None

    @property
    def conditional(self) -> bool:
        return bool(self.when)

    def active(self, values: Mapping[str, Any]) -> bool:
        """True when every ``when`` condition holds in ``values`` (the params sampled so far)."""
        return all(parent in values and values[parent] in allowed for parent, allowed in self.when)

    def suggest(self, trial) -> Any:
        """Draw this parameter from an Optuna trial (or anything with its ``suggest_*`` API)."""
        if self.kind == "uniform":
            return trial.suggest_float(self.name, self.low, self.high)
        if self.kind == "loguniform":
            return trial.suggest_float(self.name, self.low, self.high, log=True)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=self.step or 1, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def distribution(self):
        """The Optuna distribution this parameter is drawn from."""
        import optuna.distributions as od

        if self.kind == "uniform":
            return od.FloatDistribution(self.low, self.high)
        if self.kind == "loguniform":
            return od.FloatDistribution(self.low, self.high, log=True)
        if self.kind == "int":
            return od.IntDistribution(int(self.low), int(self.high), step=self.step or 1, log=self.log)
        return od.CategoricalDistribution(list(self.choices))

    def grid_values(self, default_points: int = DEFAULT_GRID_POINTS) -> list:
        """The values the grid searcher tries: every choice, every int step (or ``grid`` points
        of an int range), ``grid`` points evenly spaced on a float's scale."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int" and self.grid_points is None:
            return list(range(int(self.low), int(self.high) + 1, self.step or 1))
        n = self.grid_points or default_points
        if n == 1:
            points = [self.low]
        elif self.kind == "loguniform" or (self.kind == "int" and self.log):
            lo, hi = math.log(self.low), math.log(self.high)
            points = [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
        else:
            points = [self.low + (self.high - self.low) * i / (n - 1) for i in range(n)]
        if self.kind == "int":
            return sorted({int(round(p)) for p in points})
        return [float(p) for p in points]

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and int(value) != value:
            return False
        return self.low <= value <= self.high


@dataclass(frozen=True)
class SearchSpace:
    """The parameters of a sweep, parents before the parameters conditioned on them."""

    params: tuple[Param, ...] = field(default_factory=tuple)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def __getitem__(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def suggest(self, trial) -> None:
        """Define-by-run function for ``OptunaSearch(space=...)``: draws every active parameter.

        Returns None: OptunaSearch collects the drawn values from the ``suggest_*`` calls, so
        parameters switched off by a ``when`` are simply absent from the trial's config.
        """
        values: dict[str, Any] = {}
        for param in self.params:
            if param.active(values):
                values[param.name] = param.suggest(trial)
        return None

    def grid(self, default_points: int = DEFAULT_GRID_POINTS) -> list[dict[str, Any]]:
        """Every grid point (a dict of active parameters), conditional parameters expanded only
        where their condition holds; no duplicates, in a stable order."""
        points: list[dict[str, Any]] = [{}]
        for param in self.params:
            grown: list[dict[str, Any]] = []
            values = param.grid_values(default_points)
            for point in points:
                if param.active(point):
                    grown.extend({**point, param.name: v} for v in values)
                else:
                    grown.append(point)
            points = grown
        unique: dict[tuple, dict[str, Any]] = {}
        for point in points:
            unique.setdefault(tuple(sorted((k, repr(v)) for k, v in point.items())), point)
        return list(unique.values())

    def distributions(self, unconditional_only: bool = False) -> dict[str, Any]:
        return {p.name: p.distribution() for p in self.params if not (unconditional_only and p.conditional)}

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Raise SpaceError if ``config`` has a value outside its parameter's range."""
        for param in self.params:
            if param.name in config and not param.contains(config[param.name]):
                raise SpaceError(f"space.{param.name}: value {config[param.name]!r} outside the space")


def parse_space(raw: Any, where: str = "space") -> SearchSpace:
    """Parse the `space:` mapping of a SPEC; every error names its key and the valid choices."""
    if not isinstance(raw, Mapping) or not raw:
        raise SpaceError(f"{where}: must be a non-empty mapping of parameter name -> distribution, "
                         f"e.g. {{lr: {{loguniform: [1.0e-5, 1.0e-2]}}}}")
    parsed: dict[str, Param] = {}
    for name, body in raw.items():
        if not isinstance(name, str) or not name:
            raise SpaceError(f"{where}: parameter names must be non-empty strings, got {name!r}")
        parsed[name] = _parse_param(name, body, f"{where}.{name}")
    return SearchSpace(tuple(_order(parsed, where)))


def _parse_param(name: str, body: Any, where: str) -> Param:
    if not isinstance(body, Mapping):
        raise SpaceError(f"{where}: must be a mapping with one of {', '.join(KINDS)}, got {body!r}")
    unknown = [k for k in body if k not in KINDS + OPTION_KEYS]
    if unknown:
        raise SpaceError(f"{where}.{unknown[0]}: unknown key; valid keys: {', '.join(KINDS + OPTION_KEYS)}")
    kinds = [k for k in body if k in KINDS]
    if len(kinds) != 1:
        raise SpaceError(f"{where}: needs exactly one distribution among {', '.join(KINDS)}, got "
                         f"{', '.join(kinds) or 'none'}")
    kind = kinds[0]
    when = _parse_when(body.get("when"), f"{where}.when")
    grid_points = body.get("grid")
    if grid_points is not None and (isinstance(grid_points, bool) or not isinstance(grid_points, int) or grid_points < 1):
        raise SpaceError(f"{where}.grid: must be a positive integer (points on the grid), got {grid_points!r}")
    if kind == "choice":
        for option in ("step", "log", "grid"):
            if option in body:
                raise SpaceError(f"{where}.{option}: not an option of a choice parameter; valid: when")
        choices = body["choice"]
        if not isinstance(choices, Sequence) or isinstance(choices, str) or len(choices) == 0:
            raise SpaceError(f"{where}.choice: empty or not a list; give at least one value, "
                             f"e.g. choice: [bce, asymmetric]")
        for value in choices:
            if not isinstance(value, (str, int, float, bool)) and value is not None:
                raise SpaceError(f"{where}.choice: values must be strings, numbers, booleans or null, got {value!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise SpaceError(f"{where}.choice: repeated values in {list(choices)}")
        return Param(name, kind, choices=tuple(choices), when=when)

    bounds = body[kind]
    if not isinstance(bounds, Sequence) or isinstance(bounds, str) or len(bounds) != 2:
        raise SpaceError(f"{where}.{kind}: needs [low, high], got {bounds!r}")
    low, high = (_number(b, f"{where}.{kind}") for b in bounds)
    if not low < high:
        raise SpaceError(f"{where}.{kind}: empty range [{low:g}, {high:g}]: low must be < high")
    step = body.get("step")
    log = body.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}.log: must be true or false, got {log!r}")
    if kind == "int":
        if int(low) != low or int(high) != high:
            raise SpaceError(f"{where}.int: bounds must be integers, got [{low:g}, {high:g}]")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
            raise SpaceError(f"{where}.step: must be a positive integer, got {step!r}")
        if step is not None and (high - low) % step:
            raise SpaceError(f"{where}.step: {step} does not divide the range [{low:g}, {high:g}]")
        if log and step not in (None, 1):
            raise SpaceError(f"{where}.log: a log-scale int range takes no step")
        if log and low < 1:
            raise SpaceError(f"{where}.int: a log-scale int range needs low >= 1, got {low:g}")
        return Param(name, kind, int(low), int(high), step=step, log=log, when=when, grid_points=grid_points)
    if step is not None:
        raise SpaceError(f"{where}.step: only int parameters take a step")
    if log:
        raise SpaceError(f"{where}.log: use loguniform for a float on a log scale")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}.loguniform: needs low > 0, got {low:g}")
    return Param(name, kind, low, high, when=when, grid_points=grid_points)


def _number(value: Any, where: str) -> float:
    # PyYAML reads "1e-5" (no dot) as a string: accept numeric strings rather than surprise users.
    if isinstance(value, bool):
        raise SpaceError(f"{where}: bounds must be numbers, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        try:
            number = float(str(value))
        except ValueError:
            raise SpaceError(f"{where}: bounds must be numbers, got {value!r}") from None
    if not math.isfinite(number):
        raise SpaceError(f"{where}: bounds must be finite, got {value!r}")
    return number


def _parse_when(raw: Any, where: str) -> tuple[tuple[str, tuple], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise SpaceError(f"{where}: must map a choice parameter to its value(s), e.g. when: {{loss: asymmetric}}")
    out = []
    for parent, allowed in raw.items():
        values = tuple(allowed) if isinstance(allowed, (list, tuple)) else (allowed,)
        if not values:
            raise SpaceError(f"{where}.{parent}: empty list of values")
        out.append((str(parent), values))
    return tuple(out)


def _order(params: dict[str, Param], where: str) -> list[Param]:
    """Parents first; every ``when`` must name a choice parameter and values among its choices."""
    for param in params.values():
        for parent, allowed in param.when:
            if parent == param.name:
                raise SpaceError(f"{where}.{param.name}.when: a parameter cannot depend on itself")
            if parent not in params:
                raise SpaceError(f"{where}.{param.name}.when.{parent}: unknown parameter; valid: "
                                 f"{', '.join(n for n in params if params[n].kind == 'choice') or '(no choice parameters)'}")
            if params[parent].kind != "choice":
                raise SpaceError(f"{where}.{param.name}.when.{parent}: must name a choice parameter "
                                 f"({parent} is {params[parent].kind})")
            bad = [v for v in allowed if v not in params[parent].choices]
            if bad:
                raise SpaceError(f"{where}.{param.name}.when.{parent}: {bad[0]!r} is not one of "
                                 f"{list(params[parent].choices)}")
    ordered: list[Param] = []
    placed: set[str] = set()
    pending = list(params.values())
    while pending:
        ready = [p for p in pending if all(parent in placed for parent, _ in p.when)]
        if not ready:
            raise SpaceError(f"{where}: conditions form a cycle among {', '.join(p.name for p in pending)}")
        for p in ready:
            ordered.append(p)
            placed.add(p.name)
        pending = [p for p in pending if p.name not in placed]
    return ordered
