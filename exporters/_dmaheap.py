"""DmaHeapExporter: real kernel dma-bufs from ``/dev/dma_heap/<heap>``.

Buffers are allocated with ``DMA_HEAP_IOCTL_ALLOC``, so their fds are genuine
dma-buf files any driver or process can import; they are mapped into this
process like the memfd exporter's, and CPU access is bracketed with
``DMA_BUF_IOCTL_SYNC`` as the kernel asks of every CPU user of a dma-buf.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Awaitable
from typing import TYPE_CHECKING, ClassVar

import anyio.lowlevel

from asyncdmabuf import DmaBuf, InvalidArgument, NoDevice
from asyncdmabuf.lowlevel import check_int, check_name, export_mapped, from_oserror

from ._memfd import MemfdExporter

if TYPE_CHECKING:
    from asyncdmabuf import CpuMode

__all__ = ["DmaHeapExporter"]

HEAP_DIR = "/dev/dma_heap"


def _iowr(kind: str, nr: int, size: int, direction: int = 3) -> int:
    """The ``_IOC`` encoding of asm-generic/ioctl.h (x86, arm64, riscv...)."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


#: struct dma_heap_allocation_data { u64 len; u32 fd; u32 fd_flags; u64 heap_flags; }
_ALLOC = struct.Struct("=QIIQ")
DMA_HEAP_IOCTL_ALLOC = _iowr("H", 0, _ALLOC.size)  # _IOWR('H', 0x0, ...)
#: struct dma_buf_sync { u64 flags; }
_SYNC = struct.Struct("=Q")
DMA_BUF_IOCTL_SYNC = _iowr("b", 0, _SYNC.size, direction=1)  # _IOW('b', 0, ...)
DMA_BUF_SET_NAME_B = _iowr("b", 1, 8, direction=1)  # _IOW('b', 1, u64)
DMA_BUF_SYNC_READ = 1
DMA_BUF_SYNC_WRITE = 2
DMA_BUF_SYNC_START = 0
DMA_BUF_SYNC_END = 4

_SYNC_FLAGS = {
    "r": DMA_BUF_SYNC_READ,
    "w": DMA_BUF_SYNC_WRITE,
    "rw": DMA_BUF_SYNC_READ | DMA_BUF_SYNC_WRITE,
}


class DmaHeapExporter(MemfdExporter):
    """Buffers from a kernel dma-heap (``system`` by default).

    Sizes are rounded up to whole pages, as the kernel does. The heap's device
    is opened for each allocation and closed straight after.

    Args:
        heap: The heap's name, a file in ``/dev/dma_heap``.

    Raises:
        TypeError: ``heap`` is not a str.
        InvalidArgument: ``heap`` is not a plain file name.
        NoDevice: This machine has no such heap.
    """

    name: ClassVar[str] = "dmaheap"

    def __init__(self, heap: str = "system") -> None:
        if not isinstance(heap, str):
            raise TypeError(f"heap must be a str, not {type(heap).__name__}")
        if not heap or "/" in heap or "\0" in heap or heap in (".", ".."):
            raise InvalidArgument(f"{heap!r} is not a dma-heap name")
        self.heap = heap
        self.path = os.path.join(HEAP_DIR, heap)
        os.close(self._open())

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoDevice(f"no dma-heap {self.path} on this machine") from None
        except OSError as exc:
            raise from_oserror(exc, f"opening {self.path}") from None

    def __repr__(self) -> str:
        return f"DmaHeapExporter(heap={self.heap!r})"

    async def allocate(self, size: int, *, name: str | None = None) -> DmaBuf:
        """Allocate a dma-buf of at least ``size`` zero bytes (a checkpoint).

        Raises:
            TypeError: ``size`` is not an int.
            InvalidArgument: ``size`` is not positive, or ``name`` too long.
            OutOfMemory: The heap could not allocate it.
            NoDevice: The heap has gone.
        """
        check_int(size, "size")
        check_name(name)
        await anyio.lowlevel.checkpoint()
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        fd = self._alloc(size)
        if name is not None:
            _set_name(fd, name)  # never raises
        return export_mapped(self, fd, size, name=name, writable=True)

    def _alloc(self, size: int) -> int:
        heap = self._open()
        try:
            request = bytearray(_ALLOC.pack(size, 0, os.O_RDWR | os.O_CLOEXEC, 0))
            fcntl.ioctl(heap, DMA_HEAP_IOCTL_ALLOC, request, True)
        except OSError as exc:
            raise from_oserror(
                exc, f"allocating {size} bytes from {self.path}"
            ) from None
        finally:
            os.close(heap)
        _, fd, _, _ = _ALLOC.unpack(request)
        return int(fd)

    def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> Awaitable[None] | None:
        """Refuse writes to a read-only buffer, then ``DMA_BUF_SYNC_START``.

        Raises:
            InvalidArgument: ``mode`` writes and the mapping is read-only.
            DmaBufError: The kernel refused the sync.
        """
        super().begin_cpu_access(buf, mode)
        _sync(buf, DMA_BUF_SYNC_START | _SYNC_FLAGS[mode])
        return None

    def end_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> Awaitable[None] | None:
        """``DMA_BUF_SYNC_END``: hand the bytes back to the devices.

        Raises:
            DmaBufError: The kernel refused the sync.
        """
        _sync(buf, DMA_BUF_SYNC_END | _SYNC_FLAGS[mode])
        return None


def _sync(buf: DmaBuf, flags: int) -> None:
    fd = buf.fd()
    try:
        fcntl.ioctl(fd, DMA_BUF_IOCTL_SYNC, _SYNC.pack(flags))
    except OSError as exc:
        raise from_oserror(exc, f"DMA_BUF_IOCTL_SYNC on {buf!r}") from None
    finally:
        os.close(fd)


def _set_name(fd: int, name: str) -> None:
    """``DMA_BUF_SET_NAME``; a kernel without it just keeps the buffer unnamed."""
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, DMA_BUF_SET_NAME_B, name.encode() + b"\0")
