"""Fairness: thousands of tasks over a few buffers, on each backend.

Every buffer's lock is held while a random mix of tasks arrives: blocking maps
(which queue), ``try_map`` calls (which must say ``Busy`` at once) and
cancellations of queued maps. Then the locks are let go. The maps that were not
cancelled must be granted in exactly the order they arrived (FIFO: nobody is
overtaken, so nobody starves), every one of them must complete, and at the end
no lock is held, no waiter is queued, no table is left mapped and SimDevice's
accounting is exact.
"""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest

from asyncdmabuf import Attachment, Busy, Device, Direction, DmaBuf
from asyncdmabuf.exporters import MemfdExporter, SimDevice

from .reliability import NullExporter, assert_quiet, assert_sim_exact, budget

pytestmark = pytest.mark.anyio

DIRECTIONS = list(Direction)


async def _queued(buf: DmaBuf, expected: int) -> None:
    """Yield until exactly ``expected`` tasks wait for ``buf``'s lock."""
    while buf._lock.waiting != expected:
        await anyio.lowlevel.checkpoint()


async def _mapper(
    index: int,
    att: Attachment,
    direction: Direction,
    scope: anyio.CancelScope,
    grants: list[int],
) -> None:
    with scope:
        sgt = await att.map(direction)
        grants.append(index)  # before anything else can run: the grant order
        await att.unmap(sgt)


@pytest.mark.parametrize("seed", [1, 2])
async def test_fifo_grants_under_random_load(seed: int) -> None:
    rng = random.Random(seed)
    dev = SimDevice("sim", memory=64 * 4096)
    bufs = [
        NullExporter().make(4096),
        await MemfdExporter().allocate(8192),
        await dev.allocate(3 * 4096),
    ]
    atts = [await buf.attach(Device(f"dev{i}")) for i, buf in enumerate(bufs)]
    total = budget(6000, 60000)
    rounds = budget(6, 40)
    index = 0
    busy = cancelled_total = 0
    for _ in range(rounds):
        arrivals: list[list[int]] = [[] for _ in bufs]
        grants: list[list[int]] = [[] for _ in bufs]
        scopes: dict[int, anyio.CancelScope] = {}
        cancelled: set[int] = set()
        for buf in bufs:
            assert buf._lock.acquire_nowait()
        async with anyio.create_task_group() as tg:
            for _ in range(total // rounds):
                b = rng.randrange(len(bufs))
                buf, att = bufs[b], atts[b]
                roll = rng.random()
                if roll < 0.15:
                    with pytest.raises(Busy):
                        att.try_map(rng.choice(DIRECTIONS))
                    busy += 1
                elif roll < 0.3:
                    waiting = [i for i in arrivals[b] if i not in cancelled]
                    if waiting:
                        victim = rng.choice(waiting)
                        scopes[victim].cancel()
                        cancelled.add(victim)
                        cancelled_total += 1
                        await _queued(buf, len(waiting) - 1)
                else:
                    index += 1
                    scopes[index] = anyio.CancelScope()
                    tg.start_soon(
                        _mapper,
                        index,
                        att,
                        rng.choice(DIRECTIONS),
                        scopes[index],
                        grants[b],
                    )
                    queued = sum(i not in cancelled for i in arrivals[b])
                    await _queued(buf, queued + 1)
                    arrivals[b].append(index)
            for buf in bufs:
                buf._lock.release()
        for b, buf in enumerate(bufs):
            expected = [i for i in arrivals[b] if i not in cancelled]
            assert grants[b] == expected, f"{buf!r} granted out of arrival order"
            assert not any(scopes[i].cancelled_caught is False for i in cancelled)
            assert_quiet(buf)
            assert atts[b].mappings == ()
            atts[b].try_map(Direction.NONE)  # idle again: try_map succeeds
            await atts[b].unmap(atts[b].mappings[0])
        assert_sim_exact(dev)
    print(
        f"seed {seed}: {index} maps, {busy} Busy try_maps, {cancelled_total} cancelled"
    )
    assert index > total // 2
    for att in atts:
        await att.detach()
    for buf in bufs:
        await buf.put()
    stats = dev.statistics()
    assert (stats.buffers, stats.memory_in_use, stats.waiters) == (0, 0, 0)
