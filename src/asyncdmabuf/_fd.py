"""File descriptors: a buffer's file, its identity, and memfds and their seals.

What an fd *is* is decided in :mod:`._fdkind`."""

from __future__ import annotations

import errno
import fcntl
import os

from ._errors import BadFileDescriptor, InvalidArgument, OutOfMemory, from_oserror
from ._fdkind import RESIZE_SEALS
from ._label import memfd_label

__all__ = [
    "MEMFD_SEALS",
    "dup_cloexec",
    "file_identity",
    "seal_against_resizing",
    "sealed_memfd",
]

#: Seals every memfd gets before it can leave the process: nobody can shrink it
#: under a mapping (SIGBUS), grow it, or take the seals off.
MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def file_identity(fd: int) -> tuple[int, int, int]:
    """Return ``(st_dev, st_ino, st_mode)`` of the file behind ``fd``.

    Raises:
        BadFileDescriptor: ``fd`` is not open.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise BadFileDescriptor(f"fd {fd} is not open") from None
        raise from_oserror(exc, f"fstat of fd {fd}") from None
    return st.st_dev, st.st_ino, st.st_mode


def seal_against_resizing(fd: int, seals: int) -> int:
    """Add ``F_SEAL_SHRINK|F_SEAL_GROW`` to the memfd ``fd``; return its seals.

    ``seals`` are the seals it had when looked at; nothing is asked of the
    kernel when they already fix its size.

    Raises:
        InvalidArgument: The file cannot be sealed (``F_SEAL_SEAL`` is set, or
            it is not a memfd), so its size could change under a mapping.
    """
    if seals & RESIZE_SEALS == RESIZE_SEALS:
        return seals
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, RESIZE_SEALS)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise BadFileDescriptor(f"fd {fd} is not open") from None
        raise InvalidArgument(
            f"fd {fd} cannot be sealed against resizing, so mapping it is unsafe"
        ) from None
    return seals | RESIZE_SEALS


def dup_cloexec(fd: int) -> int:
    """Return a new fd for the same open file, with ``O_CLOEXEC`` set."""
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
    except OSError as exc:
        raise from_oserror(exc, f"dup of fd {fd}") from None


def sealed_memfd(name: str, size: int, *, exporter: str = "") -> int:
    """Create a memfd of ``size`` zero bytes, sealed against resizing.

    Its name (in ``/proc/<pid>/fd`` and ``/proc/<pid>/maps``) is
    ``asyncdmabuf:<exporter>:<name>`` (:func:`memfd_label`), which the
    machine-wide ``asyncdmabuf bufinfo`` reads back.

    Returns:
        The fd, ``O_CLOEXEC``; the caller owns it.

    Raises:
        OutOfMemory: The kernel could not allocate it.
        DmaBufError: Another syscall failure, with its errno.
    """
    label = memfd_label(exporter, name)
    try:
        fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise from_oserror(exc, "memfd_create") from None
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
    except OSError as exc:
        os.close(fd)
        raise from_oserror(exc, f"sizing a memfd to {size} bytes") from None
    except OverflowError:  # beyond off_t: no file can ever be that large
        os.close(fd)
        raise OutOfMemory(f"a memfd cannot hold {size} bytes") from None
    except BaseException:
        os.close(fd)
        raise
    return fd
