"""CPU access: ``begin_cpu_access`` / ``end_cpu_access`` and the view between them.

Beginning waits for the fences the access must wait for (implicit sync: a
reader for ``WRITE`` fences, a writer for ``READ`` fences too) without holding
the buffer's lock, then calls the exporter's hook under it. ``async with
buf.cpu_access(mode) as view`` hands out a view of the bytes; on exit the view
is released and the access ended, unless something still exports the view (a
numpy array made from it): then the access stays open, so that no byte written
through the live array is lost, and a later ``end_cpu_access(mode)`` ends it
once the array is gone.

Beginning is a checkpoint; then, with no fence pending, the lock free and the
exporter's hooks plain functions (:func:`start`, :func:`stop`), the whole access
runs synchronously: no other awaits, no cancel scope, no object but the view.

``with buf.try_cpu_access(mode) as view`` is the same access without the
checkpoint (:class:`TryCpuAccess`): it begins at once or raises ``Busy``, and
its exit never waits; an exit that finds the lock held leaves the end to the
lock (``FifoLock.defer``), to run in its turn.
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from collections.abc import Awaitable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, final

import anyio

from ._errors import Busy, InvalidArgument
from ._types import CpuMode
from ._undo import complete, run_undo, run_undo_sync
from ._validate import check_cpu_mode

if TYPE_CHECKING:
    from ._buffer import DmaBuf

__all__ = ["NO_CPU", "CpuAccess", "CpuState", "TryCpuAccess"]


@final
class _Held:
    """An access whose view was still exported when its block ended."""

    __slots__ = ("base", "mode", "view")

    def __init__(self, mode: CpuMode, base: memoryview, view: memoryview) -> None:
        self.mode = mode
        self.base = base
        self.view = view

    def try_release(self) -> bool:
        """Release both views if nothing exports them any more."""
        try:
            self.view.release()
            self.base.release()
        except BufferError:
            return False
        return True


@final
class CpuState:
    """The CPU accesses open on one buffer, by mode, and the views left held.

    A buffer shares :data:`NO_CPU` until its first access makes its own.
    """

    __slots__ = ("_held", "_open")

    def __init__(self) -> None:
        # The mode of each open access, in the order they began: a list is
        # cheaper to count up and down than a dict, and there are few.
        self._open: list[str] = []
        self._held: list[_Held] | None = None

    def __bool__(self) -> bool:
        return bool(self._open)

    def modes(self) -> tuple[str, ...]:
        """The modes open, each as often as it is open."""
        return tuple(self._open)

    def opened(self, mode: CpuMode) -> None:
        """Count one more access of ``mode`` as open."""
        self._open.append(mode)

    def hold(self, held: _Held) -> None:
        """Keep ``held`` until its view is no longer exported."""
        if self._held is None:
            self._held = []
        self._held.append(held)

    def check_end(self, mode: CpuMode) -> None:
        """Check that an access of ``mode`` may end now.

        Views left held that are no longer exported are let go; an end is
        refused while every open access of ``mode`` still has its view exported.

        Raises:
            InvalidArgument: No access of ``mode`` is open.
            BufferError: Each one's view is still exported.
        """
        count = self._open.count(mode)
        if not count:
            raise InvalidArgument(f"end_cpu_access({mode!r}) without begin_cpu_access")
        if self._held:
            still = [h for h in self._held if not h.try_release()]
            self._held = still
            if sum(h.mode == mode for h in still) >= count:
                raise BufferError(
                    f"the view of a {mode!r} CPU access is still exported "
                    "(a numpy array of it is alive): the access stays open"
                )

    def end(self, mode: CpuMode) -> None:
        """Count one access of ``mode`` as ended, if :meth:`check_end` allows."""
        if self._held or mode not in self._open:
            self.check_end(mode)
        self._open.remove(mode)

    def drain(self) -> list[str]:
        """Forget every open access (the last put); return the modes they had."""
        modes = self._open
        if modes or self._held is not None:
            self._open = []
            self._held = None
        return modes


#: The state of every buffer that has never been accessed: nothing open, and
#: never written (a buffer's first access gives it its own).
NO_CPU = CpuState()


async def begin(buf: DmaBuf, mode: CpuMode) -> None:
    """Begin CPU access (see :meth:`DmaBuf.begin_cpu_access`)."""
    check_cpu_mode(mode)
    buf._check_live()
    await buf._lock.checkpoint()
    pending = start(buf, mode)
    if pending is not None:
        await pending


def start(
    buf: DmaBuf, mode: CpuMode, *, wait: bool = True
) -> Coroutine[Any, Any, None] | None:
    """Begin CPU access, after the caller's checkpoint, at once if nothing waits.

    With no fence to wait for, the lock free and the exporter's hook a plain
    function, the access has begun when this returns None. Otherwise it
    returns the coroutine that begins it, which the caller awaits at once;
    with ``wait=False`` it raises ``Busy`` instead, and nothing has begun.

    Raises:
        Busy: ``wait`` is false and beginning would wait.
    """
    resv = buf._resv
    if resv is not None and not resv.test_for_cpu(mode):
        if not wait:
            raise Busy(f"{buf!r} has fences pending for CPU access {mode!r}")
        return _begin_waiting(buf, mode)
    lock = buf._lock
    if lock.contended():
        if not wait:
            raise Busy(f"{buf!r} is locked by another operation")
        return _begin_waiting(buf, mode)
    # The lock is free and nothing runs until a plain hook returns: it runs
    # without taking the lock, which is taken only if the hook must be awaited.
    buf._check_live()
    result = buf._exporter.begin_cpu_access(buf, mode)
    if result is not None:
        if not wait:
            _discard(result)
            raise Busy(f"{buf._exporter!r}'s begin_cpu_access would wait")
        lock.acquire_nowait()  # free: nothing has run since the test
        return _begin_locked(buf, mode, result)
    cpu = buf._cpu
    if cpu is NO_CPU:
        cpu = buf._cpu_state()
    cpu._open.append(mode)  # cpu.opened(mode), a call less
    return None


def _discard(result: Awaitable[None]) -> None:
    """Drop what an exporter's hook returned to be awaited, without running it.

    A coroutine that has not started has done nothing yet, and closing it
    keeps it so.
    """
    if inspect.iscoroutine(result):
        result.close()


async def _begin_locked(buf: DmaBuf, mode: CpuMode, result: Awaitable[None]) -> None:
    """Complete an exporter's hook that waits; the lock is held and released here."""
    try:
        await result
        buf._cpu_state().opened(mode)
    finally:
        buf._lock.release()


