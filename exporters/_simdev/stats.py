"""What a SimDevice reports about itself."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SimStatistics"]


@dataclass(frozen=True, slots=True)
class SimStatistics:
    """A snapshot of a :class:`SimDevice`'s state; byte counts are page-rounded.

    The first six fields are :class:`asyncdmabuf.DeviceStatistics`, what
    every device promises; the rest are SimDevice's own.
    """

    memory_total: int
    """The device's memory, in bytes."""
    memory_in_use: int
    """Bytes of pages allocated, including reservations still in their latency."""
    memory_pinned: int
    """Bytes of pages of resident buffers that cannot be evicted (pinned)."""
    waiters: int
    """Maps (and CPU accesses) waiting for memory."""
    evictions: int
    """Buffers moved out of memory (their bytes saved) so far."""
    faults_injected: int
    """Faults raised on purpose so far."""
    restores: int
    """Evicted buffers brought back into memory so far."""
    buffers: int
    """Buffers exported by the device and not yet released."""
    resident: int
    """Of those, how many have their pages now."""
    copies: int
    """Transfers the DMA engine completed."""
    bytes_copied: int
    """Bytes those transfers moved."""
