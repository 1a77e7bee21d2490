"""Fault injection: every exporter op raising at every call site.

A deliberately faulty exporter (:class:`tests.reliability.FaultyExporter`)
raises from each of its ops, before or after doing its work, at each place the
framework calls that op; SimDevice's scripted faults hit each of its
operations the same way, and a seeded random run keeps many faults going. After
every fault: the error is the injected one (nothing converted or swallowed), no
lock is held, no waiter is queued, no mapping is recorded that the caller cannot
reach, refcounts are right, SimDevice's accounting is exact (and zero after the
last release), and no fd is left open.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import get_args

import pytest

from asyncdmabuf import (
    Attachment,
    Busy,
    CpuMode,
    Device,
    Direction,
    DmaBuf,
    DmaBufError,
    InvalidArgument,
    OutOfMemory,
    SgTable,
    Usage,
)
from asyncdmabuf.exporters import FaultOp, SimDevice

from .helpers import fd_count
from .reliability import (
    FAULTY_OPS,
    FaultyExporter,
    InjectedError,
    assert_quiet,
    assert_sim_exact,
    budget,
    run_or_cancel_when_blocked,
)

pytestmark = pytest.mark.anyio

BIDI = Direction.BIDIRECTIONAL
FAULT_OPS_TYPED: tuple[FaultOp, ...] = get_args(FaultOp)
PAGE = 4096


@contextlib.contextmanager
def _quietly() -> Iterator[list[warnings.WarningMessage]]:
    """Record warnings instead of failing on them (leftover detaches warn)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


# -- the faulty exporter, op by op and call site by call site ------------------------


Site = Callable[[FaultyExporter, DmaBuf], Awaitable[None]]


async def _attach(exp: FaultyExporter, buf: DmaBuf) -> None:
    with pytest.raises(InjectedError):
        await buf.attach(Device("gpu"))
    assert buf.attachments == ()
    assert exp.attached == 0
    assert_quiet(buf)
    exp.fail.clear()
    att = await buf.attach(Device("gpu"))  # a retry works
    await att.detach()


async def _detach(exp: FaultyExporter, buf: DmaBuf) -> None:
    exp.fail.clear()
    att = await buf.attach(Device("gpu"))
    exp.fail.add("detach")
    with pytest.raises(InjectedError):
        await att.detach()
    assert not att.attached
    assert buf.attachments == ()
    assert_quiet(buf)
    with pytest.raises(InvalidArgument):
        await att.detach()


async def _detach_in_put(exp: FaultyExporter, buf: DmaBuf) -> None:
    exp.fail.clear()
    att = await buf.attach(Device("gpu"))
    exp.fail.add("detach")
    with _quietly() as caught, pytest.raises(InjectedError):
        await buf.put()
    assert [w.category for w in caught] == [ResourceWarning]
    assert buf.released
    assert not att.attached
    assert_quiet(buf)


async def _map(exp: FaultyExporter, buf: DmaBuf) -> None:
    fail, exp.fail = set(exp.fail), set()
    att = await buf.attach(Device("gpu"))
    exp.fail = fail
    with pytest.raises(InjectedError):
        await att.map(BIDI)
    assert att.mappings == ()
    assert_quiet(buf)
    with pytest.raises(InjectedError):
        async with att.map(BIDI):
            pytest.fail("mapped")  # pragma: no cover
    assert att.mappings == ()
    exp.fail.clear()
    sgt = await att.map(BIDI)  # a retry works
    assert att.mappings == (sgt,)
    await att.unmap(sgt)
    await att.detach()


async def _try_map(exp: FaultyExporter, buf: DmaBuf) -> None:
    fail, exp.fail = set(exp.fail), set()
    att = await buf.attach(Device("gpu"))
    exp.fail = fail
    with pytest.raises(InjectedError):
        att.try_map(BIDI)
    assert att.mappings == ()
    assert_quiet(buf)
    exp.fail.clear()
    await att.unmap(att.try_map(BIDI))
    await att.detach()


async def _mapped(exp: FaultyExporter, buf: DmaBuf) -> tuple[Attachment, SgTable]:
    fail, exp.fail = set(exp.fail), set()
    att = await buf.attach(Device("gpu"))
    sgt = await att.map(BIDI)
    exp.fail = fail
    return att, sgt