async def _begin_waiting(buf: DmaBuf, mode: CpuMode) -> None:
    """Begin behind pending fences or a held lock (the caller has checkpointed).

    The fences are waited for without the lock; holding it, they are checked
    again, since one may have come while this task queued.
    """
    lock = buf._lock
    while True:
        resv = buf._resv
        if resv is not None and not resv.test_for_cpu(mode):
            await resv.wait_for_cpu(mode)
        if not lock.acquire_nowait():
            await lock.wait_turn()
        resv = buf._resv
        if resv is None or resv.test_for_cpu(mode):
            break
        lock.release()  # a fence came while we queued: wait again
    try:
        buf._check_live()
        await complete(buf._exporter.begin_cpu_access(buf, mode))
        buf._cpu_state().opened(mode)
    finally:
        lock.release()


async def end(buf: DmaBuf, mode: CpuMode) -> bool:
    """End CPU access without a final checkpoint (:meth:`DmaBuf.end_cpu_access`).

    Returns:
        Whether it waited for the lock.
    """
    check_cpu_mode(mode)
    pending = stop(buf, mode)
    return False if pending is None else await pending


def stop(buf: DmaBuf, mode: CpuMode) -> Coroutine[Any, Any, bool] | None:
    """End CPU access at once if the lock is free and the exporter's hook plain.

    Returns None when the access has ended; otherwise the coroutine that ends
    it (shielded: it always completes), which the caller awaits at once and
    which returns whether it waited for the lock.

    Raises:
        InvalidArgument: No access of ``mode`` is open.
        BufferError: Each one's view is still exported.
    """
    lock = buf._lock
    if lock.contended():
        return _end_waiting(buf, mode)
    # As in start(): a plain hook runs without the lock.
    buf._cpu.end(mode)
    result = buf._exporter.end_cpu_access(buf, mode)
    if result is None:
        return None
    lock.acquire_nowait()  # free: nothing has run since the test
    return _end_locked(buf, result)


