"""The buffer lock: FIFO, cancellation-safe hand-over, checkpoints."""

from __future__ import annotations

import asyncio as _asyncio
import functools

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncdmabuf._backends import current_backend, native_checkpoint, task_name
from asyncdmabuf._lock import FifoLock

from .helpers import assert_checkpoints, assert_no_checkpoints, wait_all_blocked
from .reliability import PROFILE, budget

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


async def test_deferred_work_runs_in_its_turn_holding_the_lock() -> None:
    """defer(): at once on a free lock; else after who asked first, before later."""
    lock = FifoLock()
    order: list[str] = []

    def deferred(name: str) -> None:
        assert lock.locked()
        assert task_name(lock.owner) == f"deferred {name}"
        order.append(name)

    async with assert_no_checkpoints():
        lock.defer(lambda: order.append("at once"), "deferred now")
    assert order == ["at once"]
    assert not lock.locked()

    async def take(name: str) -> None:
        await lock.acquire()
        order.append(name)
        lock.release()

    await lock.acquire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "before")
        await wait_all_blocked()
        async with assert_no_checkpoints():
            lock.defer(lambda: deferred("one"), "deferred one")
            lock.defer(lambda: deferred("two"), "deferred two")
        tg.start_soon(take, "after")
        await wait_all_blocked()
        stats = lock.statistics()
        assert stats.tasks_waiting == 4
        lock.release()
    assert order == ["at once", "before", "one", "two", "after"]
    assert not lock.locked()

    await lock.acquire()
    lock.defer(lambda: order.append("last"), "deferred last")
    lock.release()  # nobody else waits: the lock is free after it ran
    assert order[-1] == "last"
    assert not lock.locked()


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


# -- FIFO and cancellation, model-checked ---------------------------------------------

#: A step: queue a waiter (shielded or not), queue deferred work
#: (:meth:`FifoLock.defer`, which nothing cancels), cancel the k-th live waiter
#: through its scope or (asyncio) with ``Task.cancel()``, or release and at once
#: cancel the waiter the lock was just handed to (through its scope, or
#: natively), then queue again behind everyone.
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.booleans()),
        st.tuples(st.just("defer"), st.none()),
        st.tuples(st.sampled_from(["cancel", "native"]), st.integers(0, 7)),
        st.tuples(st.just("handoff"), st.booleans()),
    ),
    max_size=14,
)


@settings(PROFILE, max_examples=budget(60, 600))
@given(steps=_steps)
async def test_fifo_and_cancellation_at_every_point(
    steps: list[tuple[str, object]],
) -> None:
    """Grants follow arrival; cancelled waiters leave; shielded ones get their turn.

    Whatever mix of waiters and cancellations: the lock is granted in arrival
    order to every waiter that did not leave; a non-shielded waiter cancelled
    before its grant leaves (on asyncio also one ``Task.cancel()``-ed between
    its grant and its first step: the lock goes on to the next); a shielded
    waiter is
    granted anyway and meets its cancellation exactly once, at its next
    checkpoint, with asyncio's ``cancelling()`` count exact; deferred work runs
    in its turn, holding the lock; at the end the lock is free and nobody is
    counted waiting.
    """
    asyncio = current_backend() == "asyncio"
    lock = FifoLock()
    await lock.acquire()
    arrivals: list[int] = []
    shielded: dict[int, bool] = {}
    scopes: dict[int, anyio.CancelScope] = {}
    tasks: dict[int, object] = {}
    natives: dict[int, int] = {}  # Task.cancel() calls per waiter
    left: set[int] = set()  # predicted never to be granted
    grants: list[int] = []
    caught: dict[int, int] = {}  # cancellations seen per waiter
    counts: dict[int, int] = {}  # cancelling() right after a shielded grant

    async def waiter(i: int) -> None:
        if asyncio:
            tasks[i] = _asyncio.current_task()
        try:
            with scopes[i]:
                if shielded[i]:
                    waited = await lock.acquire_shielded()
                    assert waited
                    if asyncio:
                        counts[i] = tasks[i].cancelling()  # type: ignore[attr-defined]
                else:
                    await lock.acquire()
                try:
                    grants.append(i)
                    await anyio.lowlevel.checkpoint()
                finally:
                    lock.release()
        except _asyncio.CancelledError:  # a native cancel (anyio's are caught)
            caught[i] = caught.get(i, 0) + 1
            task = tasks[i]
            # One exception however many cancel() calls, each counted once.
            assert task.cancelling() == natives[i]  # type: ignore[attr-defined]
            for _ in range(natives[i]):
                task.uncancel()  # type: ignore[attr-defined]
        if scopes[i].cancelled_caught:
            caught[i] = caught.get(i, 0) + 1
        if asyncio:  # every cancel() was matched by one uncancel()
            assert tasks[i].cancelling() == 0  # type: ignore[attr-defined]
        await anyio.lowlevel.checkpoint()  # nothing more is pending

    deferred: set[int] = set()

    def run_deferred(i: int) -> None:
        assert task_name(lock.owner) == f"deferred {i}"
        grants.append(i)

    def live() -> list[int]:
        return [i for i in arrivals if i not in left and i not in grants]

    async with anyio.create_task_group() as tg:
        for step, arg in steps:
            queued = live()
            if step == "wait":
                i = len(arrivals)
                arrivals.append(i)
                shielded[i] = bool(arg)
                scopes[i] = anyio.CancelScope()
                tg.start_soon(waiter, i)
                await wait_all_blocked()
                assert lock.waiting == len(queued) + 1
                continue
            if step == "defer":
                i = len(arrivals)
                arrivals.append(i)
                deferred.add(i)
                lock.defer(functools.partial(run_deferred, i), f"deferred {i}")
                assert lock.waiting == len(queued) + 1
                continue
            if not queued:
                continue
            if step == "handoff":
                victim = queued[0]
                lock.release()  # handed to the victim...
                if victim in deferred:  # which ran in the release, and passed it on
                    await lock.acquire()
                    assert lock.waiting == 0
                    continue
                if arg and asyncio:  # ...cancelled before it ran: it passes it on
                    tasks[victim].cancel()  # type: ignore[attr-defined]
                    natives[victim] = natives.get(victim, 0) + 1
                    if not shielded[victim]:
                        left.add(victim)
                else:  # anyio (like trio) does not cancel a task already woken
                    scopes[victim].cancel()
                await lock.acquire()  # behind everyone: they all had their turn
                assert lock.waiting == 0
                continue
            victim = queued[int(arg) % len(queued)]  # type: ignore[call-overload]
            if victim in deferred:
                continue  # nothing cancels deferred work
            if step == "native":
                if not asyncio:
                    continue
                tasks[victim].cancel()  # type: ignore[attr-defined]
                natives[victim] = natives.get(victim, 0) + 1
            else:
                scopes[victim].cancel()
            if not shielded[victim]:
                left.add(victim)
            await wait_all_blocked()
            assert lock.waiting == len(live())
        lock.release()
    assert grants == [i for i in arrivals if i not in left]
    assert not lock.locked()
    assert lock.waiting == 0
    assert lock.owner is None
    for i in arrivals:
        if i in deferred:
            continue
        cancelled = scopes[i].cancel_called or natives.get(i, 0) > 0
        # Exactly one cancellation reached each cancelled waiter (anyio's scope
        # and a native cancel together arrive as one), none reached the others.
        assert caught.get(i, 0) == (1 if cancelled else 0), (i, caught, natives)
        if i in counts and not scopes[i].cancel_called:
            assert counts[i] == natives.get(i, 0)  # held back, counted once each
