"""MemfdExporter: buffers in sealed memfds, mapped into this process.

The bytes live in an anonymous memfd sealed against shrinking and growing (so no
holder of the fd can pull pages out from under another's mapping), mapped
``MAP_SHARED``: any process that receives the fd maps the same pages. Devices
see the buffer through its address in this process, split into segments of at
most the device's ``max_segment_size``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
from typing import TYPE_CHECKING, Any, ClassVar, final

import anyio.lowlevel

from asyncdmabuf import (
    Busy,
    DmaBuf,
    Exporter,
    InvalidArgument,
    SgEntry,
    SgTable,
    export,
)
from asyncdmabuf.lowlevel import (
    MEMFD_SEALS,
    check_int,
    check_name,
    dup_cloexec,
    from_oserror,
    sealed_memfd,
)

if TYPE_CHECKING:
    from asyncdmabuf import Attachment, CpuMode, Device, Direction

__all__ = ["MemfdExporter", "import_fd"]

#: The most entries a table may have; a device whose segments are so small that
#: it would need more is refused with Busy.
MAX_ENTRIES = 1 << 16


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
    """Return the address of the first byte of a buffer-protocol object."""
    view = _PyBuffer()
    _get_buffer(obj, ctypes.byref(view), 0)  # PyBUF_SIMPLE; raises on error
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


@final
class _Backing:
    """The mapping of a buffer's memfd: its bytes and their address."""

    __slots__ = ("address", "mm", "writable")

    def __init__(self, fd: int, size: int, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        self.address = address_of(self.mm)
        self.writable = writable

    def close(self) -> None:
        # If someone still holds a view, the mapping goes when the view does.
        with contextlib.suppress(BufferError):
            self.mm.close()


def export_mapped(
    exporter: Exporter, fd: int, size: int, *, name: str | None, writable: bool
) -> DmaBuf:
    """Map ``fd`` and export it as a buffer of ``exporter`` that owns the fd.

    On any failure the fd is closed and nothing stays mapped.

    Raises:
        OutOfMemory: The mapping failed for lack of memory (other mmap errors
            become the matching :class:`DmaBufError`).
    """
    try:
        backing = _Backing(fd, size, writable=writable)
    except OSError as exc:  # ENOMEM for sizes no mapping can hold
        os.close(fd)
        raise from_oserror(exc, f"mapping {size} bytes of fd {fd}") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        return export(exporter, size, backing, name, fd=fd)
    except BaseException:
        backing.close()
        os.close(fd)
        raise


def layout(address: int, size: int, device: Device) -> tuple[SgEntry, ...] | None:
    """Split ``[address, address + size)`` into entries ``device`` can take.

    Returns None when no table can honour the device's constraints.
    """
    if address + size - 1 > device.dma_mask:
        return None
    segment = device.max_segment_size
    if device.contiguous:
        return (SgEntry(address, size, 0),) if size <= segment else None
    if -(-size // segment) > MAX_ENTRIES:
        return None
    return tuple(
        SgEntry(address + offset, min(segment, size - offset), offset)
        for offset in range(0, size, segment)
    )


class MemfdExporter(Exporter):
    """Buffers in sealed memfds: real memory, shareable with any process.

    Its buffers never need to wait to be mapped, so ``try_map`` only fails when
    the buffer's lock is busy. Every new buffer reads as zeros.
    """

    name: ClassVar[str] = "memfd"

    async def allocate(self, size: int, *, name: str | None = None) -> DmaBuf:
        """Create a buffer of ``size`` zero bytes (a checkpoint).

        Raises:
            TypeError: ``size`` is not an int.
            InvalidArgument: ``size`` is not positive, or ``name`` too long.
            OutOfMemory: The kernel could not allocate it.
        """
        check_int(size, "size")
        check_name(name)
        await anyio.lowlevel.checkpoint()
        fd = sealed_memfd(name or "dmabuf", size)
        return export_mapped(self, fd, size, name=name, writable=True)

    async def attach(self, buf: DmaBuf, attachment: Attachment) -> None:
        """Work out the device's table once; refuse a device it cannot serve.

        Raises:
            Busy: The memory is already placed and the device cannot reach it
                (mask too narrow, or contiguity it cannot have).
        """
        backing: _Backing = buf.priv
        entries = layout(backing.address, buf.size, attachment.device)
        if entries is None:
            raise Busy(
                f"{attachment.device!r} cannot reach {buf!r} at {backing.address:#x}"
            )
        attachment.priv = entries

    async def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        """Return the table; the memory is always resident."""
        return self.try_map(attachment, direction)

    def try_map(self, attachment: Attachment, direction: Direction) -> SgTable:
        """Return the table; never waits."""
        return SgTable(attachment.priv, direction=direction, attachment=attachment)

    async def unmap(
        self, attachment: Attachment, sgt: SgTable, direction: Direction
    ) -> None:
        """Nothing to undo: the memory stays mapped in this process."""

    async def release(self, buf: DmaBuf) -> None:
        """Unmap the memory; the kernel frees it when the last fd closes."""
        backing: _Backing = buf.priv
        backing.close()

    async def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        """Refuse writes to a read-only import.

        Raises:
            InvalidArgument: ``mode`` writes and the mapping is read-only.
        """
        backing: _Backing = buf.priv
        if mode != "r" and not backing.writable:
            raise InvalidArgument(f"{buf!r} is read-only")

    def vmap(self, buf: DmaBuf) -> memoryview:
        """Return a view of the mapped bytes."""
        backing: _Backing = buf.priv
        return memoryview(backing.mm)


class _Importer(MemfdExporter):
    """The built-in importer: shareable memory that came from elsewhere."""

    name: ClassVar[str] = "import"

    def import_fd(self, fd: int) -> DmaBuf:
        """Map the memory behind ``fd`` as a new buffer (the fd stays the caller's).

        A file that only reads (an ``O_RDONLY`` fd, or a memfd sealed against
        writes) is mapped read-only.

        Raises:
            InvalidArgument: The file is empty, or cannot be sealed against
                resizing.
            DmaBufError: It cannot be mapped (``OutOfMemory`` for ENOMEM).
        """
        size = os.fstat(fd).st_size
        if size <= 0:
            raise InvalidArgument(f"fd {fd} holds no bytes to share")
        seals = _seal(fd)
        writable = (
            fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
            and not seals & _WRITE_SEALS
        )
        return export_mapped(self, dup_cloexec(fd), size, name=None, writable=writable)


#: Seals that forbid shared writable mappings (F_SEAL_FUTURE_WRITE is 0x10).
_WRITE_SEALS = fcntl.F_SEAL_WRITE | 0x10


def _seal(fd: int) -> int:
    """Seal ``fd`` against resizing if it is a memfd; return its seals (0 if none)."""
    try:
        seals: int = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return 0  # not a memfd (a kernel dma-buf): its size cannot change anyway
    needed = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    if seals & needed == needed:
        return seals
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS & ~seals)
    except OSError:
        raise InvalidArgument(
            f"fd {fd} cannot be sealed against resizing, so mapping it is unsafe"
        ) from None
    return seals | MEMFD_SEALS


_IMPORTER = _Importer()


def import_fd(fd: int) -> DmaBuf:
    """Import shareable memory as a buffer of the built-in importer."""
    return _IMPORTER.import_fd(fd)