async def _unmap(exp: FaultyExporter, buf: DmaBuf) -> None:
    att, sgt = await _mapped(exp, buf)
    assert hasattr(att, "unmap")
    with pytest.raises(InjectedError):
        await att.unmap(sgt)
    assert not sgt.valid
    assert att.mappings == ()
    assert_quiet(buf)
    with pytest.raises(InvalidArgument):
        await att.unmap(sgt)
    exp.fail.clear()
    await att.detach()


async def _unmap_on_exit(exp: FaultyExporter, buf: DmaBuf) -> None:
    fail, exp.fail = set(exp.fail), set()
    att = await buf.attach(Device("gpu"))
    exp.fail = fail
    with pytest.raises(InjectedError):
        async with att.map(BIDI) as sgt:
            pass
    assert not sgt.valid
    assert att.mappings == ()
    assert_quiet(buf)
    exp.fail.clear()
    await att.detach()


async def _unmap_in_detach(exp: FaultyExporter, buf: DmaBuf) -> None:
    att, sgt = await _mapped(exp, buf)
    with _quietly(), pytest.raises(InjectedError):
        await att.detach()
    assert not sgt.valid
    assert not att.attached
    assert buf.attachments == ()
    assert_quiet(buf)


async def _unmap_in_put(exp: FaultyExporter, buf: DmaBuf) -> None:
    att, sgt = await _mapped(exp, buf)
    with _quietly(), pytest.raises(InjectedError):
        await buf.put()
    assert buf.released
    assert not sgt.valid
    assert not att.attached
    assert_quiet(buf)


async def _release(exp: FaultyExporter, buf: DmaBuf) -> None:
    with pytest.raises(InjectedError):
        await buf.put()
    assert buf.released
    assert not buf.shared
    assert_quiet(buf)
    with pytest.raises(InvalidArgument):
        await buf.put()
    with pytest.raises(InvalidArgument):
        buf.fd()


async def _begin(exp: FaultyExporter, buf: DmaBuf) -> None:
    with pytest.raises(InjectedError):
        await buf.begin_cpu_access("rw")
    assert buf.cpu_access_modes == ()
    with pytest.raises(InvalidArgument):
        await buf.end_cpu_access("rw")
    assert_quiet(buf)


async def _begin_in_cpu_access(exp: FaultyExporter, buf: DmaBuf) -> None:
    with pytest.raises(InjectedError):
        async with buf.cpu_access("w"):
            pytest.fail("entered")  # pragma: no cover
    assert buf.cpu_access_modes == ()
    assert exp.cpu == 0
    assert_quiet(buf)


async def _vmap(exp: FaultyExporter, buf: DmaBuf) -> None:
    with pytest.raises(InjectedError):
        async with buf.cpu_access("r"):
            pytest.fail("entered")  # pragma: no cover
    assert buf.cpu_access_modes == ()
    assert exp.cpu == 0  # the begin was ended again
    assert_quiet(buf)


async def _end(exp: FaultyExporter, buf: DmaBuf) -> None:
    fail, exp.fail = set(exp.fail), set()
    await buf.begin_cpu_access("r")
    exp.fail = fail
    with pytest.raises(InjectedError):
        await buf.end_cpu_access("r")
    assert buf.cpu_access_modes == ()
    assert_quiet(buf)


async def _end_in_cpu_access(exp: FaultyExporter, buf: DmaBuf) -> None:
    with pytest.raises(InjectedError):
        async with buf.cpu_access("rw") as view:
            view[:2] = b"ok"
    assert buf.cpu_access_modes == ()
    assert_quiet(buf)
    exp.fail.clear()
    async with buf.cpu_access("r") as view:
        assert bytes(view[:2]) == b"ok"


#: Every place the framework calls each op.
SITES: dict[str, list[Site]] = {
    "attach": [_attach],
    "detach": [_detach, _detach_in_put],
    "map": [_map],
    "try_map": [_try_map],
    "unmap": [_unmap, _unmap_on_exit, _unmap_in_detach, _unmap_in_put],
    "release": [_release],
    "begin_cpu_access": [_begin, _begin_in_cpu_access],
    "end_cpu_access": [_end, _end_in_cpu_access],
    "vmap": [_vmap],
}
CASES = [
    pytest.param(op, site, after, id=f"{op}-{site.__name__.strip('_')}-{when}")
    for op in FAULTY_OPS
    for site in SITES[op]
    for after, when in ((False, "before"), (True, "after"))
]


