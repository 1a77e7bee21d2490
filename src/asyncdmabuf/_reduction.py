"""Pickling a :class:`DmaBuf` through ``multiprocessing``: the fd goes, not the bytes.

The reduction is registered with ``multiprocessing``'s own pickler, as
``multiprocessing.reduction`` registers sockets: the buffer's fd is handed to
``multiprocessing.reduction.DupFd``, which passes it to a child being spawned
with its other fds, or else through the resource sharer (``SCM_RIGHTS`` over a
UNIX socket) when the pickle travels later, through a ``Queue``, a ``Pipe`` or
a ``Pool``. The receiver turns the fd into a buffer as :func:`get` does, with a
reference of its own, and closes the fd. Plain :mod:`pickle` is not affected.
"""

from __future__ import annotations

import os
import weakref
from multiprocessing import context, reduction
from typing import Any, Protocol

from ._buffer import DmaBuf, get
from ._errors import InvalidArgument, from_oserror

__all__: list[str] = []


class _Detachable(Protocol):
    def detach(self) -> int: ...


def _reduce(buf: DmaBuf) -> tuple[Any, tuple[Any, ...]]:
    fd = buf.fd()  # raises InvalidArgument once released
    try:
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise from_oserror(exc, f"fstat of {buf!r}'s file") from None
        if size < buf.size:
            raise InvalidArgument(
                f"{buf!r} has no shareable memory: its exporter does not keep"
                " its bytes in its file"
            )
        popen = context.get_spawning_popen()
        dupfd = reduction.DupFd(fd)
        if popen is not None:
            # A child being spawned inherits the fd itself: keep it open until
            # the launch is over (the Popen object goes with the process).
            weakref.finalize(popen, os.close, fd)
            fd = -1
    finally:
        if fd >= 0:
            os.close(fd)  # the resource sharer keeps a duplicate of its own
    return _rebuild, (dupfd,)


def _rebuild(dupfd: _Detachable) -> DmaBuf:
    """Return the buffer behind the fd that came with a pickle: a new reference.

    As :func:`get`: a buffer of this process comes back as itself; memory from
    another process is imported (its file is sealed against resizing).

    Raises:
        InvalidArgument: The fd is not shareable memory.
    """
    fd = dupfd.detach()
    try:
        return get(fd)
    finally:
        os.close(fd)


reduction.ForkingPickler.register(DmaBuf, _reduce)
