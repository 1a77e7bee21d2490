"""Fences: ``struct dma_fence``, a promise that something will be done, awaitable.

A fence is signalled exactly once, optionally with an error. Tasks await it,
callbacks run when it signals, and it can travel to another process as an fd
(the kernel's ``sync_file``): a UNIX socket whose peer end the fence keeps. At
signal the fence writes one record (0 or an errno) and shuts its end down, so
the fd polls readable from then on and every holder can peek the record
without consuming it. An owner that goes away unsignalled leaves EOF and no
record: the importer sees the fence signalled with ``EOWNERDEAD``.

Fences of one :class:`FenceContext` (a timeline) signal in order of their
sequence numbers: signalling one signals every pending earlier one first, as
the kernel requires of every timeline (and as ``sw_sync`` does).

Fences are not thread-safe: use them from the thread that runs the event loop
(``anyio.from_thread.run_sync(fence.signal)`` from others).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import heapq
import itertools
import os
import select
import socket
import stat
import struct
import threading
import weakref
from collections.abc import Callable
from typing import ClassVar, Final, final

import anyio
import anyio.lowlevel

from ._errors import (
    BadFileDescriptor,
    Busy,
    DmaBufError,
    InvalidArgument,
    NoDevice,
    OutOfMemory,
    from_oserror,
)
from ._fd import dup_cloexec
from ._validate import check_fd

__all__ = ["Fence", "FenceCallback", "FenceContext"]

FenceCallback = Callable[["Fence"], object]

#: Context 0 belongs to the stub fence, as in the kernel.
_context_ids = itertools.count(1)
_tiebreak = itertools.count()

#: The record a fence writes at signal: 0, or the errno it failed with.
_RECORD: Final = struct.Struct("<i")
_MAX_ERRNO: Final = 4095

_DEFAULT_NAMES: Final = ("asyncdmabuf", "unbound")
_ARRAY_NAMES: Final = ("dma_fence_array", "unbound")
_IMPORTED_NAMES: Final = ("sync_file", "imported")
_STUB_NAMES: Final = ("stub", "stub")

#: Fences by the identity of the socket their fds refer to, so that importing
#: an fd of this process gives back the very fence (as ``sync_file_get_fence``).
_by_file: weakref.WeakValueDictionary[tuple[int, int], Fence] = (
    weakref.WeakValueDictionary()
)


def _error_from_errno(code: int) -> DmaBufError:
    """Return the framework error carrying ``code`` (for errors read from an fd)."""
    message = f"fence signalled with an error: {os.strerror(code)}"
    for cls in (BadFileDescriptor, InvalidArgument, OutOfMemory, Busy, NoDevice):
        if cls.default_errno == code:
            return cls(message)
    return DmaBufError(message, code=code)


def _errno_of(error: Exception | None) -> int:
    """Return the errno that stands for ``error`` in an fd's record (0: none)."""
    if error is None:
        return 0
    code = getattr(error, "errno", None)
    if isinstance(code, int) and 0 < code <= _MAX_ERRNO:
        return code
    return _errno.EIO


def _check_error(error: object) -> Exception | None:
    if error is None or isinstance(error, Exception):
        return error
    if isinstance(error, int) and not isinstance(error, bool):
        if not 0 < error <= _MAX_ERRNO:
            raise InvalidArgument(f"a fence error is a positive errno, not {error}")
        return _error_from_errno(error)
    raise TypeError(
        f"a fence error is an Exception or an errno, not {type(error).__name__}"
    )


def _check_seqno(seqno: object) -> int:
    if not isinstance(seqno, int) or isinstance(seqno, bool):
        raise TypeError(f"a sequence number is an int, not {type(seqno).__name__}")
    if seqno < 0:
        raise InvalidArgument(f"a sequence number is not negative, got {seqno}")
    return seqno


def _check_fences(fences: tuple[object, ...]) -> tuple[Fence, ...]:
    for fence in fences:
        if not isinstance(fence, Fence):
            raise TypeError(f"expected a Fence, not {type(fence).__name__}")
    return fences  # type: ignore[return-value]


