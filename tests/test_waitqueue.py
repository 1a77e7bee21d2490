"""The one wait queue: FIFO hand-over, cancellation before and after the grant."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf._backends import current_backend
from asyncdmabuf._lock import FifoLock, LockStatistics
from asyncdmabuf.exporters import MemfdExporter
from asyncdmabuf.lowlevel import Deferred, WaitQueue, WaitQueueStatistics

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


async def test_a_deferred_entry_takes_its_turn_and_wakes_nobody() -> None:
    """unpark() returns a deferred entry for its caller to run, in FIFO order."""
    queue = WaitQueue()
    got: list[object] = []
    ran: list[str] = []

    async def waiter() -> None:
        got.append(await queue.park())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await wait_all_blocked()
        entry = Deferred(lambda: ran.append("deferred"), "the deferred one")
        queue.defer(entry)
        tg.start_soon(waiter)
        await wait_all_blocked()
        assert queue.statistics().waiting[1] == "the deferred one"
        assert queue.unpark("first") not in (None, entry)
        await wait_all_blocked()  # the first waiter ran (trio shuffles wakers)
        assert queue.unpark("lost") is entry  # nothing woken: "lost" goes nowhere
        assert ran == []  # the caller runs it, not the queue
        entry.run()
        assert queue.unpark("second") not in (None, entry)
    assert got == ["first", "second"]
    assert ran == ["deferred"]
    assert repr(entry) == "<Deferred the deferred one>"


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


async def _cancel_while_parked(
    queue: WaitQueue,
    waiter: Callable[[anyio.CancelScope], Coroutine[Any, Any, None]],
    value: object = None,
) -> anyio.CancelScope:
    """Cancel the scope ``waiter`` parks in (shielded), then unpark it with ``value``.

    Checks that the waiter is still parked after the cancellation and a
    checkpoint; returns the scope once the waiter is done.
    """
    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, scope)
        await wait_all_blocked()
        scope.cancel()
        await wait_all_blocked()
        await anyio.lowlevel.checkpoint()
        assert len(queue) == 1  # still parked
        queue.unpark(value)
    return scope


async def _checkpoint_cancelled(order: list[str]) -> None:
    """A checkpoint that must raise the held-back cancellation; noted in ``order``."""
    try:
        await anyio.lowlevel.checkpoint()
    except anyio.get_cancelled_exc_class():
        order.append("cancelled")
        raise
    order.append("not cancelled")  # pragma: no cover


async def _nothing_pending(order: list[str]) -> None:
    """Check that no cancellation is left on the task; note "done" in ``order``."""
    if current_backend() == "asyncio":
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
    await anyio.lowlevel.checkpoint()  # nothing more is pending
    order.append("done")


async def test_a_shielded_park_ignores_cancellation_until_woken() -> None:
    queue = WaitQueue()
    done = anyio.Event()

    async def shielded(scope: anyio.CancelScope) -> None:
        with scope:
            await queue.park(shielded=True)
            done.set()
            await anyio.lowlevel.checkpoint()  # the cancellation lands here

    scope = await _cancel_while_parked(queue, shielded)
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


async def _asyncio_only() -> None:
    if current_backend() != "asyncio":
        pytest.skip("Task.cancel() and cancelling() are asyncio's")


async def test_a_shielded_park_holds_back_native_cancels_and_delivers_once() -> None:
    await _asyncio_only()
    queue = WaitQueue()
    seen: list[object] = []

    async def shielded() -> None:
        task = asyncio.current_task()
        assert task is not None
        seen.append(await queue.park(shielded=True))
        seen.append(task.cancelling())  # both cancels counted, none undone
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError as exc:
            seen.append(exc.args)
            assert task.uncancel() == 1
            assert task.uncancel() == 0
        await asyncio.sleep(0)  # delivered once: nothing is pending any more
        seen.append("done")

    task = asyncio.create_task(shielded())
    await wait_all_blocked()
    task.cancel("first")
    task.cancel("second")
    await wait_all_blocked()
    assert len(queue) == 1  # still parked
    assert queue.unpark("value") is task
    await task
    assert seen == ["value", 2, ("second",), "done"]


async def test_asyncio_timeout_around_a_shielded_park_times_out_after_it() -> None:
    await _asyncio_only()
    queue = WaitQueue()
    got: list[object] = []

    async def shielded() -> None:
        try:
            async with asyncio.timeout(0):
                got.append(await queue.park(shielded=True))
                await asyncio.sleep(0)  # the timeout's cancellation lands here
        except TimeoutError:  # not CancelledError: its count was kept exact
            got.append("timed out")
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        got.append("after")

    task = asyncio.create_task(shielded())
    await wait_all_blocked()
    await asyncio.sleep(0)  # the timeout fires while it waits
    await wait_all_blocked()
    assert len(queue) == 1
    queue.unpark("value")
    await task
    assert got == ["value", "timed out", "after"]


async def test_a_cancel_scope_cancelled_during_a_shielded_park_lands_after_it() -> None:
    queue = WaitQueue()
    order: list[str] = []

    async def shielded(scope: anyio.CancelScope) -> None:
        with scope:
            order.append(str(await queue.park(shielded=True)))
            # No checkpoint yet: the cancellation is held back until one.
            order.append("ran on")
            await _checkpoint_cancelled(order)
        order.append("left")
        await _nothing_pending(order)

    scope = await _cancel_while_parked(queue, shielded, "woken")
    assert scope.cancelled_caught
    assert order == ["woken", "ran on", "cancelled", "left", "done"]


async def test_a_shielded_park_in_an_already_cancelled_scope_still_waits() -> None:
    queue = WaitQueue()
    got: list[object] = []

    async def shielded() -> None:
        with anyio.CancelScope() as scope:
            scope.cancel()
            got.append(await queue.park(shielded=True))
            await anyio.lowlevel.checkpoint()
        got.append(scope.cancelled_caught)

    async with anyio.create_task_group() as tg:
        tg.start_soon(shielded)
        await wait_all_blocked()
        await anyio.lowlevel.checkpoint()
        assert len(queue) == 1
        queue.unpark("value")
    assert got == ["value", True]


async def test_a_held_back_scope_cancel_does_not_land_inside_a_later_shield() -> None:
    # Issue found by SIGTERM-ing `asyncdmabuf stress`: a scope cancel held back
    # by a shielded park (a contended cpu_access exit) landed in the shielded
    # cleanup that came next, so the cleanup's unmaps and detaches were lost.
    queue = WaitQueue()
    order: list[str] = []

    async def shielded(scope: anyio.CancelScope) -> None:
        with scope:
            order.append(str(await queue.park(shielded=True)))
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()  # the shield holds
                await anyio.lowlevel.checkpoint()
                order.append("cleaned up")
            await _checkpoint_cancelled(order)
        await _nothing_pending(order)

    scope = await _cancel_while_parked(queue, shielded, "woken")
    assert scope.cancelled_caught
    assert order == ["woken", "cleaned up", "cancelled", "done"]


async def test_a_contended_cpu_access_exit_then_a_shielded_cleanup() -> None:
    # The same, end to end: the access's exit waits (shielded) for the lock
    # while its scope is cancelled; the shielded cleanup after it must complete.
    buf = await MemfdExporter().allocate(4096)
    att = await buf.attach(dmabuf.Device("d"))
    sgt = await att.map(dmabuf.Direction.TO_DEVICE)
    lock = buf._lock  # held by the test, as an exporter op that awaits holds it
    body, end_body = anyio.Event(), anyio.Event()
    done: list[str] = []

    async def worker(scope: anyio.CancelScope) -> None:
        with scope:
            try:
                async with buf.cpu_access("w"):
                    body.set()
                    await end_body.wait()
            finally:
                with anyio.CancelScope(shield=True):
                    await att.unmap(sgt)
                    done.append("unmapped")

    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()
        tg.start_soon(worker, scope)
        await body.wait()
        await lock.acquire()  # free: the access holds it only to begin and end
        end_body.set()
        await wait_all_blocked()  # the worker's exit queues behind the test
        scope.cancel()
        await wait_all_blocked()
        lock.release()
    assert done == ["unmapped"]
    assert not att.mappings
    await att.detach()
    await buf.put()