@pytest.mark.parametrize(("op", "site", "after"), CASES)
async def test_faulty_exporter_op_at_each_call_site(
    op: str, site: Site, after: bool
) -> None:
    fds = fd_count()
    exp = FaultyExporter()
    exp.fail.add(op)
    if after:
        exp.fail_after.add(op)
    buf = exp.make(2 * PAGE)
    os.close(buf.fd())  # give it a file, to see that faults never leak it
    await site(exp, buf)
    assert exp.injected >= 1
    exp.fail.clear()
    if not buf.released:
        with _quietly():
            await buf.put()
    assert buf.released
    assert_quiet(buf)
    assert fd_count() <= fds
    assert exp.calls[op] >= 1


def test_every_faulty_op_has_call_sites() -> None:
    assert set(SITES) == set(FAULTY_OPS)


# -- SimDevice: each operation's scripted fault ---------------------------------------


async def _sim_world(
    dev: SimDevice, *, dynamic: bool = False
) -> tuple[DmaBuf, Attachment]:
    buf = await dev.allocate(2 * PAGE)
    notify = (lambda att: None) if dynamic else None
    att = await buf.attach(Device("gpu"), move_notify=notify)
    return buf, att


def _check_sim(dev: SimDevice, *bufs: DmaBuf) -> None:
    assert_quiet(*bufs)
    assert_sim_exact(dev)


SimSite = Callable[[SimDevice], Awaitable[None]]


async def _sim_allocate(dev: SimDevice) -> None:
    with pytest.raises(OutOfMemory):
        await dev.allocate(PAGE)
    assert dev.statistics().buffers == 0
    buf = await dev.allocate(PAGE)
    await buf.put()


async def _sim_backing_map(dev: SimDevice) -> None:
    buf, att = await _sim_world(dev)
    with pytest.raises(OutOfMemory):
        await att.map(BIDI)
    assert att.mappings == ()
    _check_sim(dev, buf)
    assert dev.statistics().memory_in_use == 0
    sgt = await att.map(BIDI)
    await att.unmap(sgt)
    await att.detach()
    await buf.put()


async def _sim_backing_try_map(dev: SimDevice) -> None:
    buf, att = await _sim_world(dev)
    with pytest.raises(OutOfMemory):
        att.try_map(BIDI)
    assert att.mappings == ()
    _check_sim(dev, buf)
    assert dev.statistics().memory_in_use == 0
    await att.detach()
    await buf.put()


async def _sim_backing_cpu(dev: SimDevice) -> None:
    buf = await dev.allocate(PAGE)
    with pytest.raises(OutOfMemory):
        async with buf.cpu_access("w"):
            pytest.fail("entered")  # pragma: no cover
    assert buf.cpu_access_modes == ()
    _check_sim(dev, buf)
    assert dev.statistics().memory_in_use == 0
    await buf.put()


async def _sim_backing_restore(dev: SimDevice) -> None:
    """Evicted, then the restore at the next map fails: the bytes survive."""
    dev._faults.armed.clear()  # the fault goes to the restore, below
    buf, att = await _sim_world(dev, dynamic=True)
    sgt = await att.map(BIDI)
    async with buf.cpu_access("w") as view:
        view[:3] = b"old"
    await att.unmap(sgt)
    hog = await dev.allocate(dev.memory)  # needs everything: evicts buf
    hog_att = await hog.attach(Device("hog"))
    await hog_att.unmap(await hog_att.map(BIDI))
    assert dev.statistics().evictions == 1
    await hog_att.detach()
    await hog.put()
    dev.inject_fault("backing")
    with pytest.raises(OutOfMemory):
        await att.map(BIDI)
    _check_sim(dev, buf)
    async with buf.cpu_access("r") as view:
        assert bytes(view[:3]) == b"old"
    await att.detach()
    await buf.put()


async def _sim_attach(dev: SimDevice) -> None:
    buf = await dev.allocate(PAGE)
    with pytest.raises(Busy):
        await buf.attach(Device("gpu"))
    assert buf.attachments == ()
    _check_sim(dev, buf)
    await buf.put()


async def _sim_detach(dev: SimDevice) -> None:
    buf, att = await _sim_world(dev)
    await att.unmap(await att.map(BIDI))
    assert dev.statistics().memory_pinned == 2 * PAGE
    with pytest.raises(DmaBufError) as info:
        await att.detach()
    assert info.value.errno == errno.EIO
    assert buf.attachments == ()
    assert dev.statistics().memory_pinned == 0  # the pin went all the same
    _check_sim(dev, buf)
    await buf.put()


