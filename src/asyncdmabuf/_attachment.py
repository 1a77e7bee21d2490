"""Attachments: ``struct dma_buf_attachment``, one device's use of one buffer.

An attachment maps the buffer for its device (:meth:`Attachment.map`, which
waits, or :meth:`Attachment.try_map`, which never does), keeps the tables it
mapped, checks every table its exporter returns (once per cached layout), and
unmaps and detaches. Every operation takes the buffer's lock; state changes
happen synchronously while it is held, between awaits, so a cancellation at
any await leaves either the old state or the new one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, final

import anyio

from ._device import Device
from ._errors import Busy, DmaBufError, InvalidArgument
from ._operation import Operation
from ._sgtable import SgEntry, SgTable, check_entries
from ._types import Direction
from ._undo import run_undo, run_undo_sync
from ._validate import check_direction

if TYPE_CHECKING:
    from ._buffer import DmaBuf

__all__ = ["Attachment", "MoveNotify"]

T = TypeVar("T")
#: Shared by every attachment that has never mapped; never written.
_NO_MAPPINGS: dict[SgTable, None] = {}
MoveNotify = Callable[["Attachment"], object]


@final
class Attachment:
    """One device's use of one buffer: ``struct dma_buf_attachment``.

    Made by :meth:`DmaBuf.attach`; maps with :meth:`map` / :meth:`try_map`,
    ends with :meth:`detach`.
    """

    __slots__ = (
        "__weakref__",
        "_attached",
        "_buffer",
        "_checked",
        "_device",
        "_mappings",
        "_move_notify",
        "priv",
    )

    def __init__(
        self, buffer: DmaBuf, device: Device, move_notify: MoveNotify | None
    ) -> None:
        self._buffer = buffer
        self._device = device
        self._move_notify = move_notify
        #: The exporter's state for this attachment (the kernel's ``attach->priv``).
        self.priv: Any = None
        # Insertion-ordered; a dict so that lookup and removal are O(1).
        self._mappings: dict[SgTable, None] = _NO_MAPPINGS  # own dict at first map
        self._attached = False
        # The last entries tuple checked for this attachment's device.
        self._checked: tuple[SgEntry, ...] | None = None

    @property
    def buffer(self) -> DmaBuf:
        """The buffer attached to."""
        return self._buffer

    @property
    def device(self) -> Device:
        """The importing device."""
        return self._device

    @property
    def dynamic(self) -> bool:
        """True for an attachment made with ``move_notify``."""
        return self._move_notify is not None

    @property
    def attached(self) -> bool:
        """True until :meth:`detach` (or the buffer's release)."""
        return self._attached

    @property
    def mappings(self) -> tuple[SgTable, ...]:
        """The tables mapped and not yet unmapped, oldest first."""
        return tuple(self._mappings)

    def is_mapped(self, sgt: SgTable) -> bool:
        """Return whether ``sgt`` is one of this attachment's live mappings."""
        return sgt in self._mappings

    def move_notify(self) -> None:
        """Tell a dynamic importer its buffer is about to move (exporters call this).

        Does nothing for a static attachment.
        """
        if self._move_notify is not None:
            self._move_notify(self)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (
            f"<Attachment {self._device.name!r} to {self._buffer!r}, "
            f"{len(self._mappings)} mapped, {state}>"
        )

    def _check_usable(self) -> None:
        if not self._attached:
            raise InvalidArgument(f"{self!r} is detached")
        self._buffer._check_live()

    def _mark_attached(self) -> None:
        self._attached = True

    # -- map ----------------------------------------------------------------------

    def map(
        self, direction: Direction, *, interruptible: bool = True
    ) -> Operation[SgTable]:
        """Map the buffer for this device.

        ``await att.map(d)`` returns the :class:`SgTable`; ``async with
        att.map(d) as sgt:`` also unmaps it on exit; the result is a real
        coroutine, so ``create_task`` and ``start_soon`` take it. Always a
        checkpoint: takes the buffer's lock (waiters are served first come,
        first served), then awaits the exporter, which may allocate backing
        first. Cancelled while waiting, it leaves nothing behind and may simply
        be retried; with ``interruptible=False`` the wait is shielded.

        Raises:
            TypeError: ``direction`` is not a :class:`Direction`.
            InvalidArgument: The attachment is detached or the buffer released.
            DmaBufError: The exporter failed, or returned a broken table.
        """
        direction = check_direction(direction)
        self._check_usable()
        coro = self._map(direction)
        if not interruptible:
            coro = _shielded(coro)
        return Operation(coro, self._unmap_if_mapped)

    async def _map(self, direction: Direction) -> SgTable:
        buf = self._buffer
        lock = buf._lock
        if not lock.contended():  # else the wait below is the checkpoint
            await lock.checkpoint()
        if not lock.acquire_nowait():
            await lock.wait_turn()
        try:
            self._check_usable()
            result = buf.exporter.map(self, direction)
            # A plain map (it never waits) returns the table itself.
            sgt = result if isinstance(result, SgTable) else await result
            self._record(sgt, direction)
        finally:
            lock.release()
        return sgt

    def try_map(self, direction: Direction) -> SgTable:
        """Map without waiting: return a table, or raise :class:`Busy`.

        Never checkpoints. Raises ``Busy`` whenever :meth:`map` would have
        waited: the buffer's lock is held or has waiters, or the exporter could
        only map by waiting. When it returns, the result is the same as
        :meth:`map`'s.

        Raises:
            Busy: A map would have had to wait.
            TypeError: ``direction`` is not a :class:`Direction`.
            InvalidArgument: The attachment is detached or the buffer released.
        """
        direction = check_direction(direction)
        self._check_usable()
        buf = self._buffer
        if buf._lock.contended():
            raise Busy(f"{buf!r} is locked")
        sgt = buf.exporter.try_map(self, direction)
        self._record(sgt, direction)
        return sgt

    def _record(self, sgt: object, direction: Direction) -> None:
        """Check a table the exporter returned and record it as mapped.

        Raises:
            DmaBufError: Not a fresh table of this attachment and direction.
            InvalidArgument: It does not cover the buffer or breaks the
                device's constraints.
        """
        # The hot path of every map: the table's fields are read directly.
        if (
            type(sgt) is not SgTable
            or sgt._attachment is not self
            or sgt._direction is not direction
            or sgt in self._mappings
        ):
            raise DmaBufError(
                f"exporter {self._buffer.exporter.name!r} returned {sgt!r}, "
                f"not a fresh {direction.name} table for {self!r}"
            )
        entries = sgt._entries
        if entries is not self._checked:
            check_entries(entries, self._buffer.size, self._device)
            self._checked = entries
        if self._mappings is _NO_MAPPINGS:
            self._mappings = {}
        self._mappings[sgt] = None

    async def unmap(self, sgt: SgTable) -> None:
        """Unmap a table returned by :meth:`map` or :meth:`try_map`.

        The unmap always completes, even in a cancelled scope: waiting for the
        lock and the exporter's ``unmap`` are shielded. Then, like trio's
        ``aclose()``, it is a checkpoint, where a pending cancellation is
        raised. To undo several things in a cancelled scope, use the ``async
        with`` forms, or a shielded scope.

        Raises:
            TypeError: ``sgt`` is not an :class:`SgTable`.
            InvalidArgument: The table is not mapped (never was, or already
                unmapped), or belongs to another attachment.
        """
        waited = await self._unmap(sgt)
        await self._buffer._lock.finish(waited)

    async def _unmap(self, sgt: SgTable) -> bool:
        """:meth:`unmap` without the final checkpoint (for ``__aexit__``).

        Returns:
            Whether it waited for the lock.
        """
        if not isinstance(sgt, SgTable):
            raise TypeError(f"unmap() needs an SgTable, not {type(sgt).__name__}")
        self._check_mapped(sgt)
        buf = self._buffer
        lock = buf._lock
        waited = await lock.acquire_shielded()
        try:
            self._check_mapped(sgt)
            del self._mappings[sgt]
            await run_undo(buf.exporter.unmap(self, sgt, sgt.direction))
        finally:
            lock.release()
        return waited

    async def _unmap_if_mapped(self, sgt: SgTable) -> None:
        if sgt in self._mappings:
            await self._unmap(sgt)

    def _check_mapped(self, sgt: SgTable) -> None:
        if sgt.attachment is not self:
            raise InvalidArgument(f"{sgt!r} was not mapped by {self!r}")
        if sgt not in self._mappings:
            raise InvalidArgument(f"{sgt!r} is not mapped")

    # -- detach -------------------------------------------------------------------

    async def detach(self) -> None:
        """Detach from the buffer; leftover mappings are unmapped.

        Each leftover mapping is unmapped with a ``ResourceWarning``. Like
        :meth:`unmap`, it completes even in a cancelled scope, then checkpoints.

        Raises:
            InvalidArgument: Already detached.
        """
        waited = await self._detach()
        await self._buffer._lock.finish(waited)

    async def _detach(self) -> bool:
        """:meth:`detach` without the final checkpoint (for ``__aexit__``).

        Returns:
            Whether it waited for the lock.
        """
        if not self._attached:
            raise InvalidArgument(f"{self!r} is already detached")
        buf = self._buffer
        lock = buf._lock
        errors: list[Exception] = []
        waited = await lock.acquire_shielded()
        try:
            if not self._attached:
                raise InvalidArgument(f"{self!r} is already detached")
            leftovers = len(self._mappings)
            await self._detach_locked(errors)
        finally:
            lock.release()
        if leftovers:
            warnings.warn(
                f"{self!r} detached with {leftovers} table(s) still mapped",
                ResourceWarning,
                stacklevel=3,
            )
        if errors:
            raise errors[0]
        return waited

    async def _detach_locked(self, errors: list[Exception]) -> None:
        """Unmap what is left, then detach; the lock is held.

        Every step runs, shielded, even if an earlier one failed; failures go
        to ``errors``.
        """
        exporter = self._buffer.exporter
        for sgt in list(self._mappings):
            del self._mappings[sgt]
            try:
                await run_undo(exporter.unmap(self, sgt, sgt.direction))
            except Exception as exc:
                errors.append(exc)
        self._attached = False
        self._buffer._forget_attachment(self)
        try:
            await run_undo(exporter.detach(self._buffer, self))
        except Exception as exc:
            errors.append(exc)

    def _detach_sync(self, errors: list[Exception]) -> bool:
        """:meth:`_detach_locked` without a loop (garbage collection).

        Returns:
            Whether every op completed.
        """
        exporter = self._buffer.exporter
        done = True
        for sgt in list(self._mappings):
            del self._mappings[sgt]
            try:
                done &= run_undo_sync(exporter.unmap(self, sgt, sgt.direction))
            except Exception as exc:
                errors.append(exc)
        self._attached = False
        self._buffer._forget_attachment(self)
        try:
            done &= run_undo_sync(exporter.detach(self._buffer, self))
        except Exception as exc:
            errors.append(exc)
        return done


async def detach_if_attached(att: Attachment) -> None:
    """The undo of ``async with buf.attach(dev)``."""
    if att.attached:
        await att._detach()


async def _shielded(coro: Coroutine[Any, Any, T]) -> T:
    with anyio.CancelScope(shield=True):
        result = await coro
    return result