async def _end_locked(buf: DmaBuf, result: Awaitable[None]) -> bool:
    """Complete an exporter's end hook that waits, shielded; release the lock."""
    try:
        await run_undo(result)
    finally:
        buf._lock.release()
    return False


async def _end_waiting(buf: DmaBuf, mode: CpuMode) -> bool:
    """End behind a held lock: check, queue for it shielded, end under it.

    Nothing to end, or every view still exported, raises before it queues.
    """
    buf._cpu.check_end(mode)
    lock = buf._lock
    await lock.wait_turn(shielded=True)
    try:
        buf._cpu.end(mode)
        await run_undo(buf._exporter.end_cpu_access(buf, mode))
    finally:
        lock.release()
    return True


def stop_nowait(buf: DmaBuf, mode: CpuMode) -> None:
    """End CPU access without waiting, ever (:class:`TryCpuAccess`'s exit).

    With the lock free the access has ended when this returns. With the lock
    held (the block awaited and another operation took it), the end is
    queued on the lock and runs in its turn, holding it.

    Raises:
        InvalidArgument: No access of ``mode`` is open.
        BufferError: Each one's view is still exported.
        Exception: What the exporter's (plain) hook raised, if it ran now.
    """
    lock = buf._lock
    if not lock.contended():
        _end_now(buf, mode)  # plain: nothing runs until it returns
        return
    buf._cpu.check_end(mode)  # what the end would refuse, refused here
    lock.defer(lambda: _end_deferred(buf, mode), f"end_cpu_access({mode!r})")


def _end_now(buf: DmaBuf, mode: CpuMode) -> None:
    """End an access with a plain exporter hook, the lock free or held."""
    buf._cpu.end(mode)
    result = buf._exporter.end_cpu_access(buf, mode)
    if result is not None and not run_undo_sync(result):
        warnings.warn(
            f"{buf._exporter!r}'s end_cpu_access({mode!r}) would wait, "
            "and cannot from try_cpu_access: it did not complete",
            RuntimeWarning,
            stacklevel=4,
        )


def _end_deferred(buf: DmaBuf, mode: CpuMode) -> None:
    """End an access when the lock comes to it; an error becomes a warning."""
    if mode not in buf._cpu.modes():
        return  # the last put ended every access meanwhile
    try:
        _end_now(buf, mode)
    except Exception as exc:
        warnings.warn(
            f"ending the {mode!r} CPU access of {buf!r} after its block raised {exc!r}",
            RuntimeWarning,
            stacklevel=2,
        )


async def end_all(buf: DmaBuf, errors: list[Exception]) -> None:
    """End every open access (the last put); the lock is held."""
    for mode in buf._cpu.drain():
        try:
            await run_undo(buf._exporter.end_cpu_access(buf, check_cpu_mode(mode)))
        except Exception as exc:
            errors.append(exc)


def end_all_sync(buf: DmaBuf, errors: list[Exception]) -> bool:
    """:func:`end_all` without a loop (garbage collection); whether all completed."""
    done = True
    for mode in buf._cpu.drain():
        try:
            done &= run_undo_sync(
                buf._exporter.end_cpu_access(buf, check_cpu_mode(mode))
            )
        except Exception as exc:
            errors.append(exc)
    return done


