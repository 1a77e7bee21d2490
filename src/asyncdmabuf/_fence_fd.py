"""The fence fd protocol: what a fence looks like to another process.

A fence of this library travels as the read end of a UNIX stream socketpair.
The read end is bound, at creation, to a unique abstract-namespace name
``\\0asyncdmabuf-fence/<pid>/<n>``: a plain ``socketpair()`` end has no name,
so the kernel's own record of the socket (``getsockname``) tells a fence's fd
from any other socket. At signal the owner writes one record (0 or an errno)
and shuts its end down: the fd polls readable from then on and every holder
peeks the record without consuming it. An owner that goes away unsignalled
leaves EOF and no record: ``EOWNERDEAD``.

A real kernel ``sync_file`` (GPU, V4L2, ``DMA_BUF_IOCTL_EXPORT_SYNC_FILE``) is
recognised by the kernel's identity of its file: an inode of the anonymous
inode filesystem (``ANON_INODE_FS_MAGIC``, from ``fstatfs``) whose
``/proc/self/fd`` link is exactly ``anon_inode:sync_file``. It polls readable
once signalled; its status (and error) comes from ``SYNC_IOC_FILE_INFO``.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import itertools
import os
import select
import socket
import struct
from typing import Final, Literal

from . import _fdkind
from ._errors import (
    BadFileDescriptor,
    Busy,
    DmaBufError,
    InvalidArgument,
    NoDevice,
    OutOfMemory,
    from_oserror,
)

__all__ = [
    "FenceFdKind",
    "classify",
    "errno_of",
    "error_from_errno",
    "file_key",
    "finish",
    "read_status",
    "signaled_fd",
    "socketpair",
]

#: The record a fence writes at signal: 0, or the errno it failed with.
_RECORD: Final = struct.Struct("<i")
MAX_ERRNO: Final = 4095

#: What every fence socket's name starts with (abstract namespace: no file).
_NAME_PREFIX: Final = b"\0asyncdmabuf-fence/"
_names = itertools.count(1)
#: Attempts at a free name before giving up (another process may squat some).
_BIND_ATTEMPTS: Final = 64

#: ``struct sync_file_info``: name[32], status, flags, num_fences, pad, fences ptr.
_SYNC_FILE_INFO: Final = struct.Struct("=32siIIIQ")
#: ``_IOWR('>', 4, struct sync_file_info)``.
SYNC_IOC_FILE_INFO: Final = (3 << 30) | (_SYNC_FILE_INFO.size << 16) | (0x3E << 8) | 4

#: What a fence fd is: one of this library's sockets, or a kernel sync_file.
FenceFdKind = Literal["fence", "sync_file"]


# -- errors <-> records -------------------------------------------------------------


def error_from_errno(code: int) -> DmaBufError:
    """Return the framework error carrying ``code`` (for errors read from an fd)."""
    message = f"fence signalled with an error: {os.strerror(code)}"
    for cls in (BadFileDescriptor, InvalidArgument, OutOfMemory, Busy, NoDevice):
        if cls.default_errno == code:
            return cls(message)
    return DmaBufError(message, code=code)


def errno_of(error: Exception | None) -> int:
    """Return the errno that stands for ``error`` in an fd's record (0: none)."""
    if error is None:
        return 0
    code = getattr(error, "errno", None)
    if isinstance(code, int) and 0 < code <= MAX_ERRNO:
        return code
    return _errno.EIO


# -- making and finishing fence fds -------------------------------------------------


def socketpair() -> tuple[int, int]:
    """Return ``(read_end, write_end)`` of a new fence socketpair (``O_CLOEXEC``).

    The read end is bound to a name of this library's own (see the module).

    Raises:
        DmaBufError: Out of fds or memory (with the errno).
    """
    try:
        reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise from_oserror(exc, "socketpair for a fence") from None
    try:
        _bind(reader)
    except BaseException:
        reader.close()
        writer.close()
        raise
    return reader.detach(), writer.detach()


