"""The page allocator: a device's free pages as a sorted list of extents.

Its size follows the number of free extents (at most one more than the number
of allocations), never the size of the memory it manages, so a device may
have a petabyte of simulated memory.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from typing import final

__all__ = ["PageAllocator", "Runs"]

Runs = tuple[tuple[int, int], ...]
"""Pages as ``(first_page, count)`` runs, in ascending order, never adjacent."""


@final
class PageAllocator:
    """The free pages of ``[0, npages)``; allocation takes the highest that fit.

    Taking the highest reachable pages keeps low memory for devices with
    narrow DMA masks.
    """

    __slots__ = ("_free", "free_pages", "npages")

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.free_pages = npages
        #: Free extents ``(start, end)``: sorted, disjoint, never adjacent.
        self._free: list[tuple[int, int]] = [(0, npages)] if npages else []

    def extents(self) -> tuple[tuple[int, int], ...]:
        """Return the free extents, ``(start, end)`` in ascending order."""
        return tuple(self._free)

    def find(self, npages: int, limit: int, contiguous: bool) -> Runs | None:
        """Choose ``npages`` free pages below ``limit``, highest first; or None.

        Nothing is taken: :meth:`take` the runs returned.
        """
        runs: list[tuple[int, int]] = []
        remaining = npages
        for start, end in reversed(self._free):
            if start >= limit:
                continue
            top = min(end, limit)
            if contiguous:
                if top - start >= npages:
                    return ((top - npages, npages),)
                continue
            take = min(top - start, remaining)
            runs.append((top - take, take))
            remaining -= take
            if not remaining:
                runs.reverse()
                return tuple(runs)
        return None

    def would_fit(
        self, npages: int, limit: int, contiguous: bool, freed: Iterable[Runs]
    ) -> bool:
        """Return whether :meth:`find` would succeed once ``freed`` is given back."""
        trial = PageAllocator(0)
        trial.npages = self.npages
        trial._free = list(self._free)
        for runs in freed:
            trial.give(runs)
        return trial.find(npages, limit, contiguous) is not None

    def take(self, runs: Runs) -> None:
        """Mark free pages as allocated (runs :meth:`find` returned)."""
        free = self._free
        for first, count in runs:
            end = first + count
            i = bisect.bisect_right(free, (first, math.inf)) - 1  # start <= first
            start, stop = free[i]
            assert i >= 0, "taking pages that are not free"
            assert end <= stop, "taking pages that are not free"
            pieces = [(a, b) for a, b in ((start, first), (end, stop)) if a < b]
            free[i : i + 1] = pieces
            self.free_pages -= count

    def give(self, runs: Runs) -> None:
        """Mark allocated pages free again, merging neighbouring extents."""
        free = self._free
        for first, count in runs:
            end = first + count
            i = bisect.bisect_left(free, (first, end))
            assert i == len(free) or end <= free[i][0], "freeing free pages"
            assert i == 0 or free[i - 1][1] <= first, "freeing free pages"
            if i < len(free) and free[i][0] == end:
                end = free.pop(i)[1]
            if i and free[i - 1][1] == first:
                i -= 1
                first = free.pop(i)[0]
            free.insert(i, (first, end))
            self.free_pages += count
