"""SimDevice: a simulated device with finite memory, late allocation and a DMA engine.

A :class:`SimDevice` is both sides of dma-buf at once, as a GPU is:

- an exporter whose buffers live in its own finite memory, a range of simulated
  bus addresses (``[base_address, base_address + memory)``, split into pages).
  A buffer gets its pages late, at its first map (or CPU access), so they can be
  placed where every device attached by then can reach them. When memory is
  full, ``map()`` evicts unpinned buffers (least recently used first), or waits,
  first come first served, until memory frees;
- a :class:`~asyncdmabuf.Device` that attaches to buffers of any exporter and
  moves bytes between tables it mapped with a DMA engine (:meth:`SimDevice.copy`).

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

Policies: pages are taken from the top of the range every attached device
reaches, keeping low memory for narrow masks; memory waiters are served
strictly in arrival order (a small request never overtakes a big one, and a
new map queues behind waiters even when it would fit); eviction happens only
when it is sure to make room. A device, like its buffers, belongs to one event
loop run.
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, final, overload

import anyio

from asyncdmabuf import (
    Busy,
    Device,
    Direction,
    DmaBuf,
    Exporter,
    FenceContext,
    InvalidArgument,
    OutOfMemory,
    SgEntry,
    SgTable,
    Usage,
    export,
)
from asyncdmabuf.lowlevel import DMA_MASK_64, UNLIMITED_SEGMENT, check_int, check_name

from ._faults import Fault, FaultOp, FaultPlan, Injector

if TYPE_CHECKING:
    from asyncdmabuf import Attachment, CpuMode

__all__ = ["Fault", "FaultOp", "FaultPlan", "SimDevice", "SimStatistics"]

#: The most entries one table may have; a device that would need more is refused.
MAX_ENTRIES = 1 << 16
#: Where a device's memory starts on the simulated bus unless told otherwise:
#: low, so that 32-bit (and narrower) DMA masks mean something.
DEFAULT_BASE_ADDRESS = 0x1000_0000

_Runs = tuple[tuple[int, int], ...]
"""A buffer's pages: ``(first_page, count)`` runs, in buffer order."""


# -- public records -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimStatistics:
    """A snapshot of a :class:`SimDevice`'s state; byte counts are page-rounded."""

    memory_total: int
    """The device's memory, in bytes."""
    memory_in_use: int
    """Bytes of pages allocated, including reservations still in their latency."""
    memory_pinned: int
    """Bytes of pages of resident buffers that cannot be evicted (pinned)."""
    waiters: int
    """Maps (and CPU accesses) waiting for memory."""
    evictions: int
    """Buffers moved out of memory (their bytes saved) so far."""
    restores: int
    """Evicted buffers brought back into memory so far."""
    faults_injected: int
    """Faults raised on purpose so far."""
    buffers: int
    """Buffers exported by the device and not yet released."""
    resident: int
    """Of those, how many have their pages now."""
    copies: int
    """Transfers the DMA engine completed."""
    bytes_copied: int
    """Bytes those transfers moved."""


# -- private state --------------------------------------------------------------


def _check_seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{what} must be finite and >= 0, got {value}")
    return float(value)


class _Need(NamedTuple):
    """What a buffer's backing must look like: pages, reach, contiguity."""

    npages: int
    limit: int
    """Only pages below this index are reachable by every attached device."""
    contiguous: bool