def _bind(reader: socket.socket) -> None:
    """Bind ``reader`` to a free fence name of this process."""
    for _ in range(_BIND_ATTEMPTS):
        name = b"%s%d/%d" % (_NAME_PREFIX, os.getpid(), next(_names))
        try:
            reader.bind(name)
        except OSError as exc:
            if exc.errno != _errno.EADDRINUSE:
                raise from_oserror(exc, "naming a fence socket") from None
            continue
        return
    raise Busy("no free name for a fence socket: someone holds them all")


def finish(wfd: int, code: int | None) -> None:
    """Write the record (``None``: none, the owner died), shut down, close ``wfd``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=wfd)
    try:
        # OSError: nobody holds the read end any more.
        if code is not None:
            with contextlib.suppress(OSError):
                sock.send(_RECORD.pack(code), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
    finally:
        sock.close()


def signaled_fd(code: int) -> int:
    """Return a new fence fd that is already readable with the record ``code``."""
    rfd, wfd = socketpair()
    finish(wfd, code)
    return rfd


def file_key(fd: int) -> tuple[int, int]:
    """Return the identity of ``fd``'s file: ``(st_dev, st_ino)``."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


# -- what an fd is ------------------------------------------------------------------


def _is_fence_socket(fd: int) -> bool:
    """Whether socket ``fd`` is a UNIX stream socket bound to a fence name."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # an O_PATH fd of a socket file, say
        return False
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            return False
        name = sock.getsockname()
    except OSError:
        return False
    finally:
        sock.detach()
    return isinstance(name, bytes) and name.startswith(_NAME_PREFIX)


def classify(fd: int) -> FenceFdKind:
    """Return what kind of fence fd ``fd`` is, from the framework's fd classifier.

    Raises:
        BadFileDescriptor: ``fd`` is not open.
        InvalidArgument: It is open but neither a fence fd of this library
            nor a kernel ``sync_file``.
    """
    info = _fdkind.classify(fd)
    if info.kind is _fdkind.FdKind.SOCKET:
        if _is_fence_socket(fd):
            return "fence"
        raise InvalidArgument(f"fd {fd} is a socket, but not a fence's")
    if info.kind is _fdkind.FdKind.SYNC_FILE:
        return "sync_file"
    raise InvalidArgument(f"fd {fd} is not a fence")


# -- reading a fence fd's status ----------------------------------------------------


def _peek(fd: int) -> int | None:
    """Return the record behind a fence socket without consuming it (None: pending).

    EOF without a record (the owner died unsignalled) reads as ``EOWNERDEAD``,
    anything that is not a record as ``EPROTO``.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        data = sock.recv(_RECORD.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return _errno.EPROTO
    finally:
        sock.detach()
    if not data:
        return _errno.EOWNERDEAD
    if len(data) != _RECORD.size:
        return _errno.EPROTO
    (code,) = _RECORD.unpack(data)
    return code if 0 <= code <= MAX_ERRNO else _errno.EPROTO


def _sync_file_status(fd: int) -> int | None:
    """Return a kernel sync_file's errno (0: success), None while it is pending.

    ``SYNC_IOC_FILE_INFO`` gives the status and error; where the ioctl fails,
    readability alone says it signalled, and it reads as success.
    """
    try:
        info = fcntl.ioctl(fd, SYNC_IOC_FILE_INFO, bytes(_SYNC_FILE_INFO.size))
    except OSError:
        ready = select.select([fd], [], [], 0)[0]
        return 0 if ready else None
    status = _SYNC_FILE_INFO.unpack(info)[1]
    if status > 0:
        return 0
    if status == 0:
        return None
    return -status if -status <= MAX_ERRNO else _errno.EIO


def read_status(fd: int, kind: FenceFdKind) -> int | None:
    """Return the errno a fence fd signalled with (0: none); None while pending."""
    if kind == "fence":
        return _peek(fd)
    return _sync_file_status(fd)
