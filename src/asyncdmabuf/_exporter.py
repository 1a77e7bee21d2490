"""The table of ops an exporter provides: ``struct dma_buf_ops`` for Python."""

from __future__ import annotations

import abc
import inspect
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, ClassVar

from ._errors import Busy, InvalidArgument
from ._types import CpuMode

if TYPE_CHECKING:
    from ._attachment import Attachment
    from ._buffer import DmaBuf
    from ._sgtable import SgTable
    from ._types import Direction

__all__ = ["CpuMode", "Exporter"]


class Exporter(abc.ABC):
    """Base class of every exporter.

    The framework calls the ops with the buffer's lock held, so an op never
    runs concurrently with another op on the same buffer. (A plain ``map``,
    ``try_map``, ``unmap``, ``begin_cpu_access`` or ``end_cpu_access`` called
    while the lock is free runs without taking it: no other task can run
    before it returns.)

    Each op may be a coroutine function (``async def``): it may then wait for
    anything (sleeps, I/O, its own ``fail_after`` / ``move_on_after`` scopes),
    and must be cancellation-safe (when a cancellation interrupts it, it undoes
    what it had done, or keeps it only as a cache of its own, and lets the
    cancellation propagate). An op that never waits may instead be a plain
    function (``def``), which the framework calls without a task switch or a
    cancel scope. The undo ops ``unmap``, ``detach``, ``release`` and
    ``end_cpu_access`` are run to completion, shielded from the caller's
    cancellation, from their first step; the op's own cancel scopes keep
    working inside the shield. A plain ``release`` also lets garbage
    collection give an unput buffer's memory back.

    State belongs in ``buf.priv`` and ``attachment.priv``.
    """

    #: Shown by :func:`asyncdmabuf.bufinfo`; subclasses set their own (an
    #: instance may shadow it with a name of its own, as ``SimDevice`` does).
    name: ClassVar[str] = "exporter"

    #: Whether the class's ``end_cpu_access`` is a coroutine function (it may
    #: wait), worked out once per class: ``try_cpu_access`` refuses to begin
    #: an access it could not end without waiting.
    _end_cpu_access_waits: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._end_cpu_access_waits = inspect.iscoroutinefunction(cls.end_cpu_access)

    def attach(self, buf: DmaBuf, attachment: Attachment) -> Awaitable[None] | None:
        """Accept a new attachment, or refuse it.

        The new attachment is not yet in ``buf.attachments`` while this runs;
        it is added only if this returns.

        Raises:
            Busy: The backing already exists and cannot serve this device.
        """
        return None

    def detach(self, buf: DmaBuf, attachment: Attachment) -> Awaitable[None] | None:
        """Forget an attachment; it has no mappings left."""
        return None

    @abc.abstractmethod
    def map(
        self, attachment: Attachment, direction: Direction
    ) -> Awaitable[SgTable] | SgTable:
        """Return a scatter table for ``attachment``, waiting for backing if needed."""

    def try_map(self, attachment: Attachment, direction: Direction) -> SgTable:
        """Return a table without waiting, or raise :class:`Busy`.

        Must never await or block. The default cannot map without waiting.

        Raises:
            Busy: A map would have had to wait.
        """
        raise Busy(f"exporter {self.name!r} cannot map without waiting")

    @abc.abstractmethod
    def unmap(
        self, attachment: Attachment, sgt: SgTable, direction: Direction
    ) -> Awaitable[None] | None:
        """Give back a table returned by :meth:`map` or :meth:`try_map`."""

    @abc.abstractmethod
    def release(self, buf: DmaBuf) -> Awaitable[None] | None:
        """Free the buffer's backing after its last put; called exactly once."""

    def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> Awaitable[None] | None:
        """Make the bytes coherent for the CPU before it reads or writes them."""
        return None

    def end_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> Awaitable[None] | None:
        """Make the CPU's writes visible to devices again."""
        return None

    def vmap(self, buf: DmaBuf) -> memoryview:
        """Return a writable view of the buffer's bytes in this process.

        Raises:
            InvalidArgument: The exporter has no CPU mapping of its memory.
        """
        raise InvalidArgument(f"exporter {self.name!r} has no CPU mapping")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