class _Access:
    """What both forms of an access keep: the buffer, the mode, the views."""

    __slots__ = ("_base", "_buf", "_mode", "_view")

    def __init__(self, buf: DmaBuf, mode: CpuMode) -> None:
        self._buf = buf
        self._mode = mode
        self._base: memoryview | None = None
        self._view: memoryview | None = None

    def _let_go(self, exc: BaseException | None) -> bool:
        """Release the views as the block ends; whether the access may end.

        Raises:
            BufferError: See :func:`_keep_open`.
        """
        base = self._base
        view = self._view
        if base is None or view is None:
            return True
        self._base = self._view = None
        try:
            view.release()
            base.release()
        except BufferError:
            _keep_open(self._buf, self._mode, base, view, exc)
            return False
        return True


@final
class CpuAccess(_Access):
    """``async with buf.cpu_access(mode) as view``: begin, a view, end.

    The view handed out is a re-export (through :class:`pickle.PickleBuffer`)
    of a view private to this access, so that on exit the private view can
    tell whether anything derived from the handed-out one (a numpy array, a
    ctypes object, a slice) still holds the memory.

    Uncontended, with no fence pending and the exporter's hooks plain
    functions, the entry is one checkpoint and the exit none: everything else
    runs synchronously.
    """

    __slots__ = ()

    async def __aenter__(self) -> memoryview:
        buf = self._buf
        mode = self._mode
        await buf._lock.checkpoint()
        pending = start(buf, mode)
        if pending is not None:
            await pending
        try:
            base, view = _views(buf, mode)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await end(buf, mode)
            raise
        self._base = base
        self._view = view
        return view

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._let_go(exc):
            return  # the body's own exception propagates unchanged
        # Like trio's ``async with lock``, the block's checkpoint was at entry:
        # the exit ends the access (waiting, shielded, only if contended).
        pending = stop(self._buf, self._mode)
        if pending is not None:
            await pending


@final
class TryCpuAccess(_Access):
    """``with buf.try_cpu_access(mode) as view``: :class:`CpuAccess`, never waiting.

    The entry begins the access at once or raises ``Busy``, and is no
    checkpoint; the exit ends it at once, or, if the block awaited and
    another operation holds the lock now, queues the end on the lock (it runs
    in its turn, before any operation that asks later). Uncontended, the
    whole access is synchronous, with no object but the view.
    """

    __slots__ = ()

    def __enter__(self) -> memoryview:
        buf = self._buf
        mode = self._mode
        if buf._exporter._end_cpu_access_waits:
            raise Busy(f"{buf._exporter!r}'s end_cpu_access may wait")
        start(buf, mode, wait=False)
        try:
            base, view = _views(buf, mode)
        except BaseException:
            stop_nowait(buf, mode)
            raise
        self._base = base
        self._view = view
        return view

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._let_go(exc):
            return  # the body's own exception propagates unchanged
        stop_nowait(self._buf, self._mode)


def _views(buf: DmaBuf, mode: CpuMode) -> tuple[memoryview, memoryview]:
    """The access's private view of the bytes, and the one handed out."""
    base = buf._exporter.vmap(buf)
    if mode == "r":
        readonly = base.toreadonly()
        base.release()
        base = readonly
    return base, memoryview(pickle.PickleBuffer(base))


def _keep_open(
    buf: DmaBuf,
    mode: CpuMode,
    base: memoryview,
    view: memoryview,
    exc: BaseException | None,
) -> None:
    """Something still reads or writes through the view: keep the access open.

    The buffer stays pinned and resident rather than lose those bytes.

    Raises:
        BufferError: The block succeeded (``exc`` is None); otherwise a note
            is added to ``exc`` and this returns, for it to propagate.
    """
    buf._cpu.hold(_Held(mode, base, view))
    message = (
        f"the view of {buf!r} is still exported (a numpy array "
        f"of it is alive): the {mode!r} CPU access stays open "
        f"until end_cpu_access({mode!r}) or the last put"
    )
    if exc is None:
        raise BufferError(message)
    exc.add_note(message)
