"""Imported fences: a fence known only through an fd (the kernel's ``sync_file``).

The fd is this library's fence socket (from this process or another) or a
real kernel ``sync_file``; ``_fence_fd`` tells which, from the kernel's
identity of the file. Nothing delivers an imported fence's signal: whoever
awaits or tests it notices it, by peeking at the fd. Tasks awaiting it take
turns: one polls the fd, the others park on the fence's wait queue behind it
and one of them takes over if the poller is cancelled.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from typing import Final, final

import anyio

from . import _fence, _fence_fd
from ._errors import InvalidArgument
from ._fd import dup_cloexec
from ._fence import Fence, settle
from ._fence_fd import FenceFdKind

__all__ = ["ImportedFence", "import_fence"]

_IMPORTED_NAMES: Final = ("sync_file", "imported")

#: Kernel sync_files share one anonymous inode: each import is told apart by
#: a number of its own instead.
_sync_files = itertools.count(1)


def import_fence(fd: int) -> Fence:
    """Return the fence behind ``fd`` (see :meth:`Fence.import_fd`).

    Raises:
        BadFileDescriptor: ``fd`` is not open.
        InvalidArgument: It is neither a fence fd nor a kernel sync_file.
    """
    kind = _fence_fd.classify(fd)
    key: tuple[object, ...]
    if kind == "fence":
        key = _fence_fd.file_key(fd)
        known = _fence._by_file.get(key)
        if known is not None:
            return known
    else:
        key = ("sync_file", next(_sync_files))
    return ImportedFence(dup_cloexec(fd), kind, key)


@final
class ImportedFence(Fence):
    """A fence known only through an fd: the kernel's ``sync_file``."""

    __slots__ = ("_fd", "_key", "_kind")

    def __init__(self, fd: int, kind: FenceFdKind, key: tuple[object, ...]) -> None:
        super().__init__()
        self._names = _IMPORTED_NAMES
        self._fd = fd
        self._kind: FenceFdKind = kind
        self._key = key
        self._passive = True
        if kind == "fence":
            _fence._by_file[key] = self
        self._poll()

    def signal(self, error: Exception | int | None = None) -> None:
        """Refuse: an imported fence is signalled by its owner.

        Raises:
            InvalidArgument: Always.
        """
        raise InvalidArgument(f"{self!r} is signalled by its owner")

    def _poll(self) -> bool:
        if self._signaled:
            return True
        code = _fence_fd.read_status(self._fd, self._kind)
        if code is not None:
            self._mark(_fence_fd.error_from_errno(code) if code else None)
            settle(deque([self]))
        return self._signaled

    def _release(self) -> None:
        if not self._polling:  # the poller closes it when it stops
            self._close_fd()

    def _poll_ended(self) -> None:
        if self._signaled:
            self._close_fd()

    async def _wait_ready(self) -> None:
        await anyio.wait_readable(self._fd)

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            if _fence._by_file.get(self._key) is self:
                del _fence._by_file[self._key]
            os.close(fd)

    def export_fd(self) -> int:
        """Return a new fd for the same fence (a duplicate of the imported one)."""
        if self._fd >= 0:
            return dup_cloexec(self._fd)
        return super().export_fd()

    def _watch_fd(self) -> tuple[tuple[object, ...], int, FenceFdKind]:
        if self._fd >= 0:
            return self._key, self._fd, self._kind
        return super()._watch_fd()  # pragma: no cover: signalled leaves are skipped

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self._close_fd()
