"""MemfdExporter: buffers in sealed memfds, mapped into this process.

The bytes live in an anonymous memfd sealed against shrinking and growing (so no
holder of the fd can pull pages out from under another's mapping), mapped
``MAP_SHARED``: any process that receives the fd maps the same pages. Devices
see the buffer through its address in this process, split into segments of at
most the device's ``max_segment_size``. Built, as a third party's exporter
would be, from :mod:`asyncdmabuf.lowlevel` alone.
"""

from __future__ import annotations

from typing import ClassVar

import anyio.lowlevel

from asyncdmabuf import DmaBuf, get
from asyncdmabuf.lowlevel import (
    MappedExporter,
    check_int,
    check_name,
    export_mapped,
    sealed_memfd,
)

__all__ = ["MemfdExporter", "import_fd"]


class MemfdExporter(MappedExporter):
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
        fd = sealed_memfd(name or "", size, exporter=self.name)
        return export_mapped(self, fd, size, name=name, writable=True)


def import_fd(fd: int) -> DmaBuf:
    """The same as :func:`asyncdmabuf.get`, kept for older callers.

    Raises:
        The same as :func:`asyncdmabuf.get`.
    """
    return get(fd)
