"""What a stress run reports: figures, latency distributions, the verdict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from .._errors import InvalidArgument
from .config import StressConfig

__all__ = [
    "QUANTILE_POINTS",
    "Invariant",
    "LatencySummary",
    "StressProgress",
    "StressReport",
    "figure",
    "percentile",
]

#: How many points of each latency distribution a report keeps (for plots).
QUANTILE_POINTS = 101

#: JSON keys that carry their unit: every duration in seconds is renamed
#: ``*_s``, every size ``*_bytes``; latencies are in microseconds (``*_us``).
_CONFIG_KEYS = {
    "buffer_size": "buffer_size_bytes",
    "memory": "memory_bytes",
    "duration": "duration_s",
    "watchdog": "watchdog_s",
    "backoff": "backoff_s",
    "alloc_latency": "alloc_latency_s",
    "map_latency": "map_latency_s",
    "map_hold": "map_hold_s",
}


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

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data, in microseconds (keys ``*_us``)."""
        data: dict[str, Any] = {"count": self.count}
        for name in ("mean", "p50", "p90", "p99", "max"):
            data[f"{name}_us"] = getattr(self, name) * 1e6
        data["quantiles_us"] = [q * 1e6 for q in self.quantiles]
        return data


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
    lock_wait: LatencySummary
    """Of each blocking map: the time the buffer's lock kept it out."""
    exporter_time: LatencySummary
    """Of each blocking map: the time in the exporter's ``map``, lock held."""
    scheduler_delay: LatencySummary
    """Of each blocking map: the time its task was ready but not running."""
    invariants: tuple[Invariant, ...]
    hung: bool
    interrupted: bool = False
    """The run was stopped early (``stop``): the figures are partial."""
    hang_report: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    busy_reasons: tuple[tuple[str, int], ...] = ()
    """Why ``try_map`` was Busy: the exporters' messages (buffer names
    folded), with how often, most frequent first."""
    cpu_tried: int = 0
    """``try_cpu_access`` calls (the verification of ``try`` operations)."""
    cpu_busy: int = 0
    """Of them, those Busy (then ``cpu_access`` waited)."""

    @property
    def ok(self) -> bool:
        """True when every invariant held (the exit status is 0 only then)."""
        return all(inv.ok for inv in self.invariants)

    def to_dict(self) -> dict[str, Any]:
        """Every figure, as JSON-ready data, each key naming its unit.

        Durations are ``*_s`` (seconds), sizes ``*_bytes``, latencies
        ``*_us`` (microseconds); counts have no unit.
        """
        data: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "config":
                data["config"] = {
                    _CONFIG_KEYS.get(k, k): v for k, v in asdict(value).items()
                }
            else:
                key, item = figure(field.name, value)
                data[key] = item
        data["ok"] = self.ok
        return data


def figure(name: str, value: Any) -> tuple[str, Any]:
    """A report's field as a JSON key and value, the key naming its unit.

    Latencies become ``<name>_us``, ``elapsed`` ``elapsed_s``, invariants
    dicts; anything else is kept as it is.
    """
    if isinstance(value, LatencySummary):
        return f"{name}_us", value.to_dict()
    if name == "elapsed":
        return "elapsed_s", value
    if name == "invariants":
        return name, [asdict(inv) for inv in value]
    return name, value
