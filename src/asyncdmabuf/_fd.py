"""File descriptors: the buffer's identity, and telling shareable memory apart."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from ._errors import BadFileDescriptor, OutOfMemory, from_oserror

__all__ = ["dup_cloexec", "file_identity", "is_shareable_memory", "sealed_memfd"]

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


def is_shareable_memory(fd: int, mode: int) -> bool:
    """Return whether ``fd`` is memory another process can map: a memfd or a dma-buf."""
    if not stat.S_ISREG(mode):
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        pass
    else:
        return True  # memfd (or other shmem that supports sealing)
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return target.startswith(("/dmabuf:", "anon_inode:dmabuf"))


def dup_cloexec(fd: int) -> int:
    """Return a new fd for the same open file, with ``O_CLOEXEC`` set."""
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
    except OSError as exc:
        raise from_oserror(exc, f"dup of fd {fd}") from None


def sealed_memfd(name: str, size: int) -> int:
    """Create a memfd of ``size`` zero bytes, sealed against resizing.

    Returns:
        The fd, ``O_CLOEXEC``; the caller owns it.

    Raises:
        OutOfMemory: The kernel could not allocate it.
        DmaBufError: Another syscall failure, with its errno.
    """
    label = ("asyncdmabuf:" + name).encode()[:240].decode(errors="ignore")
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
