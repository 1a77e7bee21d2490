"""Buffers and attachments: ``struct dma_buf`` and ``struct dma_buf_attachment``.

Every operation that can wait takes the buffer's lock, a FIFO :class:`anyio.Lock`,
and is therefore a checkpoint. State changes happen synchronously while the lock
is held, between awaits, so a cancellation at any await leaves either the old
state or the new one, never something in between.

The undoing operations (``unmap``, ``detach``, ``put``, ``end_cpu_access``)
always finish their work, even in a cancelled scope: waiting for the lock and
the exporter's op are shielded, like the kernel's void functions. Then, like
trio's ``aclose()``, each ends with a checkpoint where a pending cancellation is
raised. The ``async with`` forms nest so that every undo still runs.
"""

from __future__ import annotations

import enum
import os
import pickle
import warnings
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, TypeVar, final

import anyio
import anyio.lowlevel

from . import _fd
from ._backends import task_name
from ._device import Device
from ._errors import Busy, DmaBufError, InvalidArgument
from ._exporter import CpuMode, Exporter
from ._fdkind import FdInfo, classify
from ._lock import FifoLock
from ._resv import Reservation
from ._sgtable import SgTable
from ._shield import run_to_completion
from ._types import Direction
from ._validate import check_cpu_mode, check_direction, check_fd, check_int, check_name

__all__ = ["Attachment", "DmaBuf", "export", "get"]

T = TypeVar("T")
MoveNotify = Callable[["Attachment"], object]


class _State(enum.Enum):
    LIVE = "live"
    RELEASING = "releasing"
    RELEASED = "released"


#: Every buffer not yet released, for bufinfo(): the kernel's db_list.
_live: weakref.WeakSet[DmaBuf] = weakref.WeakSet()
#: Buffers by the identity of their file, for get(fd).
_by_file: weakref.WeakValueDictionary[tuple[int, int], DmaBuf] = (
    weakref.WeakValueDictionary()
)


def live_buffers() -> list[DmaBuf]:
    """Return every buffer of this process that has not been released."""
    return [buf for buf in list(_live) if buf._state is not _State.RELEASED]


def lock_holder(buf: DmaBuf) -> tuple[str | None, int]:
    """Return who holds ``buf``'s lock and how many wait for it (read-only).

    For watchdogs and debugging: the name of the task holding the lock (None
    when it is free) and the number of tasks queued for it.
    """
    owner = buf._lock.owner
    return (None if owner is None else task_name(owner)), buf._lock.waiting


class _Operation(Generic[T]):
    """The result of ``attach()`` / ``map()``: await it, or use it with ``async with``.

    ``await op`` gives the result and leaves its undoing to the caller;
    ``async with op as result`` undoes it on exit (``detach`` / ``unmap``).
    As with trio's ``async with lock``, the block checkpoints on entry; its exit
    completes the undoing without a checkpoint of its own (it waits, shielded,
    only if the buffer's lock is contended), so nested blocks unwind fully
    even in a cancelled scope, and the cancellation surfaces at the next
    checkpoint.
    """

    __slots__ = ("_coro", "_result", "_undo")

    def __init__(
        self,
        coro: Coroutine[Any, Any, T],
        undo: Callable[[T], Awaitable[None]],
    ) -> None:
        self._coro = coro
        self._undo = undo
        self._result: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    async def __aenter__(self) -> T:
        self._result = await self._coro
        return self._result

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        result, self._result = self._result, None
        if result is not None:
            await self._undo(result)


