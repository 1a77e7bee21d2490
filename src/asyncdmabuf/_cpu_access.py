"""CPU access: ``begin_cpu_access`` / ``end_cpu_access`` and the view between them.

Beginning waits for the fences the access must wait for (implicit sync: a
reader for ``WRITE`` fences, a writer for ``READ`` fences too) without holding
the buffer's lock, then calls the exporter's hook under it. ``async with
buf.cpu_access(mode) as view`` hands out a view of the bytes; on exit the view
is released and the access ended, unless something still exports the view (a
numpy array made from it): then the access stays open, so that no byte written
through the live array is lost, and a later ``end_cpu_access(mode)`` ends it
once the array is gone.
"""

from __future__ import annotations

import pickle
from types import TracebackType
from typing import TYPE_CHECKING, final

import anyio

from ._errors import InvalidArgument
from ._types import CpuMode
from ._undo import complete, run_undo, run_undo_sync
from ._validate import check_cpu_mode

if TYPE_CHECKING:
    from ._buffer import DmaBuf

__all__ = ["CpuAccess", "CpuState"]


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
    """The CPU accesses open on one buffer, by mode, and the views left held."""

    __slots__ = ("_counts", "_held")

    def __init__(self) -> None:
        # Made on first use: most buffers never see CPU access.
        self._counts: dict[str, int] | None = None
        self._held: list[_Held] | None = None

    def __bool__(self) -> bool:
        return bool(self._counts)

    def modes(self) -> tuple[str, ...]:
        """The modes open, each as often as it is open."""
        counts = self._counts
        if not counts:
            return ()
        return tuple(mode for mode, n in counts.items() for _ in range(n))

    def opened(self, mode: CpuMode) -> None:
        counts = self._counts
        if counts is None:
            counts = self._counts = {}
        counts[mode] = counts.get(mode, 0) + 1

    def closing(self, mode: CpuMode) -> None:
        """Count one access of ``mode`` as ended.

        Raises:
            InvalidArgument: None is open in that mode.
        """
        counts = self._counts
        count = counts.get(mode, 0) if counts else 0
        if not counts or not count:
            raise InvalidArgument(f"end_cpu_access({mode!r}) without begin_cpu_access")
        if count == 1:
            del counts[mode]
        else:
            counts[mode] = count - 1

    def hold(self, held: _Held) -> None:
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
        counts = self._counts
        if not counts or not counts.get(mode):
            raise InvalidArgument(f"end_cpu_access({mode!r}) without begin_cpu_access")
        if not self._held:
            return
        still = [h for h in self._held if not h.try_release()]
        self._held = still
        if sum(h.mode == mode for h in still) >= counts[mode]:
            raise BufferError(
                f"the view of a {mode!r} CPU access is still exported "
                "(a numpy array of it is alive): the access stays open"
            )

    def drain(self) -> list[str]:
        """Forget every open access (the last put); return the modes they had."""
        modes = list(self.modes())
        self._counts = self._held = None
        return modes


async def begin(buf: DmaBuf, mode: CpuMode) -> None:
    """Begin CPU access (see :meth:`DmaBuf.begin_cpu_access`)."""
    check_cpu_mode(mode)
    buf._check_live()
    lock = buf._lock
    while True:
        resv = buf.pending_resv()
        if resv is not None and not resv.test_for_cpu(mode):
            await resv.wait_for_cpu(mode)
        await lock.acquire()
        if resv is None or resv.test_for_cpu(mode):
            break
        lock.release()  # a fence came while we queued: wait again
    try:
        buf._check_live()
        await complete(buf.exporter.begin_cpu_access(buf, mode))
        buf._cpu.opened(mode)
    finally:
        lock.release()


async def end(buf: DmaBuf, mode: CpuMode) -> bool:
    """End CPU access without a final checkpoint (:meth:`DmaBuf.end_cpu_access`).

    Returns:
        Whether it waited for the lock.
    """
    check_cpu_mode(mode)
    buf._cpu.check_end(mode)
    lock = buf._lock
    waited = await lock.acquire_shielded()
    try:
        buf._cpu.check_end(mode)
        buf._cpu.closing(mode)
        await run_undo(buf.exporter.end_cpu_access(buf, mode))
    finally:
        lock.release()
    return waited


async def end_all(buf: DmaBuf, errors: list[Exception]) -> None:
    """End every open access (the last put); the lock is held."""
    for mode in buf._cpu.drain():
        try:
            await run_undo(buf.exporter.end_cpu_access(buf, check_cpu_mode(mode)))
        except Exception as exc:
            errors.append(exc)


def end_all_sync(buf: DmaBuf, errors: list[Exception]) -> bool:
    """:func:`end_all` without a loop (garbage collection); whether all completed."""
    done = True
    for mode in buf._cpu.drain():
        try:
            done &= run_undo_sync(
                buf.exporter.end_cpu_access(buf, check_cpu_mode(mode))
            )
        except Exception as exc:
            errors.append(exc)
    return done


@final
class CpuAccess:
    """``async with buf.cpu_access(mode) as view``: begin, a view, end.

    The view handed out is a re-export (through :class:`pickle.PickleBuffer`)
    of a view private to this access, so that on exit the private view can
    tell whether anything derived from the handed-out one (a numpy array, a
    ctypes object) still holds the memory.
    """

    __slots__ = ("_base", "_buf", "_mode", "_view")

    def __init__(self, buf: DmaBuf, mode: CpuMode) -> None:
        self._buf = buf
        self._mode = mode
        self._base: memoryview | None = None
        self._view: memoryview | None = None

    async def __aenter__(self) -> memoryview:
        buf = self._buf
        await begin(buf, self._mode)
        try:
            base = buf.exporter.vmap(buf)
            if self._mode == "r":
                readonly = base.toreadonly()
                base.release()
                base = readonly
            view = memoryview(pickle.PickleBuffer(base))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await end(buf, self._mode)
            raise
        self._base, self._view = base, view
        return view

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        base, view = self._base, self._view
        self._base = self._view = None
        if base is not None and view is not None:
            held = _Held(self._mode, base, view)
            if not held.try_release():
                # Something still writes or reads through the view: keep the
                # access open (pinned, resident) rather than lose those bytes.
                self._buf._cpu.hold(held)
                message = (
                    f"the view of {self._buf!r} is still exported (a numpy array "
                    f"of it is alive): the {self._mode!r} CPU access stays open "
                    f"until end_cpu_access({self._mode!r}) or the last put"
                )
                if exc is not None:
                    exc.add_note(message)
                    return  # the body's own exception propagates unchanged
                raise BufferError(message)
        # Like trio's ``async with lock``, the block's checkpoint was at entry:
        # the exit ends the access (waiting, shielded, only if contended).
        await end(self._buf, self._mode)
