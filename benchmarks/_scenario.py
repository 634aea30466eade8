"""What a scenario is, for the suite's driver and its report.

A :class:`Measurement` runs for one contender in one round and returns metrics for
one or more scenarios (the cold-start child measures both the first call and
memory); a :class:`Table` says how the report shows one scenario.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _contenders import Contender

Metrics = dict[str, float | None]  # metric -> value; None where it does not apply
Results = dict[str, Metrics]  # scenario key -> metrics


@dataclass(frozen=True)
class Column:
    key: str  # metric key in the JSON
    label: str  # column header
    fmt: str = "{:.1f}"


@dataclass(frozen=True)
class Table:
    key: str  # scenario key in the JSON
    title: str
    explain: str  # one line: what is measured
    columns: tuple[Column, ...]
    headline: str  # the metric that ratios and "rounds min-max" use
    lower_is_better: bool


@dataclass(frozen=True)
class Measurement:
    name: str
    families: tuple[str, ...]
    tables: tuple[Table, ...]
    # (contender, quick) -> {scenario key: metrics}
    run: Callable[[Contender, bool], Awaitable[Results]]
    quick_rounds: int | None = None  # with --quick, run in the first rounds only