@final
class DmaBuf:
    """A shared buffer: size, exporter, refcount, attachments and a file.

    Made by an exporter through :func:`export` (or an exporter's own
    ``allocate``), shared as an fd with :meth:`fd`, found again with :func:`get`
    and given back with :meth:`put`. The last put releases it.
    """

    __slots__ = (
        "__weakref__",
        "_attachments",
        "_cpu_access",
        "_exported_fd",
        "_exporter",
        "_file",
        "_file_key",
        "_lock",
        "_name",
        "_refcount",
        "_resv",
        "_size",
        "_state",
        "priv",
    )

    def __init__(
        self, exporter: Exporter, size: int, priv: object, name: str | None
    ) -> None:
        self._exporter = exporter
        self._size = size
        #: The exporter's state for this buffer (the kernel's ``dmabuf->priv``).
        self.priv: Any = priv
        self._name = name
        self._refcount = 1
        self._state = _State.LIVE
        self._lock = FifoLock()
        self._attachments: list[Attachment] = []
        self._cpu_access: dict[str, int] = {}
        self._file: int | None = None
        self._exported_fd = False
        self._file_key: tuple[int, int] | None = None
        self._resv: Reservation | None = None

    # -- identity ---------------------------------------------------------------

    @property
    def size(self) -> int:
        """The size in bytes, fixed at export."""
        return self._size

    @property
    def name(self) -> str | None:
        """The name given at export or by :meth:`set_name`, or None."""
        return self._name

    @property
    def exporter(self) -> Exporter:
        """The exporter whose ops serve this buffer."""
        return self._exporter

    @property
    def refcount(self) -> int:
        """How many gets (including the export) have not been put yet."""
        return self._refcount

    @property
    def released(self) -> bool:
        """True once the last put has released the buffer."""
        return self._state is _State.RELEASED

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        """The live attachments, oldest first: who is using this buffer."""
        return tuple(self._attachments)

    @property
    def inode(self) -> int:
        """The inode number of the buffer's file, as the kernel's bufinfo shows.

        Raises:
            InvalidArgument: The buffer has been released.
        """
        self._check_live()
        self._ensure_file()
        assert self._file_key is not None
        return self._file_key[1]

    @property
    def resv(self) -> Reservation:
        """The buffer's reservation object: its fences, for implicit sync.

        Made on first use, so buffers that never see a fence pay nothing.
        """
        if self._resv is None:
            self._resv = Reservation()
        return self._resv

    def export_sync_fd(self, mode: CpuMode) -> int:
        """Return one fd for the fences CPU access in ``mode`` would wait for.

        Like ``DMA_BUF_IOCTL_EXPORT_SYNC_FILE``: ``"r"`` gives the fences a
        reader waits for (``WRITE`` and stronger), ``"w"``/``"rw"`` a writer's
        (``READ`` and stronger). A snapshot: fences added later do not make it
        busy; with nothing pending it is readable at once. The caller owns it.

        Raises:
            InvalidArgument: A bad mode, or the buffer has been released.
        """
        self._check_live()
        return self.resv.export_sync_fd(mode)

    def import_sync_fd(self, fd: int, mode: CpuMode) -> None:
        """Add the fence behind ``fd`` to the buffer, like ``IMPORT_SYNC_FILE``.

        ``"r"`` adds it as a ``READ`` fence (writers wait, readers do not);
        ``"w"``/``"rw"`` as a ``WRITE`` fence (both wait). The fd stays the
        caller's.

        Raises:
            InvalidArgument: A bad mode, a bad fd, or the buffer has been released.
        """
        self._check_live()
        self.resv.import_sync_fd(fd, mode)

    @property
    def exposed(self) -> bool:
        """True once an fd of the buffer has been handed out (:meth:`fd`, a share).

        Whoever holds such an fd can reach the bytes for as long as it stays
        open, beyond the buffer's refcount: a pool never reuses such a buffer.
        """
        return self._exported_fd

    @property
    def cpu_access_open(self) -> bool:
        """True while a :meth:`begin_cpu_access` has no matching end."""
        return bool(self._cpu_access)

    @property
    def shared(self) -> bool:
        """True once the buffer has a file (after :meth:`fd` or :attr:`inode`)."""
        return self._file is not None

    def set_name(self, name: str | None) -> None:
        """Rename the buffer, like ``DMA_BUF_SET_NAME``.

        Raises:
            TypeError: ``name`` is not a str or None.
            InvalidArgument: It is longer than 32 bytes of UTF-8, or the
                buffer has been released.
        """
        self._check_live()
        self._name = check_name(name)

    def __repr__(self) -> str:
        name = f" {self._name!r}" if self._name else ""
        return (
            f"<DmaBuf{name} {self._size} bytes, exporter={self._exporter.name!r}, "
            f"refcount={self._refcount}, {self._state.value}>"
        )

    # -- files ------------------------------------------------------------------

    def _check_live(self) -> None:
        if self._state is not _State.LIVE:
            raise InvalidArgument(f"{self!r} has been released")

    def _adopt_file(self, fd: int) -> None:
        dev, ino, _ = _fd.file_identity(fd)
        if (dev, ino) in _by_file:
            raise InvalidArgument(f"fd {fd} already belongs to a buffer")
        self._file = fd
        self._file_key = (dev, ino)
        _by_file[(dev, ino)] = self

    def _ensure_file(self) -> int:
        if self._file is None:
            # Exporters without memory of their own still need a file to travel
            # as: an empty sealed memfd, which no importer can mistake for bytes.
            fd = _fd.sealed_memfd(self._name or "dmabuf", 0)
            try:
                self._adopt_file(fd)
            except BaseException:
                os.close(fd)
                raise
        assert self._file is not None
        return self._file

    def fd(self) -> int:
        """Return a new OS fd for the buffer's file (``O_CLOEXEC``).

        Each call returns a new fd, which the caller owns and must close. The
        fd does not hold a reference: :func:`get` turns it back into the buffer
        (taking one) for as long as the buffer lives.

        Raises:
            InvalidArgument: The buffer has been released.
        """
        self._check_live()
        fd = _fd.dup_cloexec(self._ensure_file())
        self._exported_fd = True
        return fd

    def _close_file(self) -> None:
        fd, self._file = self._file, None
        key, self._file_key = self._file_key, None
        if key is not None and _by_file.get(key) is self:
            del _by_file[key]
        if fd is not None:
            os.close(fd)

    # -- the lock -----------------------------------------------------------------

    async def _wait_shielded(self) -> None:
        """Queue for the lock whatever happens: for undo ops, which must complete.

        Callers first try ``self._lock.acquire_nowait()``, which costs nothing.
        """
        await self._lock.wait_turn(shielded=True)

    # -- refcount ---------------------------------------------------------------

    def _get(self) -> DmaBuf:
        self._check_live()
        self._refcount += 1
        return self

    async def put(self) -> None:
        """Drop one reference; the last one releases the buffer.

        The release detaches whatever is still attached (each with a
        ``ResourceWarning``), then awaits the exporter's ``release``. It runs
        shielded and always completes, even in a cancelled scope.

        Raises:
            InvalidArgument: The buffer has already been released.
        """
        self._check_live()
        self._refcount -= 1
        if self._refcount:
            await self._lock.checkpoint()
            return
        self._state = _State.RELEASING
        _live.discard(self)
        leftovers = [att.device.name for att in self._attachments]
        errors: list[BaseException] = []
        if not self._lock.acquire_nowait():
            await self._wait_shielded()
        try:
            await run_to_completion(self._release_locked(errors))
        finally:
            self._state = _State.RELEASED
            self._close_file()
            self._lock.release()
        if leftovers:
            warnings.warn(
                f"{self!r} released while still attached to {', '.join(leftovers)}",
                ResourceWarning,
                stacklevel=2,
            )
        if errors:
            raise errors[0]
        await self._lock.checkpoint()

    async def _release_locked(self, errors: list[BaseException]) -> None:
        for att in list(self._attachments):
            await att._detach_locked(errors)
        try:
            await self._exporter.release(self)
        except Exception as exc:
            errors.append(exc)

    async def aclose(self) -> None:
        """Same as :meth:`put`."""
        await self.put()

    async def __aenter__(self) -> DmaBuf:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.put()

    def __del__(self) -> None:
        if getattr(self, "_state", _State.RELEASED) is _State.RELEASED:
            return
        fd, self._file = self._file, None
        if fd is not None:
            os.close(fd)
        warnings.warn(
            f"{self!r} was garbage-collected without its last put",
            ResourceWarning,
            source=self,
            stacklevel=1,
        )

    # -- attachments --------------------------------------------------------------

    def attach(
        self, device: Device, *, move_notify: MoveNotify | None = None
    ) -> _Operation[Attachment]:
        """Attach ``device`` to this buffer.

        ``await buf.attach(dev)`` returns the :class:`Attachment`;
        ``async with buf.attach(dev) as att:`` also detaches it on exit. Giving
        ``move_notify`` makes the attachment dynamic: the exporter may move the
        backing while nothing is mapped, calling ``move_notify(attachment)`` first.

        Raises:
            TypeError: ``device`` is not a :class:`Device`, or ``move_notify``
                is not callable.
            InvalidArgument: The buffer has been released.
            Busy: The exporter cannot serve this device; nothing is recorded.
        """
        if not isinstance(device, Device):
            raise TypeError(f"attach() needs a Device, not {type(device).__name__}")
        if move_notify is not None and not callable(move_notify):
            raise TypeError("move_notify must be callable")
        self._check_live()
        return _Operation(self._attach(device, move_notify), _detach_if_attached)

    async def _attach(
        self, device: Device, move_notify: MoveNotify | None
    ) -> Attachment:
        await self._lock.acquire()
        try:
            self._check_live()
            att = Attachment(self, device, move_notify)
            await self._exporter.attach(self, att)
            att._attached = True
            self._attachments.append(att)
        finally:
            self._lock.release()
        return att

    # -- CPU access ---------------------------------------------------------------

    def cpu_access(self, mode: CpuMode = "rw") -> _CpuAccess:
        """Return an async context manager giving a view of the bytes.

        ``"r"`` gives a read-only view, ``"w"`` and ``"rw"`` a writable one.
        The view is released on exit; if something still exports it (a numpy
        array made from it, say), exit raises ``BufferError``.

        Raises:
            InvalidArgument: ``mode`` is not one of ``"r"``, ``"w"``, ``"rw"``,
                the buffer has been released, or the exporter has no CPU mapping.
        """
        check_cpu_mode(mode)
        self._check_live()
        return _CpuAccess(self, mode)

    async def begin_cpu_access(self, mode: CpuMode) -> None:
        """Prepare the bytes for CPU access in ``mode`` (a checkpoint).

        First waits for the fences that access must wait for (implicit sync: a
        reader for ``WRITE`` fences, a writer for ``READ`` fences too), without
        holding the buffer's lock, then calls the exporter's hook under it.

        Raises:
            InvalidArgument: A bad mode, or the buffer has been released.
        """
        check_cpu_mode(mode)
        self._check_live()
        while True:
            resv = self._resv
            if resv is not None and not resv.test_for_cpu(mode):
                await resv.wait_for_cpu(mode)
            await self._lock.acquire()
            if resv is None or resv.test_for_cpu(mode):
                break
            self._lock.release()  # a fence came while we queued: wait again
        try:
            self._check_live()
            await self._exporter.begin_cpu_access(self, mode)
            self._cpu_access[mode] = self._cpu_access.get(mode, 0) + 1
        finally:
            self._lock.release()

    async def end_cpu_access(self, mode: CpuMode) -> None:
        """End CPU access begun with :meth:`begin_cpu_access`.

        Completes even in a cancelled scope, then checkpoints (see
        :meth:`Attachment.unmap`).

        Raises:
            InvalidArgument: A bad mode, or no matching ``begin_cpu_access``.
        """
        await self._end_cpu_access(mode)
        await self._lock.checkpoint()

    async def _end_cpu_access(self, mode: CpuMode) -> None:
        """:meth:`end_cpu_access` without the final checkpoint (for ``__aexit__``)."""
        check_cpu_mode(mode)
        if not self._cpu_access.get(mode):
            raise InvalidArgument(f"end_cpu_access({mode!r}) without begin_cpu_access")
        if not self._lock.acquire_nowait():
            await self._wait_shielded()
        try:
            count = self._cpu_access.get(mode, 0)
            if not count:
                raise InvalidArgument(
                    f"end_cpu_access({mode!r}) without begin_cpu_access"
                )
            if count == 1:
                del self._cpu_access[mode]
            else:
                self._cpu_access[mode] = count - 1
            await run_to_completion(self._exporter.end_cpu_access(self, mode))
        finally:
            self._lock.release()


