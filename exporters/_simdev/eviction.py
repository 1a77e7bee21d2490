"""A device's memory: resident buffers, eviction, and the tasks waiting for room.

Resident buffers are kept least recently used first. Reserving pages evicts
unpinned buffers, LRU first, only when evicting every candidate would make
room. Tasks that find no room wait in arrival order: the longest waiter is
*the head*, the only one whose request is tried when memory frees (so a small
request never overtakes a big one); the others queue for their turn to be
head. Both waits are :class:`asyncdmabuf.lowlevel.WaitQueue` parks, which
hand over values (pages, the turn) without losing them to a cancellation.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from typing import final

from asyncdmabuf import OutOfMemory
from asyncdmabuf.lowlevel import WaitQueue

from .constraints import Need
from .pages import PageAllocator, Runs
from .state import SimBuffer

__all__ = ["EvictionFailed", "Memory", "save_bytes"]


class EvictionFailed(OutOfMemory):
    """A buffer could not be moved out: no host memory to save its bytes in."""


def save_bytes(frame: mmap.mmap) -> bytes:
    """Copy a resident buffer's bytes out (where an eviction may run out of memory)."""
    return bytes(frame)


@final
class _Head:
    """The longest waiter's request."""

    __slots__ = ("buffer", "need")

    def __init__(self, need: Need, buffer: SimBuffer) -> None:
        self.need = need
        self.buffer = buffer