# -- the fd protocol ----------------------------------------------------------------


def _socketpair() -> tuple[int, int]:
    """Return ``(read_end, write_end)`` of a new UNIX stream pair (``O_CLOEXEC``)."""
    try:
        reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise from_oserror(exc, "socketpair for a fence") from None
    return reader.detach(), writer.detach()


def _finish(wfd: int, code: int | None) -> None:
    """Write the record (``None``: none, the owner died), shut down, close ``wfd``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=wfd)
    try:
        # OSError: nobody holds the read end any more.
        if code is not None:
            with contextlib.suppress(OSError):
                sock.send(_RECORD.pack(code), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
    finally:
        sock.close()


def _signaled_fd(code: int) -> int:
    """Return a new fd that is already readable with the record ``code``."""
    rfd, wfd = _socketpair()
    _finish(wfd, code)
    return rfd


def _peek(fd: int) -> int | None:
    """Return the record behind ``fd`` without consuming it; ``None`` while pending.

    EOF without a record (the owner died unsignalled) reads as ``EOWNERDEAD``,
    anything that is not a record as ``EPROTO``.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        data = sock.recv(_RECORD.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return _errno.EPROTO
    finally:
        sock.detach()
    if not data:
        return _errno.EOWNERDEAD
    if len(data) != _RECORD.size:
        return _errno.EPROTO
    (code,) = _RECORD.unpack(data)
    return code if 0 <= code <= _MAX_ERRNO else _errno.EPROTO


def _file_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _watch(fds: list[int], wfd: int, any_: bool) -> None:
    """Thread body: finish ``wfd`` once all (or any) of ``fds`` have signalled.

    What the kernel does for an exported fence array, done by a thread because
    nothing in this process is bound to run when the components signal. Owns
    and closes every fd it is given.
    """
    code = 0
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        left = set(fds)
        while left:
            for fd, _ in poller.poll():
                record = _peek(fd)
                if record is None or fd not in left:
                    continue
                poller.unregister(fd)
                left.discard(fd)
                if any_:
                    code = record
                    left.clear()
                    break
                code = code or record
    finally:
        for fd in fds:
            os.close(fd)
        _finish(wfd, code)


# -- fences -------------------------------------------------------------------------


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
        "_event",
        "_names",
        "_passive",
        "_rfd",
        "_seqno",
        "_signaled",
        "_waiters",
        "_wfd",
    )

    _stub: ClassVar[Fence | None] = None

    def __init__(
        self, *, context: FenceContext | None = None, seqno: int | None = None
    ) -> None:
        self._signaled = False
        self._error: Exception | None = None
        self._event: anyio.Event | None = None
        self._waiters = 0
        self._callbacks: list[FenceCallback] | None = None
        self._rfd = -1
        self._wfd = -1
        #: True for fences whose signal nothing in this process delivers by
        #: itself (imported from an fd, or built on such fences): awaiting or
        #: testing them is what notices the signal.
        self._passive = False
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
        fences give the stub, one fence gives that fence itself.

        Raises:
            TypeError: An argument is not a :class:`Fence`.
        """
        _check_fences(fences)
        if not fences:
            return cls.stub()
        if len(fences) == 1:
            return fences[0]
        return _ArrayFence(fences, any_=False)

    @classmethod
    def any(cls, *fences: Fence) -> Fence:
        """Return a fence that signals as soon as one of ``fences`` has.

        Its error is that fence's error. One fence gives that fence itself.

        Raises:
            TypeError: An argument is not a :class:`Fence`.
            InvalidArgument: No fences (it could never signal).
        """
        _check_fences(fences)
        if not fences:
            raise InvalidArgument("Fence.any() of no fences would never signal")
        if len(fences) == 1:
            return fences[0]
        return _ArrayFence(fences, any_=True)

    @classmethod
    def import_fd(cls, fd: int) -> Fence:
        """Return the fence behind an fd made by :meth:`export_fd` (here or elsewhere).

        The fd stays the caller's (the fence keeps a duplicate, closed once
        the fence has signalled). An fd of a fence of this process gives that
        fence back. Nothing watches the fd in the background: the fence
        notices its signal when a task awaits it or reads :attr:`signaled`
        (a reservation's ``test`` does), and runs its callbacks then.

        Raises:
            TypeError: ``fd`` is not an int.
            BadFileDescriptor: ``fd`` is not open.
            InvalidArgument: ``fd`` is open but not a fence's fd.
        """
        fd = check_fd(fd)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            if exc.errno == _errno.EBADF:
                raise BadFileDescriptor(f"fd {fd} is not open") from None
            raise from_oserror(exc, f"fstat of fd {fd}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise InvalidArgument(f"fd {fd} is not a fence")
        known = _by_file.get((st.st_dev, st.st_ino))
        if known is not None:
            return known
        sock = socket.socket(fileno=dup_cloexec(fd))
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise InvalidArgument(f"fd {fd} is not a fence")
        return _ImportedFence(sock.detach(), (st.st_dev, st.st_ino))

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
        self._signal_checked(err)

    def _signal_checked(self, err: Exception | None) -> None:
        errors: list[Exception] = []
        ctx = self._ctx
        if ctx is not None:
            for earlier in ctx._retire(self._seqno):
                if earlier is not self and not earlier._signaled:
                    earlier._signal(None, errors)
        self._signal(err, errors)
        if errors:
            for extra in errors[1:]:
                errors[0].add_note(f"another fence callback also raised {extra!r}")
            raise errors[0]

    def _signal(self, err: Exception | None, errors: list[Exception]) -> None:
        self._signaled = True
        self._error = err
        self._ctx = None
        event = self._event
        if event is not None:
            self._event = None
            event.set()
        if self._rfd >= 0:
            self._close_export(_errno_of(err))
        callbacks = self._callbacks
        if callbacks:
            self._callbacks = None
            for callback in callbacks:
                try:
                    callback(self)
                except Exception as exc:
                    errors.append(exc)

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
        event = self._event
        if event is None:
            event = self._event = anyio.Event()
        self._waiters += 1
        try:
            await event.wait()
        finally:
            self._waiters -= 1
            if not self._waiters and self._event is event:
                self._event = None

    async def _wait_event(self) -> None:
        """Wait for the fence's event to be set (by the signal, or a hand-over)."""
        event = self._event
        if event is None:
            event = self._event = anyio.Event()
        self._waiters += 1
        try:
            await event.wait()
        finally:
            self._waiters -= 1
            if not self._waiters and self._event is event:
                self._event = None

    async def _drive(self) -> None:
        """Wait for a passive fence by watching whatever it depends on."""
        raise NotImplementedError  # pragma: no cover

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
            return _signaled_fd(_errno_of(self._error))
        if self._rfd < 0:
            self._open_export()
        return dup_cloexec(self._rfd)

    def _open_export(self) -> None:
        self._rfd, self._wfd = _socketpair()
        try:
            _by_file[_file_key(self._rfd)] = self
        except BaseException:
            self._close_export(None)
            raise

    def _close_export(self, code: int | None) -> None:
        """Finish the write end with ``code`` and close both ends (idempotent)."""
        rfd, wfd = self._rfd, self._wfd
        self._rfd = self._wfd = -1
        if rfd >= 0:
            try:
                key = _file_key(rfd)
                if _by_file.get(key) is self:
                    del _by_file[key]
            finally:
                os.close(rfd)
        if wfd >= 0:
            _finish(wfd, code)

    def __del__(self) -> None:
        # A pending fence dropped with exported fds: importers see its owner died.
        if getattr(self, "_rfd", -1) >= 0:
            self._close_export(None)


@final
class _ArrayFence(Fence):
    """``Fence.all`` / ``Fence.any``: the kernel's ``dma_fence_array``."""

    __slots__ = ("_any", "_components", "_pending")

    def __init__(self, fences: tuple[Fence, ...], *, any_: bool) -> None:
        super().__init__()
        self._names = _ARRAY_NAMES
        self._any = any_
        self._components = fences
        self._passive = any(f._passive and not f._signaled for f in fences)
        self._pending = 1 if any_ else len(fences)
        for fence in fences:
            if not fence.add_callback(self._component_signaled):
                self._component_signaled(fence)
                if self._signaled:
                    break

    def _component_signaled(self, fence: Fence) -> None:
        if self._signaled:
            return
        if self._error is None:
            self._error = fence._error
        self._pending -= 1
        if not self._pending:
            self._signal_checked(self._error)

    def _signal(self, err: Exception | None, errors: list[Exception]) -> None:
        components = self._components
        self._components = ()
        if self._any:
            for other in components:
                other.remove_callback(self._component_signaled)
        super()._signal(err, errors)

    def signal(self, error: Exception | int | None = None) -> None:
        """Refuse: a fence array signals when its components do.

        Raises:
            InvalidArgument: Always.
        """
        raise InvalidArgument(f"{self!r} signals when its components do")

    def _poll(self) -> bool:
        for fence in self._components:
            if self._signaled:
                break
            if fence._passive:
                fence._poll()
        return self._signaled

    async def _drive(self) -> None:
        pending = [f for f in self._components if not f._signaled]
        if not self._any:
            for fence in pending:
                await fence.wait()
            return

        async def one(fence: Fence, scope: anyio.CancelScope) -> None:
            await fence.wait()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            for fence in pending:
                tg.start_soon(one, fence, tg.cancel_scope)

    def _open_export(self) -> None:
        if not self._passive:
            super()._open_export()
            return
        # Some components signal only when watched: a thread watches their fds
        # and finishes the write end (ours stays -1: signal() leaves it alone).
        fds: list[int] = []
        try:
            fds.extend(f.export_fd() for f in self._components if not f._signaled)
            rfd, wfd = _socketpair()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._rfd = rfd
        _by_file[_file_key(rfd)] = self
        threading.Thread(
            target=_watch, args=(fds, wfd, self._any), name="fence-watch", daemon=True
        ).start()


@final
class _ImportedFence(Fence):
    """A fence known only through an fd: the kernel's ``sync_file``."""

    __slots__ = ("_fd", "_key", "_polling")

    def __init__(self, fd: int, key: tuple[int, int]) -> None:
        super().__init__()
        self._names = _IMPORTED_NAMES
        self._fd = fd
        self._key = key
        self._polling = False
        self._passive = True
        _by_file[key] = self
        self._poll()

    def signal(self, error: Exception | int | None = None) -> None:
        """Refuse: an imported fence is signalled by its owner.

        Raises:
            InvalidArgument: Always.
        """
        raise InvalidArgument(f"{self!r} is signalled by its owner")

    def _poll(self) -> bool:
        if self._signaled:
            return True
        code = _peek(self._fd)
        if code is not None:
            self._signal_checked(_error_from_errno(code) if code else None)
        return self._signaled

    def _signal(self, err: Exception | None, errors: list[Exception]) -> None:
        super()._signal(err, errors)
        if not self._polling:
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            if _by_file.get(self._key) is self:
                del _by_file[self._key]
            os.close(fd)

    def export_fd(self) -> int:
        """Return a new fd for the same fence (a duplicate of the imported one)."""
        if self._fd >= 0:
            return dup_cloexec(self._fd)
        return super().export_fd()

    async def _drive(self) -> None:
        while not self._poll():
            if self._polling:
                # Another task watches the fd: wake when it sees the signal, or
                # when it is cancelled and one of us must take over.
                await self._wait_event()
                continue
            self._polling = True
            try:
                await anyio.wait_readable(self._fd)
                self._poll()
            finally:
                self._polling = False
                if self._signaled:
                    self._close_fd()
                elif self._event is not None:
                    event, self._event = self._event, None
                    event.set()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self._close_fd()
