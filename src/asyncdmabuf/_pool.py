"""A bounded pool of equal-sized buffers, reused instead of allocated afresh.

Fresh memory costs a page fault per page the first time it is touched; a
buffer taken back from the pool is already resident, so the only price of
reuse is zeroing it, which the contract demands anyway: every buffer reads as
zeros for a new owner, and no bytes of one owner ever reach the next.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, final

import anyio
import anyio.lowlevel

from ._buffer import DmaBuf
from ._errors import InvalidArgument
from ._exporter import Exporter
from ._validate import check_int

__all__ = ["Allocator", "BufferPool", "PoolStatistics"]


class Allocator(Protocol):
    """An exporter that can make buffers: ``MemfdExporter``, ``SimDevice``..."""

    async def allocate(self, size: int, *, name: str | None = None) -> DmaBuf:
        """Return a new buffer of ``size`` zero bytes, refcount 1."""
        ...


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a :class:`BufferPool`."""

    size: int
    """The size of every buffer, in bytes."""
    max_buffers: int
    """The most buffers the pool ever holds at once (free and lent)."""
    free: int
    """Buffers ready to be handed out again."""
    lent: int
    """Buffers acquired and not yet released."""
    waiters: int
    """Tasks waiting in :meth:`BufferPool.acquire`."""
    allocated: int
    """Buffers allocated from the exporter so far."""
    reused: int
    """Acquires served by a buffer released before (zeroed first)."""