@final
class _CpuAccess:
    """``async with buf.cpu_access(mode) as view``: begin, a view, end.

    The view handed out is a re-export (through :class:`pickle.PickleBuffer`)
    of a view private to this access, so that on exit the private view can
    tell whether anything derived from the handed-out one (a numpy array, a
    ctypes object) still holds the memory: then exit raises ``BufferError``.
    """

    __slots__ = ("_base", "_buf", "_mode", "_view")

    def __init__(self, buf: DmaBuf, mode: CpuMode) -> None:
        self._buf = buf
        self._mode = mode
        self._base: memoryview | None = None
        self._view: memoryview | None = None

    async def __aenter__(self) -> memoryview:
        buf = self._buf
        await buf.begin_cpu_access(self._mode)
        try:
            base = buf._exporter.vmap(buf)
            if self._mode == "r":
                readonly = base.toreadonly()
                base.release()
                base = readonly
            view = memoryview(pickle.PickleBuffer(base))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await buf.end_cpu_access(self._mode)
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
        try:
            if view is not None:
                view.release()
            if base is not None:
                base.release()  # BufferError while anything still holds it
        finally:
            # Like trio's ``async with lock``, the block's checkpoint was at entry:
            # the exit ends the access (waiting, shielded, only if contended).
            await self._buf._end_cpu_access(self._mode)


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
        "_checked_entries",
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
        self._mappings: dict[SgTable, None] = {}
        self._attached = False
        #: The last entries tuple SgTable checked for this attachment.
        self._checked_entries: object = None

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

    # -- map ----------------------------------------------------------------------

    def map(
        self, direction: Direction, *, interruptible: bool = True
    ) -> _Operation[SgTable]:
        """Map the buffer for this device.

        ``await att.map(d)`` returns the :class:`SgTable`; ``async with
        att.map(d) as sgt:`` also unmaps it on exit. Always a checkpoint: takes
        the buffer's lock (waiters are served first come, first served), then
        awaits the exporter, which may allocate backing first. Cancelled while
        waiting, it leaves nothing behind and may simply be retried; with
        ``interruptible=False`` the wait is shielded from cancellation.

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
        return _Operation(coro, self._unmap_if_mapped)

    async def _map(self, direction: Direction) -> SgTable:
        buf = self._buffer
        await buf._lock.acquire()
        try:
            self._check_usable()
            sgt = await buf._exporter.map(self, direction)
            self._record(sgt, direction)
        finally:
            buf._lock.release()
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
        sgt = buf._exporter.try_map(self, direction)
        self._record(sgt, direction)
        return sgt

    def _record(self, sgt: object, direction: Direction) -> None:
        if (
            type(sgt) is not SgTable
            or sgt._attachment is not self
            or sgt._direction is not direction
            or not sgt._valid
            or sgt in self._mappings
        ):
            raise DmaBufError(
                f"exporter {self._buffer._exporter.name!r} returned {sgt!r}, "
                f"not a fresh {direction.name} table for {self!r}"
            )
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
            InvalidArgument: The table is already unmapped, or belongs to
                another attachment.
        """
        await self._unmap(sgt)
        await self._buffer._lock.checkpoint()

    async def _unmap(self, sgt: SgTable) -> None:
        """:meth:`unmap` without the final checkpoint (for ``__aexit__``)."""
        if not isinstance(sgt, SgTable):
            raise TypeError(f"unmap() needs an SgTable, not {type(sgt).__name__}")
        self._check_mapped(sgt)
        buf = self._buffer
        if not buf._lock.acquire_nowait():
            await buf._wait_shielded()
        try:
            self._check_mapped(sgt)
            self._forget(sgt)
            await run_to_completion(buf._exporter.unmap(self, sgt, sgt._direction))
        finally:
            buf._lock.release()

    async def _unmap_if_mapped(self, sgt: SgTable) -> None:
        if sgt._valid:
            await self._unmap(sgt)

    def _check_mapped(self, sgt: SgTable) -> None:
        if sgt._attachment is not self:
            raise InvalidArgument(f"{sgt!r} was not mapped by {self!r}")
        if not sgt._valid:
            raise InvalidArgument(f"{sgt!r} is not mapped")

    def _forget(self, sgt: SgTable) -> None:
        sgt._valid = False
        del self._mappings[sgt]

    # -- detach -------------------------------------------------------------------

    async def detach(self) -> None:
        """Detach from the buffer; leftover mappings are unmapped.

        Each leftover mapping is unmapped with a ``ResourceWarning``. Like
        :meth:`unmap`, it completes even in a cancelled scope, then checkpoints.

        Raises:
            InvalidArgument: Already detached.
        """
        await self._detach()
        await self._buffer._lock.checkpoint()

    async def _detach(self) -> None:
        """:meth:`detach` without the final checkpoint (for ``__aexit__``)."""
        if not self._attached:
            raise InvalidArgument(f"{self!r} is already detached")
        buf = self._buffer
        errors: list[BaseException] = []
        if not buf._lock.acquire_nowait():
            await buf._wait_shielded()
        try:
            if not self._attached:
                raise InvalidArgument(f"{self!r} is already detached")
            leftovers = len(self._mappings)
            await run_to_completion(self._detach_locked(errors))
        finally:
            buf._lock.release()
        if leftovers:
            warnings.warn(
                f"{self!r} detached with {leftovers} table(s) still mapped",
                ResourceWarning,
                stacklevel=3,
            )
        if errors:
            raise errors[0]

    async def _detach_locked(self, errors: list[BaseException]) -> None:
        """Unmap what is left, then detach; the lock is held, cancellation shielded.

        Every step runs even if an earlier one failed; failures go to ``errors``.
        """
        exporter = self._buffer._exporter
        for sgt in list(self._mappings):
            self._forget(sgt)
            try:
                await exporter.unmap(self, sgt, sgt._direction)
            except Exception as exc:
                errors.append(exc)
        self._attached = False
        self._buffer._attachments.remove(self)
        try:
            await exporter.detach(self._buffer, self)
        except Exception as exc:
            errors.append(exc)


