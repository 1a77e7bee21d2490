"""SimDevice: finite memory, late allocation, FIFO waiters, eviction, faults, DMA."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import os
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from asyncdmabuf import (
    Attachment,
    Busy,
    Device,
    Direction,
    DmaBuf,
    DmaBufError,
    InjectedFault,
    InvalidArgument,
    OutOfMemory,
    SgTable,
)
from asyncdmabuf._backends import current_backend
from asyncdmabuf.exporters import (
    Fault,
    FaultPlan,
    MemfdExporter,
    SimDevice,
    SimStatistics,
)

from .helpers import wait_all_blocked

pytestmark = pytest.mark.anyio

PAGE = 4096
BASE = 0x10_0000
BIDI = Direction.BIDIRECTIONAL


def on_mock_clock() -> pytest.MarkDecorator:
    """Run the test on trio only, with virtual time that jumps when all block."""
    clock = MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend",
        [pytest.param(("trio", {"clock": clock}), id="trio-mockclock")],
    )


@contextlib.contextmanager
def no_checkpoints() -> Iterator[None]:
    """On trio, fail if the body checkpoints (sync code never can elsewhere)."""
    if current_backend() == "trio":
        import trio.testing

        with trio.testing.assert_no_checkpoints():
            yield
    else:
        yield


def sim(memory_pages: int = 8, **kwargs: Any) -> SimDevice:
    kwargs.setdefault("base_address", BASE)
    return SimDevice("sim", memory_pages * PAGE, PAGE, **kwargs)


async def pinned(dev: SimDevice, size: int) -> tuple[DmaBuf, Attachment, SgTable]:
    """A buffer of ``dev`` mapped by a static attachment: pinned until detach."""
    buf = await dev.allocate(size)
    att = await buf.attach(dev.device)
    return buf, att, await att.map(BIDI)


async def drop(buf: DmaBuf, att: Attachment, sgt: SgTable | None = None) -> None:
    if sgt is not None and sgt.valid:
        await att.unmap(sgt)
    if att.attached:
        await att.detach()
    await buf.put()


async def map_in_task(att: Attachment) -> None:
    """Map, for a task that may wait; the caller unmaps what ``att.mappings`` has."""
    await att.map(BIDI)


async def write(buf: DmaBuf, data: bytes) -> None:
    async with buf.cpu_access("w") as view:
        view[: len(data)] = data


async def read(buf: DmaBuf) -> bytes:
    async with buf.cpu_access("r") as view:
        return bytes(view)


def check_table(sgt: SgTable, dev: SimDevice) -> None:
    """What every table of a SimDevice buffer must be, checked independently."""
    device = sgt.attachment.device
    if device.contiguous:
        assert len(sgt) == 1
    offset = 0
    for entry in sgt:
        assert entry.offset == offset
        assert 0 < entry.length <= device.max_segment_size
        assert entry.dma_address + entry.length - 1 <= device.dma_mask
        assert dev.base_address <= entry.dma_address
        assert entry.dma_address + entry.length <= dev.base_address + dev.memory
        offset += entry.length
    assert offset == sgt.nbytes


def bus_pages(sgt: SgTable, dev: SimDevice) -> set[int]:
    pages: set[int] = set()
    for entry in sgt:
        first = (entry.dma_address - dev.base_address) // dev.page_size
        last = (entry.dma_address + entry.length - 1 - dev.base_address) // PAGE
        pages.update(range(first, last + 1))
    return pages


# -- the device itself ----------------------------------------------------------


async def test_allocate_late_and_zeroed() -> None:
    dev = sim(4)
    buf = await dev.allocate(PAGE + 1, name="late")
    assert buf.exporter is dev
    assert buf.size == PAGE + 1
    assert dev.statistics().memory_in_use == 0  # nothing until the first map
    with pytest.raises(InvalidArgument):
        dev.vmap(buf)
    async with buf.attach(dev.device) as att, att.map(BIDI) as sgt:
        check_table(sgt, dev)
        stats = dev.statistics()
        assert stats.memory_in_use == stats.memory_pinned == 2 * PAGE
        assert stats.buffers == stats.resident == 1
        assert await read(buf) == bytes(PAGE + 1)
    await buf.put()
    assert dev.statistics().memory_in_use == 0
    assert dev.statistics().buffers == 0


async def test_allocate_checks_and_checkpoints() -> None:
    dev = sim(4)
    with pytest.raises(OutOfMemory) as info:
        await dev.allocate(4 * PAGE + 1)
    assert info.value.errno == errno.ENOMEM
    with pytest.raises(InvalidArgument):
        await dev.allocate(0)
    with pytest.raises(TypeError):
        await dev.allocate(1.5)  # type: ignore[arg-type]
    with anyio.CancelScope() as scope:
        scope.cancel()
        await dev.allocate(PAGE)
    assert scope.cancelled_caught
    assert dev.statistics().buffers == 0


def test_simdevice_holds_its_device() -> None:
    a = SimDevice("gpu", 16 * PAGE, dma_mask=2**32 - 1, contiguous=True)
    b = SimDevice("gpu", 16 * PAGE, dma_mask=2**32 - 1, contiguous=True)
    assert not isinstance(a, Device)  # it holds one, by composition
    assert a.device == Device("gpu", dma_mask=2**32 - 1, contiguous=True)
    assert a.device == b.device  # Device's own equality, by field
    assert a != b  # two SimDevices are two memories
    assert len({a, b}) == 2
    assert a.name == "gpu"
    assert SimDevice.name == "simdev"  # as an exporter class, like MemfdExporter
    assert a.memory == 16 * PAGE
    assert "gpu" in repr(a)
    stats = a.statistics()
    assert isinstance(stats, SimStatistics)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.memory_in_use = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        a.device = Device("other")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"memory": PAGE + 1}, InvalidArgument),
        ({"memory": 0}, InvalidArgument),
        ({"page_size": 0}, InvalidArgument),
        ({"memory": "big"}, TypeError),
        ({"alloc_latency": -1}, InvalidArgument),
        ({"bandwidth": 0}, InvalidArgument),
        ({"base_address": 2**64 - PAGE}, InvalidArgument),
        ({"faults": {"nap": 0.5}}, InvalidArgument),
        ({"faults": {"map": 1.5}}, InvalidArgument),
        ({"faults": ["map"]}, TypeError),
        ({"dma_mask": -1}, InvalidArgument),
    ],
)
def test_constructor_checks(kwargs: dict[str, Any], error: type[Exception]) -> None:
    kwargs.setdefault("memory", 4 * PAGE)
    with pytest.raises(error):
        SimDevice("sim", **kwargs)


# -- memory exhaustion and FIFO waiters ------------------------------------------


async def test_waiters_wake_in_fifo_order() -> None:
    dev = sim(1)
    hog, hog_att, hog_sgt = await pinned(dev, PAGE)
    order: list[str] = []

    async def user(name: str) -> None:
        buf = await dev.allocate(PAGE, name=name)
        async with buf, buf.attach(dev.device) as att, att.map(BIDI):
            order.append(name)

    async with anyio.create_task_group() as tg:
        for name in ("first", "second", "third"):
            tg.start_soon(user, name)
            await wait_all_blocked()  # fixes the arrival order
        assert dev.statistics().waiters == 3
        assert order == []
        await drop(hog, hog_att, hog_sgt)
    # One page: each user frees it (its buffer is released) for the next.
    assert order == ["first", "second", "third"]
    assert dev.statistics().memory_in_use == 0
    assert dev.statistics().waiters == 0


async def test_waiters_are_strictly_fifo() -> None:
    """A small request waits behind a big one even though a page is free."""
    dev = sim(2)
    hog, hog_att, hog_sgt = await pinned(dev, PAGE)
    order: list[str] = []
    done = {name: anyio.Event() for name in ("big", "small")}

    async def user(name: str, size: int) -> None:
        buf = await dev.allocate(size, name=name)
        async with buf, buf.attach(dev.device) as att, att.map(BIDI):
            order.append(name)
            await done[name].wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(user, "big", 2 * PAGE)
        await wait_all_blocked()
        tg.start_soon(user, "small", PAGE)
        await wait_all_blocked()
        stats = dev.statistics()
        assert stats.waiters == 2
        assert stats.memory_in_use == PAGE  # a page is free, yet small waits
        other = await dev.allocate(PAGE)
        async with other.attach(dev.device) as att:
            with pytest.raises(Busy), no_checkpoints():
                att.try_map(BIDI)  # no barging past the waiters either
        await other.put()
        await drop(hog, hog_att, hog_sgt)
        await wait_all_blocked()
        assert order == ["big"]
        assert dev.statistics().waiters == 1
        done["big"].set()
        await wait_all_blocked()
        assert order == ["big", "small"]
        done["small"].set()
    assert dev.statistics().memory_in_use == 0


async def test_request_larger_than_reachable_memory_fails_at_once() -> None:
    dev = sim(4)
    low = Device("low", dma_mask=BASE + 2 * PAGE - 1)
    async with await dev.allocate(3 * PAGE) as buf:
        with pytest.raises(Busy):
            await buf.attach(low)  # can never reach 3 pages: refused
        assert buf.attachments == ()


# -- try_map never waits, map always checkpoints ----------------------------------


async def test_try_map_busy_whenever_map_would_wait() -> None:
    dev = sim(2)
    hog, hog_att, hog_sgt = await pinned(dev, 2 * PAGE)
    buf = await dev.allocate(PAGE)
    att = await buf.attach(dev.device)
    before = dev.statistics()

    # Memory full of pinned buffers.
    with pytest.raises(Busy), no_checkpoints():
        att.try_map(BIDI)
    assert att.mappings == ()
    assert dev.statistics() == before

    # The buffer's lock is held by a map waiting for memory.
    async with anyio.create_task_group() as tg:
        tg.start_soon(map_in_task, att)
        await wait_all_blocked()
        assert dev.statistics().waiters == 1
        with pytest.raises(Busy), no_checkpoints():
            att.try_map(BIDI)
        tg.cancel_scope.cancel()
    assert dev.statistics() == before
    assert att.mappings == ()

    # Once there is room, try_map allocates and maps without a checkpoint.
    await drop(hog, hog_att, hog_sgt)
    with no_checkpoints():
        sgt = att.try_map(BIDI)
    check_table(sgt, dev)
    assert dev.statistics().memory_pinned == PAGE
    await drop(buf, att, sgt)
    assert dev.statistics().memory_in_use == 0


async def test_try_map_busy_with_latency_pending() -> None:
    for kwargs in ({"alloc_latency": 5.0}, {"map_latency": 5.0}):
        dev = sim(2, **kwargs)
        async with (
            await dev.allocate(PAGE) as buf,
            buf.attach(dev.device) as att,
        ):
            with pytest.raises(Busy), no_checkpoints():
                att.try_map(BIDI)  # would wait for the latency
            # The lock held by a map in its latency.
            async with anyio.create_task_group() as tg:
                tg.start_soon(map_in_task, att)
                await wait_all_blocked()
                with pytest.raises(Busy), no_checkpoints():
                    att.try_map(BIDI)
                tg.cancel_scope.cancel()
            assert att.mappings == ()
        assert dev.statistics().memory_in_use == 0


async def test_try_map_busy_while_evicting() -> None:
    dev = sim(1)
    seen: list[type[BaseException]] = []
    other = await dev.allocate(PAGE)
    other_att = await other.attach(dev.device)

    def notify(att: Attachment) -> None:
        try:
            other_att.try_map(BIDI)
        except Busy as exc:
            seen.append(type(exc))

    victim = await dev.allocate(PAGE)
    async with victim.attach(dev.device, move_notify=notify) as vatt:
        await vatt.unmap(await vatt.map(BIDI))
        with no_checkpoints():
            sgt = other_att.try_map(BIDI)  # evicts the victim; its callback
    assert seen == [Busy]  # ... could not map in the middle of the move
    assert dev.statistics().evictions == 1
    await drop(other, other_att, sgt)
    await victim.put()


async def test_map_always_checkpoints() -> None:
    dev = sim(2)
    async with await dev.allocate(PAGE) as buf, buf.attach(dev.device) as att:
        for _ in range(2):  # not resident yet, then resident
            with anyio.CancelScope() as scope:
                scope.cancel()
                await att.map(BIDI)
            assert scope.cancelled_caught
            assert att.mappings == ()
            await att.unmap(await att.map(BIDI))
        if current_backend() == "trio":
            import trio.testing

            with trio.testing.assert_checkpoints():
                sgt = await att.map(BIDI)
            await att.unmap(sgt)


# -- cancellation ---------------------------------------------------------------


async def test_cancelled_wait_for_memory_leaves_no_reservation() -> None:
    dev = sim(2)
    hog, hog_att, hog_sgt = await pinned(dev, 2 * PAGE)
    buf = await dev.allocate(PAGE)
    att = await buf.attach(dev.device)
    before = dev.statistics()
    with anyio.move_on_after(3600) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(map_in_task, att)
            await wait_all_blocked()
            assert dev.statistics().waiters == 1
            scope.cancel()
    assert dev.statistics() == before
    assert att.mappings == ()
    # Freed, then cancelled before it could run: what it was given goes back.
    async with anyio.create_task_group() as tg:
        tg.start_soon(map_in_task, att)
        await wait_all_blocked()
        await hog_att.unmap(hog_sgt)
        await hog_att.detach()  # grants the page to the waiter...
        tg.cancel_scope.cancel()  # ...which is cancelled before it runs
    # anyio delivers the cancellation only after a woken task ran, so the
    # grant usually wins; either way the accounting must match what happened.
    leftovers: tuple[SgTable, ...] = att.mappings
    mapped = len(leftovers)
    for sgt in leftovers:
        await att.unmap(sgt)
    await att.detach()
    stats = dev.statistics()
    assert (stats.waiters, stats.memory_pinned) == (0, 0)
    assert stats.memory_in_use == mapped * PAGE
    await buf.put()
    await hog.put()
    assert dev.statistics().memory_in_use == 0


@on_mock_clock()
async def test_cancelled_latency_leaves_no_reservation() -> None:
    dev = sim(4, alloc_latency=2.0, map_latency=1.0)
    async with await dev.allocate(2 * PAGE) as buf, buf.attach(dev.device) as att:
        start = anyio.current_time()
        with anyio.move_on_after(1.0):
            await att.map(BIDI)  # cancelled half-way through allocating
        assert dev.statistics().memory_in_use == 0
        with anyio.move_on_after(2.5):
            await att.map(BIDI)  # allocated, then cancelled in the map latency
        # The backing stays as a cache: resident, unpinned, accounted.
        stats = dev.statistics()
        assert (stats.memory_in_use, stats.memory_pinned) == (2 * PAGE, 0)
        assert att.mappings == ()
        sgt = await att.map(BIDI)  # only the map latency now
        assert anyio.current_time() - start == pytest.approx(3.5 + 1.0)
        await att.unmap(sgt)
    assert dev.statistics().memory_in_use == 0


@on_mock_clock()
async def test_latency_runs_on_the_clock() -> None:
    dev = sim(4, alloc_latency=0.5, map_latency=0.25)
    async with await dev.allocate(PAGE) as buf, buf.attach(dev.device) as att:
        start = anyio.current_time()
        sgt = await att.map(BIDI)
        assert anyio.current_time() - start == pytest.approx(0.75)
        await att.unmap(sgt)
        start = anyio.current_time()
        await att.unmap(await att.map(BIDI))  # resident and mapped before
        assert anyio.current_time() == start


@on_mock_clock()
async def test_map_latency_once_per_residency_then_try_map_serves() -> None:
    # The map latency is the cost of setting up a backing's mapping each time
    # it becomes resident: later maps, by any attachment, are immediate, and
    # try_map serves them (issue 12.20).
    dev = sim(1, map_latency=0.25)
    gpu = Device("gpu")
    buf = await dev.allocate(PAGE)
    att = await buf.attach(gpu, move_notify=lambda _: None)
    with pytest.raises(Busy, match="not mapped since it became resident"):
        att.try_map(BIDI)
    start = anyio.current_time()
    await att.unmap(await att.map(BIDI))
    assert anyio.current_time() - start == pytest.approx(0.25)
    other = await buf.attach(Device("other"))
    with no_checkpoints():
        sgt = other.try_map(BIDI)  # another attachment, same resident backing
    await other.unmap(sgt)
    await other.detach()
    # Evicted, then resident again: the first map pays again.
    hog = await dev.allocate(PAGE)
    async with hog.attach(gpu) as hog_att:
        await hog_att.unmap(await hog_att.map(BIDI))
        assert dev.statistics().evictions == 1
    await hog.put()
    with pytest.raises(Busy, match="not mapped since"):
        att.try_map(BIDI)
    start = anyio.current_time()
    await att.unmap(await att.map(BIDI))
    assert anyio.current_time() - start == pytest.approx(0.25)
    with no_checkpoints():
        sgt = att.try_map(BIDI)
    await att.unmap(sgt)
    await att.detach()
    await buf.put()
    assert dev.statistics().memory_in_use == 0


# -- pinning and eviction ---------------------------------------------------------


async def test_pinning_rules() -> None:
    dev = sim(8)
    gpu = Device("gpu")
    async with await dev.allocate(PAGE) as a, await dev.allocate(PAGE) as b:
        static = await a.attach(gpu)
        await static.unmap(await static.map(BIDI))
        assert dev.statistics().memory_pinned == PAGE  # until detach
        dynamic = await b.attach(gpu, move_notify=lambda att: None)
        sgt = await dynamic.map(BIDI)
        assert dev.statistics().memory_pinned == 2 * PAGE
        await dynamic.unmap(sgt)
        assert dev.statistics().memory_pinned == PAGE  # only while mapped
        async with b.cpu_access("r"):
            assert dev.statistics().memory_pinned == 2 * PAGE
        await static.detach()
        await dynamic.detach()
        stats = dev.statistics()
        assert (stats.memory_pinned, stats.memory_in_use) == (0, 2 * PAGE)


async def test_eviction_lru_move_notify_and_restore() -> None:
    dev = sim(4)
    gpu = Device("gpu")
    notified: list[str | None] = []

    def notify(att: Attachment) -> None:
        notified.append(att.buffer.name)

    x = await dev.allocate(2 * PAGE, name="x")
    y = await dev.allocate(2 * PAGE, name="y")
    data = {"x": os.urandom(2 * PAGE), "y": os.urandom(2 * PAGE)}
    xatt = await x.attach(gpu, move_notify=notify)
    yatt = await y.attach(gpu, move_notify=notify)
    for buf, att in ((x, xatt), (y, yatt)):  # x is used first: LRU
        await write(buf, data[str(buf.name)])
        await att.unmap(await att.map(BIDI))
    assert dev.statistics().memory_in_use == 4 * PAGE

    z, zatt, zsgt = await pinned(dev, 2 * PAGE)  # needs one buffer evicted
    assert notified == ["x"]
    stats = dev.statistics()
    assert (stats.evictions, stats.resident) == (1, 2)
    await zatt.unmap(zsgt)
    await zatt.detach()  # z is unpinned now, and more recent than y

    sgt = await xatt.map(BIDI)  # restores x, evicting y (LRU), not z
    assert notified == ["x", "y"]
    check_table(sgt, dev)
    assert dev.statistics().restores == 1
    await xatt.unmap(sgt)
    assert await read(x) == data["x"]
    assert await read(y) == data["y"]  # y comes back too, evicting z
    stats = dev.statistics()
    assert (stats.evictions, stats.restores) == (3, 2)
    for buf, att in ((x, xatt), (y, yatt)):
        await drop(buf, att)
    await z.put()
    assert dev.statistics().memory_in_use == 0


async def test_move_notify_error_propagates_after_the_move() -> None:
    dev = sim(1)

    def buggy(att: Attachment) -> None:
        raise RuntimeError("importer bug")

    victim = await dev.allocate(PAGE)
    await write(victim, b"kept")
    vatt = await victim.attach(dev.device, move_notify=buggy)
    other = await dev.allocate(PAGE)
    oatt = await other.attach(dev.device)
    with pytest.raises(RuntimeError, match="importer bug"):
        await oatt.map(BIDI)  # the eviction is done, the map is not
    stats = dev.statistics()
    assert (stats.evictions, stats.memory_in_use, stats.resident) == (1, 0, 0)
    await drop(other, oatt, await oatt.map(BIDI))
    await vatt.detach()
    assert (await read(victim))[:4] == b"kept"
    await victim.put()
    assert dev.statistics().memory_in_use == 0


async def test_pinned_buffers_are_never_evicted() -> None:
    dev = sim(2)
    hog, hog_att, hog_sgt = await pinned(dev, PAGE)
    await hog_att.unmap(hog_sgt)  # static: still pinned until detach
    buf = await dev.allocate(2 * PAGE)
    att = await buf.attach(dev.device)
    with pytest.raises(Busy):
        att.try_map(BIDI)
    async with anyio.create_task_group() as tg:
        tg.start_soon(map_in_task, att)
        await wait_all_blocked()
        assert dev.statistics().evictions == 0
        await hog_att.detach()  # unpinned: the waiter may evict it now
    assert dev.statistics().evictions == 1
    await drop(buf, att, att.mappings[0])
    await hog.put()


async def test_attach_after_backing_exists() -> None:
    dev = sim(8)
    low = Device("low", dma_mask=BASE + 4 * PAGE - 1)
    one = Device("one", contiguous=True)
    buf, att, sgt = await pinned(dev, 2 * PAGE)  # placed high, and pinned
    with pytest.raises(Busy):
        await buf.attach(low)
    assert len(buf.attachments) == 1
    async with buf.attach(one) as oatt, oatt.map(BIDI) as osgt:
        check_table(osgt, dev)  # already contiguous: fine
    await att.unmap(sgt)
    await att.detach()
    # Unpinned now: the buffer moves where the new device reaches it.
    await write(buf, b"moved")
    async with buf.attach(low) as latt, latt.map(BIDI) as lsgt:
        check_table(lsgt, dev)
    assert dev.statistics().evictions == 1
    assert (await read(buf))[:5] == b"moved"
    await buf.put()


# -- constraints across devices (hypothesis) --------------------------------------

device_strategy = st.builds(
    Device,
    name=st.just("dev"),
    dma_mask=st.one_of(
        st.integers(BASE + 2 * PAGE, BASE + 32 * PAGE),
        st.integers(0, BASE + PAGE),
        st.just(2**32 - 1),
    ),
    max_segment_size=st.one_of(
        st.sampled_from([PAGE // 2, PAGE, 3 * PAGE, 2**64 - 1]),
        st.integers(1, 8 * PAGE),
    ),
    contiguous=st.booleans(),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    pages=st.integers(4, 32),
    others=st.lists(st.tuples(st.integers(1, 8 * PAGE), st.booleans()), max_size=4),
    size=st.integers(1, 10 * PAGE),
    before=st.lists(device_strategy, min_size=1, max_size=3),
    after=st.lists(device_strategy, max_size=2),
)
async def test_constraints_across_devices(
    pages: int,
    others: list[tuple[int, bool]],
    size: int,
    before: list[Device],
    after: list[Device],
) -> None:
    dev = SimDevice("sim", pages * PAGE, PAGE, base_address=BASE)
    bufs: list[DmaBuf] = []
    tables: list[SgTable] = []
    try:
        # Other buffers fragment the memory; the pinned ones stay put.
        for other_size, pin in others:
            if other_size > dev.memory:
                continue
            other = await dev.allocate(other_size)
            bufs.append(other)
            oatt = await other.attach(dev.device)
            with contextlib.suppress(Busy):
                sgt = oatt.try_map(BIDI)
                tables.append(sgt)
                if not pin:
                    await oatt.unmap(sgt)
                    await oatt.detach()
        if size > dev.memory:
            with pytest.raises(OutOfMemory):
                await dev.allocate(size)
            return
        buf = await dev.allocate(size)
        bufs.append(buf)
        atts: list[Attachment] = []
        for i, device in enumerate(before + after):
            if i == len(before) and atts:
                with contextlib.suppress(Busy):
                    tables.append(atts[0].try_map(BIDI))  # the backing exists now
            try:
                atts.append(await buf.attach(device))
            except Busy:
                event(f"attach refused ({'after' if i >= len(before) else 'before'})")
        for att in atts:
            try:
                sgt = att.try_map(BIDI)
            except Busy:
                event("try_map busy")
                continue
            event("try_map mapped")
            tables.append(sgt)
        for sgt in tables:
            if sgt.valid:
                check_table(sgt, dev)
        # Tables of different buffers never share a page.
        owners: dict[int, DmaBuf] = {}
        for sgt in tables:
            if sgt.valid:
                for page in bus_pages(sgt, dev):
                    assert owners.setdefault(page, sgt.attachment.buffer) is (
                        sgt.attachment.buffer
                    )
        # What attach accepts, an empty device can always map.
        fresh = SimDevice("fresh", pages * PAGE, PAGE, base_address=BASE)
        async with await fresh.allocate(size) as alone:
            accepted = []
            for att in atts:
                with contextlib.suppress(Busy):
                    accepted.append(await alone.attach(att.device))
            for att in accepted:
                check_table(att.try_map(BIDI), fresh)
                await att.unmap(att.mappings[0])
                await att.detach()
    finally:
        for buf in bufs:
            for att in buf.attachments:
                for sgt in att.mappings:
                    await att.unmap(sgt)
                await att.detach()
            await buf.put()
    assert dev.statistics().memory_in_use == 0


# -- faults ---------------------------------------------------------------------


async def test_scripted_faults_keep_accounting_exact() -> None:
    dev = sim(4, faults=[Fault("map", nth=2)])
    gpu = Device("gpu")
    buf = await dev.allocate(2 * PAGE)
    att = await buf.attach(gpu)
    await att.unmap(await att.map(BIDI))
    with pytest.raises(DmaBufError) as info:
        await att.map(BIDI)  # the second map
    assert info.value.errno == errno.EIO
    assert att.mappings == ()
    await att.detach()
    await buf.put()

    buf = await dev.allocate(2 * PAGE)
    att = await buf.attach(gpu)
    dev.inject_fault("backing")
    with pytest.raises(OutOfMemory):
        await att.map(BIDI)
    assert dev.statistics().memory_in_use == 0  # the reservation went back
    dev.inject_fault("map", error=RuntimeError)
    with pytest.raises(RuntimeError):
        att.try_map(BIDI)
    sgt = await att.map(BIDI)
    dev.inject_fault("unmap")
    with pytest.raises(DmaBufError):
        await att.unmap(sgt)
    assert att.mappings == ()
    dev.inject_fault("attach")
    with pytest.raises(Busy):
        await buf.attach(gpu)
    dev.inject_fault("begin_cpu_access")
    with pytest.raises(DmaBufError):
        await read(buf)
    dev.inject_fault("end_cpu_access")
    with pytest.raises(DmaBufError):
        await read(buf)
    dev.inject_fault("detach")
    with pytest.raises(DmaBufError):
        await att.detach()
    assert not att.attached
    dev.inject_fault("allocate")
    with pytest.raises(OutOfMemory):
        await dev.allocate(PAGE)
    dev.inject_fault("release")
    with pytest.raises(DmaBufError):
        await buf.put()
    assert buf.released
    stats = dev.statistics()
    assert (stats.memory_in_use, stats.memory_pinned, stats.buffers) == (0, 0, 0)
    assert stats.faults_injected == 10


async def run_random_faults(seed: int) -> tuple[list[str], SimStatistics]:
    """A fixed sequence of operations on a device that fails at random."""
    plan = FaultPlan(
        probability={
            "allocate": 0.1,
            "backing": 0.2,
            "attach": 0.1,
            "map": 0.2,
            "unmap": 0.2,
            "detach": 0.2,
            "release": 0.2,
            "copy": 0.2,
        }
    )
    dev = sim(6, seed=seed, faults=plan)
    log: list[str] = []
    live: list[DmaBuf] = []
    for step in range(30):
        try:
            buf = await dev.allocate((step % 3 + 1) * PAGE)
        except OutOfMemory:
            log.append("allocate")
            continue
        live.append(buf)
        try:
            att = await buf.attach(dev.device, move_notify=None if step % 2 else print)
            src = await att.map(BIDI)
            dst = att.try_map(BIDI) if step % 4 else await att.map(BIDI)
            await dev.copy(src, dst)
            await att.unmap(src)
            await att.unmap(dst)
        except DmaBufError as exc:
            log.append(f"{step}:{type(exc).__name__}:{exc.errno}")
        if len(live) > 2:
            old = live.pop(0)
            for old_att in old.attachments:
                for sgt in old_att.mappings:
                    with contextlib.suppress(DmaBufError):
                        await old_att.unmap(sgt)
                with contextlib.suppress(DmaBufError):
                    await old_att.detach()
            with contextlib.suppress(DmaBufError):
                await old.put()
    for buf in live:
        for att in buf.attachments:
            for sgt in att.mappings:
                with contextlib.suppress(DmaBufError):
                    await att.unmap(sgt)
            with contextlib.suppress(DmaBufError):
                await att.detach()
        with contextlib.suppress(DmaBufError):
            await buf.put()
    return log, dev.statistics()


async def test_random_faults_are_deterministic_and_exact() -> None:
    log, stats = await run_random_faults(seed=7)
    again, stats_again = await run_random_faults(seed=7)
    assert log == again
    assert stats == stats_again
    assert stats.faults_injected > 5
    assert (stats.memory_in_use, stats.memory_pinned, stats.buffers) == (0, 0, 0)
    assert stats.waiters == 0
    other, _ = await run_random_faults(seed=8)
    assert other != log


# -- the DMA engine ---------------------------------------------------------------


async def test_copy_checks_its_tables() -> None:
    dev = sim(4)
    other = sim(4)
    heap = MemfdExporter()
    async with (
        await heap.allocate(PAGE) as a,
        await dev.allocate(PAGE) as b,
        a.attach(dev.device) as aatt,
        b.attach(dev.device) as batt,
        b.attach(other.device) as oatt,
        aatt.map(Direction.TO_DEVICE) as src,
        batt.map(Direction.FROM_DEVICE) as dst,
        oatt.map(BIDI) as foreign,
    ):
        with pytest.raises(TypeError):
            await dev.copy(src, b"nope")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await dev.copy(src, foreign)  # another device's table
        with pytest.raises(InvalidArgument):
            await dev.copy(dst, src)  # directions the wrong way round
        with pytest.raises(InvalidArgument):
            await dev.copy(src, dst, nbytes=PAGE, dst_offset=1)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await dev.copy(src, dst)
        assert scope.cancelled_caught
        assert dev.statistics().copies == 0
        assert await dev.copy(src, dst, nbytes=10, src_offset=5, dst_offset=7) == 10
        stale = await aatt.map(Direction.TO_DEVICE)
        await aatt.unmap(stale)
        with pytest.raises(InvalidArgument):
            await dev.copy(stale, dst)


@on_mock_clock()
async def test_copy_latency_and_bandwidth() -> None:
    dev = sim(8, dma_latency=0.5, bandwidth=4 * PAGE)  # a page takes 0.25 s
    async with (
        await dev.allocate(4 * PAGE) as a,
        await dev.allocate(4 * PAGE) as b,
        a.attach(dev.device) as aatt,
        b.attach(dev.device) as batt,
        aatt.map(BIDI) as src,
        batt.map(BIDI) as dst,
    ):
        payload = os.urandom(4 * PAGE)
        await write(a, payload)
        start = anyio.current_time()
        await dev.copy(src, dst)
        assert anyio.current_time() - start == pytest.approx(1.5)
        assert await read(b) == payload
        # One engine: two transfers of two pages each queue up.
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(dev.copy, src, dst)
            tg.start_soon(dev.copy, dst, src)
        assert anyio.current_time() - start == pytest.approx(3.0)
        # Cancelled in flight: nothing lands.
        await write(b, bytes(4 * PAGE))
        with anyio.move_on_after(1.0):
            await dev.copy(src, dst)
        assert await read(b) == bytes(4 * PAGE)


async def test_three_stage_pipeline() -> None:
    """memfd -> SimDevice A -> SimDevice B -> memfd, concurrently, under pressure."""
    heap = MemfdExporter()
    # Too little memory for every buffer in flight: maps wait, queued buffers
    # (unpinned) are evicted and restored when the next stage maps them.
    a = SimDevice("a", 6 * PAGE, PAGE, base_address=BASE, max_segment_size=PAGE)
    b = SimDevice("b", 10 * PAGE, PAGE, base_address=BASE, dma_mask=2**32 - 1)
    sizes = [(i % 4 + 1) * PAGE - i * 17 for i in range(16)]
    inputs: list[DmaBuf] = []
    expected: dict[int, str] = {}
    results: dict[int, str] = {}
    through_b: list[int] = []
    all_through_b = anyio.Event()
    Item = tuple[int, DmaBuf]

    async def dma(dev: SimDevice, src: DmaBuf, dst: DmaBuf) -> None:
        notify = None if src.exporter is heap else (lambda att: None)
        async with (
            src.attach(dev.device, move_notify=notify) as satt,
            dst.attach(dev.device) as datt,
            satt.map(Direction.TO_DEVICE) as s,
            datt.map(Direction.FROM_DEVICE) as d,
        ):
            await dev.copy(s, d)

    async def produce(send: anyio.abc.ObjectSendStream[Item]) -> None:
        async with send:
            for i, size in enumerate(sizes):
                buf = await heap.allocate(size)
                inputs.append(buf)
                data = os.urandom(size)
                await write(buf, data)
                expected[i] = hashlib.sha256(data).hexdigest()
                await send.send((i, buf))

    async def stage(
        dev: SimDevice,
        owner: SimDevice | MemfdExporter,
        receive: anyio.abc.ObjectReceiveStream[Item],
        send: anyio.abc.ObjectSendStream[Item],
    ) -> None:
        async with receive, send:
            async for i, src in receive:
                dst = await owner.allocate(src.size)
                await dma(dev, src, dst)
                if src.exporter is not heap:
                    await src.put()
                await send.send((i, dst))
                if owner is b:
                    through_b.append(i)
                    if len(through_b) == len(sizes):
                        all_through_b.set()

    async def consume(receive: anyio.abc.ObjectReceiveStream[Item]) -> None:
        await all_through_b.wait()  # so the queues fill up, and memory with them
        async with receive:
            async for i, buf in receive:
                async with buf:
                    results[i] = hashlib.sha256(await read(buf)).hexdigest()

    streams = [anyio.create_memory_object_stream[Item](8) for _ in range(4)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(produce, streams[0][0])
        for dev, owner, (_, receive), (send, _) in (
            (a, a, streams[0], streams[1]),
            (b, b, streams[1], streams[2]),
            (a, heap, streams[2], streams[3]),
        ):
            for _ in range(2):  # two workers per stage
                tg.start_soon(stage, dev, owner, receive.clone(), send.clone())
            await receive.aclose()
            await send.aclose()
        tg.start_soon(consume, streams[3][1])
    for buf in inputs:
        await buf.put()
    assert results == expected
    for dev in (a, b):
        stats = dev.statistics()
        assert (stats.memory_in_use, stats.buffers, stats.waiters) == (0, 0, 0)
    assert a.statistics().copies + b.statistics().copies == 3 * len(sizes)
    assert b.statistics().evictions > 0  # queued buffers made room, then came back


# -- hardening (issue 12) -----------------------------------------------------------


def test_huge_memory_needs_no_page_map() -> None:
    # 12.14: the allocator's size follows its free extents, not the memory.
    dev = SimDevice("huge", memory=2**50)
    assert dev.memory == 2**50
    assert dev.statistics().memory_total == 2**50
    assert dev._audit() == []


async def test_huge_memory_allocates_from_its_top() -> None:
    dev = SimDevice("huge", memory=2**50, base_address=0)
    async with (
        await dev.allocate(PAGE) as buf,
        buf.attach(Device("wide")) as att,
        att.map(BIDI) as sgt,
    ):
        assert sgt[0].dma_address == 2**50 - PAGE  # highest pages first
        assert dev.statistics().memory_in_use == PAGE
    assert dev.statistics().memory_in_use == 0


@pytest.mark.parametrize(
    ("probability", "error"),
    [
        ({"map": "x"}, TypeError),
        ({"map": True}, TypeError),
        ({"map": float("nan")}, InvalidArgument),
        ({"map": -0.1}, InvalidArgument),
        ({"map": 1.5}, InvalidArgument),
        ("map", TypeError),
    ],
)
def test_fault_plan_checks_probabilities(probability: Any, error: type) -> None:
    # 12.14: never a bare ValueError.
    with pytest.raises(error) as info:
        FaultPlan(probability=probability)
    assert type(info.value) is not ValueError


def test_vmap_of_something_else_is_a_type_error() -> None:
    # 12.14: not an AttributeError.
    with pytest.raises(TypeError):
        sim(1).vmap("not a buffer")  # type: ignore[arg-type]


async def test_vmap_of_another_exporters_buffer_is_invalid() -> None:
    async with await MemfdExporter().allocate(PAGE) as buf:
        with pytest.raises(InvalidArgument):
            sim(1).vmap(buf)


async def test_injected_faults_are_injected_faults() -> None:
    dev = sim(2)
    dev.inject_fault("allocate")
    with pytest.raises(OutOfMemory) as oom:
        await dev.allocate(PAGE)
    assert isinstance(oom.value, InjectedFault)
    buf = await dev.allocate(PAGE)
    dev.inject_fault("attach")
    with pytest.raises(Busy) as busy:
        await buf.attach(Device("gpu"))
    assert isinstance(busy.value, InjectedFault)
    dev.inject_fault("begin_cpu_access", error=InvalidArgument)
    with pytest.raises(InvalidArgument) as invalid:
        async with buf.cpu_access("r"):
            pass
    assert isinstance(invalid.value, InjectedFault)
    dev.inject_fault("begin_cpu_access")
    with pytest.raises(InjectedFault) as plain:
        async with buf.cpu_access("r"):
            pass
    assert plain.value.errno == errno.EIO
    await buf.put()
    assert dev.statistics().faults_injected == 4


async def test_contiguous_device_too_short_a_segment_is_named() -> None:
    # 12.19: the Busy names the constraint that cannot be met.
    dev = sim(512)
    narrow = Device("dsp", contiguous=True, max_segment_size=4096)
    async with await dev.allocate(1 << 20) as buf:
        with pytest.raises(Busy, match=r"contiguous.*max_segment_size 4096"):
            await buf.attach(narrow)


async def test_mask_too_narrow_is_named() -> None:
    dev = sim(4)
    low = Device("low", dma_mask=BASE + PAGE - 1)
    async with await dev.allocate(2 * PAGE) as buf:
        with pytest.raises(Busy, match="dma_mask 0x100fff reaches 4096 bytes"):
            await buf.attach(low)


async def test_release_never_waits_and_is_idempotent() -> None:
    # 12.6: the garbage collector's release is a plain call; once is enough.
    dev = sim(2)
    buf = await dev.allocate(PAGE)
    await write(buf, b"x")
    assert dev.statistics().memory_in_use == PAGE
    dev.release(buf)  # a plain function: nothing to await
    dev.release(buf)
    stats = dev.statistics()
    assert (stats.memory_in_use, stats.buffers) == (0, 0)
    await buf.put()  # the framework's release: nothing left to free
    assert dev.statistics().buffers == 0
    assert dev._audit() == []


def test_undo_ops_are_plain_functions() -> None:
    import inspect

    for op in ("unmap", "detach", "release", "end_cpu_access"):
        assert not inspect.iscoroutinefunction(getattr(SimDevice, op)), op


def _no_host_memory(frame: object) -> bytes:
    raise MemoryError


async def test_eviction_without_host_memory_fails_cleanly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 12.3: saving an evicted buffer runs out of memory: the map that needed
    # the room raises OutOfMemory (not MemoryError, no retry loop), the
    # victim stays resident and intact, and waiters still wake once memory
    # is freed.
    from asyncdmabuf.exporters._simdev import eviction

    dev = sim(1)
    victim = await dev.allocate(PAGE)
    vatt = await victim.attach(Device("v"), move_notify=lambda _: None)
    await vatt.unmap(await vatt.map(BIDI))
    await write(victim, b"keep")
    other = await dev.allocate(PAGE)
    oatt = await other.attach(Device("o"))
    monkeypatch.setattr(eviction, "save_bytes", _no_host_memory)
    with pytest.raises(OutOfMemory) as info:
        await oatt.map(BIDI)
    assert type(info.value) is not MemoryError
    assert dev.statistics().evictions == 0
    assert dev._audit() == []
    assert (await read(victim))[:4] == b"keep"
    # A waiter whose room could come only from that eviction waits (the
    # unmap that tried it does not fail), and is served once memory is freed.
    pin = await victim.attach(Device("pin"))
    sgt = await pin.map(BIDI)
    async with anyio.create_task_group() as tg:
        tg.start_soon(map_in_task, oatt)
        await wait_all_blocked()
        assert dev.statistics().waiters == 1
        await pin.unmap(sgt)
        await pin.detach()  # unpinned: the eviction is tried, and fails
        await wait_all_blocked()
        assert dev.statistics().waiters == 1
        assert dev.statistics().evictions == 0
        await vatt.detach()
        await victim.put()  # freed: the waiter is served
    (sgt,) = oatt.mappings
    await drop(other, oatt, sgt)
    assert dev.statistics().memory_in_use == 0
    assert dev._audit() == []


RLIMIT_CHILD = """
import resource, anyio
from asyncdmabuf import Device, Direction, OutOfMemory
from asyncdmabuf.exporters import SimDevice

