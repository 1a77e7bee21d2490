"""File descriptors of every kind, made for tests (each caller closes its fd)."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket

PAGE = mmap.PAGESIZE
RESIZE = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def memfd(
    size: int = PAGE, seals: int = 0, *, sealable: bool = True, flags: int = 0
) -> int:
    """A memfd of ``size`` zero bytes with ``seals`` added."""
    extra = os.MFD_ALLOW_SEALING if sealable else 0
    fd = os.memfd_create("test", os.MFD_CLOEXEC | extra | flags)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def pipe_fd() -> int:
    """The read end of a pipe whose write end is closed."""
    r, w = os.pipe()
    os.close(w)
    return r


def socket_fd() -> int:
    """One end of a UNIX socketpair whose other end is closed."""
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def o_path_fd() -> int:
    """An O_PATH fd of a perfectly good memfd: still no memory to map."""
    fd = memfd(PAGE, RESIZE)
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
    finally:
        os.close(fd)
