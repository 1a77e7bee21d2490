"""The built-in importer: shareable memory that came from elsewhere.

:func:`asyncdmabuf.get` hands it an fd of a memfd or a kernel dma-buf that is
no buffer of this process, with the :class:`FdInfo` it already took; the
importer seals a memfd against resizing, maps the file and exports it as a
buffer whose exporter is ``import``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, ClassVar, final

from ._errors import InvalidArgument, from_oserror
from ._fd import dup_cloexec, seal_against_resizing
from ._fdkind import FdInfo, FdKind, classify
from ._mapped import MappedExporter, export_mapped

if TYPE_CHECKING:
    from . import DmaBuf

__all__ = ["Importer", "import_fd"]


@final
class Importer(MappedExporter):
    """The exporter of every buffer imported from an fd."""

    name: ClassVar[str] = "import"


IMPORTER = Importer()


def import_fd(fd: int, info: FdInfo | None = None) -> DmaBuf:
    """Map the memory behind ``fd`` as a new buffer (the fd stays the caller's).

    ``info`` is what :func:`classify` said of ``fd``, if the caller asked. A
    memfd is sealed against resizing first and its size read again after the
    seal, so that a peer shrinking it in between is seen; a kernel dma-buf's
    size never changes. A file that only reads (an ``O_RDONLY`` fd, a memfd
    sealed against writes) is mapped read-only.

    Raises:
        BadFileDescriptor: ``fd`` is not open.
        InvalidArgument: The file is not shareable memory, is empty, or cannot
            be sealed against resizing.
        DmaBufError: It cannot be mapped (``OutOfMemory`` for ENOMEM).
    """
    if info is None:
        info = classify(fd)
    size = info.size
    if info.kind is FdKind.MEMFD:
        if not info.size_fixed:
            seal_against_resizing(fd, info.seals or 0)
            try:  # what it holds now that it can no longer change
                size = os.fstat(fd).st_size
            except OSError as exc:
                raise from_oserror(exc, f"fstat of fd {fd}") from None
    elif info.kind is not FdKind.DMA_BUF:
        raise InvalidArgument(f"fd {fd} is not a shareable buffer ({info.kind.value})")
    if size <= 0:
        raise InvalidArgument(f"fd {fd} holds no bytes to share")
    return export_mapped(
        IMPORTER, dup_cloexec(fd), size, name=None, writable=info.writable
    )
