"""Fences: ``struct dma_fence``, a promise that something will be done, awaitable.

A fence is signalled exactly once, optionally with an error. Tasks await it
(parked on one :class:`~asyncdmabuf.lowlevel.WaitQueue`), callbacks run when
it signals, and it can travel to another process as an fd (the kernel's
``sync_file``; the protocol is in ``_fence_fd``).

Fences of one :class:`FenceContext` (a timeline) signal in order of their
sequence numbers: signalling one signals every pending earlier one first, as
the kernel requires of every timeline (and as ``sw_sync`` does).

Signalling is iterative: what follows from a signal (earlier fences of the
timeline, callbacks, fence arrays built on the fence, arrays built on those,
thousands of levels deep) is worked off a list, never by recursion.

Fences are not thread-safe: use them from the thread that runs the event loop
(``anyio.from_thread.run_sync(fence.signal)`` from others).
"""

from __future__ import annotations

import heapq
import itertools
import os
import weakref
from collections import deque
from collections.abc import Callable
from typing import ClassVar, Final, final

import anyio
import anyio.lowlevel

from . import _fence_fd
from ._errors import InvalidArgument
from ._fd import dup_cloexec
from ._validate import check_fd, is_int
from ._waitqueue import WaitQueue

__all__ = ["Fence", "FenceCallback", "FenceContext", "Notify", "settle"]

FenceCallback = Callable[["Fence"], object]

#: Context 0 belongs to the stub fence, as in the kernel.
_context_ids = itertools.count(1)
_tiebreak = itertools.count()

_DEFAULT_NAMES: Final = ("asyncdmabuf", "unbound")
_STUB_NAMES: Final = ("stub", "stub")

#: Fences by the identity of the socket their fds refer to, so that importing
#: an fd of this process gives back the very fence (as ``sync_file_get_fence``).
_by_file: weakref.WeakValueDictionary[tuple[object, ...], Fence] = (
    weakref.WeakValueDictionary()
)


def _check_error(error: object) -> Exception | None:
    if error is None or isinstance(error, Exception):
        return error
    if is_int(error):
        assert isinstance(error, int)
        if not 0 < error <= _fence_fd.MAX_ERRNO:
            raise InvalidArgument(f"a fence error is a positive errno, not {error}")
        return _fence_fd.error_from_errno(error)
    raise TypeError(
        f"a fence error is an Exception or an errno, not {type(error).__name__}"
    )


def _check_seqno(seqno: object) -> int:
    if not is_int(seqno):
        raise TypeError(f"a sequence number is an int, not {type(seqno).__name__}")
    assert isinstance(seqno, int)
    if seqno < 0:
        raise InvalidArgument(f"a sequence number is not negative, got {seqno}")
    return seqno


def _check_fences(fences: tuple[object, ...]) -> tuple[Fence, ...]:
    for fence in fences:
        if not isinstance(fence, Fence):
            raise TypeError(f"expected a Fence, not {type(fence).__name__}")
    return fences  # type: ignore[return-value]


def settle(signalled: deque[Fence]) -> None:
    """Run what follows from the fences just marked signalled, iteratively.

    Each fence's callbacks run, then the arrays built on it learn of it; an
    array that completes is marked and joins the list. Every callback runs
    even if one raises; the first exception is re-raised at the end, the
    others noted on it.
    """
    errors: list[BaseException] = []
    while signalled:
        fence = signalled.popleft()
        callbacks, fence._callbacks = fence._callbacks, None
        parents, fence._parents = fence._parents, None
        for callback in callbacks or ():
            try:
                callback(fence)
            except BaseException as exc:  # re-raised below, after the others
                errors.append(exc)
        for parent in parents or ():
            if isinstance(parent, Notify):
                try:
                    parent.notify(fence)
                except BaseException as exc:  # pragma: no cover: the library's own
                    errors.append(exc)
                continue
            if not parent._signaled and parent._child_signaled(fence):
                parent._mark(parent._error)
                signalled.append(parent)
    if errors:
        for extra in errors[1:]:
            errors[0].add_note(f"another fence callback also raised {extra!r}")
        raise errors[0]