SIZE = 512 << 20

async def main():
    dev = SimDevice("big", memory=SIZE, page_size=1 << 20)
    big = await dev.allocate(SIZE)
    att = await big.attach(Device("d"), move_notify=lambda _: None)
    await att.unmap(await att.map(Direction.BIDIRECTIONAL))
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize"))
    limit = vm * 1024 + (64 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(
        resource.RLIMIT_AS)[1]))
    other = await dev.allocate(SIZE)
    oatt = await other.attach(Device("e"))
    try:
        await oatt.map(Direction.BIDIRECTIONAL)
    except OutOfMemory as exc:
        assert type(exc) is not MemoryError
        print("OutOfMemory", dev.statistics().evictions, dev._audit())
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
    await oatt.detach(); await att.detach(); await other.put(); await big.put()

anyio.run(main)
"""


def test_eviction_under_rlimit_as_raises_out_of_memory() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", RLIMIT_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OutOfMemory", "0", "[]"]


def _reference_find(
    free: bytearray, npages: int, limit: int, contiguous: bool
) -> tuple[tuple[int, int], ...] | None:
    """The old page-map search, one byte per page, as the allocator's oracle."""
    if contiguous:
        first = free.rfind(b"\x01" * npages, 0, limit)
        return None if first < 0 else ((first, npages),)
    runs: list[tuple[int, int]] = []
    remaining, end = npages, limit
    while remaining:
        top = free.rfind(1, 0, end)
        if top < 0:
            return None
        start = free.rfind(0, 0, top) + 1
        take = min(top + 1 - start, remaining)
        runs.append((top + 1 - take, take))
        remaining -= take
        end = start
    return tuple(reversed(runs))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 12), st.integers(1, 64), st.booleans(), st.integers(0, 9)
        ),
        max_size=60,
    )
)
def test_page_allocator_agrees_with_a_page_map(
    steps: list[tuple[int, int, bool, int]],
) -> None:
    from asyncdmabuf.exporters._simdev.pages import PageAllocator

    npages = 64
    pages = PageAllocator(npages)
    model = bytearray(b"\x01" * npages)
    held: list[tuple[tuple[int, int], ...]] = []
    for size, limit, contiguous, free_index in steps:
        if held and free_index < 3:
            runs = held.pop(free_index % len(held))
            pages.give(runs)
            for first, count in runs:
                model[first : first + count] = b"\x01" * count
        found = pages.find(size, limit, contiguous)
        assert found == _reference_find(model, size, limit, contiguous)
        if found is not None:
            pages.take(found)
            for first, count in found:
                model[first : first + count] = bytes(count)
            held.append(found)
        assert pages.free_pages == model.count(1)
        extents = pages.extents()
        assert sum(end - start for start, end in extents) == pages.free_pages
        assert all(a[1] < b[0] for a, b in itertools.pairwise(extents))