@final
class _Waiter:
    __slots__ = ("buffer", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        #: A released buffer handed straight to this waiter, or None for a
        #: free slot (allocate a new one).
        self.buffer: DmaBuf | None = None


@final
class BufferPool:
    """Up to ``max_buffers`` buffers of ``size`` bytes, lent out and taken back.

    ``await pool.acquire()`` returns a buffer reading as zeros: a fresh one, or
    one released before and zeroed through CPU access. When all are lent out,
    acquirers wait, first come first served. ``pool.release(buf)`` takes a
    buffer back; ``async with pool.buffer() as buf`` does both. The pool owns
    the buffers' references: do not ``put()`` a pooled buffer. ``aclose()``
    (or leaving ``async with pool``) puts every free buffer, and any lent one
    when it comes back.

    Buffers of exporters without a CPU view cannot be zeroed, so they are never
    reused: each is put on release and a fresh one allocated in its place.

    Args:
        exporter: Where buffers come from (anything with ``allocate(size)``).
        size: The size of every buffer, in bytes.
        max_buffers: How many buffers may exist at once.
        name: The name given to each buffer.

    Raises:
        TypeError: A count is not an int.
        InvalidArgument: ``size`` or ``max_buffers`` is not positive.
    """

    __slots__ = (
        "_allocated",
        "_closed",
        "_dirty",
        "_exporter",
        "_free",
        "_lent",
        "_max",
        "_name",
        "_returned",
        "_reusable",
        "_reused",
        "_size",
        "_slots",
        "_waiters",
    )

    def __init__(
        self,
        exporter: Allocator,
        size: int,
        *,
        max_buffers: int,
        name: str | None = None,
    ) -> None:
        check_int(size, "size")
        check_int(max_buffers, "max_buffers")
        self._exporter = exporter
        self._size = size
        self._max = max_buffers
        self._name = name
        #: Ready buffers; the most recently released last (warmest in cache).
        self._free: list[DmaBuf] = []
        #: Buffers that were used and must be zeroed before the next owner.
        self._dirty: set[DmaBuf] = set()
        self._lent: set[DmaBuf] = set()
        self._waiters: deque[_Waiter] = deque()
        #: Buffers that exist (free, lent, or being allocated or zeroed).
        self._slots = 0
        self._allocated = 0
        self._reused = 0
        self._closed = False
        #: Set when a lent buffer comes back while aclose() waits for it.
        self._returned: anyio.Event | None = None
        self._reusable = isinstance(exporter, Exporter) and (
            type(exporter).vmap is not Exporter.vmap
        )

    @property
    def size(self) -> int:
        """The size of every buffer, in bytes."""
        return self._size

    @property
    def max_buffers(self) -> int:
        """The most buffers that exist at once."""
        return self._max

    @property
    def closed(self) -> bool:
        """True after :meth:`aclose`."""
        return self._closed

    def statistics(self) -> PoolStatistics:
        """Return a snapshot of the pool's counters."""
        return PoolStatistics(
            size=self._size,
            max_buffers=self._max,
            free=len(self._free),
            lent=len(self._lent),
            waiters=len(self._waiters),
            allocated=self._allocated,
            reused=self._reused,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<BufferPool {s.size} bytes, {s.lent} lent, {s.free} free, "
            f"max {s.max_buffers}{', closed' if self._closed else ''}>"
        )

    # -- acquire ----------------------------------------------------------------

    async def acquire(self) -> DmaBuf:
        """Return a buffer of :attr:`size` zero bytes (a checkpoint).

        Waits, first come first served, while all ``max_buffers`` are lent.
        Cancelled while waiting or zeroing, it leaves the pool as it was.

        Raises:
            InvalidArgument: The pool is closed (also for waiters when it closes).
            OutOfMemory: The exporter could not allocate a new buffer.
        """
        self._check_open()
        await anyio.lowlevel.checkpoint()
        self._check_open()
        buf: DmaBuf | None
        if not self._waiters and self._free:
            buf = self._free.pop()
        elif not self._waiters and self._slots < self._max:
            self._slots += 1
            buf = None
        else:
            buf = await self._wait()
        buf = await self._prepare(buf)
        self._lent.add(buf)
        return buf

    async def _wait(self) -> DmaBuf | None:
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.event.is_set():  # served, then cancelled: pass it on
                self._hand_on(waiter.buffer)
            else:
                self._waiters.remove(waiter)
            raise
        self._check_open()  # woken by aclose(): nothing was handed over
        return waiter.buffer

    async def _prepare(self, buf: DmaBuf | None) -> DmaBuf:
        """Make a buffer ready for a new owner; on failure give its slot back."""
        if buf is not None and buf in self._dirty:
            if self._reusable:
                try:
                    async with buf.cpu_access("w") as view:
                        _zero(view)
                except BaseException:
                    self._hand_on(buf)  # still dirty
                    raise
                self._dirty.discard(buf)
                self._reused += 1
                return buf
            # No CPU view to zero it through: replace it by fresh memory.
            self._dirty.discard(buf)
            with anyio.CancelScope(shield=True):
                await buf.put()
            buf = None
        if buf is not None:
            return buf
        try:
            buf = await self._allocate()
        except BaseException:
            self._slots -= 1
            self._hand_on(None)
            raise
        self._allocated += 1
        return buf

    async def _allocate(self) -> DmaBuf:
        buf = await self._exporter.allocate(self._size, name=self._name)
        if buf.size != self._size:
            with anyio.CancelScope(shield=True):
                await buf.put()
            raise InvalidArgument(
                f"the exporter gave {buf.size} bytes, not {self._size}"
            )
        return buf

    # -- release ----------------------------------------------------------------

    def release(self, buf: DmaBuf) -> None:
        """Take back a buffer from :meth:`acquire`; it is zeroed before reuse.

        Never waits: the buffer goes to the longest waiter, or to the free list.
        A buffer its owner already released (with ``put``) leaves the pool,
        freeing its slot, and raises.

        Raises:
            InvalidArgument: ``buf`` is not lent by this pool, it is still
                attached, someone else holds a reference to it, or it has
                been released.
        """
        if buf not in self._lent:
            raise InvalidArgument(f"{buf!r} is not lent by {self!r}")
        if buf.released:
            self._lent.discard(buf)
            self._slots -= 1
            self._hand_on(None)
            raise InvalidArgument(f"{buf!r} was put by its owner, not released")
        if buf.attachments:
            raise InvalidArgument(f"{buf!r} is still attached; detach it first")
        if buf.refcount != 1:
            raise InvalidArgument(
                f"{buf!r} has {buf.refcount - 1} reference(s) besides the pool's"
            )
        self._lent.discard(buf)
        self._dirty.add(buf)
        self._hand_on(buf)

    def _hand_on(self, buf: DmaBuf | None) -> None:
        """Give a buffer (or, with None, a free slot) to the next waiter."""
        if self._closed:
            if buf is not None:
                self._free.append(buf)  # aclose() puts it
            if self._returned is not None:
                self._returned.set()
            return
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.buffer = buf
            waiter.event.set()
        elif buf is not None:
            self._free.append(buf)

    @contextlib.asynccontextmanager
    async def buffer(self) -> AsyncIterator[DmaBuf]:
        """``async with pool.buffer() as buf``: acquire, then release on exit.

        Raises:
            As :meth:`acquire` and :meth:`release`.
        """
        buf = await self.acquire()
        try:
            yield buf
        finally:
            self.release(buf)

    # -- closing ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument(f"{self!r} is closed")

    async def aclose(self) -> None:
        """Close the pool: put every buffer, waiting for lent ones to come back.

        Waiters and later acquirers get ``InvalidArgument``. The puts are
        shielded; waiting for lent buffers is not, so a cancelled close leaves
        them to a later ``aclose()``.
        """
        if not self._closed:
            self._closed = True
            while self._waiters:
                self._waiters.popleft().event.set()
        while True:
            with anyio.CancelScope(shield=True):
                while self._free:
                    buf = self._free.pop()
                    self._dirty.discard(buf)
                    await buf.put()
            if not self._lent:
                break
            self._returned = anyio.Event()
            await self._returned.wait()
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> BufferPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _zero(view: memoryview) -> None:
    """Set every byte of a writable view to zero, at memset speed."""
    n = len(view)
    if not n:
        return
    chars = (ctypes.c_char * n).from_buffer(view)
    try:
        ctypes.memset(ctypes.addressof(chars), 0, n)
    finally:
        del chars
