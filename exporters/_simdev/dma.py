"""A SimDevice's DMA engine: transfers one at a time, each fenced on a timeline."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import final

import anyio

from asyncdmabuf import Direction, FenceContext, InvalidArgument, SgTable, Usage

__all__ = ["DmaEngine"]


@final
class DmaEngine:
    """Moves bytes between tables, first come first served, on virtual time.

    Args:
        name: Names the engine's fence timeline (``<name>:dma``).
        latency: Seconds each transfer takes to start.
        bandwidth: Bytes per second; None for no limit.
        check_table: Raises if a table is not mapped for the engine's device
            in one of the given directions.
    """

    __slots__ = (
        "_check",
        "_lock",
        "_name",
        "_timeline",
        "bandwidth",
        "bytes_copied",
        "copies",
        "latency",
    )

    def __init__(
        self,
        name: str,
        latency: float,
        bandwidth: float | None,
        check_table: Callable[[SgTable, str, tuple[Direction, ...]], None],
    ) -> None:
        self._name = name
        self.latency = latency
        self.bandwidth = bandwidth
        self._check = check_table
        self._lock: anyio.Lock | None = None  # made in the loop that uses it
        self._timeline: FenceContext | None = None
        self.copies = 0
        self.bytes_copied = 0

    @property
    def lock(self) -> anyio.Lock:
        """The engine itself: one transfer holds it at a time."""
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock

    async def copy(
        self,
        src: SgTable,
        dst: SgTable,
        nbytes: int,
        src_offset: int,
        dst_offset: int,
        fault: Callable[[], None],
    ) -> None:
        """Run one checked transfer; see :meth:`SimDevice.copy`."""
        if self._timeline is None:
            self._timeline = FenceContext(f"{self._name}:dma", driver="simdev")
        fence = self._timeline.fence()
        dst.attachment.buffer.resv.add_fence(fence, Usage.WRITE)
        src.attachment.buffer.resv.add_fence(fence, Usage.READ)
        try:
            async with self.lock:
                seconds = self.latency + (
                    nbytes / self.bandwidth if self.bandwidth else 0
                )
                if seconds > 0:
                    await anyio.sleep(seconds)
                fault()
                # Unmapped while the transfer was in flight: a bug in the caller
                # that real hardware would turn into corruption; here, an error.
                self._check(src, "source", (src.direction,))
                self._check(dst, "destination", (dst.direction,))
                _transfer(src, dst, nbytes, src_offset, dst_offset)
        except BaseException as exc:
            fence.signal(exc if isinstance(exc, Exception) else errno.ECANCELED)
            raise
        fence.signal()
        self.copies += 1
        self.bytes_copied += nbytes


def _segments(sgt: SgTable, start: int, nbytes: int) -> list[tuple[int, int]]:
    """The ``(offset, length)`` pieces of ``[start, start + nbytes)``, per entry."""
    end = start + nbytes
    pieces = []
    for entry in sgt:
        low = max(entry.offset, start)
        high = min(entry.offset + entry.length, end)
        if low < high:
            pieces.append((low, high - low))
    return pieces


def _transfer(
    src: SgTable, dst: SgTable, nbytes: int, src_offset: int, dst_offset: int
) -> None:
    """Copy entry by entry through both buffers' CPU views."""
    src_buf, dst_buf = src.attachment.buffer, dst.attachment.buffer
    with (
        src_buf.exporter.vmap(src_buf) as source,
        dst_buf.exporter.vmap(dst_buf) as target,
    ):
        if target.readonly:
            raise InvalidArgument(f"{dst_buf!r} is read-only")
        reads = iter(_segments(src, src_offset, nbytes))
        writes = iter(_segments(dst, dst_offset, nbytes))
        read_at = read_len = write_at = write_len = moved = 0
        while moved < nbytes:
            if not read_len:
                read_at, read_len = next(reads)
            if not write_len:
                write_at, write_len = next(writes)
            n = min(read_len, write_len)
            target[write_at : write_at + n] = source[read_at : read_at + n]
            read_at, read_len, moved = read_at + n, read_len - n, moved + n
            write_at, write_len = write_at + n, write_len - n
