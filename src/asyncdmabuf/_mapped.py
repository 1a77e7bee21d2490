"""Buffers whose bytes are a file mapped into this process.

A memfd, a dma-heap buffer or an imported fd is mapped ``MAP_SHARED`` once;
devices reach it through its address here, cut into segments each device can
take. :class:`MappedExporter` serves such buffers: the built-in importer and the
built-in exporters are made of it, and so can a third party's be.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, ClassVar, Self, final

from ._buffer import export
from ._errors import Busy, InvalidArgument, from_oserror
from ._exporter import Exporter
from ._sgtable import SgEntry, SgTable

if TYPE_CHECKING:
    from . import Attachment, CpuMode, Device, Direction, DmaBuf

__all__ = [
    "MAX_TABLE_ENTRIES",
    "MappedExporter",
    "MappedFile",
    "ReadOnlyMappedFile",
    "address_of",
    "export_mapped",
    "layout",
    "map_fd",
    "reachable",
]

#: The most entries a table may have; a device whose segments are so small that
#: it would need more is refused with Busy.
MAX_TABLE_ENTRIES = 1 << 16


class _PyBuffer(ctypes.Structure):
    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
_release_buffer.restype = None


def address_of(obj: Any) -> int:
    """Return the address of the first byte of a buffer-protocol object.

    Raises:
        TypeError: ``obj`` does not support the buffer protocol.
    """
    view = _PyBuffer()
    _get_buffer(obj, ctypes.byref(view), 0)  # PyBUF_SIMPLE; raises on error
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


def reachable(address: int, size: int, device: Device) -> bool:
    """Whether some table of ``[address, address + size)`` honours ``device``."""
    if address + size - 1 > device.dma_mask:
        return False
    segment = device.max_segment_size
    if size <= segment:
        return True
    return not device.contiguous and -(-size // segment) <= MAX_TABLE_ENTRIES


def layout(address: int, size: int, device: Device) -> tuple[SgEntry, ...] | None:
    """Split ``[address, address + size)`` into entries ``device`` can take.

    Returns None when no table can honour the device's constraints.
    """
    if not reachable(address, size, device):
        return None
    segment = device.max_segment_size
    if size <= segment:  # one entry, sharing the int objects it is made of
        return (SgEntry(address, size, 0),)
    return tuple(
        SgEntry(address + offset, min(segment, size - offset), offset)
        for offset in range(0, size, segment)
    )


class MappedFile(mmap.mmap):
    """The mapping of a buffer's file (``MAP_SHARED``), writable, and its layout.

    One object per buffer: the mapping itself, which remembers the table the
    device that attached last needs (a buffer is mostly attached to one device
    at a time; a dict of layouts would cost every attached buffer 64 bytes).
    A read-only mapping is a :class:`ReadOnlyMappedFile`. Made by :func:`map_fd`.
    """

    __slots__ = ("_device", "_entries")

    #: Whether the bytes may be written through the mapping.
    writable: ClassVar[bool] = True

    _device: Device | None
    _entries: tuple[SgEntry, ...] | None

    def __new__(cls, fd: int, size: int) -> Self:
        """Map the first ``size`` bytes of ``fd``.

        Raises:
            OSError: The mapping failed.
            ValueError: The file is smaller than ``size``.
        """
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if cls.writable else 0)
        self = super().__new__(cls, fd, size, mmap.MAP_SHARED, prot)
        self._device = self._entries = None
        return self

    @property
    def address(self) -> int:
        """The address of the first byte in this process."""
        return address_of(self)

    def layout_for(self, device: Device) -> tuple[SgEntry, ...] | None:
        """Return :func:`layout` of the mapping for ``device`` (kept for the next)."""
        if device is self._device:
            return self._entries
        entries = layout(self.address, len(self), device)
        self._device = device
        self._entries = entries
        return entries

    def unmap(self) -> None:
        """Unmap, unless a view still exports the bytes (then the view's end does)."""
        with contextlib.suppress(BufferError):
            self.close()


@final
class ReadOnlyMappedFile(MappedFile):
    """A :class:`MappedFile` of bytes that may only be read."""

    __slots__ = ()

    writable: ClassVar[bool] = False


def map_fd(fd: int, size: int, *, writable: bool) -> MappedFile:
    """Map the first ``size`` bytes of ``fd`` shared; the fd stays the caller's.

    Raises:
        InvalidArgument: The file is smaller than ``size`` (it shrank).
        DmaBufError: The mapping failed (``OutOfMemory`` for ENOMEM).
    """
    try:
        return (MappedFile if writable else ReadOnlyMappedFile)(fd, size)
    except OSError as exc:
        raise from_oserror(exc, f"mapping {size} bytes of fd {fd}") from None
    except (ValueError, OverflowError):  # shorter than size, or beyond any size
        raise InvalidArgument(f"fd {fd} does not hold {size} bytes") from None


def export_mapped(
    exporter: Exporter, fd: int, size: int, *, name: str | None, writable: bool
) -> DmaBuf:
    """Map ``fd`` and export it as a buffer of ``exporter`` that owns the fd.

    The buffer's ``priv`` is its :class:`MappedFile`. On any failure the fd is
    closed and nothing stays mapped.

    Raises:
        InvalidArgument: The file holds fewer than ``size`` bytes.
        DmaBufError: The mapping failed (``OutOfMemory`` for ENOMEM).
    """
    try:
        backing = map_fd(fd, size, writable=writable)
    except BaseException:
        os.close(fd)
        raise
    try:
        return export(exporter, size, backing, name, fd=fd)
    except BaseException:
        backing.unmap()
        os.close(fd)
        raise


def unreachable(address: int, size: int, device: Device) -> str:
    """Say which of ``device``'s constraints ``[address, address + size)`` breaks."""
    if address + size - 1 > device.dma_mask:
        return (
            f"the memory ends at {address + size - 1:#x}, beyond its dma_mask "
            f"{device.dma_mask:#x}"
        )
    if device.contiguous and size > device.max_segment_size:
        return (
            f"it needs one contiguous segment of {size} bytes but its "
            f"max_segment_size is {device.max_segment_size}"
        )
    return (
        f"its max_segment_size of {device.max_segment_size} bytes would need more "
        f"than {MAX_TABLE_ENTRIES} entries"
    )


def _entries(attachment: Attachment) -> tuple[SgEntry, ...]:
    """The table of ``attachment``'s device, reachable since its attach."""
    backing: MappedFile = attachment.buffer.priv
    entries = backing.layout_for(attachment.device)
    assert entries is not None, "attach refused a device that cannot reach it"
    return entries


class MappedExporter(Exporter):
    """The ops of buffers made by :func:`export_mapped`: memory always resident.

    ``try_map`` only fails when the buffer's lock is busy; a device that cannot
    reach the mapping is refused at attach.
    """

    name: ClassVar[str] = "mapped"

    def attach(self, buf: DmaBuf, attachment: Attachment) -> Awaitable[None] | None:
        """Refuse a device that cannot reach the mapping.

        Plain (it never waits), like every op of this exporter. The device's
        table is worked out at its first map and kept in ``attachment.priv``,
        so an attachment that is never mapped costs no table.

        Raises:
            Busy: The memory is already placed and the device cannot reach it;
                the message names the constraint that cannot be met.
        """
        backing: MappedFile = buf.priv
        device = attachment.device
        address = backing.address
        if not reachable(address, buf.size, device):
            raise Busy(
                f"{device.name!r} cannot map {buf!r}: "
                f"{unreachable(address, buf.size, device)}"
            )
        return None

    def map(
        self, attachment: Attachment, direction: Direction
    ) -> Awaitable[SgTable] | SgTable:
        """Return the table; the memory is always resident (plain, as try_map)."""
        entries = attachment.priv
        if entries is None:
            entries = attachment.priv = _entries(attachment)
        return SgTable(entries, direction, attachment)  # by position: faster

    def try_map(self, attachment: Attachment, direction: Direction) -> SgTable:
        """Return the table; never waits."""
        entries = attachment.priv
        if entries is None:
            entries = attachment.priv = _entries(attachment)
        return SgTable(entries, direction, attachment)  # by position: faster

    def unmap(
        self, attachment: Attachment, sgt: SgTable, direction: Direction
    ) -> Awaitable[None] | None:
        """Nothing to undo: the memory stays mapped in this process."""
        return None

    def release(self, buf: DmaBuf) -> Awaitable[None] | None:
        """Unmap the memory; the kernel frees it when the last fd closes."""
        backing: MappedFile = buf.priv
        backing.unmap()
        return None

    def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> Awaitable[None] | None:
        """Refuse writes to a read-only mapping.

        Raises:
            InvalidArgument: ``mode`` writes and the mapping is read-only.
        """
        backing: MappedFile = buf.priv
        if mode != "r" and not backing.writable:
            raise InvalidArgument(f"{buf!r} is read-only")
        return None

    def vmap(self, buf: DmaBuf) -> memoryview:
        """Return a view of the mapped bytes."""
        backing: MappedFile = buf.priv
        return memoryview(backing)