@final
class Memory:
    """The pages of one device, who holds them, and who waits for them."""

    __slots__ = (
        "_dispatching",
        "_head",
        "_queue",
        "_redispatch",
        "_turn",
        "evicting",
        "evictions",
        "pages",
        "resident",
        "restores",
        "waiting",
    )

    def __init__(self, npages: int) -> None:
        self.pages = PageAllocator(npages)
        #: Resident buffers, least recently used first.
        self.resident: OrderedDict[SimBuffer, None] = OrderedDict()
        #: How many tasks wait for memory (the head, the queued, one woken).
        self.waiting = 0
        #: The head's request, while a task holds the turn.
        self._head: _Head | None = None
        #: Where the head waits for its pages.
        self._turn = WaitQueue(on_abandon=self._abandoned_pages)
        #: Where the others wait for the turn.
        self._queue = WaitQueue(on_abandon=self._abandoned_turn)
        self._dispatching = self._redispatch = False
        #: move_notify callbacks running (no map may start in the middle).
        self.evicting = 0
        self.evictions = 0
        self.restores = 0

    # -- residency ----------------------------------------------------------------

    def touch(self, st: SimBuffer) -> None:
        """Mark a resident buffer as the most recently used."""
        if st.runs is not None:
            self.resident.move_to_end(st)

    def settle(self, st: SimBuffer, runs: Runs) -> None:
        """Record that ``st`` now holds ``runs`` (already taken)."""
        st.runs = runs
        st.generation += 1
        self.resident[st] = None

    def free(self, st: SimBuffer) -> None:
        """Give a resident buffer's pages back (its bytes are dealt with)."""
        assert st.runs is not None
        self.pages.give(st.runs)
        st.runs = None
        st.generation += 1
        del self.resident[st]

    def pinned_pages(self) -> int:
        """Pages of resident buffers that may not move."""
        return sum(st.npages for st in self.resident if st.pinned)

    def audit(self) -> list[str]:
        """Return every way the accounting disagrees with the buffers."""
        problems = []
        resident = 0
        for st in self.resident:
            if st.runs is None or sum(count for _, count in st.runs) != st.npages:
                problems.append(f"a resident buffer holds {st.runs} for {st.npages}")
            if st.busy:
                problems.append("a map left its buffer marked busy")
            resident += st.npages
        free = sum(end - start for start, end in self.pages.extents())
        if free != self.pages.free_pages:
            problems.append(f"{free} pages free, {self.pages.free_pages} counted")
        if self.pages.npages - self.pages.free_pages != resident:
            problems.append(
                f"{self.pages.npages - self.pages.free_pages} pages taken, "
                f"{resident} resident"
            )
        if self.waiting or self._head is not None or self._turn or self._queue:
            problems.append(f"{self.waiting} memory waiters left")
        if self.evicting or self._dispatching:
            problems.append("an eviction or a dispatch is still running")
        return problems

    # -- eviction -------------------------------------------------------------------

    def evict(self, st: SimBuffer) -> None:
        """Save a resident, unpinned buffer's bytes and free its pages.

        Its dynamic attachments hear ``move_notify()`` once the bytes are
        saved. If a callback raises, the move still completes and the first
        error propagates.

        Raises:
            EvictionFailed: No host memory to save the bytes in; nothing moved.
        """
        assert st.frame is not None
        try:
            saved = save_bytes(st.frame)
        except MemoryError:
            raise EvictionFailed(
                f"cannot evict a buffer of {st.size} bytes: no host memory "
                "to save its bytes in"
            ) from None
        errors: list[Exception] = []
        self.evicting += 1
        try:
            for att in st.attachments():
                try:
                    att.move_notify()
                except Exception as exc:  # re-raised below, once the move is done
                    errors.append(exc)
        finally:
            self.evicting -= 1
        st.saved = saved
        st.close_frame()
        self.free(st)
        self.evictions += 1
        if errors:
            raise errors[0]

    def reserve(self, need: Need, exclude: SimBuffer) -> Runs | None:
        """Take pages for ``need``, evicting LRU-first if that makes room; or None.

        Evicts nothing unless evicting every candidate would make room.

        Raises:
            EvictionFailed: A victim's bytes could not be saved.
            Exception: What a ``move_notify`` callback raised (that victim
                has moved; try again).
        """
        pages = self.pages
        runs = pages.find(*need)
        if runs is None:
            victims = [
                st
                for st in self.resident
                if st is not exclude
                and not st.pinned
                and not st.busy
                and st.runs is not None
                and st.runs[0][0] < need.limit
            ]
            freed = [st.runs for st in victims if st.runs is not None]
            if not victims or not pages.would_fit(*need, freed):
                return None
            for st in victims:
                self.evict(st)
                runs = pages.find(*need)
                if runs is not None:
                    break
            else:  # pragma: no cover - the trial says the last eviction suffices
                return None
        pages.take(runs)
        return runs

    # -- waiting for memory -----------------------------------------------------------

    async def acquire(self, need: Need, st: SimBuffer) -> Runs:
        """Take pages for ``need``, waiting in arrival order while there is no room.

        A new request queues behind the waiters even when it would fit. A
        cancelled wait leaves nothing reserved.

        Raises:
            EvictionFailed: Making room needed an eviction that failed.
            Exception: What a ``move_notify`` callback raised.
        """
        if not self.waiting:
            runs = self.reserve(need, st)
            if runs is not None:
                return runs
            must_queue = False
        else:
            must_queue = True
        self.waiting += 1
        try:
            if must_queue:
                await self._queue.park()  # until it is this task's turn
            self._head = _Head(need, st)
            try:
                runs = self.reserve(need, st) if must_queue else None
                if runs is None:
                    value = await self._turn.park()
                    assert isinstance(value, tuple)
                    runs = value
                return runs
            finally:
                self._head = None
                self._queue.unpark()  # the turn passes to the next waiter
        finally:
            self.waiting -= 1

    def dispatch(self) -> None:
        """Serve the head if memory now holds its request (call after freeing).

        An eviction that fails (no host memory to save a victim in) leaves the
        head waiting for memory to be freed some other way: it is tried again
        at the next free, never in a loop.

        Raises:
            Exception: The first error a ``move_notify`` callback raised; the
                head has been served if it could be.
        """
        head = self._head
        if head is None or not self._turn:
            return
        if self._dispatching:
            self._redispatch = True
            return
        self._dispatching = True
        errors: list[Exception] = []
        runs: Runs | None = None
        try:
            while True:
                self._redispatch = False
                try:
                    runs = self.reserve(head.need, head.buffer)
                except EvictionFailed:
                    break  # no room this time: the head waits for a free
                except Exception as exc:  # re-raised below; the eviction is done
                    errors.append(exc)
                    continue
                if runs is not None or not self._redispatch:
                    break
        finally:
            self._dispatching = self._redispatch = False
        if runs is not None and self._turn.unpark(runs) is None:
            self.pages.give(runs)  # the head was cancelled meanwhile
        if errors:
            raise errors[0]

    def dispatch_after(self, exc: BaseException) -> None:
        """Serve the head while ``exc`` propagates, without replacing it."""
        try:
            self.dispatch()
        except Exception as error:
            exc.add_note(f"while serving memory waiters, move_notify raised {error!r}")

    def _abandoned_pages(self, value: object) -> None:
        if isinstance(value, tuple):  # granted, then cancelled before it ran
            self.pages.give(value)

    def _abandoned_turn(self, value: object) -> None:
        self._queue.unpark()  # pass the turn on
