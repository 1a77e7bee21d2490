"""Where a buffer's pages may lie so that every attached device reaches them.

A device's constraints (its DMA mask, longest segment, need for one entry)
decide which of a SimDevice's pages it reaches and how a table shows them to
it. The messages name the constraint that cannot be met.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, final

from asyncdmabuf import Device, OutOfMemory, SgEntry

from .state import SimBuffer

__all__ = ["MAX_ENTRIES", "Geometry", "Need"]

#: The most entries one table may have; a device that would need more is refused.
MAX_ENTRIES = 1 << 16


class Need(NamedTuple):
    """What a buffer's backing must look like: pages, reach, contiguity."""

    npages: int
    limit: int
    """Only pages below this index are reachable by every attached device."""
    contiguous: bool


@final
class Geometry:
    """A device's memory on the bus: ``npages`` pages of ``page_size`` at ``base``."""

    __slots__ = ("base", "npages", "page_size")

    def __init__(self, base: int, page_size: int, npages: int) -> None:
        self.base = base
        self.page_size = page_size
        self.npages = npages

    def reach(self, mask: int) -> int:
        """How many pages, from the first, lie wholly at or below ``mask``."""
        if mask < self.base + self.page_size - 1:
            return 0
        return min(self.npages, (mask - self.base + 1) // self.page_size)

    def need(self, st: SimBuffer, devices: Iterable[Device], owner: str) -> Need:
        """What ``devices`` need of the buffer's pages.

        Raises:
            OutOfMemory: They reach too little memory ever to hold it.
        """
        limit, contiguous = self.npages, False
        for device in devices:
            limit = min(limit, self.reach(device.dma_mask))
            contiguous = contiguous or device.contiguous
        if limit < st.npages:
            raise OutOfMemory(
                f"the attached devices reach {limit * self.page_size} bytes "
                f"of {owner!r}, too few for {st.size}"
            )
        return Need(st.npages, limit, contiguous)

    def unserviceable(self, st: SimBuffer, device: Device) -> str | None:
        """Which of ``device``'s constraints no placement can meet; or None.

        The conditions are per device, so a device that passes can share the
        buffer with any other that passed.
        """
        reach = self.reach(device.dma_mask)
        if reach < st.npages:
            return (
                f"its dma_mask {device.dma_mask:#x} reaches {reach * self.page_size} "
                f"bytes of the device's memory, too few for {st.size}"
            )
        if device.contiguous and st.size > device.max_segment_size:
            return (
                f"it is contiguous (one entry) and its max_segment_size "
                f"{device.max_segment_size} is shorter than the {st.size} bytes"
            )
        worst = -(-st.size // device.max_segment_size) + st.npages
        if worst > MAX_ENTRIES:
            return (
                f"its max_segment_size {device.max_segment_size} could need "
                f"{worst} entries, more than {MAX_ENTRIES}"
            )
        return None

    def misfit(self, st: SimBuffer, device: Device) -> str | None:
        """Which of ``device``'s constraints the present pages break; or None."""
        assert st.runs is not None
        if self.layout(st, device) is not None:
            return None
        if device.contiguous and len(st.runs) != 1:
            return f"it is contiguous and the backing lies in {len(st.runs)} pieces"
        if device.contiguous:
            return (
                f"it is contiguous and its max_segment_size "
                f"{device.max_segment_size} is shorter than the {st.size} bytes"
            )
        first, count = st.runs[-1]
        top = self.base + (first + count) * self.page_size - 1
        if top > device.dma_mask:
            return (
                f"the backing reaches {top:#x}, above its dma_mask {device.dma_mask:#x}"
            )
        return (
            f"its max_segment_size {device.max_segment_size} would need more "
            f"than {MAX_ENTRIES} entries"
        )

    def layout(self, st: SimBuffer, device: Device) -> tuple[SgEntry, ...] | None:
        """The entries showing the buffer's pages to ``device``; None if it cannot."""
        assert st.runs is not None
        if device.contiguous and len(st.runs) != 1:
            return None
        segment = device.max_segment_size
        entries: list[SgEntry] = []
        offset = 0
        for first, count in st.runs:
            address = self.base + first * self.page_size
            length = min(count * self.page_size, st.size - offset)
            for start in range(0, length, segment):
                n = min(segment, length - start)
                if not device.reaches(address + start, n):
                    return None
                entries.append(SgEntry(address + start, n, offset + start))
            offset += length
        if (device.contiguous and len(entries) != 1) or len(entries) > MAX_ENTRIES:
            return None
        return tuple(entries)
