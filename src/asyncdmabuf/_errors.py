"""The exceptions the framework raises on purpose.

Every one of them is an :class:`OSError` with ``errno`` set, so callers can write
``except OSError as e: if e.errno == errno.EBUSY`` as they would around a syscall.
Cancellation is never converted into one of these.
"""

from __future__ import annotations

import errno as _errno
import os

import anyio

__all__ = [
    "BadFileDescriptor",
    "Busy",
    "DmaBufError",
    "InjectedFault",
    "InvalidArgument",
    "NoDevice",
    "OutOfMemory",
]


class DmaBufError(OSError):
    """Base class of every error the framework raises on purpose.

    Args:
        message: What went wrong, for a person.
        code: The errno to carry; subclasses supply their own.
    """

    default_errno: int = _errno.EIO

    def __init__(self, message: str, *, code: int | None = None) -> None:
        code = self.default_errno if code is None else code
        super().__init__(code, message)

    def __str__(self) -> str:
        return f"[{_errno.errorcode.get(self.errno or 0, '?')}] {self.strerror}"

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.strerror, self.errno))


def _rebuild(cls: type[DmaBufError], message: str, code: int) -> DmaBufError:
    return cls(message, code=code)


class Busy(DmaBufError, anyio.WouldBlock):
    """EBUSY: a ``try_*`` call would have had to wait, or an exporter refused.

    Also an :class:`anyio.WouldBlock`, so code written for anyio's ``*_nowait``
    conventions catches it.
    """

    default_errno = _errno.EBUSY


class InvalidArgument(DmaBufError, ValueError):
    """EINVAL: bad sizes or directions, use after release, a wrong table or fd."""

    default_errno = _errno.EINVAL


class BadFileDescriptor(DmaBufError):
    """EBADF: the fd given is not open."""

    default_errno = _errno.EBADF


class OutOfMemory(DmaBufError, MemoryError):
    """ENOMEM: a request that can never be satisfied, or a failed allocation."""

    default_errno = _errno.ENOMEM


class NoDevice(DmaBufError):
    """ENODEV: the exporter's backing does not exist on this machine."""

    default_errno = _errno.ENODEV


class InjectedFault(DmaBufError):
    """EIO unless told otherwise: a fault an exporter raised on purpose.

    Simulated devices raise it (or a subclass that is also the error the
    fault stands for, an :class:`OutOfMemory` say) so that tools such as the
    stress command tell an injected fault from a finding.
    """


def from_oserror(exc: OSError, what: str) -> DmaBufError:
    """Return the framework error that matches an ``OSError`` from a syscall.

    Args:
        exc: The error the syscall raised.
        what: What was being done, for the message.
    """
    code = exc.errno or _errno.EIO
    message = f"{what}: {os.strerror(code)}"
    for cls in (BadFileDescriptor, InvalidArgument, OutOfMemory, Busy, NoDevice):
        if cls.default_errno == code:
            return cls(message)
    return DmaBufError(message, code=code)