@final
class Notify:
    """A link to an active fence that only tells ``notify`` of its signal.

    What waits for a fence array's components without being an array: the
    task polling a passive array, the fence watcher.
    """

    __slots__ = ("notify",)

    def __init__(self, notify: Callable[[Fence], None]) -> None:
        self.notify = notify


def _hand_over(ref: weakref.ref[Fence], _value: object) -> None:
    """A waiter woken to take over polling was cancelled first: wake the next."""
    fence = ref()
    if fence is not None:
        fence._hand_over()


@final
class FenceContext:
    """A timeline of fences ordered by sequence number: ``dma_fence_context_alloc``.

    Fences of one context signal in order: signalling one first signals every
    pending fence of the context with a lower or equal sequence number, and a
    fence created at or below the last signalled number is born signalled.
    The context keeps its pending fences alive until they signal.

    Args:
        timeline: The timeline's name, shown by bufinfo.
        driver: The name of whoever signals its fences, shown by bufinfo.

    Raises:
        TypeError: A name is not a str.
    """

    __slots__ = ("__weakref__", "_id", "_last", "_names", "_pending", "_signaled")

    def __init__(
        self, timeline: str = "timeline", *, driver: str = "asyncdmabuf"
    ) -> None:
        if not isinstance(timeline, str) or not isinstance(driver, str):
            raise TypeError("a fence context's timeline and driver are str")
        self._id = next(_context_ids)
        self._names = (driver, timeline)
        self._last = 0
        self._signaled = -1
        self._pending: list[tuple[int, int, Fence]] = []

    @property
    def id(self) -> int:
        """The context number, unique in this process."""
        return self._id

    @property
    def driver(self) -> str:
        """The driver name given at creation."""
        return self._names[0]

    @property
    def timeline(self) -> str:
        """The timeline name given at creation."""
        return self._names[1]

    @property
    def seqno(self) -> int:
        """The highest sequence number given to a fence so far (0: none yet)."""
        return self._last

    def fence(self, seqno: int | None = None) -> Fence:
        """Return a new fence on this timeline; by default the next sequence number.

        Raises:
            TypeError: ``seqno`` is not an int.
            InvalidArgument: ``seqno`` is negative.
        """
        return Fence(context=self, seqno=seqno)

    def _retire(self, seqno: int) -> list[Fence]:
        """Forget and return the pending fences up to ``seqno``, oldest first."""
        self._signaled = max(self._signaled, seqno)
        pending = self._pending
        done: list[Fence] = []
        while pending and pending[0][0] <= seqno:
            done.append(heapq.heappop(pending)[2])
        return done

    def __repr__(self) -> str:
        driver, timeline = self._names
        return f"<FenceContext {self._id} {driver}:{timeline}, seqno {self._last}>"