@final
class _SimBuffer:
    """A buffer's state, kept as ``buf.priv``."""

    __slots__ = (
        "busy",
        "cpu_pins",
        "dynamic_maps",
        "frame",
        "generation",
        "npages",
        "ref",
        "runs",
        "saved",
        "size",
        "static_pins",
    )

    def __init__(self, size: int, npages: int) -> None:
        self.size = size
        self.npages = npages
        self.ref: weakref.ref[DmaBuf] | None = None
        #: The pages while resident; None before the first map and when evicted.
        self.runs: _Runs | None = None
        #: The bytes while resident.
        self.frame: mmap.mmap | None = None
        #: The bytes while evicted.
        self.saved: bytes | None = None
        self.static_pins = 0
        self.dynamic_maps = 0
        self.cpu_pins = 0
        #: Operations between awaits on the resident buffer (map latency).
        self.busy = 0
        #: Bumped whenever the pages change, to invalidate cached tables.
        self.generation = 0

    @property
    def pinned(self) -> bool:
        return bool(self.static_pins or self.dynamic_maps or self.cpu_pins)

    def attachments(self) -> tuple[Attachment, ...]:
        buf = None if self.ref is None else self.ref()
        return () if buf is None else buf.attachments


@final
class _SimAttachment:
    """An attachment's state, kept as ``attachment.priv``."""

    __slots__ = ("entries", "generation", "maps", "pinned")

    def __init__(self) -> None:
        self.pinned = False
        self.maps = 0
        self.entries: tuple[SgEntry, ...] | None = None
        self.generation = -1


@final
class _Waiter:
    """A map waiting for memory; the dispatcher reserves pages for it in turn."""

    __slots__ = ("buffer", "event", "need", "runs")

    def __init__(self, need: _Need, buffer: _SimBuffer) -> None:
        self.need = need
        self.buffer = buffer
        self.event = anyio.Event()
        self.runs: _Runs | None = None


@final
class _SimState:
    """Everything about a SimDevice that changes, in one place."""

    __slots__ = (
        "alloc_latency",
        "bandwidth",
        "base",
        "buffers",
        "bytes_copied",
        "copies",
        "dispatching",
        "dma_latency",
        "engine",
        "evicting",
        "evictions",
        "faults",
        "free",
        "free_pages",
        "map_latency",
        "npages",
        "page_size",
        "redispatch",
        "resident",
        "restores",
        "timeline",
        "waiters",
    )

    def __init__(
        self,
        *,
        npages: int,
        page_size: int,
        base: int,
        alloc_latency: float,
        map_latency: float,
        dma_latency: float,
        bandwidth: float | None,
        faults: Injector,
    ) -> None:
        self.npages = npages
        self.page_size = page_size
        self.base = base
        self.alloc_latency = alloc_latency
        self.map_latency = map_latency
        self.dma_latency = dma_latency
        self.bandwidth = bandwidth
        self.faults = faults
        #: One byte per page: 1 free, 0 allocated.
        self.free = bytearray(b"\x01" * npages)
        self.free_pages = npages
        #: Resident buffers, least recently used first.
        self.resident: OrderedDict[_SimBuffer, None] = OrderedDict()
        self.waiters: deque[_Waiter] = deque()
        self.engine: anyio.Lock | None = None
        #: The DMA engine's timeline: one fence per transfer, in order.
        self.timeline: FenceContext | None = None
        self.dispatching = False
        self.redispatch = False
        self.evicting = 0
        self.buffers = 0
        self.evictions = 0
        self.restores = 0
        self.copies = 0
        self.bytes_copied = 0


def _find(free: bytearray, need: _Need) -> list[tuple[int, int]] | None:
    """Choose free pages below ``need.limit``, highest first; None if too few.

    Taking the highest reachable pages keeps low memory for narrow DMA masks.
    The runs come back in ascending address order, never adjacent.
    """
    if need.contiguous:
        first = free.rfind(b"\x01" * need.npages, 0, need.limit)
        return None if first < 0 else [(first, need.npages)]
    runs: list[tuple[int, int]] = []
    remaining, end = need.npages, need.limit
    while remaining:
        top = free.rfind(1, 0, end)
        if top < 0:
            return None
        start = free.rfind(0, 0, top) + 1
        take = min(top + 1 - start, remaining)
        runs.append((top + 1 - take, take))
        remaining -= take
        end = start
    runs.reverse()
    return runs


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


