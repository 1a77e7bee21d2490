"""The deferred map: ``await att.map(d)`` passes a free lock's checkpoint first.

``Attachment.map`` returns an :class:`Operation` that, awaited or stepped
(``create_task``, ``start_soon``), passes the checkpoint itself before the map's
coroutine starts (``op._coro``, which the cancel-point sweep drives, does it
all by itself). These tests drive that path: cancellation at the prelude,
the lock taken by another task during it, and the coroutine protocol.
"""

from __future__ import annotations

import gc

import anyio
import anyio.lowlevel
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf import Direction
from asyncdmabuf.exporters import MemfdExporter

from .exporters_for_tests import RecordingExporter, WaitingExporter
from .helpers import assert_checkpoints

pytestmark = pytest.mark.anyio

TO_DEVICE = Direction.TO_DEVICE


async def test_a_map_cancelled_at_its_prelude_leaves_nothing_and_is_retried() -> None:
    buf = await MemfdExporter().allocate(4096)
    att = await buf.attach(dmabuf.Device("gpu"))
    op = att.map(TO_DEVICE)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await op
    assert scope.cancelled_caught
    assert att.mappings == ()
    assert not buf._lock.contended()
    async with assert_checkpoints():
        sgt = await att.map(TO_DEVICE)  # a retry just works
    assert att.mappings == (sgt,)
    await att.unmap(sgt)
    await att.detach()
    await buf.put()


async def test_the_lock_taken_during_the_prelude_is_queued_for() -> None:
    buf = WaitingExporter().make()  # its map suspends with the lock held
    att = await buf.attach(dmabuf.Device("gpu"))
    tables: list[dmabuf.SgTable] = []

    async def map_one() -> None:
        tables.append(await att.map(TO_DEVICE))

    async with anyio.create_task_group() as tg:
        for _ in range(3):  # all pass their preludes before any maps
            tg.start_soon(map_one)
    assert set(att.mappings) == set(tables)
    assert len(tables) == 3
    assert not buf._lock.contended()
    for sgt in tables:
        await att.unmap(sgt)
    await att.detach()
    await buf.put()


async def test_stepped_by_hand_it_is_a_coroutine() -> None:
    buf = RecordingExporter().make()
    att = await buf.attach(dmabuf.Device("gpu"))
    op = att.map(TO_DEVICE)
    op.send(None)  # suspended at its prelude: nothing mapped yet
    assert att.mappings == ()
    with pytest.raises(ValueError, match="thrown"):
        op.throw(ValueError("thrown"))
    assert att.mappings == ()
    assert not buf._lock.contended()
    with pytest.raises(RuntimeError):
        op.send(None)  # over, as a coroutine is after it raised

    closed = att.map(TO_DEVICE)
    closed.send(None)
    closed.close()
    assert att.mappings == ()
    with pytest.raises(RuntimeError):
        closed.send(None)

    never = att.map(TO_DEVICE)
    never.close()  # never started: nothing runs
    del never
    gc.collect()
    assert att.mappings == ()
    await anyio.lowlevel.checkpoint()
    await att.detach()
    await buf.put()


async def test_async_with_the_deferred_map_unmaps() -> None:
    buf = await MemfdExporter().allocate(4096)
    att = await buf.attach(dmabuf.Device("gpu"))
    async with assert_checkpoints(), att.map(TO_DEVICE) as sgt:
        assert att.mappings == (sgt,)
    assert att.mappings == ()
    await att.detach()
    await buf.put()


async def test_a_map_never_awaited_warns_and_one_cancelled_does_not() -> None:
    """As a coroutine would: the deferred map makes none until it starts."""
    buf = await MemfdExporter().allocate(4096)
    att = await buf.attach(dmabuf.Device("dev"))
    op = att.map(Direction.TO_DEVICE)
    with pytest.warns(RuntimeWarning, match="never awaited"):
        del op  # its last reference: finalised here
    with anyio.CancelScope() as scope:
        scope.cancel()
        await att.map(Direction.TO_DEVICE)  # started: cancelled at its checkpoint
    assert scope.cancelled_caught
    gc.collect()  # no warning (warnings are errors here)
    assert att.mappings == ()
    await att.detach()
    await buf.put()
