"""How a method declares the options ``bench --tune`` searches (``Method.search_space``).

Each entry maps an option name to one of:

- a tuple of values (``(0.8, 0.1, 0.3, 0.5)``): a categorical choice among them (the form every
  method used before ranges existed, still read the same way);
- ``Choice(...)``: the same, spelled out;
- ``FloatRange(low, high, log=...)`` / ``IntRange(low, high, log=...)``: any value in the
  closed range (``log=True``: searched on a log scale).

The tuner (``equimodal.analysis.tuning``) turns these into Optuna distributions; this module has
no dependency, so a method declares its space without importing Optuna.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class Choice:
    """One of ``values`` (categorical: no order assumed)."""

    values: tuple

    def __init__(self, *values: Any) -> None:
        if len(values) == 1 and isinstance(values[0], (list, tuple)):
            values = tuple(values[0])
        if not values:
            raise ValueError("Choice needs at least one value")
        object.__setattr__(self, "values", tuple(values))


@dataclass(frozen=True)
class FloatRange:
    """Any float in [low, high]; ``log``: sampled uniformly in log space (both ends > 0)."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"FloatRange({self.low}, {self.high}, log={self.log}): need 0 < low < high on a log "
                             "scale, low < high otherwise")


@dataclass(frozen=True)
class IntRange:
    """Any integer in [low, high]; ``log``: sampled uniformly in log space (both ends >= 1)."""

    low: int
    high: int
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high or (self.log and self.low < 1):
            raise ValueError(f"IntRange({self.low}, {self.high}, log={self.log}): need low < high (and low >= 1 "
                             "on a log scale)")


Dimension = Union[Choice, FloatRange, IntRange]


def dimension(declared: Any) -> Dimension:
    """One declared entry as a ``Dimension`` (a tuple or list becomes a ``Choice``)."""
    if isinstance(declared, (Choice, FloatRange, IntRange)):
        return declared
    if isinstance(declared, (tuple, list)):
        return Choice(*declared)
    raise TypeError(f"a search_space entry is a tuple of values, Choice, FloatRange or IntRange; got {declared!r}")


def contains(dim: Dimension, value: Any) -> bool:
    """Whether ``value`` is one of the settings ``dim`` allows (for checking a method's default)."""
    if isinstance(dim, Choice):
        return value in dim.values
    return isinstance(value, (int, float)) and not isinstance(value, bool) and dim.low <= value <= dim.high