async def _sim_detach_in_put(dev: SimDevice) -> None:
    buf, att = await _sim_world(dev)
    await att.map(BIDI)
    with _quietly(), pytest.raises(DmaBufError):
        await buf.put()
    assert buf.released
    _check_sim(dev, buf)


async def _sim_map(dev: SimDevice) -> None:
    buf, att = await _sim_world(dev)
    with pytest.raises(DmaBufError):
        await att.map(BIDI)
    assert att.mappings == ()
    assert dev.statistics().memory_pinned == 0
    _check_sim(dev, buf)
    await att.detach()
    await buf.put()


async def _sim_try_map(dev: SimDevice) -> None:
    buf, att = await _sim_world(dev)
    with pytest.raises(DmaBufError):
        att.try_map(BIDI)
    assert att.mappings == ()
    assert dev.statistics().memory_pinned == 0
    _check_sim(dev, buf)
    await att.detach()
    await buf.put()


async def _sim_unmap(dev: SimDevice) -> None:
    buf, att = await _sim_world(dev, dynamic=True)
    sgt = await att.map(BIDI)
    with pytest.raises(DmaBufError):
        await att.unmap(sgt)
    assert not sgt.valid
    assert dev.statistics().memory_pinned == 0
    _check_sim(dev, buf)
    await att.detach()
    await buf.put()


async def _sim_unmap_in_detach(dev: SimDevice) -> None:
    buf, att = await _sim_world(dev, dynamic=True)
    await att.map(BIDI)
    with _quietly(), pytest.raises(DmaBufError):
        await att.detach()
    assert buf.attachments == ()
    assert dev.statistics().memory_pinned == 0
    _check_sim(dev, buf)
    await buf.put()


async def _sim_release(dev: SimDevice) -> None:
    buf, att = await _sim_world(dev)
    await att.unmap(await att.map(BIDI))
    await att.detach()
    with pytest.raises(DmaBufError):
        await buf.put()
    assert buf.released
    _check_sim(dev, buf)


async def _sim_begin(dev: SimDevice) -> None:
    buf = await dev.allocate(PAGE)
    with pytest.raises(DmaBufError):
        await buf.begin_cpu_access("r")
    assert buf.cpu_access_modes == ()
    assert dev.statistics().memory_pinned == 0
    _check_sim(dev, buf)
    await buf.put()


async def _sim_end(dev: SimDevice) -> None:
    buf = await dev.allocate(PAGE)
    with pytest.raises(DmaBufError):
        async with buf.cpu_access("w") as view:
            view[:1] = b"x"
    assert buf.cpu_access_modes == ()
    assert dev.statistics().memory_pinned == 0
    _check_sim(dev, buf)
    async with buf.cpu_access("r") as view:
        assert bytes(view[:1]) == b"x"
    await buf.put()


async def _sim_copy(dev: SimDevice) -> None:
    src = await dev.allocate(PAGE)
    dst = await dev.allocate(PAGE)
    async with src.cpu_access("w") as view:
        view[:] = b"s" * PAGE
    a = await src.attach(dev.device)
    b = await dst.attach(dev.device)
    ssgt = await a.map(Direction.TO_DEVICE)
    dsgt = await b.map(Direction.FROM_DEVICE)
    with pytest.raises(DmaBufError):
        await dev.copy(ssgt, dsgt)
    assert dev.statistics().copies == 0
    assert dst.resv.test(Usage.BOOKKEEP)  # the transfer's fence has signalled
    async with dst.cpu_access("r") as view:
        assert bytes(view) == bytes(PAGE)  # nothing moved
    _check_sim(dev, src, dst)
    assert await dev.copy(ssgt, dsgt) == PAGE  # a retry works
    for att, sgt in ((a, ssgt), (b, dsgt)):
        await att.unmap(sgt)
        await att.detach()
    await src.put()
    await dst.put()


