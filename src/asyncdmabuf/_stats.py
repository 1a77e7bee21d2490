"""What every device's ``statistics()`` promises, and how tools ask for it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["DeviceStatistics", "device_statistics"]

_FIELDS = (
    "memory_total",
    "memory_in_use",
    "memory_pinned",
    "waiters",
    "evictions",
    "faults_injected",
)


@runtime_checkable
class DeviceStatistics(Protocol):
    """The six fields of a device's ``statistics()`` record (section 6).

    A device may report more; tools (the stress command) read only these.
    """

    @property
    def memory_total(self) -> int:
        """The device's memory, in bytes."""

    @property
    def memory_in_use(self) -> int:
        """Bytes allocated."""

    @property
    def memory_pinned(self) -> int:
        """Bytes that cannot be evicted now."""

    @property
    def waiters(self) -> int:
        """Tasks waiting for memory."""

    @property
    def evictions(self) -> int:
        """Buffers moved out of memory so far."""

    @property
    def faults_injected(self) -> int:
        """Faults raised on purpose so far."""


def device_statistics(exporter: object) -> DeviceStatistics | None:
    """Return ``exporter.statistics()`` if it has the six fields, else None.

    An exporter without ``statistics()``, or whose record lacks a field or
    holds a non-int, gives None: tools then do without.
    """
    statistics = getattr(exporter, "statistics", None)
    if not callable(statistics):
        return None
    record = statistics()
    for name in _FIELDS:
        value = getattr(record, name, None)
        if not isinstance(value, int) or isinstance(value, bool):
            return None
    assert isinstance(record, DeviceStatistics)
    return record
