"""SimDevice: an exporter with finite memory, and the device that imports with it.

A :class:`SimDevice` is both sides of dma-buf at once, as a GPU is:

- an exporter whose buffers live in its own finite memory, a range of simulated
  bus addresses (``[base_address, base_address + memory)``, split into pages).
  A buffer gets its pages late, at its first map (or CPU access), so they can be
  placed where every device attached by then can reach them. When memory is
  full, ``map()`` evicts unpinned buffers (least recently used first), or waits,
  first come first served, until memory frees;
- an importer: :attr:`SimDevice.device` is the :class:`~asyncdmabuf.Device` it
  attaches with, to buffers of any exporter, and its DMA engine
  (:meth:`SimDevice.copy`) moves bytes between tables mapped for it.

The bytes are real: a resident buffer's bytes live in an anonymous mapping of
this process (the CPU's view of its pages, which :meth:`SimDevice.vmap` returns),
an evicted buffer's in a saved copy, put back when it is mapped again. Time
(allocation and map latency, DMA bandwidth) runs on ``anyio.sleep``, so trio's
``MockClock`` drives it in tests. Faults are injected by probability and by
script, deterministically under a seed.

Pinning follows the kernel's rules: a static attachment pins the backing from
its first map until its detach; a dynamic one (made with ``move_notify``) only
while it has tables mapped; CPU access pins until it ends. Before an unpinned
buffer moves, each of its dynamic attachments gets ``move_notify()``.

The undo ops (``unmap``, ``detach``, ``release``, ``end_cpu_access``) never
wait: they are plain functions, so they run to completion wherever they are
called, the garbage collector's release of a buffer never put included. A
device, like its buffers, belongs to one event loop run.
"""

from __future__ import annotations

import mmap
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar, final, get_args, overload

import anyio
import anyio.lowlevel

from asyncdmabuf import (
    Busy,
    Device,
    Direction,
    DmaBuf,
    Exporter,
    InvalidArgument,
    OutOfMemory,
    SgEntry,
    SgTable,
    export,
)
from asyncdmabuf.exporters._faults import Fault, FaultOp, FaultPlan, Injector
from asyncdmabuf.lowlevel import (
    DMA_MASK_64,
    UNLIMITED_SEGMENT,
    check_int,
    check_name,
    check_number,
)

from .constraints import Geometry, Need
from .dma import DmaEngine
from .eviction import Memory
from .pages import Runs
from .state import SimAttachment, SimBuffer
from .stats import SimStatistics

if TYPE_CHECKING:
    from asyncdmabuf import Attachment, CpuMode

__all__ = ["DEFAULT_BASE_ADDRESS", "SimDevice"]

#: Where a device's memory starts on the simulated bus unless told otherwise:
#: low, so that 32-bit (and narrower) DMA masks mean something.
DEFAULT_BASE_ADDRESS = 0x1000_0000

_READABLE = (Direction.TO_DEVICE, Direction.BIDIRECTIONAL)
_WRITABLE = (Direction.FROM_DEVICE, Direction.BIDIRECTIONAL)


@final
class _Name:
    """``name``: ``"simdev"`` on the class (the exporter's kind, as
    :func:`asyncdmabuf.exporters.load` returns classes), the device's own
    name on an instance."""

    __slots__ = ()

    @overload
    def __get__(self, obj: None, owner: type[object]) -> str: ...
    @overload
    def __get__(self, obj: SimDevice, owner: type[object]) -> str: ...
    def __get__(self, obj: SimDevice | None, owner: type[object]) -> str:
        return "simdev" if obj is None else obj.device.name


