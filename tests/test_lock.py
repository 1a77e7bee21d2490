"""The buffer lock: FIFO, cancellation-safe hand-over, checkpoints."""

from __future__ import annotations

import anyio
import pytest

from asyncdmabuf._backends import native_checkpoint, task_name
from asyncdmabuf._lock import FifoLock

from .helpers import assert_checkpoints, assert_no_checkpoints, wait_all_blocked

pytestmark = pytest.mark.anyio


async def test_uncontended_acquire_checkpoints_and_nowait_does_not() -> None:
    lock = FifoLock()
    async with assert_checkpoints():
        await lock.acquire()
    assert lock.locked()
    assert lock.owner is not None
    async with assert_no_checkpoints():
        assert not lock.acquire_nowait()
        lock.release()
        assert lock.acquire_nowait()
        lock.release()
    assert not lock.locked()
    assert lock.owner is None


async def test_acquire_in_a_cancelled_scope_takes_nothing() -> None:
    lock = FifoLock()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await lock.acquire()
    assert scope.cancelled_caught
    assert not lock.locked()


async def test_waiters_are_served_in_arrival_order_and_none_barges_in() -> None:
    lock = FifoLock()
    await lock.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await lock.acquire()
        order.append(i)
        lock.release()

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(take, i)
            await wait_all_blocked()
        assert lock.waiting == 5
        lock.release()
        # Handed straight to the first waiter: still held, nobody may barge in.
        assert lock.locked()
        assert not lock.acquire_nowait()
    assert order == [0, 1, 2, 3, 4]
    assert not lock.contended()


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    lock = FifoLock()
    await lock.acquire()
    with anyio.CancelScope() as scope:

        async def cancel_when_blocked() -> None:
            await wait_all_blocked()
            assert lock.waiting == 1
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_blocked)
            await lock.acquire()
    assert scope.cancelled_caught
    assert lock.waiting == 0
    lock.release()
    assert not lock.locked()


async def test_a_waiter_cancelled_as_it_is_handed_the_lock_passes_it_on() -> None:
    lock = FifoLock()
    await lock.acquire()
    got: list[str] = []
    victim_scope = anyio.CancelScope()

    async def victim() -> None:
        with victim_scope:
            await lock.acquire()
            got.append("victim")  # trio: a woken task cannot be cancelled any more
            lock.release()

    async def next_in_line() -> None:
        await lock.acquire()
        got.append("next")
        lock.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(victim)
        await wait_all_blocked()
        tg.start_soon(next_in_line)
        await wait_all_blocked()
        lock.release()  # hands the lock to the victim...
        victim_scope.cancel()  # ...which is cancelled before it can run
    # asyncio delivers the cancellation and the victim passes the lock on;
    # trio has already rescheduled the victim, which takes its turn first.
    assert got in (["next"], ["victim", "next"])
    assert not lock.locked()
    assert lock.waiting == 0


async def test_native_checkpoint_and_task_names() -> None:
    checkpoint = native_checkpoint()
    async with assert_checkpoints():
        await checkpoint()
    lock = FifoLock()
    await lock.acquire()
    assert task_name(lock.owner)
    lock.release()


def test_outside_an_event_loop_anyio_is_used() -> None:
    import anyio.lowlevel

    assert native_checkpoint() is anyio.lowlevel.checkpoint
    lock = FifoLock()
    assert lock.acquire_nowait()
    assert task_name(lock.owner) == "<unknown task>"
    lock.release()