class Fence:
    """Something that will be signalled once: ``struct dma_fence``.

    ``Fence()`` is a fence on a timeline of its own; ``Fence(context=ctx)``
    (or ``ctx.fence()``) takes the next sequence number of ``ctx``.

    Args:
        context: The timeline; by default a new one used by this fence only.
        seqno: The sequence number; by default the context's next one (1 on a
            timeline of its own).

    Raises:
        TypeError: ``context`` is not a :class:`FenceContext`, or ``seqno``
            not an int.
        InvalidArgument: ``seqno`` is negative.
    """

    __slots__ = (
        "__weakref__",
        "_callbacks",
        "_context",
        "_ctx",
        "_error",
        "_names",
        "_parents",
        "_passive",
        "_polling",
        "_queue",
        "_rfd",
        "_seqno",
        "_signaled",
        "_wfd",
    )

    _stub: ClassVar[Fence | None] = None

    def __init__(
        self, *, context: FenceContext | None = None, seqno: int | None = None
    ) -> None:
        self._signaled = False
        self._error: Exception | None = None
        #: Tasks waiting for the signal (made on the first wait).
        self._queue: WaitQueue | None = None
        self._callbacks: list[FenceCallback] | None = None
        #: The arrays built on this fence that learn of its signal.
        self._parents: dict[Fence | Notify, None] | None = None
        self._rfd = -1
        self._wfd = -1
        #: True for fences whose signal nothing in this process delivers by
        #: itself (imported from an fd, or built on such fences): awaiting or
        #: testing them is what notices the signal.
        self._passive = False
        #: A passive fence is polled by one task at a time: this one is.
        self._polling = False
        self._ctx = context
        if context is None:
            self._context = next(_context_ids)
            self._seqno = 1 if seqno is None else _check_seqno(seqno)
            self._names = _DEFAULT_NAMES
            return
        if not isinstance(context, FenceContext):
            raise TypeError(f"context must be a FenceContext, not {type(context)}")
        seqno = context._last + 1 if seqno is None else _check_seqno(seqno)
        self._context = context._id
        self._seqno = seqno
        self._names = context._names
        context._last = max(context._last, seqno)
        if seqno <= context._signaled:
            self._signaled = True
            self._ctx = None
        else:
            heapq.heappush(context._pending, (seqno, next(_tiebreak), self))

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def stub(cls) -> Fence:
        """Return the stub fence: already signalled, context 0, seqno 0."""
        stub = Fence._stub
        if stub is None:
            stub = Fence(seqno=0)
            stub._context = 0
            stub._names = _STUB_NAMES
            stub._signaled = True
            Fence._stub = stub
        return stub

    @classmethod
    def all(cls, *fences: Fence) -> Fence:
        """Return a fence that signals once every one of ``fences`` has.

        Its error is the first error among them (in signalling order). No
        fences give the stub, one fence gives that fence itself. Arrays nest
        to any depth.

        Raises:
            TypeError: An argument is not a :class:`Fence`.
        """
        from ._fence_array import ArrayFence

        _check_fences(fences)
        if not fences:
            return cls.stub()
        if len(fences) == 1:
            return fences[0]
        return ArrayFence(fences, any_=False)

    @classmethod
    def any(cls, *fences: Fence) -> Fence:
        """Return a fence that signals as soon as one of ``fences`` has.

        Its error is that fence's error. One fence gives that fence itself.
        Arrays nest to any depth.

        Raises:
            TypeError: An argument is not a :class:`Fence`.
            InvalidArgument: No fences (it could never signal).
        """
        from ._fence_array import ArrayFence

        _check_fences(fences)
        if not fences:
            raise InvalidArgument("Fence.any() of no fences would never signal")
        if len(fences) == 1:
            return fences[0]
        return ArrayFence(fences, any_=True)

    @classmethod
    def import_fd(cls, fd: int) -> Fence:
        """Return the fence behind a fence fd, from this process or another.

        Accepted: an fd made by :meth:`export_fd` (here or elsewhere), and a
        real kernel ``sync_file``. The fd stays the caller's (the fence keeps
        a duplicate, closed once the fence has signalled). An fd of a fence of
        this process gives that fence back. Nothing watches the fd in the
        background: the fence notices its signal when a task awaits it or
        reads :attr:`signaled` (a reservation's ``test`` does), and runs its
        callbacks then.

        Raises:
            TypeError: ``fd`` is not an int.
            BadFileDescriptor: ``fd`` is not open.
            InvalidArgument: ``fd`` is open but neither a fence fd nor a
                kernel sync_file (an arbitrary socket, say).
        """
        from ._fence_import import import_fence

        return import_fence(check_fd(fd))

    # -- identity -------------------------------------------------------------------

    @property
    def context(self) -> int:
        """The number of the fence's context (timeline)."""
        return self._context

    @property
    def seqno(self) -> int:
        """The fence's sequence number on its timeline."""
        return self._seqno

    @property
    def driver(self) -> str:
        """The name of whoever signals the fence, as bufinfo shows it."""
        return self._names[0]

    @property
    def timeline(self) -> str:
        """The name of the fence's timeline, as bufinfo shows it."""
        return self._names[1]

    def is_later(self, other: Fence) -> bool:
        """Return whether this fence comes after ``other`` on their timeline.

        Raises:
            TypeError: ``other`` is not a :class:`Fence`.
            InvalidArgument: The fences are on different timelines.
        """
        if not isinstance(other, Fence):
            raise TypeError(f"expected a Fence, not {type(other).__name__}")
        if other._context != self._context:
            raise InvalidArgument(f"{self!r} and {other!r} are on different timelines")
        return self._seqno > other._seqno

    def __repr__(self) -> str:
        if not self.signaled:
            state = "pending"
        elif self._error is None:
            state = "signalled"
        else:
            state = f"signalled with {self._error!r}"
        driver, timeline = self._names
        return (
            f"<{type(self).__name__.lstrip('_')} {driver}:{timeline} "
            f"context {self._context} seqno {self._seqno}, {state}>"
        )

    # -- state ----------------------------------------------------------------------

    @property
    def signaled(self) -> bool:
        """True once the fence has signalled (with or without an error)."""
        if self._signaled:
            return True
        return self._passive and self._poll()

    @property
    def error(self) -> Exception | None:
        """The error the fence signalled with; None if it succeeded or is pending.

        An error given as an errno, or read from an fd, is a
        :class:`~asyncdmabuf.DmaBufError` carrying that errno.
        """
        return self._error if self.signaled else None

    def _poll(self) -> bool:
        """Notice a signal nobody delivered (passive fences); return ``_signaled``."""
        return self._signaled

    # -- signal ---------------------------------------------------------------------

    def signal(self, error: Exception | int | None = None) -> None:
        """Signal the fence, once: wake its waiters, run its callbacks, mark its fds.

        On a timeline, pending fences with lower or equal sequence numbers are
        signalled first (without an error). Every callback runs even if one
        raises; the first exception is re-raised afterwards.

        Args:
            error: None for success, or what went wrong: an exception, or a
                positive errno (kept as a :class:`~asyncdmabuf.DmaBufError`).

        Raises:
            InvalidArgument: The fence has already signalled, it signals by
                itself (it is composed of or imported from others), or
                ``error`` is not a positive errno.
            TypeError: ``error`` is neither an Exception, an int nor None.
        """
        err = _check_error(error)
        if self._signaled:
            raise InvalidArgument(f"{self!r} has already been signalled")
        signalled: deque[Fence] = deque()
        ctx = self._ctx
        if ctx is not None:
            for earlier in ctx._retire(self._seqno):
                if earlier is not self and not earlier._signaled:
                    earlier._mark(None)
                    signalled.append(earlier)
        self._mark(err)
        signalled.append(self)
        settle(signalled)

    def _mark(self, err: Exception | None) -> None:
        """Record the signal, wake the waiters, finish the fds; no callbacks yet.

        What follows (callbacks, arrays) is :func:`settle`'s, for the caller.
        """
        self._signaled = True
        self._error = err
        self._ctx = None
        queue = self._queue
        if queue is not None:
            self._queue = None
            queue.unpark_all()
        if self._rfd >= 0 or self._wfd >= 0:
            self._close_export(_fence_fd.errno_of(err))
        self._release()

    def _release(self) -> None:
        """Let go of what only a pending fence needs (subclasses)."""

    def _child_signaled(self, child: Fence) -> bool:
        """Learn that ``child`` signalled; return whether this fence now has."""
        raise NotImplementedError  # pragma: no cover: only arrays have children

    def _add_parent(self, parent: Fence | Notify) -> None:
        if self._parents is None:
            self._parents = {}
        self._parents[parent] = None

    def _remove_parent(self, parent: Fence | Notify) -> None:
        if self._parents:
            self._parents.pop(parent, None)

    # -- wait -----------------------------------------------------------------------

    async def wait(self) -> None:
        """Wait until the fence has signalled; always a checkpoint.

        Returns normally whether or not the fence signalled with an error
        (read :attr:`error`). Cancelled, it leaves nothing registered and may
        simply be retried; a timeout is the caller's ``anyio.fail_after``.
        """
        if self._signaled or (self._passive and self._poll()):
            await anyio.lowlevel.checkpoint()
            return
        if self._passive:
            await self._drive()
            return
        await self._waiters().park()

    def _waiters(self) -> WaitQueue:
        queue = self._queue
        if queue is None:
            on_abandon = None
            if self._passive:
                ref = weakref.ref(self)
                on_abandon = lambda value: _hand_over(ref, value)  # noqa: E731
            queue = self._queue = WaitQueue(on_abandon)
        return queue

    async def _drive(self) -> None:
        """Wait for a passive fence: one task polls, the others park behind it.

        A poller that is cancelled hands the polling over to the next waiter
        (the queue passes it on if that one is cancelled too).
        """
        suspended = False
        while not self._poll():
            suspended = True
            if self._polling:
                await self._waiters().park()
                continue
            self._polling = True
            try:
                await self._wait_ready()
            except BaseException:
                self._polling = False
                self._poll_ended()
                self._hand_over()
                raise
            self._polling = False
            self._poll_ended()
        if not suspended:
            await anyio.lowlevel.checkpoint()

    def _hand_over(self) -> None:
        if not self._signaled and not self._polling and self._queue is not None:
            self._queue.unpark()

    async def _wait_ready(self) -> None:
        """Wait until what a passive fence depends on may have changed."""
        raise NotImplementedError  # pragma: no cover: only passive fences poll

    def _poll_ended(self) -> None:
        """The poller stopped polling (passive fences tidy up here)."""

    # -- callbacks ------------------------------------------------------------------

    def add_callback(self, callback: FenceCallback) -> bool:
        """Arrange for ``callback(fence)`` to run once, when the fence signals.

        Returns:
            True if registered; False, without registering, if the fence has
            already signalled (the kernel's ``-ENOENT``).

        Raises:
            TypeError: ``callback`` is not callable.
        """
        if not callable(callback):
            raise TypeError(f"a fence callback must be callable, not {callback!r}")
        if self.signaled:
            return False
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)
        return True

    def remove_callback(self, callback: FenceCallback) -> bool:
        """Unregister one registration of ``callback``.

        Returns:
            True if it was registered and will not run; False if it was not
            registered (or has already run).
        """
        callbacks = self._callbacks
        if not callbacks:
            return False
        try:
            callbacks.remove(callback)
        except ValueError:
            return False
        return True

    # -- fds ------------------------------------------------------------------------

    def export_fd(self) -> int:
        """Return a new fd (``O_CLOEXEC``) that polls readable once the fence signals.

        The caller owns the fd and closes it. Any process holding it can
        :meth:`import_fd` it and learn whether the fence failed.

        Raises:
            DmaBufError: The process is out of fds (with the errno).
        """
        if self.signaled:
            return _fence_fd.signaled_fd(_fence_fd.errno_of(self._error))
        return dup_cloexec(self._read_end())

    def _read_end(self) -> int:
        """Return the fence's own read end (made on first use); not a new fd."""
        if self._rfd < 0:
            self._rfd, self._wfd = _fence_fd.socketpair()
            try:
                _by_file[_fence_fd.file_key(self._rfd)] = self
            except BaseException:
                self._close_export(None)
                raise
        return self._rfd

    def _watch_fd(self) -> tuple[tuple[object, ...], int, _fence_fd.FenceFdKind]:
        """Return ``(identity, fd, kind)`` of an fd readable at the signal (not new).

        What a fence array that waits for this fence, or the fence watcher,
        watches.
        """
        fd = self._read_end()
        return _fence_fd.file_key(fd), fd, "fence"

    def _close_export(self, code: int | None) -> None:
        """Finish the write end with ``code`` and close both ends (idempotent)."""
        rfd, wfd = self._rfd, self._wfd
        self._rfd = self._wfd = -1
        if rfd >= 0:
            try:
                key = _fence_fd.file_key(rfd)
                if _by_file.get(key) is self:
                    del _by_file[key]
            finally:
                os.close(rfd)
        if wfd >= 0:
            _fence_fd.finish(wfd, code)

    def __del__(self) -> None:
        # A pending fence dropped with exported fds: importers see its owner died.
        if getattr(self, "_rfd", -1) >= 0:
            self._close_export(None)
