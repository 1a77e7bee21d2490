"""Attachments: ``struct dma_buf_attachment``, one device's use of one buffer.

An attachment maps the buffer for its device (:meth:`Attachment.map`, which
waits, or :meth:`Attachment.try_map`, which never does), keeps the tables it
mapped, checks every table its exporter returns (once per cached layout), and
unmaps and detaches. Every operation takes the buffer's lock; state changes
happen synchronously while it is held, between awaits, so a cancellation at
any await leaves either the old state or the new one.

The common case is fast: when the lock is free and the exporter's op is a
plain function (it never waits), the op runs inline, between the operation's
one checkpoint and its return. Nothing can run in between, so holding the
lock there would exclude nobody; the lock is taken before the first await
that could let another task in (a queue, or an op that is a coroutine).
"""

from __future__ import annotations

import warnings
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, final

import anyio

from ._backends import ASYNCIO_CHECKPOINT
from ._device import Device
from ._errors import Busy, DmaBufError, InvalidArgument
from ._operation import BARE_YIELD, BareYield, Operation, Prelude
from ._sgtable import SgEntry, SgTable, check_entries
from ._types import Direction
from ._undo import run_undo, run_undo_sync
from ._validate import check_direction

if TYPE_CHECKING:
    from ._buffer import DmaBuf

__all__ = ["Attachment", "MoveNotify"]

T = TypeVar("T")
#: What an attachment has mapped: nothing, one table, or (two or more, ever)
#: an insertion-ordered dict of them. One table needs no container at all.
_Mapped = SgTable | dict[SgTable, None] | None
MoveNotify = Callable[["Attachment"], object]


@final
class _Queued:
    """What :meth:`Attachment._unmap_now` returns when the lock is contended."""

    __slots__ = ()