class SimDevice(Exporter):
    """A simulated device: finite memory it exports from, and a DMA engine.

    As an exporter, ``await dev.allocate(size)`` makes a buffer whose pages are
    allocated at its first map, honouring every attached device's constraints.
    As an importer, ``buf.attach(dev.device)`` attaches it (with its
    ``dma_mask``, ``max_segment_size`` and ``contiguous``) to buffers of any
    exporter, and :meth:`copy` moves bytes between tables it mapped.

    Args:
        name: The device's name, also its exporter name in bufinfo.
        memory: Its memory in bytes, a multiple of ``page_size``.
        page_size: The allocation granule in bytes.
        dma_mask: As an importer: the highest bus address it reaches.
        max_segment_size: As an importer: the longest entry it accepts.
        contiguous: As an importer: it needs one entry per table.
        base_address: The bus address of its first page.
        alloc_latency: Seconds a buffer's backing takes to allocate.
        map_latency: Seconds the first map of a backing takes, each time it
            becomes resident (setting up its mapping); later maps of the
            resident backing, by any attachment, are immediate, and
            ``try_map`` serves them.
        dma_latency: Seconds every DMA transfer takes to start.
        bandwidth: The DMA engine's bytes per second; None for no limit.
        seed: Seeds the fault draws; the same seed gives the same faults.
        faults: A :class:`FaultPlan`, a mapping of operation to probability, or
            a script of :class:`Fault`.

    Raises:
        TypeError: An argument has the wrong type.
        InvalidArgument: A size, address or time out of range.
    """

    #: The operations a fault can be injected into (:data:`FaultOp`).
    fault_ops: ClassVar[tuple[FaultOp, ...]] = get_args(FaultOp)

    __slots__ = (
        "_alloc_latency",
        "_buffers",
        "_device",
        "_engine",
        "_faults",
        "_geometry",
        "_map_latency",
        "_memory",
    )
    name = _Name()

    def __init__(
        self,
        name: str,
        memory: int = 64 << 20,
        page_size: int = 4096,
        *,
        dma_mask: int = DMA_MASK_64,
        max_segment_size: int = UNLIMITED_SEGMENT,
        contiguous: bool = False,
        base_address: int = DEFAULT_BASE_ADDRESS,
        alloc_latency: float = 0.0,
        map_latency: float = 0.0,
        dma_latency: float = 0.0,
        bandwidth: float | None = None,
        seed: int | None = None,
        faults: FaultPlan | Mapping[FaultOp, float] | Iterable[Fault] | None = None,
    ) -> None:
        self._device = Device(name, dma_mask, max_segment_size, contiguous)
        check_int(page_size, "page_size", 1)
        check_int(memory, "memory", page_size)
        if memory % page_size:
            raise InvalidArgument(f"memory {memory} is not a multiple of {page_size}")
        check_int(base_address, "base_address", 0)
        if base_address + memory - 1 > DMA_MASK_64:
            raise InvalidArgument("the device's memory ends beyond 64-bit addresses")
        if bandwidth is not None:
            bandwidth = check_number(bandwidth, "bandwidth")
            if bandwidth <= 0:
                raise InvalidArgument("bandwidth must be positive")
        if seed is not None:
            check_int(seed, "seed", -(2**63))
        if faults is None:
            plan = FaultPlan()
        elif isinstance(faults, FaultPlan):
            plan = faults
        elif isinstance(faults, Mapping):
            plan = FaultPlan(probability=faults)
        else:
            plan = FaultPlan(script=tuple(faults))
        npages = memory // page_size
        self._geometry = Geometry(base_address, page_size, npages)
        self._alloc_latency = check_number(alloc_latency, "alloc_latency")
        self._map_latency = check_number(map_latency, "map_latency")
        self._engine = DmaEngine(
            name,
            check_number(dma_latency, "dma_latency"),
            bandwidth,
            self._check_table,
        )
        self._faults = Injector(plan, seed)
        self._memory = Memory(npages)
        self._buffers = 0

    def __repr__(self) -> str:
        g, pages = self._geometry, self._memory.pages
        used = (pages.npages - pages.free_pages) * g.page_size
        return (
            f"<SimDevice {self.name!r} {used}/{g.npages * g.page_size} bytes "
            f"in use, {self._buffers} buffers>"
        )

    # -- configuration ----------------------------------------------------------

    @property
    def device(self) -> Device:
        """The device this SimDevice attaches to buffers with (its constraints)."""
        return self._device

    @property
    def memory(self) -> int:
        """The device's memory in bytes."""
        return self._geometry.npages * self._geometry.page_size

    @property
    def page_size(self) -> int:
        """The allocation granule in bytes."""
        return self._geometry.page_size

    @property
    def base_address(self) -> int:
        """The bus address of the device's first page."""
        return self._geometry.base

    # -- public operations ------------------------------------------------------

    async def allocate(self, size: int, *, name: str | None = None) -> DmaBuf:
        """Create a buffer of ``size`` bytes in this device's memory (a checkpoint).

        No pages are taken yet: they are allocated at the first map, where the
        buffer reads as zeros.

        Raises:
            TypeError: ``size`` is not an int.
            InvalidArgument: ``size`` is not positive, or ``name`` is too long.
            OutOfMemory: ``size`` exceeds the device's whole memory, or an
                injected allocation failure.
        """
        check_int(size, "size")
        check_name(name)
        g = self._geometry
        npages = -(-size // g.page_size)
        if npages > g.npages:
            raise OutOfMemory(
                f"{size} bytes can never fit in the {self.memory} bytes of "
                f"{self.name!r}"
            )
        await anyio.lowlevel.checkpoint()
        self._fault("allocate", f"{size} bytes")
        state = SimBuffer(size, npages)
        buf = export(self, size, state, name)
        state.ref = weakref.ref(buf)
        self._buffers += 1
        return buf

    async def copy(
        self,
        src: SgTable,
        dst: SgTable,
        *,
        nbytes: int | None = None,
        src_offset: int = 0,
        dst_offset: int = 0,
    ) -> int:
        """Move bytes from ``src`` to ``dst`` with the DMA engine (a checkpoint).

        Both tables must be mapped by attachments of :attr:`device`, ``src``
        for reading (``TO_DEVICE`` or ``BIDIRECTIONAL``), ``dst`` for writing
        (``FROM_DEVICE`` or ``BIDIRECTIONAL``). Transfers queue for the engine
        one at a time, first come first served; each takes ``dma_latency`` plus
        ``nbytes / bandwidth`` seconds, then the bytes land, following both
        tables' entries, in the buffers' real memory. A transfer cancelled
        before it completes moves nothing.

        Implicit sync: from submission until the transfer ends, a fence of the
        engine's timeline sits in ``dst``'s reservation as a ``WRITE`` fence and
        in ``src``'s as a ``READ`` fence, so ``cpu_access("r")`` of the
        destination (or a write to the source) waits for the transfer. The fence
        signals when the transfer ends, with the error if it failed or was
        cancelled.

        Args:
            src: The table to read.
            dst: The table to write.
            nbytes: How many bytes; by default the rest of ``src`` from
                ``src_offset``.
            src_offset: Where to start reading in the source buffer.
            dst_offset: Where to start writing in the destination buffer.

        Returns:
            The number of bytes moved.

        Raises:
            TypeError: A table is not an :class:`~asyncdmabuf.SgTable`, or a
                number not an int.
            InvalidArgument: A table is unmapped, not this device's, mapped for
                the wrong direction, or the range runs past a buffer's end;
                or a buffer's exporter gives no CPU view of its bytes.
            InjectedFault: An injected fault.
        """
        for sgt in (src, dst):
            if not isinstance(sgt, SgTable):
                raise TypeError(f"copy() needs SgTables, not {type(sgt).__name__}")
        self._check_table(src, "source", _READABLE)
        self._check_table(dst, "destination", _WRITABLE)
        check_int(src_offset, "src_offset", 0)
        check_int(dst_offset, "dst_offset", 0)
        if nbytes is None:
            nbytes = max(src.nbytes - src_offset, 0)
        check_int(nbytes, "nbytes", 0)
        if src_offset + nbytes > src.nbytes or dst_offset + nbytes > dst.nbytes:
            raise InvalidArgument(
                f"copying {nbytes} bytes from offset {src_offset} to offset "
                f"{dst_offset} runs past the end of a {src.nbytes}- or "
                f"{dst.nbytes}-byte buffer"
            )

        def fault() -> None:
            self._fault("copy", f"{nbytes} bytes")

        await self._engine.copy(src, dst, nbytes, src_offset, dst_offset, fault)
        return nbytes

    def statistics(self) -> SimStatistics:
        """Return a snapshot of the device's memory, waiters and counters."""
        m, page = self._memory, self._geometry.page_size
        return SimStatistics(
            memory_total=m.pages.npages * page,
            memory_in_use=(m.pages.npages - m.pages.free_pages) * page,
            memory_pinned=m.pinned_pages() * page,
            waiters=m.waiting,
            evictions=m.evictions,
            faults_injected=self._faults.injected,
            restores=m.restores,
            buffers=self._buffers,
            resident=len(m.resident),
            copies=self._engine.copies,
            bytes_copied=self._engine.bytes_copied,
        )

    def inject_fault(
        self, op: FaultOp, *, nth: int = 1, error: type[Exception] | None = None
    ) -> None:
        """Make the ``nth`` call of ``op`` from now on fail (see :class:`Fault`).

        Raises:
            InvalidArgument: ``op`` names no operation, or ``nth`` is below 1.
            TypeError: ``error`` is not an exception class.
        """
        self._faults.arm(Fault(op, nth, error))

    def _audit(self) -> list[str]:
        """For tests: every way the accounting disagrees with the buffers."""
        return self._memory.audit()

    # -- exporter ops -----------------------------------------------------------

    async def attach(self, buf: DmaBuf, attachment: Attachment) -> None:
        """Accept a device if the buffer can be placed where it reaches.

        A resident buffer the device cannot reach is moved out (to be placed
        again at the next map) if nothing pins it.

        Raises:
            Busy: No placement can meet one of this device's constraints (the
                message names it), or the backing is pinned where it cannot
                reach; or an injected fault.
            OutOfMemory: The backing had to move and its bytes could not be
                saved.
        """
        st = self._state(buf)
        self._fault("attach", repr(attachment.device))
        device = attachment.device
        reason = self._geometry.unserviceable(st, device)
        if reason is not None:
            raise Busy(
                f"{self.name!r} cannot place {buf!r} for {device.name!r}: {reason}"
            )
        if st.runs is not None:
            misfit = self._geometry.misfit(st, device)
            if misfit is not None:
                if st.pinned or st.busy:
                    raise Busy(
                        f"the backing of {buf!r} is pinned where {device.name!r} "
                        f"cannot use it: {misfit}"
                    )
                self._memory.evict(st)
                self._memory.dispatch()
        attachment.priv = SimAttachment()

    def detach(self, buf: DmaBuf, attachment: Attachment) -> None:
        """Drop the pin of a static attachment that has mapped; never waits."""
        st = self._state(buf)
        ast: SimAttachment | None = attachment.priv
        if ast is not None and ast.pinned:
            ast.pinned = False
            st.static_pins -= 1
            if not st.pinned:
                self._memory.dispatch()
        self._fault("detach", repr(attachment.device))

    async def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        """Return a table, allocating or restoring the backing first if needed.

        Waits while memory is full (after evicting what it can), behind any
        earlier waiter, then for ``alloc_latency``, then for ``map_latency``
        if the backing was not mapped since it became resident. A cancelled
        wait leaves no pages reserved.

        Raises:
            OutOfMemory: The reachable memory can never hold the buffer, an
                eviction that would make room failed, or an injected
                allocation failure.
            InjectedFault: An injected fault.
        """
        st = self._state(attachment.buffer)
        self._fault("map", repr(attachment.device))
        if st.runs is None:
            await self._populate(st)
        if self._map_latency and st.mapped_generation != st.generation:
            st.busy += 1
            try:
                await anyio.sleep(self._map_latency)
            except BaseException as exc:
                st.busy -= 1
                if not st.busy and not st.pinned:
                    self._memory.dispatch_after(exc)
                raise
            st.busy -= 1
        return self._table(attachment, st, direction)

    def try_map(self, attachment: Attachment, direction: Direction) -> SgTable:
        """Return a table without waiting, or raise :class:`Busy`.

        Evicts if that makes room (eviction never waits), and allocates when
        no latency is configured and nobody waits for memory. A backing that
        is resident and mapped since it became resident is served whatever
        the latencies.

        Raises:
            Busy: ``map()`` would wait: a backing to allocate with latency or
                without room, a first map with ``map_latency``, earlier
                waiters, or an eviction in progress. The message says which.
            OutOfMemory: As for :meth:`map`.
            InjectedFault: An injected fault.
        """
        m = self._memory
        st = self._state(attachment.buffer)
        self._fault("map", repr(attachment.device))
        if m.evicting:
            raise Busy(f"{self.name!r} is moving a buffer")
        if st.runs is None:
            if self._alloc_latency:
                raise Busy(
                    f"the backing of {attachment.buffer!r} is not resident and "
                    f"allocating it on {self.name!r} takes {self._alloc_latency} s"
                )
            if m.waiting:
                raise Busy(f"{m.waiting} maps already wait for memory")
            runs = m.reserve(self._need(st), st)
            if runs is None:
                raise Busy(f"the memory of {self.name!r} is full")
            self._finish_populate(st, runs)
        if self._map_latency and st.mapped_generation != st.generation:
            raise Busy(
                f"the backing of {attachment.buffer!r} was not mapped since it "
                f"became resident, and its first map on {self.name!r} takes "
                f"{self._map_latency} s"
            )
        return self._table(attachment, st, direction)

    def unmap(self, attachment: Attachment, sgt: SgTable, direction: Direction) -> None:
        """Drop a dynamic attachment's pin (a static one's stays until detach)."""
        st = self._state(attachment.buffer)
        if attachment.dynamic:
            ast: SimAttachment = attachment.priv
            ast.maps -= 1
            st.dynamic_maps -= 1
        self._memory.touch(st)
        if not st.pinned:
            self._memory.dispatch()
        self._fault("unmap", repr(attachment.device))

    def release(self, buf: DmaBuf) -> None:
        """Free the buffer's pages and bytes, then serve memory waiters.

        Never waits, and is safe to call more than once: the garbage collector
        may release a buffer that was never put.
        """
        st = self._state(buf)
        if st.released:
            return
        st.released = True
        self._buffers -= 1
        if st.runs is not None:
            self._memory.free(st)
        st.close_frame()
        st.saved = None
        self._memory.dispatch()
        self._fault("release", repr(buf))

    async def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        """Make the backing resident (waiting for memory if needed) and pin it.

        Raises:
            OutOfMemory: As for :meth:`map`.
            InjectedFault: An injected fault.
        """
        st = self._state(buf)
        self._fault("begin_cpu_access", mode)
        if st.runs is None:
            await self._populate(st)
        st.cpu_pins += 1
        self._memory.touch(st)

    def end_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        """Drop the pin taken by :meth:`begin_cpu_access`; never waits."""
        st = self._state(buf)
        if st.cpu_pins:
            st.cpu_pins -= 1
            if not st.pinned:
                self._memory.dispatch()
        self._fault("end_cpu_access", mode)

    def vmap(self, buf: DmaBuf) -> memoryview:
        """Return a writable view of a resident buffer's bytes.

        The view stays valid while the buffer is pinned (mapped, or inside
        ``cpu_access``); an evicted buffer's old view no longer reaches it.

        Raises:
            TypeError: ``buf`` is not a :class:`~asyncdmabuf.DmaBuf`.
            InvalidArgument: The buffer is not this device's, or has no
                backing now (never mapped, or evicted): use
                ``buf.cpu_access()`` or map it first.
        """
        st = self._state(buf)
        if st.frame is None:
            raise InvalidArgument(
                f"{buf!r} is not resident on {self.name!r}; map it or use cpu_access()"
            )
        return memoryview(st.frame)

    # -- helpers ----------------------------------------------------------------

    def _state(self, buf: DmaBuf) -> SimBuffer:
        if not isinstance(buf, DmaBuf):
            raise TypeError(f"expected a DmaBuf, not {type(buf).__name__}")
        st = buf.priv
        if buf.exporter is not self or not isinstance(st, SimBuffer):
            raise InvalidArgument(f"{buf!r} is not a buffer of {self.name!r}")
        return st

    def _fault(self, op: FaultOp, what: str) -> None:
        error = self._faults.check(op, f"{self.name}: {what}")
        if error is not None:
            raise error

    def _check_table(
        self, sgt: SgTable, what: str, directions: tuple[Direction, ...]
    ) -> None:
        if not sgt.valid:
            raise InvalidArgument(f"the {what} table {sgt!r} is not mapped")
        if sgt.attachment.device is not self._device:
            raise InvalidArgument(
                f"the {what} table was mapped for {sgt.attachment.device.name!r}, "
                f"not for {self.name!r}"
            )
        if sgt.direction not in directions:
            raise InvalidArgument(
                f"the {what} table is mapped {sgt.direction.name}, not "
                f"{' or '.join(d.name for d in directions)}"
            )

    def _need(self, st: SimBuffer) -> Need:
        return self._geometry.need(
            st, (att.device for att in st.attachments()), self.name
        )

    def _table(
        self, attachment: Attachment, st: SimBuffer, direction: Direction
    ) -> SgTable:
        """Build the table of a resident buffer for ``attachment`` and pin it."""
        sgt = SgTable(
            self._entries(attachment, st), direction=direction, attachment=attachment
        )
        st.mapped_generation = st.generation
        ast: SimAttachment = attachment.priv
        if attachment.dynamic:
            ast.maps += 1
            st.dynamic_maps += 1
        elif not ast.pinned:
            ast.pinned = True
            st.static_pins += 1
        self._memory.touch(st)
        return sgt

    def _entries(self, attachment: Attachment, st: SimBuffer) -> tuple[SgEntry, ...]:
        ast: SimAttachment = attachment.priv
        if ast.entries is None or ast.generation != st.generation:
            entries = self._geometry.layout(st, attachment.device)
            if entries is None:  # attach() keeps this from happening
                reason = self._geometry.misfit(st, attachment.device)
                raise Busy(
                    f"{attachment.device.name!r} cannot use the backing of "
                    f"{attachment.buffer!r}: {reason}"
                )
            ast.entries, ast.generation = entries, st.generation
        return ast.entries

    async def _populate(self, st: SimBuffer) -> None:
        """Give a buffer pages, waiting for memory and latency; undo if cut short."""
        m = self._memory
        runs = await m.acquire(self._need(st), st)
        try:
            if self._alloc_latency:
                await anyio.sleep(self._alloc_latency)
        except BaseException as exc:
            m.pages.give(runs)
            m.dispatch_after(exc)
            raise
        self._finish_populate(st, runs)

    def _finish_populate(self, st: SimBuffer, runs: Runs) -> None:
        """Fill reserved pages with the buffer's bytes and make it resident."""
        m = self._memory
        try:
            self._fault("backing", f"{st.size} bytes")
            try:
                frame = mmap.mmap(-1, st.size)
            except OSError as exc:
                raise OutOfMemory(f"no memory for {st.size} bytes: {exc}") from None
        except BaseException as exc:
            m.pages.give(runs)
            m.dispatch_after(exc)
            raise
        if st.saved is not None:
            frame[:] = st.saved
            st.saved = None
            m.restores += 1
        st.frame = frame
        m.settle(st, runs)
