"""Reservation objects: ``struct dma_resv``, the fences guarding a buffer.

Each fence is kept with a :class:`Usage`. Asking about a usage considers the
fences of that usage and every stronger one (a lower value): a reader waits
for ``WRITE`` (and ``KERNEL``) fences, a writer for ``READ`` ones as well, and
``BOOKKEEP`` fences are never waited on implicitly. Signalled fences are
dropped as they are noticed.
"""

from __future__ import annotations

from typing import final

import anyio.lowlevel

from ._fence import Fence
from ._types import Usage
from ._validate import check_cpu_mode, check_usage

__all__ = ["Reservation", "Usage"]


def cpu_usage(mode: object) -> Usage:
    """Return the usage CPU access in ``mode`` waits for (``dma_resv_usage_rw``).

    ``"r"`` waits for writers (``WRITE``); ``"w"`` and ``"rw"`` for readers as
    well (``READ``).

    Raises:
        TypeError: ``mode`` is not a str.
        InvalidArgument: It is not ``"r"``, ``"w"`` or ``"rw"``.
    """
    return Usage.WRITE if check_cpu_mode(mode) == "r" else Usage.READ


@final
class Reservation:
    """The fences of a buffer and what they do to it: ``struct dma_resv``."""

    __slots__ = ("__weakref__", "_fences")

    def __init__(self) -> None:
        self._fences: list[tuple[Fence, Usage]] = []

    def _prune(self) -> list[tuple[Fence, Usage]]:
        # Every fence is asked (an imported one notices its signal when asked).
        fences = self._fences
        kept = [(f, u) for f, u in fences if not f.signaled]
        if len(kept) != len(fences):
            self._fences = fences = kept
        return fences

    def add_fence(self, fence: Fence, usage: Usage) -> None:
        """Add ``fence`` with ``usage`` (``dma_resv_add_fence``).

        A pending fence of the same context that is not later and has the same
        or a weaker usage is replaced; one that is at least as late with the
        same or a stronger usage makes ``fence`` redundant, so it is not
        added. A fence's usage can thus be raised, never lowered. A fence that
        has already signalled is not kept.

        Raises:
            TypeError: ``fence`` is not a :class:`Fence`, or ``usage`` not a
                :class:`Usage`.
            InvalidArgument: ``usage`` is an int that is no usage.
        """
        if not isinstance(fence, Fence):
            raise TypeError(f"add_fence() needs a Fence, not {type(fence).__name__}")
        usage = check_usage(usage)
        fences = self._prune()
        if fence.signaled:
            return
        context, seqno = fence._context, fence._seqno
        kept: list[tuple[Fence, Usage]] = []
        for old, old_usage in fences:
            if old._context == context:
                if old_usage <= usage and old._seqno >= seqno:
                    return  # ``old`` already covers ``fence``
                if old_usage >= usage and seqno >= old._seqno:
                    continue  # ``fence`` covers ``old``
            kept.append((old, old_usage))
        kept.append((fence, usage))
        self._fences = kept

    def fences(self, usage: Usage = Usage.BOOKKEEP) -> tuple[tuple[Fence, Usage], ...]:
        """Return the pending fences of ``usage`` or stronger, with their usage.

        Raises:
            TypeError: ``usage`` is not a :class:`Usage`.
            InvalidArgument: ``usage`` is an int that is no usage.
        """
        usage = check_usage(usage)
        return tuple((f, u) for f, u in self._prune() if u <= usage)

    def test(self, usage: Usage) -> bool:
        """Return whether every fence of ``usage`` or stronger has signalled.

        Never waits and never checkpoints.

        Raises:
            TypeError: ``usage`` is not a :class:`Usage`.
            InvalidArgument: ``usage`` is an int that is no usage.
        """
        usage = check_usage(usage)
        return not any(u <= usage for _, u in self._prune())

    async def wait(self, usage: Usage) -> None:
        """Wait until every fence of ``usage`` or stronger has signalled.

        Always a checkpoint. Fences added while waiting are waited for too, so
        on return :meth:`test` is true. Errors the fences signalled with are
        not raised. Cancelled, it leaves nothing behind.

        Raises:
            TypeError: ``usage`` is not a :class:`Usage`.
            InvalidArgument: ``usage`` is an int that is no usage.
        """
        usage = check_usage(usage)
        waited = False
        while True:
            pending = next((f for f, u in self._prune() if u <= usage), None)
            if pending is None:
                break
            await pending.wait()
            waited = True
        if not waited:
            await anyio.lowlevel.checkpoint()

    # -- what a buffer delegates ----------------------------------------------------

    def test_for_cpu(self, mode: str) -> bool:
        """Return whether CPU access in ``mode`` could start without waiting.

        Raises:
            TypeError: ``mode`` is not a str.
            InvalidArgument: It is not ``"r"``, ``"w"`` or ``"rw"``.
        """
        return self.test(cpu_usage(mode))

    async def wait_for_cpu(self, mode: str) -> None:
        """Wait for the fences CPU access in ``mode`` must wait for (a checkpoint).

        ``"r"`` waits for ``WRITE`` fences, ``"w"`` and ``"rw"`` for ``READ``
        fences too.

        Raises:
            TypeError: ``mode`` is not a str.
            InvalidArgument: It is not ``"r"``, ``"w"`` or ``"rw"``.
        """
        await self.wait(cpu_usage(mode))

    def export_sync_fd(self, mode: str) -> int:
        """Return one fd for the fences a reader (``"r"``) or writer must wait for.

        Like ``DMA_BUF_IOCTL_EXPORT_SYNC_FILE``: a snapshot, so fences added
        later do not make it busy; with nothing pending it is already
        readable. The caller owns the fd (``O_CLOEXEC``) and closes it.

        With fences of other processes pending, the fd is finished by the
        process's one fence watcher thread, which holds nothing of it once
        every holder has closed it; the export adds nothing to the fences.

        Raises:
            TypeError: ``mode`` is not a str.
            InvalidArgument: It is not ``"r"``, ``"w"`` or ``"rw"``.
        """
        usage = cpu_usage(mode)
        pending = [f for f, u in self._prune() if u <= usage]
        return Fence.all(*pending).export_fd()

    def import_sync_fd(self, fd: int, mode: str) -> None:
        """Add the fence behind ``fd`` (``DMA_BUF_IOCTL_IMPORT_SYNC_FILE``).

        ``"r"`` adds it as a ``READ`` fence (writers wait for it, readers do
        not); ``"w"`` and ``"rw"`` as a ``WRITE`` fence (both wait). The fd
        stays the caller's.

        Raises:
            TypeError: ``mode`` is not a str, or ``fd`` not an int.
            InvalidArgument: ``mode`` is not ``"r"``, ``"w"`` or ``"rw"``, or
                ``fd`` is not a fence's fd.
            BadFileDescriptor: ``fd`` is not open.
        """
        usage = Usage.READ if cpu_usage(mode) is Usage.WRITE else Usage.WRITE
        self.add_fence(Fence.import_fd(fd), usage)

    def __repr__(self) -> str:
        return f"<Reservation, {len(self._prune())} pending fence(s)>"
