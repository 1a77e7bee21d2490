"""The one wait queue: FIFO hand-over, cancellation before and after the grant."""

from __future__ import annotations

import anyio
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf._lock import FifoLock, LockStatistics
from asyncdmabuf.lowlevel import WaitQueue, WaitQueueStatistics

from .helpers import assert_checkpoints, wait_all_blocked

pytestmark = pytest.mark.anyio


async def test_waiters_are_woken_in_arrival_order_with_their_values() -> None:
    queue = WaitQueue()
    got: list[tuple[int, object]] = []

    async def waiter(i: int) -> None:
        got.append((i, await queue.park()))

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(waiter, i)
            await wait_all_blocked()
        assert len(queue) == 5
        stats = queue.statistics()
        assert isinstance(stats, WaitQueueStatistics)
        assert stats.tasks_waiting == 5
        for value in "abcde":
            assert queue.unpark(value) is not None
            await wait_all_blocked()
    assert got == list(enumerate("abcde"))
    assert queue.unpark("nobody") is None
    assert not queue


async def test_park_always_suspends() -> None:
    queue = WaitQueue()

    async def wake() -> None:
        queue.unpark()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wake)
        async with assert_checkpoints():
            await queue.park()


async def test_a_waiter_cancelled_before_its_turn_leaves_the_queue() -> None:
    abandoned: list[object] = []
    queue = WaitQueue(on_abandon=abandoned.append)
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.park)
        await wait_all_blocked()
        tg.cancel_scope.cancel()
    assert len(queue) == 0
    assert abandoned == []


async def test_a_value_handed_to_a_cancelled_waiter_is_not_lost() -> None:
    abandoned: list[object] = []
    queue = WaitQueue(on_abandon=abandoned.append)
    results: list[object] = []

    async def victim(scope: anyio.CancelScope) -> None:
        with scope:
            results.append(await queue.park())

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(victim, scope)
        await wait_all_blocked()
        queue.unpark("the lock")
        scope.cancel()  # asyncio: cancelled before it ran; trio: it already has it
    # Either the waiter got the value, or on_abandon did: never neither.
    assert results + abandoned == ["the lock"]


async def test_a_shielded_park_ignores_cancellation_until_woken() -> None:
    queue = WaitQueue()
    done = anyio.Event()

    async def shielded(scope: anyio.CancelScope) -> None:
        with scope:
            await queue.park(shielded=True)
            done.set()
            await anyio.lowlevel.checkpoint()  # the cancellation lands here

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(shielded, scope)
        await wait_all_blocked()
        scope.cancel()
        await wait_all_blocked()
        assert len(queue) == 1  # still parked
        queue.unpark()
    assert done.is_set()
    assert scope.cancelled_caught


async def test_lock_statistics_are_frozen_snapshots() -> None:
    lock = FifoLock()
    assert lock.statistics() == LockStatistics(
        locked=False, owner=None, tasks_waiting=0
    )
    await lock.acquire()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lock.acquire)
        await wait_all_blocked()
        stats = lock.statistics()
        assert stats.locked
        assert stats.owner
        assert stats.tasks_waiting == stats.waiting == 1
        with pytest.raises(AttributeError):
            stats.locked = False  # type: ignore[misc]
        lock.release()
    lock.release()
    assert not lock.statistics().locked


async def test_a_buffer_shows_its_lock_statistics() -> None:
    from asyncdmabuf.exporters import MemfdExporter

    buf = await MemfdExporter().allocate(4096)
    assert buf.lock_statistics() == LockStatistics(False, None, 0)
    att = await buf.attach(dmabuf.Device("d"))
    assert buf._lock.acquire_nowait()
    async with anyio.create_task_group() as tg:
        tg.start_soon(att.map, dmabuf.Direction.TO_DEVICE)
        await wait_all_blocked()
        stats = buf.lock_statistics()
        assert stats.locked
        assert stats.tasks_waiting == 1
        buf._lock.release()
    (sgt,) = att.mappings
    await att.unmap(sgt)
    await att.detach()
    await buf.put()
