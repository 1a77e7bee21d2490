"""What a stress run reports: figures, latency distributions, the verdict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .._errors import InvalidArgument
from .config import StressConfig

__all__ = [
    "QUANTILE_POINTS",
    "Invariant",
    "LatencySummary",
    "StressProgress",
    "StressReport",
    "percentile",
]

#: How many points of each latency distribution a report keeps (for plots).
QUANTILE_POINTS = 101


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """A latency distribution, in seconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    quantiles: tuple[float, ...] = ()
    """``QUANTILE_POINTS`` evenly spaced quantiles, 0 to 1 (for plots)."""

    @classmethod
    def of(cls, samples: Sequence[float]) -> LatencySummary:
        """Summarise samples (any order); all zeros when there are none."""
        if not samples:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ordered = sorted(samples)
        last = len(ordered) - 1
        return cls(
            count=len(ordered),
            mean=math.fsum(ordered) / len(ordered),
            p50=percentile(ordered, 50),
            p90=percentile(ordered, 90),
            p99=percentile(ordered, 99),
            max=ordered[-1],
            quantiles=tuple(
                ordered[round(i * last / (QUANTILE_POINTS - 1))]
                for i in range(QUANTILE_POINTS)
            ),
        )


def percentile(ordered: Sequence[float], pct: float) -> float:
    """The nearest-rank ``pct``-th percentile of sorted, non-empty samples."""
    if not ordered:
        raise InvalidArgument("no samples")
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True, slots=True)
class Invariant:
    """One check of the verdict: what, whether it held, and the evidence."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class StressProgress:
    """A live view of a run, for progress displays."""

    ops_done: int
    ops_total: int | None
    elapsed: float
    duration: float | None
    busy: int
    cancellations: int
    faults: int


@dataclass(frozen=True, slots=True)
class StressReport:
    """Everything a run measured, and the verdict.

    Times are seconds; ``ok`` is True only if every invariant held.
    """

    config: StressConfig
    backend: str
    exporter: str
    elapsed: float
    ops: int
    ops_per_second: float
    abandoned: int
    """``try`` operations given up after ``MAX_TRY_ROUNDS`` Busy rounds."""
    maps: int
    try_maps: int
    busy: int
    cancellations: int
    faults: int
    """Injected faults the operations met (each one abandons its operation)."""
    faults_injected: int
    """Faults the exporter says it injected (its statistics), 0 otherwise."""
    errors: tuple[str, ...]
    """Errors that no injected fault explains (at most the first 10)."""
    evictions: int
    move_notifies: int
    bytes_verified: int
    mismatches: int
    map_latency: LatencySummary
    try_map_latency: LatencySummary
    invariants: tuple[Invariant, ...]
    hung: bool
    hang_report: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    busy_reasons: tuple[tuple[str, int], ...] = ()
    """Why ``try_map`` was Busy: the exporters' messages (buffer names
    folded), with how often, most frequent first."""

    @property
    def ok(self) -> bool:
        """True when every invariant held (the exit status is 0 only then)."""
        return all(inv.ok for inv in self.invariants)

    def to_dict(self) -> dict[str, Any]:
        """Every figure, as JSON-ready data."""
        data = asdict(self)
        data["ok"] = self.ok
        return data
