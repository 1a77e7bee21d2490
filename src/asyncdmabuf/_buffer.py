"""Buffers: ``struct dma_buf``, its file, its refcount and its lock.

Every operation that can wait takes the buffer's lock, a FIFO lock, and is
therefore a checkpoint. State changes happen synchronously while the lock is
held, between awaits, so a cancellation at any await leaves either the old
state or the new one, never something in between. Attachments live in
``_attachment.py``, CPU access in ``_cpu_access.py``.

The undoing operations (``unmap``, ``detach``, ``put``, ``end_cpu_access``)
always finish their work, even in a cancelled scope: waiting for the lock and
the exporter's op are shielded, like the kernel's void functions. Then, like
trio's ``aclose()``, each ends with a checkpoint where a pending cancellation is
raised. The ``async with`` forms nest so that every undo still runs.
"""

from __future__ import annotations

import os
import warnings
import weakref
from types import TracebackType
from typing import Any, final

from . import _cpu_access, _fd
from ._attachment import Attachment, MoveNotify, detach_if_attached
from ._device import Device
from ._errors import DmaBufError, InvalidArgument
from ._exporter import Exporter
from ._fdkind import FdInfo, classify
from ._lock import FifoLock, LockStatistics
from ._operation import Operation
from ._resv import Reservation
from ._types import CpuMode
from ._undo import complete as complete_op
from ._undo import run_undo, run_undo_sync
from ._validate import CPU_MODES, check_cpu_mode, check_fd, check_int, check_name

__all__ = ["DmaBuf", "export", "get"]


#: A buffer's ``_refcount`` is also its state: at least 1 while it lives, 0
#: while its last put releases it, then this (one slot less per buffer).
_RELEASED = -1


#: Buffers by the identity of their file (:func:`_file_key`), for get(fd). Each
#: entry is removed when its buffer's file is closed, at the last put or at
#: garbage collection, so plain references do (a WeakValueDictionary's keyed
#: ones cost more), and a dead one is an entry not yet removed.
_by_file: dict[int, weakref.ref[DmaBuf]] = {}
#: Buffers made without a file (until they need one). With ``_by_file``, every
#: buffer not yet released, for bufinfo(): the kernel's db_list. One registry
#: entry per buffer, not two: the registries are most of a buffer's cost.
_fileless: weakref.WeakSet[DmaBuf] = weakref.WeakSet()


def _file_key(dev: int, ino: int) -> int:
    """Return one int for a file's identity (a ``(dev, ino)`` tuple costs more)."""
    return dev << 64 | ino


def _registered(key: int) -> DmaBuf | None:
    """Return the live buffer whose file is ``key``, if there is one."""
    ref = _by_file.get(key)
    return None if ref is None else ref()


def live_buffers() -> list[DmaBuf]:
    """Return every buffer of this process that has not been released."""
    seen = {id(buf): buf for ref in list(_by_file.values()) if (buf := ref())}
    seen.update((id(buf), buf) for buf in list(_fileless))
    return [buf for buf in seen.values() if not buf.released]


