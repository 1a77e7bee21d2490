"""File descriptors: the buffer's identity, and telling shareable memory apart."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from ._errors import BadFileDescriptor, InvalidArgument, OutOfMemory, from_oserror

__all__ = ["dup_cloexec", "file_identity", "is_shareable_memory", "sealed_memfd"]

#: Seals every memfd gets before it can leave the process: nobody can shrink it
#: under a mapping (SIGBUS), grow it, or take the seals off.
MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: The largest fd number there can be (fds are C ints).
_FD_MAX = 2**31 - 1


def check_fd(fd: object) -> int:
    """Return ``fd`` as an int.

    Raises:
        TypeError: ``fd`` is not an int.
        BadFileDescriptor: ``fd`` is negative or beyond any fd number.
    """
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"an fd is an int, not {type(fd).__name__}")
    if not 0 <= fd <= _FD_MAX:  # an fd is a C int: beyond it, none is open
        raise BadFileDescriptor(f"fd {fd} is not open")
    return fd


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


def check_name(name: object) -> str | None:
    """Return ``name`` if it is a valid buffer name (``DMA_BUF_SET_NAME``'s rule).

    Raises:
        TypeError: ``name`` is neither a str nor None.
        InvalidArgument: It is longer than 32 bytes of UTF-8, holds a NUL, or
            is not valid UTF-8 (a lone surrogate).
    """
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"a buffer name is a str, not {type(name).__name__}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 for the kernel's name
        raise InvalidArgument(f"buffer name {name!r} is not valid UTF-8") from None
    if len(encoded) > 32 or "\0" in name:
        raise InvalidArgument(f"buffer name {name!r} is longer than 32 bytes")
    return name