async def _detach_if_attached(att: Attachment) -> None:
    if att._attached:
        await att._detach()


async def _shielded(coro: Coroutine[Any, Any, T]) -> T:
    with anyio.CancelScope(shield=True):
        result = await coro
    return result


def export(
    exporter: Exporter,
    size: int,
    priv: object = None,
    name: str | None = None,
    *,
    fd: int | None = None,
) -> DmaBuf:
    """Create a buffer served by ``exporter``, with refcount 1 (for exporter authors).

    Args:
        exporter: Whose ops serve the buffer.
        size: Its size in bytes, a positive int.
        priv: The exporter's state, kept as ``buf.priv``.
        name: A name of at most 32 bytes of UTF-8.
        fd: A file the buffer takes ownership of and shares as (a sealed memfd
            holding its bytes, say). Without one, an empty memfd is made the first
            time the buffer needs a file.

    Raises:
        TypeError: ``exporter`` is not an :class:`Exporter`, or an argument has
            the wrong type.
        InvalidArgument: ``size`` is not positive, ``name`` is too long, or
            ``fd`` already belongs to a buffer.
        BadFileDescriptor: ``fd`` is not open.
    """
    if not isinstance(exporter, Exporter):
        raise TypeError(f"export() needs an Exporter, not {type(exporter).__name__}")
    check_int(size, "size")
    buf = DmaBuf(exporter, size, priv, check_name(name))
    if fd is not None:
        try:
            buf._adopt_file(check_fd(fd))
        except BaseException:
            buf._state = _State.RELEASED  # never handed out: no warning
            raise
    _live.add(buf)
    return buf


def get(fd: int) -> DmaBuf:
    """Return the buffer behind ``fd``, taking a reference (refcount + 1).

    Any fd of the buffer's open file works: one from :meth:`DmaBuf.fd`, a
    ``dup()`` of it, one received from another process. Shareable memory from
    elsewhere (a memfd, a kernel dma-buf) is imported as a new buffer served by
    the built-in importer; getting it again gives the same buffer. The fd stays
    the caller's.

    Raises:
        TypeError: ``fd`` is not an int.
        BadFileDescriptor: ``fd`` is not open.
        InvalidArgument: ``fd`` is open but not shareable memory (a pipe, a
            socket, a directory, an empty memfd), or its buffer is being released.
    """
    return get_classified(fd, classify(fd))


def get_classified(fd: int, info: FdInfo) -> DmaBuf:
    """:func:`get` of an fd already classified (``info`` is ``classify(fd)``)."""
    buf = _by_file.get(info.key)
    if buf is not None and buf._state is not _State.RELEASED:
        return buf._get()
    from ._import import import_fd  # the built-in importer (it imports this module)

    return import_fd(fd, info)
