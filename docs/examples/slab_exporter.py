"""SlabExporter: the exporter built step by step in docs/writing-an-exporter.md.

Buffers live in fixed-size slabs of one anonymous memory area. A buffer gets
its slab late, at its first map or CPU access (so a buffer that is never used
costs nothing), and waits for one while every slab is taken. The slab is
cleared a chunk at a time, letting other tasks run in between; a cancellation
in the middle gives the slab back. Ops that never wait are plain functions.
It imports only :mod:`asyncdmabuf`, as every exporter should (and
:mod:`asyncdmabuf.lowlevel` for the toolkit). ``tests/test_conformance.py`` runs the
exporter conformance suite on this very file.
"""

from __future__ import annotations

import mmap
from typing import ClassVar

import anyio
import anyio.lowlevel

import asyncdmabuf as dmabuf
from asyncdmabuf import (
    Attachment,
    Busy,
    CpuMode,
    Direction,
    DmaBuf,
    InvalidArgument,
    OutOfMemory,
    SgEntry,
    SgTable,
)

# --8<-- [start:state]
#: Where slab 0 sits on the (simulated) bus.
BASE_ADDRESS = 0x4000_0000
#: Slabs are cleared this many bytes at a time, with a checkpoint in between.
CLEAR_CHUNK = 16 * 1024


class _SlabBuffer:
    """A buffer's state, kept as ``buf.priv``: its slab, once it has one."""

    __slots__ = ("slab",)

    def __init__(self) -> None:
        self.slab: int | None = None


class SlabExporter(dmabuf.Exporter):
    """Buffers of up to ``slab_size`` bytes, in ``slabs`` slabs of one memory area."""

    name: ClassVar[str] = "slab"

    def __init__(self, slabs: int = 8, slab_size: int = 64 * 1024) -> None:
        self.slabs = slabs
        self.slab_size = slab_size
        self.memory = mmap.mmap(-1, slabs * slab_size)  # anonymous: starts zeroed
        self.free: list[int] = list(range(slabs))
        self._freed: anyio.Event | None = None  # set when a slab comes back

    async def allocate(self, size: int, *, name: str | None = None) -> DmaBuf:
        """Make a buffer; its slab comes at its first map or CPU access."""
        if isinstance(size, int) and size > self.slab_size:
            raise OutOfMemory(f"{size} bytes never fit in a {self.slab_size}-byte slab")
        await anyio.lowlevel.checkpoint()  # a coroutine is a checkpoint: keep it so
        return dmabuf.export(self, size, priv=_SlabBuffer(), name=name)

    # --8<-- [end:state]

    # --8<-- [start:backing]
    async def _take_slab(self) -> int:
        """Wait for a free slab and clear it; on cancellation, give it back."""
        while not self.free:
            if self._freed is None:
                self._freed = anyio.Event()
            await self._freed.wait()  # nothing taken yet: cancelling here is free
        slab = self.free.pop()
        try:
            start = slab * self.slab_size
            for offset in range(0, self.slab_size, CLEAR_CHUNK):
                end = min(offset + CLEAR_CHUNK, self.slab_size)
                self.memory[start + offset : start + end] = bytes(end - offset)
                await anyio.lowlevel.checkpoint()  # let other tasks run
        except BaseException:
            self._give_back(slab)  # cancelled half-way: undo, then propagate
            raise
        return slab

    def _give_back(self, slab: int) -> None:
        self.free.append(slab)
        if self._freed is not None:
            self._freed.set()
            self._freed = None

    async def _ensure_slab(self, buf: DmaBuf) -> None:
        state: _SlabBuffer = buf.priv
        if state.slab is None:
            state.slab = await self._take_slab()  # recorded only once it is ready

    # --8<-- [end:backing]

    # --8<-- [start:attach]
    def attach(self, buf: DmaBuf, attachment: Attachment) -> None:
        """Refuse, before any map, a device this exporter can never serve.

        A plain function: it never waits.

        It must reach every slab; a contiguous one must take the buffer whole.
        """
        device = attachment.device
        top = BASE_ADDRESS + self.slabs * self.slab_size - 1
        if top > device.dma_mask:
            raise Busy(f"{device.name} cannot reach {self.name} memory")
        if device.contiguous and buf.size > device.max_segment_size:
            raise Busy(f"{device.name} needs one entry longer than it accepts")

    # --8<-- [end:attach]

    # --8<-- [start:map]
    def _table(self, attachment: Attachment, direction: Direction) -> SgTable:
        state: _SlabBuffer = attachment.buffer.priv
        assert state.slab is not None
        start = BASE_ADDRESS + state.slab * self.slab_size
        size = attachment.buffer.size
        segment = attachment.device.max_segment_size
        entries = [
            SgEntry(start + offset, min(segment, size - offset), offset)
            for offset in range(0, size, segment)
        ]
        return SgTable(entries, direction=direction, attachment=attachment)

    async def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        await self._ensure_slab(attachment.buffer)
        return self._table(attachment, direction)

    def try_map(self, attachment: Attachment, direction: Direction) -> SgTable:
        state: _SlabBuffer = attachment.buffer.priv
        if state.slab is None:  # map() would wait for (and clear) a slab
            raise Busy(f"{attachment.buffer!r} has no slab yet")
        return self._table(attachment, direction)

    def unmap(self, attachment: Attachment, sgt: SgTable, direction: Direction) -> None:
        """Nothing to do: a buffer keeps its slab until it is released."""

    # --8<-- [end:map]

    # --8<-- [start:cpu]
    async def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        await self._ensure_slab(buf)

    def vmap(self, buf: DmaBuf) -> memoryview:
        state: _SlabBuffer = buf.priv
        if state.slab is None:
            raise InvalidArgument(f"{buf!r} has no slab yet")
        start = state.slab * self.slab_size
        return memoryview(self.memory)[start : start + buf.size]

    def release(self, buf: DmaBuf) -> None:
        """Give the slab back. Plain: garbage collection can run it too."""
        state: _SlabBuffer = buf.priv
        if state.slab is not None:
            self._give_back(state.slab)
            state.slab = None

    # --8<-- [end:cpu]
