"""A bounded pool of equal-sized buffers, reused instead of allocated afresh.

Fresh memory costs a page fault per page the first time it is touched; a
buffer taken back from the pool is already resident, so the only price of
reuse is zeroing it, which the contract demands anyway: every buffer reads as
zeros for a new owner, and no bytes of one owner ever reach the next.

Ownership, in the order a buffer goes through it:

* **lent**: the pool holds the buffer's reference (refcount 1) but only a
  weak reference to the Python object, so a buffer its owner drops without
  ``release()`` is not kept alive by the pool. Garbage collection then does
  what a put would (the buffer's own finalizer warns with a
  ``ResourceWarning`` and gives its memory back) and the pool frees the slot,
  waking the next acquirer. That weakref callback runs wherever the collector
  runs: like the loop it belongs to, a pool is used from one thread.
* **released**: reused only if nothing outside the pool can reach its bytes:
  never exposed as an fd, no CPU access open, nothing attached, no other
  reference. Otherwise it is *retired*: put (by the next ``acquire``, by
  ``aclose``, or at once by the async exit of ``pool.buffer()``) and its slot
  given to a fresh allocation.
* **set aside**: reusable but with a pending fence. ``acquire`` never waits
  on it; a fence callback makes it free once every fence has signalled.
* **free**: ready for the next owner, zeroed before it is handed out (or
  already zeroed, by the exit of ``pool.buffer()``).

Waiting acquirers park on one :class:`~asyncdmabuf.lowlevel.WaitQueue`, which
hands them either a buffer or a free slot (``None``: allocate one); what is
handed to an acquirer cancelled before it ran comes back through
``on_abandon`` and goes to the next one.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import warnings
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, final

import anyio
import anyio.lowlevel

from ._buffer import DmaBuf, lock_holder
from ._errors import Busy, InvalidArgument
from ._exporter import Exporter
from ._fence import Fence
from ._types import Usage
from ._validate import check_int, check_name
from ._waitqueue import WaitQueue

__all__ = ["Allocator", "BufferPool", "Lending", "PoolStatistics"]


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
    """The most buffers the pool ever holds at once (free, lent, set aside)."""
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
    set_aside: int
    """Released buffers waiting for their fences before they can be reused."""
    replaced: int
    """Released buffers put instead of reused (something else could reach them)."""


#: Handed to the waiters of a pool that closes: they raise InvalidArgument.
_CLOSED = object()


def _check_allocator(exporter: object) -> None:
    allocate = getattr(exporter, "allocate", None)
    if not inspect.iscoroutinefunction(allocate):
        raise TypeError(
            "a pool's exporter needs an async allocate(size, *, name=None), "
            f"which {type(exporter).__name__} does not have"
        )
    try:
        inspect.signature(allocate).bind(1, name=None)
    except TypeError:
        raise TypeError(
            f"{type(exporter).__name__}.allocate must take (size, *, name=None)"
        ) from None
    except ValueError:  # no signature to read (a builtin): trust it
        pass


@final
class BufferPool:
    """Up to ``max_buffers`` buffers of ``size`` bytes, lent out and taken back.

    ``await pool.acquire()`` returns a buffer reading as zeros: a fresh one, or
    one released before and zeroed through CPU access. When all are taken,
    acquirers wait, first come first served. ``pool.release(buf)`` takes a
    buffer back; ``async with pool.buffer() as buf`` does both (and zeroes the
    buffer on a clean exit, so that :meth:`try_acquire` can hand it out). The
    pool owns the buffers' references: do not ``put()`` a pooled buffer.

    ``aclose()`` (or leaving ``async with pool``) puts every buffer the pool
    holds and never waits for lent ones: each is put when it comes back, or
    at garbage collection (with the buffer's ``ResourceWarning``).

    Buffers of exporters without a CPU view cannot be zeroed, so they are never
    reused: each is put on release and a fresh one allocated in its place.

    Args:
        exporter: Where buffers come from: anything with an async
            ``allocate(size, *, name=None)``.
        size: The size of every buffer, in bytes.
        max_buffers: How many buffers may exist at once.
        name: The name given to each buffer.

    Raises:
        TypeError: ``exporter`` cannot allocate, a count is not an int, or
            ``name`` is not a str.
        InvalidArgument: ``size`` or ``max_buffers`` is not positive, or
            ``name`` is too long.
    """

    __slots__ = (
        "__weakref__",
        "_allocated",
        "_clean",
        "_closed",
        "_exporter",
        "_fenced",
        "_free",
        "_lent",
        "_max",
        "_name",
        "_queue",
        "_replaced",
        "_retired",
        "_reusable",
        "_reused",
        "_size",
        "_slots",
    )

    def __init__(
        self,
        exporter: Allocator,
        size: int,
        *,
        max_buffers: int,
        name: str | None = None,
    ) -> None:
        _check_allocator(exporter)
        self._size = check_int(size, "size")
        self._max = check_int(max_buffers, "max_buffers")
        self._name = check_name(name)
        self._exporter = exporter
        #: Ready buffers; the most recently released last (warmest in cache).
        self._free: list[DmaBuf] = []
        #: Free buffers already zeroed (by the exit of ``buffer()``).
        self._clean: weakref.WeakSet[DmaBuf] = weakref.WeakSet()
        #: Lent buffers, held weakly; the callback frees a dropped one's slot.
        self._lent: dict[weakref.ref[DmaBuf], None] = {}
        #: Released buffers with pending fences, and the callback watching them.
        self._fenced: dict[DmaBuf, functools.partial[None]] = {}
        #: Released buffers that must be put, not reused (their slot is free).
        self._retired: list[DmaBuf] = []
        self._queue = WaitQueue(on_abandon=self._hand_on)
        #: Buffers that exist (free, lent, set aside, being made or zeroed) plus
        #: slots handed to waiters that have not allocated yet.
        self._slots = 0
        self._allocated = 0
        self._reused = 0
        self._replaced = 0
        self._closed = False
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
            waiters=len(self._queue),
            allocated=self._allocated,
            reused=self._reused,
            set_aside=len(self._fenced),
            replaced=self._replaced,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<BufferPool {s.size} bytes, {s.lent} lent, {s.free} free, "
            f"max {s.max_buffers}{', closed' if self._closed else ''}>"
        )

    # -- acquire ----------------------------------------------------------------

    async def acquire(self) -> DmaBuf:
        """Return a buffer of :attr:`size` zero bytes (always a checkpoint).

        Takes a free buffer, else allocates one while fewer than
        ``max_buffers`` exist, else waits, first come first served, for a
        buffer to come back. Never waits on a released buffer's fences.
        Cancelled at any point, it leaves the pool as it was.

        Raises:
            InvalidArgument: The pool is closed, or closes while this waits or
                allocates (a buffer allocated meanwhile is put).
            OutOfMemory: The exporter could not allocate a new buffer.
        """
        self._check_open()
        if self._fenced:
            self._poll_fenced()
        if self._free and not self._queue:
            # The fast path: one suspension, the checkpoint of the zeroing
            # (or, for a buffer zeroed already, a bare one).
            return await self._prepare(self._free.pop(), checkpoint=True)
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._poll_fenced()
        value: object
        if self._queue:
            value = await self._park()
        elif self._free:
            value = self._free.pop()
        elif self._slots < self._max:
            self._slots += 1
            value = None
        else:
            value = await self._park()
        if value is _CLOSED:
            raise InvalidArgument(f"{self!r} closed while waiting")
        return await self._prepare(value if isinstance(value, DmaBuf) else None)

    def try_acquire(self) -> DmaBuf:
        """Return a free, already zeroed buffer; never checkpoints.

        Buffers zeroed by the exit of ``async with pool.buffer()`` qualify; a
        buffer released with :meth:`release` is zeroed by the next
        :meth:`acquire`, and a new buffer can only be allocated by it.

        Raises:
            Busy: No zeroed buffer is free, or tasks are waiting in
                :meth:`acquire` (they come first).
            InvalidArgument: The pool is closed.
        """
        self._check_open()
        self._poll_fenced()
        if not self._queue:
            for i in range(len(self._free) - 1, -1, -1):
                buf = self._free[i]
                if buf in self._clean:
                    del self._free[i]
                    self._clean.discard(buf)
                    self._reused += 1
                    self._lend(buf)
                    return buf
        raise Busy(
            f"{self!r} has no zeroed buffer free"
            + (f" ({len(self._queue)} task(s) wait)" if self._queue else "")
        )

    async def _park(self) -> object:
        """Wait in line for a buffer or a slot; return what was handed over.

        While buffers are set aside, their fences are watched meanwhile: a
        fence known only by its fd (a GPU's sync_file) signals nothing by
        itself, it must be polled, and a full pool would otherwise wait for it
        forever. Nothing is waited for beyond the hand-over.
        """
        if not self._fenced:
            return await self._queue.park()
        value: object = _CLOSED
        async with anyio.create_task_group() as tg:
            for buf in self._fenced:
                tg.start_soon(self._watch, buf)
            try:
                value = await self._queue.park()
            finally:
                tg.cancel_scope.cancel()
        return value

    async def _watch(self, buf: DmaBuf) -> None:
        await buf.resv.wait(Usage.BOOKKEEP)
        self._fence_signalled(buf, None)

    async def _prepare(self, buf: DmaBuf | None, *, checkpoint: bool = False) -> DmaBuf:
        """Make a buffer (or a slot) ready for a new owner, then lend it.

        With ``checkpoint``, this is the acquire's checkpoint: zeroing is one
        (CPU access always checkpoints), else a bare one is taken. On failure
        or cancellation the buffer, or the slot, goes to the next waiter; if
        the pool closed meanwhile, the buffer is put.
        """
        try:
            if buf is None:
                await self._put_retired()
                self._check_open()
                buf = await self._allocate()
            elif buf in self._clean:
                if checkpoint:
                    await anyio.lowlevel.checkpoint()
                self._clean.discard(buf)
                self._reused += 1
            else:
                async with buf.cpu_access("w") as view:
                    _zero(view)
                    del view
                self._reused += 1
        except BaseException:
            self._hand_on(buf)
            raise
        if self._closed:  # aclose() ran while we allocated or zeroed
            self._slots -= 1
            with anyio.CancelScope(shield=True):
                await buf.put()
            raise InvalidArgument(f"{self!r} closed while allocating")
        self._lend(buf)
        return buf

    async def _allocate(self) -> DmaBuf:
        buf = await self._exporter.allocate(self._size, name=self._name)
        if not isinstance(buf, DmaBuf):
            raise TypeError(
                f"{type(self._exporter).__name__}.allocate returned "
                f"{type(buf).__name__}, not a DmaBuf"
            )
        self._allocated += 1
        if buf.size != self._size:
            with anyio.CancelScope(shield=True):
                await buf.put()
            raise InvalidArgument(
                f"the exporter gave {buf.size} bytes, not {self._size}"
            )
        return buf

    def _lend(self, buf: DmaBuf) -> None:
        self._lent[weakref.ref(buf, self._lost)] = None

    def _lost(self, ref: weakref.ref[DmaBuf]) -> None:
        """A lent buffer was garbage-collected: its finalizer did the put."""
        if self._lent.pop(ref, _CLOSED) is None:
            self._hand_on(None)

    # -- release ----------------------------------------------------------------

    def release(self, buf: DmaBuf) -> None:
        """Take back a buffer from :meth:`acquire`; never waits or checkpoints.

        A buffer nothing else can reach goes to the longest waiter or the free
        list (zeroed before it is handed out again); one with pending fences is
        set aside until they signal. A buffer something else could still reach
        (an fd was handed out, CPU access is open, another reference exists)
        is never reused: it is put, and its slot serves a fresh allocation.
        After :meth:`aclose`, the buffer is put at once.

        Raises:
            TypeError: ``buf`` is not a :class:`DmaBuf`.
            InvalidArgument: ``buf`` is not lent by this pool (or was released
                already); it is still attached (detach first: it stays lent);
                its owner put it (it leaves the pool).
        """
        doomed = self._take_back(buf)
        self._poll_fenced()
        if doomed is None:
            return
        if self._closed:
            _put_now(doomed)
        else:
            self._retired.append(doomed)

    def _take_back(self, buf: DmaBuf) -> DmaBuf | None:
        """Do :meth:`release`'s bookkeeping; return a buffer that must be put."""
        if not isinstance(buf, DmaBuf):
            raise TypeError(f"release() takes a DmaBuf, not {type(buf).__name__}")
        ref = weakref.ref(buf)
        if ref not in self._lent:
            raise InvalidArgument(f"{buf!r} is not lent by {self!r}")
        if buf.released:
            del self._lent[ref]
            self._hand_on(None)
            raise InvalidArgument(f"{buf!r} was put by its owner, not released")
        if buf.attachments and buf.refcount == 1:
            raise InvalidArgument(f"{buf!r} is still attached; detach it first")
        del self._lent[ref]
        if self._closed or not self._private(buf):
            self._clean.discard(buf)
            self._replaced += 1
            self._hand_on(None)
            return buf
        if not _unfenced(buf):
            self._set_aside(buf)
        else:
            self._hand_on(buf)
        return None

    def _private(self, buf: DmaBuf) -> bool:
        """Whether nothing outside the pool can reach ``buf``'s bytes."""
        return (
            self._reusable
            and buf.refcount == 1
            and not buf.exposed
            and not buf.cpu_access_open
            and not buf.attachments
        )

    def _hand_on(self, value: object) -> None:
        """Give a buffer (or, with None, a free slot) to the next waiter.

        Also the wait queue's ``on_abandon``: what a cancelled waiter was
        handed comes back here.
        """
        if value is _CLOSED:
            return
        if self._closed:
            self._slots -= 1
            if isinstance(value, DmaBuf):
                _put_now(value)
            return
        if self._queue.unpark(value) is not None:
            return
        if isinstance(value, DmaBuf):
            self._free.append(value)
        else:
            self._slots -= 1

    async def _put_retired(self) -> None:
        with anyio.CancelScope(shield=True):
            while self._retired:
                await self._retired.pop().put()

    # -- fences -------------------------------------------------------------------

    def _set_aside(self, buf: DmaBuf) -> None:
        callback = functools.partial(self._fence_signalled, buf)
        self._fenced[buf] = callback
        for fence, _ in buf.resv.fences(Usage.BOOKKEEP):
            fence.add_callback(callback)
        self._fence_signalled(buf, None)  # one may have signalled meanwhile

    def _fence_signalled(self, buf: DmaBuf, _: Fence | None) -> None:
        """A fence of a set-aside buffer signalled: free it once all have."""
        if buf not in self._fenced or not _unfenced(buf):
            return
        # Testing polls a fence known by its fd, whose signal may call this
        # again: whichever call pops the buffer hands it on.
        if self._fenced.pop(buf, None) is not None:
            self._hand_on(buf)

    def _poll_fenced(self) -> None:
        """Notice fences that signal only when asked (imported from an fd)."""
        for buf in list(self._fenced):
            self._fence_signalled(buf, None)

    def _unwatch(self, buf: DmaBuf) -> None:
        callback = self._fenced.pop(buf)
        for fence, _ in buf.resv.fences(Usage.BOOKKEEP):
            fence.remove_callback(callback)

    # -- the async form -------------------------------------------------------------

    def buffer(self) -> Lending:
        """``async with pool.buffer() as buf``: acquire, then release on exit.

        On a clean exit a reusable buffer is zeroed before it goes back (so
        the owner's bytes do not linger and :meth:`try_acquire` can serve
        it), and a buffer that must be put is put before the exit returns.
        If the body raises, the buffer is released as by :meth:`release` and
        the body's exception propagates.

        Raises:
            As :meth:`acquire` and :meth:`release`.
        """
        return Lending(self)

    async def _end_lending(self, buf: DmaBuf) -> None:
        """The clean exit of ``pool.buffer()``: zero what may be reused, give back."""
        if (
            weakref.ref(buf) in self._lent  # not released in the body already
            and self._private(buf)
            and not self._closed
            and _unfenced(buf)
        ):
            try:
                async with buf.cpu_access("w") as view:
                    _zero(view)
                    del view
            except BaseException:
                await self._give_back(buf)
                raise
            if self._private(buf):
                self._clean.add(buf)
        await self._give_back(buf)

    async def _give_back(self, buf: DmaBuf) -> None:
        """:meth:`release`, putting at once (shielded) what must be put."""
        doomed = self._take_back(buf)
        self._poll_fenced()
        if doomed is not None:
            with anyio.CancelScope(shield=True):
                await doomed.put()

    # -- closing ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument(f"{self!r} is closed")

    async def aclose(self) -> None:
        """Close the pool: put every buffer it holds; never waits for lent ones.

        Waiters and later acquirers get ``InvalidArgument``; an acquire that
        is allocating puts its buffer and raises too. A buffer still lent is
        put when it is released, or at garbage collection. The puts are
        shielded; then, like trio's ``aclose``, a checkpoint.
        """
        if not self._closed:
            self._closed = True
            self._queue.unpark_all(_CLOSED)
        with anyio.CancelScope(shield=True):
            for buf in list(self._fenced):
                self._unwatch(buf)
                self._retired.append(buf)
                self._slots -= 1
            while self._free:
                self._retired.append(self._free.pop())
                self._slots -= 1
            await self._put_retired()
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


@final
class Lending:
    """What :meth:`BufferPool.buffer` returns: ``async with`` it for a buffer."""

    __slots__ = ("_buf", "_entered", "_pool")

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool
        self._buf: DmaBuf | None = None
        self._entered = False

    async def __aenter__(self) -> DmaBuf:
        if self._entered:
            raise RuntimeError("a pool.buffer() block can be entered only once")
        self._entered = True
        buf = self._buf = await self._pool.acquire()
        return buf

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        buf = self._buf
        assert buf is not None
        self._buf = None  # the block holds the buffer no longer than it lasts
        if exc is None:
            await self._pool._end_lending(buf)
        else:  # the body's exception propagates once the buffer is back
            await self._pool._give_back(buf)


def _put_now(buf: DmaBuf) -> None:
    """Put ``buf`` from synchronous code (a release after the pool closed).

    ``put`` completes without suspending except for its closing checkpoint
    when the buffer's lock is free and its exporter's ``release`` does not
    suspend (every built-in exporter): it is stepped to that checkpoint. A
    buffer whose put would have to wait is left to garbage collection, with a
    ``ResourceWarning`` (``async with pool.buffer()`` always puts properly).
    """
    holder, waiting = lock_holder(buf)
    if holder is not None or waiting:
        warnings.warn(
            f"{buf!r} is busy and cannot be put by a synchronous release",
            ResourceWarning,
            stacklevel=3,
        )
        return
    step = buf.put()
    try:
        step.send(None)
    except StopIteration:
        return
    if buf.released or buf.refcount:  # at the closing checkpoint: done
        step.close()
        return
    step.close()  # the exporter's release suspended: it is cut short here
    warnings.warn(
        f"the release of {buf!r} by {buf.exporter.name!r} had to wait and was "
        "cut short by a synchronous pool release; use async with pool.buffer()",
        ResourceWarning,
        stacklevel=3,
    )


def _unfenced(buf: DmaBuf) -> bool:
    """Whether every fence of ``buf`` has signalled (making no reservation)."""
    resv = buf.pending_resv()
    return resv is None or resv.test(Usage.BOOKKEEP)


#: Zero bytes a small buffer is zeroed from: a slice assignment costs a tenth
#: of making the ctypes array a memset needs.
_ZEROS = bytes(1 << 16)
_ZERO_VIEW = memoryview(_ZEROS)


def _zero(view: memoryview) -> None:
    """Set every byte of a writable view to zero, at memset speed."""
    n = len(view)
    if n <= len(_ZEROS) and view.ndim == 1 and view.format == "B":
        view[:] = _ZERO_VIEW[:n]
        return
    chars = (ctypes.c_char * n).from_buffer(view)
    try:
        ctypes.memset(ctypes.addressof(chars), 0, n)
    finally:
        del chars