def lock_holder(buf: DmaBuf) -> tuple[str | None, int]:
    """Return who holds ``buf``'s lock and how many wait for it (read-only).

    For watchdogs and debugging: the name of the task holding the lock (None
    when it is free) and the number of tasks queued for it.
    """
    stats = buf._lock.statistics()
    return stats.owner, stats.tasks_waiting


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
        "_cpu",
        "_exported_fd",
        "_exporter",
        "_file",
        "_lock",
        "_name",
        "_refcount",
        "_resv",
        "_size",
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
        self._refcount = 1  # and the state: see _RELEASED
        self._lock = FifoLock()
        self._attachments: list[Attachment] | None = None  # made on first attach
        self._cpu = _cpu_access.NO_CPU  # its own at the first CPU access
        self._file: int | None = None
        self._exported_fd = False
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
        return max(self._refcount, 0)

    @property
    def released(self) -> bool:
        """True once the last put has released the buffer."""
        return self._refcount == _RELEASED

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        """The live attachments, oldest first: who is using this buffer."""
        return tuple(self._attachments) if self._attachments else ()

    @property
    def inode(self) -> int:
        """The inode number of the buffer's file, as the kernel's bufinfo shows.

        Raises:
            InvalidArgument: The buffer has been released.
        """
        self._check_live()
        return _fd.file_identity(self._ensure_file())[1]

    @property
    def resv(self) -> Reservation:
        """The buffer's reservation object: its fences, for implicit sync.

        Made on first use, so buffers that never see a fence pay nothing.
        """
        if self._resv is None:
            self._resv = Reservation()
        return self._resv

    def _cpu_state(self) -> _cpu_access.CpuState:
        """Return the buffer's own CPU access state, made at its first access."""
        cpu = self._cpu
        if cpu is _cpu_access.NO_CPU:
            cpu = self._cpu = _cpu_access.CpuState()
        return cpu

    def pending_resv(self) -> Reservation | None:
        """Return the reservation if one was ever made (None: no fence ever)."""
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

    def lock_statistics(self) -> LockStatistics:
        """Return a frozen snapshot of the buffer's lock: locked, owner, waiting."""
        return self._lock.statistics()

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
        return bool(self._cpu)

    @property
    def cpu_access_modes(self) -> tuple[str, ...]:
        """The modes of the CPU accesses open now, each as often as it is open."""
        return self._cpu.modes()

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
            f"refcount={self.refcount}, {self._state_name()}>"
        )

    # -- files ------------------------------------------------------------------

    def _state_name(self) -> str:
        count = self._refcount
        return "live" if count > 0 else "releasing" if count == 0 else "released"

    def _check_live(self) -> None:
        if self._refcount <= 0:
            raise InvalidArgument(f"{self!r} has been released")

    def _adopt_file(self, fd: int) -> None:
        dev, ino, _ = _fd.file_identity(fd)
        key = _file_key(dev, ino)
        if _registered(key) is not None:
            raise InvalidArgument(f"fd {fd} already belongs to a buffer")
        self._file = fd
        _by_file[key] = weakref.ref(self)

    def _ensure_file(self) -> int:
        if self._file is None:
            # Exporters without memory of their own still need a file to travel
            # as: an empty sealed memfd, which no importer can mistake for bytes.
            fd = _fd.sealed_memfd(self._name or "", 0, exporter=self._exporter.name)
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
        if fd is None:
            return
        # The key is asked of the file again rather than kept (a slot less
        # per buffer); a dead reference under it is ours, at collection.
        try:
            dev, ino, _ = _fd.file_identity(fd)
        except DmaBufError:  # the fd was closed behind our back
            dev = ino = -1
        key = _file_key(dev, ino)
        owner = _registered(key)
        if owner is self or (owner is None and key in _by_file):
            del _by_file[key]
        else:  # not found by its file: look for it
            for key, ref in list(_by_file.items()):
                if ref() is self:
                    del _by_file[key]
        os.close(fd)

    # -- refcount ---------------------------------------------------------------

    def _get(self) -> DmaBuf:
        self._check_live()
        self._refcount += 1
        return self

    async def put(self) -> None:
        """Drop one reference; the last one releases the buffer.

        The release ends open CPU accesses, detaches whatever is still attached
        (each with a ``ResourceWarning``), then runs the exporter's
        ``release``. It runs shielded and always completes, even in a cancelled
        scope; then it checkpoints.

        Raises:
            InvalidArgument: The buffer has already been released.
        """
        self._check_live()
        self._refcount -= 1
        lock = self._lock
        if self._refcount:
            await lock.checkpoint()
            return
        _fileless.discard(self)  # releasing: the refcount is 0
        leftovers = [att.device.name for att in self.attachments]
        errors: list[Exception] = []
        waited = await lock.acquire_shielded()
        try:
            await _cpu_access.end_all(self, errors)
            for att in self.attachments:
                await att._detach_locked(errors)
            try:
                await run_undo(self._exporter.release(self))
            except Exception as exc:
                errors.append(exc)
        finally:
            self._refcount = _RELEASED
            self._close_file()
            lock.release()
        if leftovers:
            warnings.warn(
                f"{self!r} released while still attached to {', '.join(leftovers)}",
                ResourceWarning,
                stacklevel=2,
            )
        if errors:
            raise errors[0]
        await lock.finish(waited)

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
        if getattr(self, "_refcount", _RELEASED) == _RELEASED:
            return
        # Garbage collection frees what the last put would have: the exporter
        # gets its memory back. Ops that never wait run now; one that would
        # wait cannot run without a loop, and the warning says so.
        self._refcount = _RELEASED
        errors: list[Exception] = []
        done = True
        try:
            done &= _cpu_access.end_all_sync(self, errors)
            for att in self.attachments:
                done &= att._detach_sync(errors)
            try:
                done &= run_undo_sync(self._exporter.release(self))
            except Exception as exc:
                errors.append(exc)
        finally:
            self._close_file()
        detail = ""
        if not done:
            detail = f"; {self._exporter!r} had to wait to release it and could not"
        if errors:
            detail += f"; releasing it raised {errors[0]!r}"
        warnings.warn(
            f"{self!r} was garbage-collected without its last put{detail}",
            ResourceWarning,
            source=self,
            stacklevel=1,
        )

    # -- attachments --------------------------------------------------------------

    def attach(
        self, device: Device, *, move_notify: MoveNotify | None = None
    ) -> Operation[Attachment]:
        """Attach ``device`` to this buffer.

        ``await buf.attach(dev)`` returns the :class:`Attachment`;
        ``async with buf.attach(dev) as att:`` also detaches it on exit; the
        result is a real coroutine, so ``create_task`` and ``start_soon`` take
        it. Giving ``move_notify`` makes the attachment dynamic: the exporter
        may move the backing while nothing is mapped, calling
        ``move_notify(attachment)`` first.

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
        return Operation(self._attach(device, move_notify), detach_if_attached)

    async def _attach(
        self, device: Device, move_notify: MoveNotify | None
    ) -> Attachment:
        lock = self._lock
        await lock.acquire()
        try:
            self._check_live()
            att = Attachment(self, device, move_notify)
            await complete_op(self._exporter.attach(self, att))
            att._mark_attached()
            if self._attachments is None:
                self._attachments = [att]  # one slot: most buffers have one
            else:
                self._attachments.append(att)
        finally:
            lock.release()
        return att

    def _forget_attachment(self, att: Attachment) -> None:
        if self._attachments is not None:
            self._attachments.remove(att)

    # -- CPU access ---------------------------------------------------------------

    def cpu_access(self, mode: CpuMode = "rw") -> _cpu_access.CpuAccess:
        """Return an async context manager giving a view of the bytes.

        ``"r"`` gives a read-only view, ``"w"`` and ``"rw"`` a writable one.
        The view is released on exit. If something still exports it (a numpy
        array made from it, say), the access is not ended (the buffer stays
        pinned and nothing written through the array is lost): exit raises
        ``BufferError`` if the block succeeded, or lets the block's exception
        through with a note; a later :meth:`end_cpu_access` ends it.

        Raises:
            InvalidArgument: ``mode`` is not one of ``"r"``, ``"w"``, ``"rw"``,
                the buffer has been released, or the exporter has no CPU mapping.
        """
        check_cpu_mode(mode)
        self._check_live()
        return _cpu_access.CpuAccess(self, mode)

    def try_cpu_access(self, mode: CpuMode = "rw") -> _cpu_access.TryCpuAccess:
        """Return a context manager giving a view of the bytes, without waiting.

        ``with buf.try_cpu_access("w") as view:`` is :meth:`cpu_access` with
        no checkpoint, for hot loops of small copies: the entry begins the
        access at once or raises ``Busy``; the exit never waits (if the block
        awaited and another operation holds the lock by then, the end is
        queued on the lock and runs in its turn). A view still exported at
        exit keeps the access open, as with :meth:`cpu_access`.

        Raises:
            InvalidArgument: As for :meth:`cpu_access`.
            Busy: On entry: a fence the access must wait for is pending,
                another operation holds or waits for the buffer's lock, or the
                exporter's ``begin_cpu_access`` or ``end_cpu_access`` is a
                coroutine function (it may wait). Nothing has begun.
        """
        if mode not in CPU_MODES:
            check_cpu_mode(mode)
        self._check_live()
        return _cpu_access.TryCpuAccess(self, mode)

    async def begin_cpu_access(self, mode: CpuMode) -> None:
        """Prepare the bytes for CPU access in ``mode`` (a checkpoint).

        First waits for the fences that access must wait for (implicit sync: a
        reader for ``WRITE`` fences, a writer for ``READ`` fences too), without
        holding the buffer's lock, then calls the exporter's hook under it.

        Raises:
            InvalidArgument: A bad mode, or the buffer has been released.
        """
        await _cpu_access.begin(self, mode)

    async def end_cpu_access(self, mode: CpuMode) -> None:
        """End CPU access begun with :meth:`begin_cpu_access`.

        Completes even in a cancelled scope, then checkpoints (see
        :meth:`Attachment.unmap`).

        Raises:
            InvalidArgument: A bad mode, or no matching ``begin_cpu_access``.
            BufferError: Every open access in ``mode`` still has its view
                exported (by a live numpy array): it stays open.
        """
        waited = await _cpu_access.end(self, mode)
        await self._lock.finish(waited)


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
            buf._refcount = _RELEASED  # never handed out: no warning
            raise
    if fd is None:
        _fileless.add(buf)
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
    buf = _registered(_file_key(*info.key))
    if buf is not None and buf._refcount != _RELEASED:
        return buf._get()
    from ._import import import_fd  # the built-in importer (it imports this module)

    return import_fd(fd, info)
