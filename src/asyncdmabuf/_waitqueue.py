"""The wait queue: tasks parked in arrival order, each woken with a value.

Like trio's ``ParkingLot``, with what every waiter of asyncdmabuf needs (the
buffer lock, the buffer pool, a device's memory, a fence) written once:

* first come, first served: :meth:`WaitQueue.unpark` wakes the longest waiter
  and hands it a value (the lock itself, a buffer, ...);
* a waiter cancelled before it is woken leaves the queue as if it had never
  asked;
* a waiter woken and cancelled before it could run (asyncio can do that) does
  not lose what it was handed: the queue passes the value to ``on_abandon``
  (which gives the lock to the next waiter, or the buffer back), and the
  cancellation propagates;
* a shielded park ignores cancellation until it is woken.

Parking uses the backend's own primitive (a future on asyncio, trio's
``wait_task_rescheduled``), so a park costs no :class:`anyio.Event` and no
cancel scope unless it is shielded on asyncio.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import anyio

from ._backends import current_backend, task_name

__all__ = ["WaitQueue", "WaitQueueStatistics"]


@dataclass(frozen=True, slots=True)
class WaitQueueStatistics:
    """A snapshot of a :class:`WaitQueue`."""

    tasks_waiting: int
    """How many tasks are parked."""
    waiting: tuple[str, ...]
    """Their names, longest waiter first."""


@final
class _Waiter:
    __slots__ = ("future", "granted", "task", "value")

    def __init__(self, task: Any, future: asyncio.Future[object] | None) -> None:
        self.task = task
        self.future = future  # asyncio only; trio reschedules the task
        self.granted = False
        self.value: object = None


def _ignore(value: object) -> None:
    pass


@final
class WaitQueue:
    """A FIFO queue of parked tasks; not thread-safe, like the loop it runs on.

    Args:
        on_abandon: Called with the value handed to a waiter that was
            cancelled before it could take it (so the value is never lost).
    """

    __slots__ = ("_on_abandon", "_waiters")

    def __init__(self, on_abandon: Callable[[object], None] | None = None) -> None:
        # Made on first park: most queues (one per buffer) never hold a waiter.
        self._waiters: dict[_Waiter, None] | None = None
        self._on_abandon = on_abandon or _ignore

    def __len__(self) -> int:
        return len(self._waiters) if self._waiters else 0

    def __bool__(self) -> bool:
        return bool(self._waiters)

    def statistics(self) -> WaitQueueStatistics:
        """Return how many tasks are parked, and who."""
        waiters = tuple(self._waiters or ())
        return WaitQueueStatistics(
            tasks_waiting=len(waiters),
            waiting=tuple(task_name(w.task) for w in waiters),
        )

    def first_task(self) -> object | None:
        """Return the longest-waiting task, or None."""
        if not self._waiters:
            return None
        task: object = next(iter(self._waiters)).task
        return task

    async def park(self, *, shielded: bool = False) -> object:
        """Wait until :meth:`unpark` hands this task a value; return it.

        Always suspends. Cancelled before being woken, the task leaves the
        queue and the cancellation propagates; woken and then cancelled before
        it ran, the value goes to ``on_abandon`` and the cancellation
        propagates. With ``shielded=True`` cancellation is ignored until the
        task is woken (it is raised at the caller's next checkpoint).
        """
        if self._waiters is None:
            self._waiters = {}
        if current_backend() == "trio":
            return await self._park_trio(shielded)
        if shielded:
            with anyio.CancelScope(shield=True):
                return await self._park_asyncio()
        return await self._park_asyncio()

    async def _park_asyncio(self) -> object:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(asyncio.current_task(), future)
        assert self._waiters is not None
        self._waiters[waiter] = None
        try:
            await future
        except BaseException:
            if waiter.granted:
                self._on_abandon(waiter.value)
            else:
                self._discard(waiter)
            raise
        return waiter.value

    async def _park_trio(self, shielded: bool) -> object:
        trio = sys.modules["trio"]
        waiter = _Waiter(trio.lowlevel.current_task(), None)
        assert self._waiters is not None
        self._waiters[waiter] = None

        def abort(_: object) -> object:
            if shielded:
                return trio.lowlevel.Abort.FAILED  # stay parked until woken
            self._discard(waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        # trio never cancels a task it has rescheduled: no abandoned values.
        await trio.lowlevel.wait_task_rescheduled(abort)
        return waiter.value

    def _discard(self, waiter: _Waiter) -> None:
        if self._waiters is not None:
            self._waiters.pop(waiter, None)

    def unpark(self, value: object = None) -> object | None:
        """Wake the longest waiter, handing it ``value``; never checkpoints.

        Returns:
            The task woken, or None (and nothing happens) if nobody waits.
        """
        waiters = self._waiters
        while waiters:
            waiter = next(iter(waiters))
            del waiters[waiter]
            if waiter.future is None or not waiter.future.done():
                break
            # Cancelled on asyncio and not yet run: it leaves by itself.
        else:
            return None
        waiter.granted = True
        waiter.value = value
        future = waiter.future
        if future is None:
            import outcome  # trio's own dependency; only reached on trio

            sys.modules["trio"].lowlevel.reschedule(waiter.task, outcome.Value(None))
        else:
            future.set_result(None)
        task: object = waiter.task
        return task

    def unpark_all(self, value: object = None) -> int:
        """Wake every waiter, each with ``value``; return how many woke."""
        woken = 0
        while self.unpark(value) is not None:
            woken += 1
        return woken