SIM_SITES: dict[FaultOp, list[SimSite]] = {
    "allocate": [_sim_allocate],
    "backing": [
        _sim_backing_map,
        _sim_backing_try_map,
        _sim_backing_cpu,
        _sim_backing_restore,
    ],
    "attach": [_sim_attach],
    "detach": [_sim_detach, _sim_detach_in_put],
    "map": [_sim_map, _sim_try_map],
    "unmap": [_sim_unmap, _sim_unmap_in_detach],
    "release": [_sim_release],
    "begin_cpu_access": [_sim_begin],
    "end_cpu_access": [_sim_end],
    "copy": [_sim_copy],
}


@pytest.mark.parametrize(
    ("op", "site"),
    [
        pytest.param(op, site, id=f"{op}-{site.__name__.strip('_')}")
        for op, sites in SIM_SITES.items()
        for site in sites
    ],
)
async def test_simdevice_fault_at_each_call_site(op: FaultOp, site: SimSite) -> None:
    fds = fd_count()
    dev = SimDevice("sim", memory=8 * PAGE)
    dev.inject_fault(op)
    await site(dev)
    stats = dev.statistics()
    assert stats.faults_injected == 1
    assert (stats.buffers, stats.memory_in_use, stats.waiters) == (0, 0, 0)
    assert_sim_exact(dev)
    assert fd_count() <= fds


def test_every_simdevice_fault_op_has_call_sites() -> None:
    from asyncdmabuf.exporters._faults import FAULT_OPS

    assert set(SIM_SITES) == set(FAULT_OPS)


# -- SimDevice under random faults ---------------------------------------------


async def test_simdevice_random_faults_keep_the_invariants() -> None:
    """Every op fails now and then; the accounting stays exact throughout."""

    seed = 7
    rng = random.Random(seed)
    dev = SimDevice(
        "sim",
        memory=6 * PAGE,
        seed=seed,
        faults=dict.fromkeys(FAULT_OPS_TYPED, 0.15),
    )
    bufs: list[DmaBuf] = []
    tables: list[tuple[Attachment, SgTable]] = []
    atts: list[Attachment] = []
    errors = 0
    steps = budget(600, 20000)
    for _ in range(steps):
        action = rng.randrange(8)
        try:
            with _quietly():
                await _random_step(dev, rng, action, bufs, atts, tables)
        except (DmaBufError, Busy):
            errors += 1
        live = [b for b in bufs if not b.released]
        assert_quiet(*bufs)
        stats = dev.statistics()
        assert stats.buffers == len(live)
        assert stats.waiters == 0
        assert_sim_exact(dev)
        bufs[:] = live
        atts[:] = [a for a in atts if a.attached]
        tables[:] = [(a, t) for a, t in tables if t.valid]
    with _quietly():
        for buf in bufs:
            while not buf.released:
                try:
                    await buf.put()
                except DmaBufError:
                    errors += 1
    stats = dev.statistics()
    assert (stats.buffers, stats.memory_in_use) == (0, 0)
    assert stats.faults_injected > steps // 20
    assert errors > steps // 20


async def _touch(buf: DmaBuf, mode: CpuMode) -> None:
    async with buf.cpu_access(mode) as view:
        assert len(view) == buf.size


async def _random_step(
    dev: SimDevice,
    rng: random.Random,
    action: int,
    bufs: list[DmaBuf],
    atts: list[Attachment],
    tables: list[tuple[Attachment, SgTable]],
) -> None:
    if action == 0 or not bufs:
        if len(bufs) < 5:
            bufs.append(await dev.allocate(rng.choice((PAGE, 2 * PAGE, 3 * PAGE))))
        return
    buf = rng.choice(bufs)
    if action == 1:
        notify = (lambda att: None) if rng.random() < 0.5 else None
        atts.append(await buf.attach(Device("gpu"), move_notify=notify))
    elif action == 2 and atts:
        att = rng.choice(atts)
        # Memory may be pinned full: a map that blocks is cancelled.
        _, sgt = await run_or_cancel_when_blocked(att.map(BIDI)._coro)
        if sgt is not None:
            tables.append((att, sgt))
    elif action == 3 and atts:
        att = rng.choice(atts)
        tables.append((att, att.try_map(BIDI)))
    elif action == 4 and tables:
        att, sgt = rng.choice(tables)
        await att.unmap(sgt)
    elif action == 5 and atts:
        await rng.choice(atts).detach()
    elif action == 6:
        await run_or_cancel_when_blocked(_touch(buf, rng.choice(("r", "w", "rw"))))
    elif action == 7 and rng.random() < 0.3:
        await buf.put()