_QUEUED = _Queued()


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
        "_mapped",
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
        self._mapped: _Mapped = None  # see _Mapped
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
        mapped = self._mapped
        if mapped is None:
            return ()
        if type(mapped) is SgTable:
            return (mapped,)
        return tuple(mapped)

    def is_mapped(self, sgt: SgTable) -> bool:
        """Return whether ``sgt`` is one of this attachment's live mappings."""
        mapped = self._mapped
        return mapped is sgt or (type(mapped) is dict and sgt in mapped)

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
            f"{len(self.mappings)} mapped, {state}>"
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
        if type(direction) is not Direction:
            direction = check_direction(direction)
        if not self._attached:  # a released buffer has detached it too
            self._check_usable()  # raises
        if not interruptible:
            return Operation(_shielded(self._map(direction)), unmap_if_mapped)
        # Deferred: a free lock's checkpoint is passed before _map starts.
        return Operation(
            None, unmap_if_mapped, Attachment._map, _map_prelude, self, direction
        )

    async def _map(self, direction: Direction, checkpointed: bool = False) -> SgTable:
        """Map; with ``checkpointed``, a checkpoint has just been passed."""
        buf = self._buffer
        lock = buf._lock
        held = lock.contended()
        if not held and not checkpointed:
            await lock.checkpoint()
            held = lock.contended()  # another task may have taken it meanwhile
        if held:
            await lock.wait_turn()  # the wait is the checkpoint: none before it
        try:
            if not self._attached:
                self._check_usable()  # raises
            buf._check_live()
            sgt = buf._exporter.map(self, direction)
            if type(sgt) is not SgTable:  # a coroutine: it may let others in
                if not held:
                    held = lock.acquire_nowait()  # free: nothing ran since
                    assert held, "the exporter's map took the buffer's lock"
                sgt = await sgt
            self._record(sgt, direction)
        finally:
            if held:
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
        if type(direction) is not Direction:
            direction = check_direction(direction)
        buf = self._buffer
        if not self._attached:
            self._check_usable()  # raises
        buf._check_live()
        if buf._lock.contended():
            raise Busy(f"{buf!r} is locked")
        sgt = buf._exporter.try_map(self, direction)
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
        mapped = self._mapped
        if (
            type(sgt) is not SgTable
            or sgt._attachment is not self
            or sgt._direction is not direction
            or mapped is sgt
            or (type(mapped) is dict and sgt in mapped)
        ):
            raise DmaBufError(
                f"exporter {self._buffer.exporter.name!r} returned {sgt!r}, "
                f"not a fresh {direction.name} table for {self!r}"
            )
        entries = sgt._entries
        checked = self._checked
        if entries is not checked:
            if not _same_entries(entries, checked):
                check_entries(entries, self._buffer.size, self._device)
            self._checked = entries
        if mapped is None:
            self._mapped = sgt
        elif type(mapped) is SgTable:
            self._mapped = {mapped: None, sgt: None}
        else:
            mapped[sgt] = None

    def _forget(self, sgt: SgTable) -> None:
        """Drop ``sgt`` from the live mappings (it is one)."""
        mapped = self._mapped
        if mapped is sgt:
            self._mapped = None
        else:
            assert type(mapped) is dict
            del mapped[sgt]

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
        lock = self._buffer._lock
        result = self._unmap_now(sgt)
        if result is None:
            await lock.checkpoint()
        elif type(result) is _Queued:  # _unmap_queued inline: the contended hot path
            await lock.wait_turn(shielded=True)
            try:
                result = self._unmap_checked(sgt)
                if result is not None:
                    await run_undo(result)
            finally:
                lock.release()
            await lock.checkpoint_if_cancelled()  # it waited: others ran
        else:
            await lock.finish(await self._unmap_async(result))

    def _unmap(self, sgt: SgTable) -> Awaitable[bool] | None:
        """:meth:`unmap` without the final checkpoint (also for ``__aexit__``).

        Returns:
            None when it is done already (the lock was free and the exporter's
            ``unmap`` plain); otherwise what completes it, which returns
            whether it waited for the lock.
        """
        result = self._unmap_now(sgt)
        if result is None:
            return None
        if type(result) is _Queued:
            return self._unmap_queued(sgt)
        return self._unmap_async(result)

    def _unmap_now(self, sgt: SgTable) -> Awaitable[None] | _Queued | None:
        """Check ``sgt``; unmap it now unless the lock is contended.

        Returns:
            ``_QUEUED`` when the lock is contended (nothing done yet); else
            what the exporter's ``unmap`` returned (None: done).
        """
        if type(sgt) is not SgTable:
            raise TypeError(f"unmap() needs an SgTable, not {type(sgt).__name__}")
        buf = self._buffer
        if buf._lock.contended():
            mapped = self._mapped  # checked now, and again once it is our turn
            if mapped is not sgt and not (type(mapped) is dict and sgt in mapped):
                self._check_mapped(sgt)  # raises
            return _QUEUED
        if self._mapped is sgt:  # _unmap_checked's common case, inline
            self._mapped = None
            return buf._exporter.unmap(self, sgt, sgt._direction)
        return self._unmap_checked(sgt)

    def _unmap_checked(self, sgt: SgTable) -> Awaitable[None] | None:
        """Check that ``sgt`` is mapped, forget it, call the exporter's ``unmap``.

        Raises:
            InvalidArgument: ``sgt`` is not one of this attachment's mappings.
        """
        mapped = self._mapped
        if mapped is sgt:  # the common case of one table
            self._mapped = None
        elif type(mapped) is dict and sgt in mapped:
            del mapped[sgt]
        else:
            self._check_mapped(sgt)  # raises
        return self._buffer._exporter.unmap(self, sgt, sgt._direction)

    async def _unmap_async(self, result: Awaitable[None]) -> bool:
        """Complete an exporter's ``unmap`` that is a coroutine, holding the lock.

        Returns:
            Whether it waited for the lock (it is free unless the exporter's
            call took it).
        """
        lock = self._buffer._lock
        waited = await lock.acquire_shielded()
        try:
            await run_undo(result)
        finally:
            lock.release()
        return waited

    async def _unmap_queued(self, sgt: SgTable) -> bool:
        """Unmap once the contended lock is this task's (shielded wait)."""
        lock = self._buffer._lock
        await lock.wait_turn(shielded=True)
        try:
            result = self._unmap_checked(sgt)  # another task may have unmapped it
            if result is not None:
                await run_undo(result)
        finally:
            lock.release()
        return True

    def _check_mapped(self, sgt: SgTable) -> None:
        if sgt._attachment is not self:
            raise InvalidArgument(f"{sgt!r} was not mapped by {self!r}")
        if not self.is_mapped(sgt):
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
            leftovers = len(self.mappings)
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
        for sgt in self.mappings:
            self._forget(sgt)
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
        for sgt in self.mappings:
            self._forget(sgt)
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


def _same_entries(
    entries: tuple[SgEntry, ...], checked: tuple[SgEntry, ...] | None
) -> bool:
    """Whether ``entries`` equal the entries checked last, entry for entry.

    An exporter that builds a fresh table of the same layout on every map
    then pays for one comparison, not for the whole check.
    """
    if entries != checked:
        return False
    for entry in entries:  # noqa: SIM110 (a loop is faster than all() here)
        if type(entry) is not SgEntry:  # a plain tuple compares equal too
            return False
    return True


def _map_prelude(att: Attachment) -> Prelude | BareYield | None:
    """What a map passes before it starts: a free lock's checkpoint, or nothing.

    A contended lock is queued for at once instead (the wait is the
    checkpoint).
    """
    lock = att._buffer._lock
    if lock.contended():
        return None
    checkpoint = lock.checkpoint
    if checkpoint is ASYNCIO_CHECKPOINT:
        return BARE_YIELD
    return checkpoint()  # type: ignore[return-value]  # trio's: a coroutine


def unmap_if_mapped(sgt: SgTable) -> Awaitable[object] | None:
    """The undo of ``async with att.map(d)``; None when done without waiting."""
    att = sgt._attachment
    return att._unmap(sgt) if att.is_mapped(sgt) else None


async def detach_if_attached(att: Attachment) -> None:
    """The undo of ``async with buf.attach(dev)``."""
    if att.attached:
        await att._detach()


async def _shielded(coro: Coroutine[Any, Any, T]) -> T:
    with anyio.CancelScope(shield=True):
        result = await coro
    return result
