"""The vocabulary types every module speaks: DMA directions, fence usages, CPU modes."""

from __future__ import annotations

import enum
from typing import Literal

__all__ = ["CpuMode", "Direction", "Usage"]

#: How the CPU touches a buffer: read, write, or both.
CpuMode = Literal["r", "w", "rw"]


class Direction(enum.IntEnum):
    """The direction of a DMA transfer, as in the kernel's DMA API."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2
    NONE = 3


class Usage(enum.IntEnum):
    """How a fence uses a buffer (``enum dma_resv_usage``); lower is stronger."""

    KERNEL = 0
    """Kernel-internal work (moves, clears): everybody waits for it."""
    WRITE = 1
    """Implicit-sync writes: readers and writers wait for it."""
    READ = 2
    """Implicit-sync reads: writers wait for it."""
    BOOKKEEP = 3
    """Explicitly synchronised work: nobody waits for it implicitly."""