# -- the device -----------------------------------------------------------------

#: The slot that holds a Device's name.
_NAME_SLOT: Any = Device.__dict__["name"]


@final
class _Name:
    """``name``: the device's own on an instance, ``"simdev"`` on the class.

    ``Exporter.name`` is a class attribute, read from exporter classes (as
    :func:`asyncdmabuf.exporters.load` returns them); ``Device.name`` is a
    field. A SimDevice is both, so its ``name`` answers each way.
    """

    __slots__ = ()

    @overload
    def __get__(self, obj: None, owner: type[object]) -> str: ...
    @overload
    def __get__(self, obj: SimDevice, owner: type[object]) -> str: ...
    def __get__(self, obj: SimDevice | None, owner: type[object]) -> str:
        if obj is None:
            return "simdev"
        name: str = _NAME_SLOT.__get__(obj, owner)
        return name

    def __set__(self, obj: SimDevice, value: str) -> None:
        _NAME_SLOT.__set__(obj, value)  # only Device.__init__ gets this far


class SimDevice(Device, Exporter):
    """A simulated device: finite memory it exports from, and a DMA engine.

    As an exporter, ``await dev.allocate(size)`` makes a buffer whose pages are
    allocated at its first map, honouring every attached device's constraints.
    As a :class:`~asyncdmabuf.Device` (its own ``dma_mask``, ``max_segment_size``
    and ``contiguous``), it attaches to buffers of any exporter, and
    :meth:`copy` moves bytes between tables it mapped. Devices compare by
    identity.

    Args:
        name: The device's name, also its exporter name in bufinfo.
        memory: Its memory in bytes, a multiple of ``page_size``.
        page_size: The allocation granule in bytes.
        dma_mask: As an importer: the highest bus address it reaches.
        max_segment_size: As an importer: the longest entry it accepts.
        contiguous: As an importer: it needs one entry per table.
        base_address: The bus address of its first page.
        alloc_latency: Seconds a buffer's backing takes to allocate.
        map_latency: Seconds every map takes once the backing is there.
        dma_latency: Seconds every DMA transfer takes to start.
        bandwidth: The DMA engine's bytes per second; None for no limit.
        seed: Seeds the fault draws; the same seed gives the same faults.
        faults: A :class:`FaultPlan`, a mapping of operation to probability, or
            a script of :class:`Fault`.

    Raises:
        TypeError: An argument has the wrong type.
        InvalidArgument: A size, address or time out of range.
    """

    __slots__ = ("_sim",)
    name = _Name()  # type: ignore[misc]
    _sim: _SimState

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
        Device.__init__(self, name, dma_mask, max_segment_size, contiguous)
        check_int(page_size, "page_size", 1)
        check_int(memory, "memory", page_size)
        if memory % page_size:
            raise InvalidArgument(f"memory {memory} is not a multiple of {page_size}")
        check_int(base_address, "base_address", 0)
        if base_address + memory - 1 > DMA_MASK_64:
            raise InvalidArgument("the device's memory ends beyond 64-bit addresses")
        if bandwidth is not None and _check_seconds(bandwidth, "bandwidth") <= 0:
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
        state = _SimState(
            npages=memory // page_size,
            page_size=page_size,
            base=base_address,
            alloc_latency=_check_seconds(alloc_latency, "alloc_latency"),
            map_latency=_check_seconds(map_latency, "map_latency"),
            dma_latency=_check_seconds(dma_latency, "dma_latency"),
            bandwidth=None if bandwidth is None else float(bandwidth),
            faults=Injector(plan, seed),
        )
        object.__setattr__(self, "_sim", state)

    # Identity, not the field-by-field equality of Device: two devices with the
    # same name are still two devices with two memories.
    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return object.__hash__(self)

    def __repr__(self) -> str:
        s = self._sim
        used = (s.npages - s.free_pages) * s.page_size
        return (
            f"<SimDevice {self.name!r} {used}/{s.npages * s.page_size} bytes "
            f"in use, {s.buffers} buffers>"
        )

    # -- configuration ----------------------------------------------------------

    @property
    def memory(self) -> int:
        """The device's memory in bytes."""
        return self._sim.npages * self._sim.page_size

    @property
    def page_size(self) -> int:
        """The allocation granule in bytes."""
        return self._sim.page_size

    @property
    def base_address(self) -> int:
        """The bus address of the device's first page."""
        return self._sim.base

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
        s = self._sim
        npages = -(-size // s.page_size)
        if npages > s.npages:
            raise OutOfMemory(
                f"{size} bytes can never fit in the {self.memory} bytes of "
                f"{self.name!r}"
            )
        await anyio.lowlevel.checkpoint()
        self._fault("allocate", f"{size} bytes")
        state = _SimBuffer(size, npages)
        buf = export(self, size, state, name)
        state.ref = weakref.ref(buf)
        s.buffers += 1
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

        Both tables must be mapped by attachments of this device, ``src`` for
        reading (``TO_DEVICE`` or ``BIDIRECTIONAL``), ``dst`` for writing
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
            DmaBufError: An injected fault.
        """
        for sgt in (src, dst):
            if not isinstance(sgt, SgTable):
                raise TypeError(f"copy() needs SgTables, not {type(sgt).__name__}")
        self._check_table(src, "source", (Direction.TO_DEVICE, Direction.BIDIRECTIONAL))
        self._check_table(
            dst, "destination", (Direction.FROM_DEVICE, Direction.BIDIRECTIONAL)
        )
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
        s = self._sim
        if s.engine is None:
            s.engine = anyio.Lock()
        if s.timeline is None:
            s.timeline = FenceContext(f"{self.name}:dma", driver="simdev")
        fence = s.timeline.fence()
        dst.attachment.buffer.resv.add_fence(fence, Usage.WRITE)
        src.attachment.buffer.resv.add_fence(fence, Usage.READ)
        try:
            async with s.engine:
                seconds = s.dma_latency + (nbytes / s.bandwidth if s.bandwidth else 0)
                if seconds > 0:
                    await anyio.sleep(seconds)
                self._fault("copy", f"{nbytes} bytes")
                # Unmapped while the transfer was in flight: a bug in the caller
                # that real hardware would turn into corruption; here, an error.
                self._check_table(src, "source", (src.direction,))
                self._check_table(dst, "destination", (dst.direction,))
                _transfer(src, dst, nbytes, src_offset, dst_offset)
        except BaseException as exc:
            fence.signal(exc if isinstance(exc, Exception) else errno.ECANCELED)
            raise
        fence.signal()
        s.copies += 1
        s.bytes_copied += nbytes
        return nbytes

    def statistics(self) -> SimStatistics:
        """Return a snapshot of the device's memory, waiters and counters."""
        s = self._sim
        pinned = sum(st.npages for st in s.resident if st.pinned)
        return SimStatistics(
            memory_total=s.npages * s.page_size,
            memory_in_use=(s.npages - s.free_pages) * s.page_size,
            memory_pinned=pinned * s.page_size,
            waiters=len(s.waiters),
            evictions=s.evictions,
            restores=s.restores,
            faults_injected=s.faults.injected,
            buffers=s.buffers,
            resident=len(s.resident),
            copies=s.copies,
            bytes_copied=s.bytes_copied,
        )

    def inject_fault(
        self, op: FaultOp, *, nth: int = 1, error: type[Exception] | None = None
    ) -> None:
        """Make the ``nth`` call of ``op`` from now on fail (see :class:`Fault`).

        Raises:
            InvalidArgument: ``op`` names no operation, or ``nth`` is below 1.
            TypeError: ``error`` is not an exception class.
        """
        self._sim.faults.arm(Fault(op, nth, error))

    # -- exporter ops -----------------------------------------------------------

    async def attach(self, buf: DmaBuf, attachment: Attachment) -> None:
        """Accept a device if the buffer can be placed where it reaches.

        A resident buffer the device cannot reach is moved out (to be placed
        again at the next map) if nothing pins it.

        Raises:
            Busy: No placement can satisfy this device together with those
                already attached, or the backing is pinned where it cannot
                reach; or an injected fault.
        """
        st = self._state(buf)
        self._fault("attach", repr(attachment.device))
        device = attachment.device
        reason = self._unserviceable(st, device)
        if reason is not None:
            raise Busy(f"{self.name!r} cannot serve {device!r} for {buf!r}: {reason}")
        if st.runs is not None and self._layout(st, device) is None:
            if st.pinned or st.busy:
                raise Busy(
                    f"the backing of {buf!r} is pinned where {device!r} cannot reach"
                )
            self._evict(st)
            self._dispatch()
        attachment.priv = _SimAttachment()

    async def detach(self, buf: DmaBuf, attachment: Attachment) -> None:
        """Drop the pin of a static attachment that has mapped."""
        st = self._state(buf)
        ast: _SimAttachment | None = attachment.priv
        if ast is not None and ast.pinned:
            ast.pinned = False
            st.static_pins -= 1
            if not st.pinned:
                self._dispatch()
        self._fault("detach", repr(attachment.device))

    async def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        """Return a table, allocating or restoring the backing first if needed.

        Waits while memory is full (after evicting what it can), behind any
        earlier waiter, then for ``alloc_latency`` and ``map_latency``. A
        cancelled wait leaves no pages reserved.

        Raises:
            OutOfMemory: The reachable memory can never hold the buffer, or an
                injected allocation failure.
            DmaBufError: An injected fault.
        """
        s = self._sim
        st = self._state(attachment.buffer)
        self._fault("map", repr(attachment.device))
        if st.runs is None:
            await self._populate(st)
        st.busy += 1
        try:
            if s.map_latency:
                await anyio.sleep(s.map_latency)
            sgt = SgTable(
                self._entries(attachment, st),
                direction=direction,
                attachment=attachment,
            )
        except BaseException as exc:
            st.busy -= 1
            if not st.busy and not st.pinned:
                self._dispatch_after(exc)
            raise
        st.busy -= 1
        self._pin(attachment, st)
        return sgt

    def try_map(self, attachment: Attachment, direction: Direction) -> SgTable:
        """Return a table without waiting, or raise :class:`Busy`.

        Evicts if that makes room (eviction never waits), and allocates when
        no latency is configured and nobody waits for memory.

        Raises:
            Busy: ``map()`` would wait: a map latency, a backing to allocate
                with latency or without room, earlier waiters, or an eviction
                in progress.
            OutOfMemory: As for :meth:`map`.
            DmaBufError: An injected fault.
        """
        s = self._sim
        st = self._state(attachment.buffer)
        self._fault("map", repr(attachment.device))
        if s.evicting:
            raise Busy(f"{self.name!r} is moving a buffer")
        if s.map_latency:
            raise Busy(f"maps on {self.name!r} take {s.map_latency} s")
        if st.runs is None:
            if s.alloc_latency:
                raise Busy(f"allocating on {self.name!r} takes {s.alloc_latency} s")
            if s.waiters:
                raise Busy(f"{len(s.waiters)} maps already wait for memory")
            runs = self._reserve(self._need(st), st)
            if runs is None:
                raise Busy(f"the memory of {self.name!r} is full")
            self._finish_populate(st, runs)
        sgt = SgTable(
            self._entries(attachment, st), direction=direction, attachment=attachment
        )
        self._pin(attachment, st)
        return sgt

    async def unmap(
        self, attachment: Attachment, sgt: SgTable, direction: Direction
    ) -> None:
        """Drop a dynamic attachment's pin; a static one stays pinned until detach."""
        st = self._state(attachment.buffer)
        if attachment.dynamic:
            ast: _SimAttachment = attachment.priv
            ast.maps -= 1
            st.dynamic_maps -= 1
        self._touch(st)
        if not st.pinned:
            self._dispatch()
        self._fault("unmap", repr(attachment.device))

    async def release(self, buf: DmaBuf) -> None:
        """Free the buffer's pages and bytes, then serve memory waiters."""
        st = self._state(buf)
        s = self._sim
        s.buffers -= 1
        if st.runs is not None:
            self._give(st.runs)
            st.runs = None
            del s.resident[st]
        _close(st)
        st.saved = None
        st.generation += 1
        self._dispatch()
        self._fault("release", repr(buf))

    async def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        """Make the backing resident (waiting for memory if needed) and pin it.

        Raises:
            OutOfMemory: As for :meth:`map`.
            DmaBufError: An injected fault.
        """
        st = self._state(buf)
        self._fault("begin_cpu_access", mode)
        if st.runs is None:
            await self._populate(st)
        st.cpu_pins += 1
        self._touch(st)

    async def end_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        """Drop the pin taken by :meth:`begin_cpu_access`."""
        st = self._state(buf)
        if st.cpu_pins:
            st.cpu_pins -= 1
            if not st.pinned:
                self._dispatch()
        self._fault("end_cpu_access", mode)

    def vmap(self, buf: DmaBuf) -> memoryview:
        """Return a writable view of a resident buffer's bytes.

        The view stays valid while the buffer is pinned (mapped, or inside
        ``cpu_access``); an evicted buffer's old view no longer reaches it.

        Raises:
            InvalidArgument: The buffer has no backing now (never mapped, or
                evicted): use ``buf.cpu_access()`` or map it first.
        """
        st = self._state(buf)
        if st.frame is None:
            raise InvalidArgument(
                f"{buf!r} is not resident on {self.name!r}; map it or use cpu_access()"
            )
        return memoryview(st.frame)

    # -- helpers: buffers and tables ----------------------------------------------

    def _state(self, buf: DmaBuf) -> _SimBuffer:
        st = buf.priv
        assert isinstance(st, _SimBuffer), f"{buf!r} is not a SimDevice buffer"
        return st

    def _fault(self, op: FaultOp, what: str) -> None:
        error = self._sim.faults.check(op, f"{self.name}: {what}")
        if error is not None:
            raise error

    def _check_table(
        self, sgt: SgTable, what: str, directions: tuple[Direction, ...]
    ) -> None:
        if not sgt.valid:
            raise InvalidArgument(f"the {what} table {sgt!r} is not mapped")
        if sgt.attachment.device is not self:
            raise InvalidArgument(
                f"the {what} table was mapped for {sgt.attachment.device.name!r}, "
                f"not for {self.name!r}"
            )
        if sgt.direction not in directions:
            raise InvalidArgument(
                f"the {what} table is mapped {sgt.direction.name}, not "
                f"{' or '.join(d.name for d in directions)}"
            )

    def _reach(self, mask: int) -> int:
        """How many pages, from the first, lie wholly at or below ``mask``."""
        s = self._sim
        if mask < s.base + s.page_size - 1:
            return 0
        return min(s.npages, (mask - s.base + 1) // s.page_size)

    def _need(self, st: _SimBuffer) -> _Need:
        """What the attached devices need of the buffer's pages.

        Raises:
            OutOfMemory: They reach too little memory ever to hold it.
        """
        limit, contiguous = self._sim.npages, False
        for att in st.attachments():
            limit = min(limit, self._reach(att.device.dma_mask))
            contiguous = contiguous or att.device.contiguous
        if limit < st.npages:
            raise OutOfMemory(
                f"the attached devices reach {limit * self._sim.page_size} bytes "
                f"of {self.name!r}, too few for {st.size}"
            )
        return _Need(st.npages, limit, contiguous)

    def _unserviceable(self, st: _SimBuffer, device: Device) -> str | None:
        """Why no placement, even in empty memory, can serve ``device``; or None.

        The conditions are per device, so a device that passes can share the
        buffer with any other that passed.
        """
        if self._reach(device.dma_mask) < st.npages:
            return "it reaches too little of the memory"
        if device.contiguous and st.size > device.max_segment_size:
            return "it needs one entry, longer than its segment size"
        if -(-st.size // device.max_segment_size) + st.npages > MAX_ENTRIES:
            return f"it could need more than {MAX_ENTRIES} entries"
        return None

    def _layout(self, st: _SimBuffer, device: Device) -> tuple[SgEntry, ...] | None:
        """The entries showing the buffer's pages to ``device``; None if it cannot."""
        s = self._sim
        assert st.runs is not None
        if device.contiguous and len(st.runs) != 1:
            return None
        segment = device.max_segment_size
        entries: list[SgEntry] = []
        offset = 0
        for first, count in st.runs:
            address = s.base + first * s.page_size
            length = min(count * s.page_size, st.size - offset)
            for start in range(0, length, segment):
                n = min(segment, length - start)
                if not device.reaches(address + start, n):
                    return None
                entries.append(SgEntry(address + start, n, offset + start))
            offset += length
        if (device.contiguous and len(entries) != 1) or len(entries) > MAX_ENTRIES:
            return None
        return tuple(entries)

    def _entries(self, attachment: Attachment, st: _SimBuffer) -> tuple[SgEntry, ...]:
        ast: _SimAttachment = attachment.priv
        if ast.entries is None or ast.generation != st.generation:
            entries = self._layout(st, attachment.device)
            if entries is None:  # attach() keeps this from happening
                raise Busy(f"{attachment.device!r} cannot reach {attachment.buffer!r}")
            ast.entries, ast.generation = entries, st.generation
        return ast.entries

    def _pin(self, attachment: Attachment, st: _SimBuffer) -> None:
        ast: _SimAttachment = attachment.priv
        if attachment.dynamic:
            ast.maps += 1
            st.dynamic_maps += 1
        elif not ast.pinned:
            ast.pinned = True
            st.static_pins += 1
        self._touch(st)

    def _touch(self, st: _SimBuffer) -> None:
        if st.runs is not None:
            self._sim.resident.move_to_end(st)

    # -- helpers: pages ---------------------------------------------------------

    def _take(self, runs: Iterable[tuple[int, int]]) -> None:
        s = self._sim
        for first, count in runs:
            s.free[first : first + count] = bytes(count)
            s.free_pages -= count

    def _give(self, runs: Iterable[tuple[int, int]]) -> None:
        s = self._sim
        for first, count in runs:
            s.free[first : first + count] = b"\x01" * count
            s.free_pages += count

    def _reserve(self, need: _Need, exclude: _SimBuffer) -> _Runs | None:
        """Take pages for ``need``, evicting LRU-first if that makes room; or None.

        Evicts nothing unless evicting every candidate would make room.
        """
        s = self._sim
        runs = _find(s.free, need)
        if runs is None:
            victims = [
                st
                for st in s.resident
                if st is not exclude
                and not st.pinned
                and not st.busy
                and st.runs is not None
                and st.runs[0][0] < need.limit
            ]
            if not victims:
                return None
            trial = bytearray(s.free)
            for st in victims:
                assert st.runs is not None
                for first, count in st.runs:
                    trial[first : first + count] = b"\x01" * count
            if _find(trial, need) is None:
                return None
            for st in victims:
                self._evict(st)
                runs = _find(s.free, need)
                if runs is not None:
                    break
            else:  # pragma: no cover - the trial says the last eviction suffices
                return None
        self._take(runs)
        return tuple(runs)

    def _evict(self, st: _SimBuffer) -> None:
        """Save a resident, unpinned buffer's bytes and free its pages.

        Each dynamic attachment hears ``move_notify()`` first. If a callback
        raises, the move still completes and the first error propagates.
        """
        s = self._sim
        errors: list[Exception] = []
        s.evicting += 1
        try:
            for att in st.attachments():
                try:
                    att.move_notify()
                except Exception as exc:  # re-raised below, once the move is done
                    errors.append(exc)
        finally:
            s.evicting -= 1
        assert st.frame is not None
        assert st.runs is not None
        st.saved = bytes(st.frame)
        _close(st)
        self._give(st.runs)
        st.runs = None
        st.generation += 1
        del s.resident[st]
        s.evictions += 1
        if errors:
            raise errors[0]

    async def _populate(self, st: _SimBuffer) -> None:
        """Give a buffer pages, waiting for memory and latency; undo if cut short."""
        s = self._sim
        need = self._need(st)
        runs = None if s.waiters else self._reserve(need, st)
        if runs is None:
            runs = await self._wait_for_memory(need, st)
        try:
            if s.alloc_latency:
                await anyio.sleep(s.alloc_latency)
        except BaseException as exc:
            self._give(runs)
            self._dispatch_after(exc)
            raise
        self._finish_populate(st, runs)

    def _finish_populate(self, st: _SimBuffer, runs: _Runs) -> None:
        """Fill reserved pages with the buffer's bytes and make it resident."""
        s = self._sim
        try:
            self._fault("backing", f"{st.size} bytes")
            try:
                frame = mmap.mmap(-1, st.size)
            except OSError as exc:
                raise OutOfMemory(f"no memory for {st.size} bytes: {exc}") from None
        except BaseException as exc:
            self._give(runs)
            self._dispatch_after(exc)
            raise
        if st.saved is not None:
            frame[:] = st.saved
            st.saved = None
            s.restores += 1
        st.frame = frame
        st.runs = runs
        st.generation += 1
        s.resident[st] = None

    async def _wait_for_memory(self, need: _Need, st: _SimBuffer) -> _Runs:
        s = self._sim
        waiter = _Waiter(need, st)
        s.waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException as exc:
            if waiter.runs is not None:  # granted, then cancelled: give it back
                self._give(waiter.runs)
            else:
                s.waiters.remove(waiter)
            self._dispatch_after(exc)
            raise
        assert waiter.runs is not None
        return waiter.runs

    def _dispatch(self) -> None:
        """Reserve pages for waiters, strictly in arrival order, while they fit.

        Raises:
            Exception: The first error a ``move_notify`` callback raised; every
                waiter that could be served has been.
        """
        s = self._sim
        if s.dispatching:
            s.redispatch = True
            return
        s.dispatching = True
        errors: list[Exception] = []
        try:
            while s.waiters:
                waiter = s.waiters[0]
                try:
                    runs = self._reserve(waiter.need, waiter.buffer)
                except Exception as exc:  # re-raised below; the eviction is done
                    errors.append(exc)
                    continue
                if runs is None:
                    if s.redispatch:
                        s.redispatch = False
                        continue
                    break
                s.waiters.popleft()
                waiter.runs = runs
                waiter.event.set()
        finally:
            s.dispatching = s.redispatch = False
        if errors:
            raise errors[0]

    def _dispatch_after(self, exc: BaseException) -> None:
        """Serve waiters while ``exc`` propagates, without replacing it."""
        try:
            self._dispatch()
        except Exception as error:
            exc.add_note(f"while serving memory waiters, move_notify raised {error!r}")


def _close(st: _SimBuffer) -> None:
    frame, st.frame = st.frame, None
    if frame is not None:
        # A stale view (vmap outside a pin) keeps the old mapping until it goes.
        with contextlib.suppress(BufferError):
            frame.close()


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
