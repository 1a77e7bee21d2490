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
cancel scope, shielded or not.
"""

from __future__ import annotations

import asyncio
import sys
from asyncio.events import _get_running_loop
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

from ._backends import anyio_redelivers, asyncio_current_task, task_name

__all__ = ["Deferred", "WaitQueue", "WaitQueueStatistics"]


@dataclass(frozen=True, slots=True)
class WaitQueueStatistics:
    """A snapshot of a :class:`WaitQueue`."""

    tasks_waiting: int
    """How many tasks are parked."""
    waiting: tuple[str, ...]
    """Their names, longest waiter first."""


class _ShieldedFuture(asyncio.Future[object]):
    """A future its waiting task cannot cancel: a shielded park's.

    ``Task.cancel()`` asks the future it waits on to cancel; refused, it marks
    the task instead (``_must_cancel``), and the cancellation is delivered when
    the future completes. No cancel scope, and nothing to redo per cancel.
    """

    __slots__ = ()

    def cancel(self, msg: object = None) -> bool:
        return False


@final
class Deferred:
    """A waiter that is not a task: a plain function to run when its turn comes.

    :meth:`WaitQueue.unpark` wakes nothing for it: it returns the entry, and
    whoever unparked it runs it (the buffer lock runs it holding the lock:
    that is how ``try_cpu_access`` ends an access behind a held lock). It
    cannot be cancelled: it leaves the queue only by being run.
    """

    __slots__ = ("name", "run")

    def __init__(self, run: Callable[[], None], name: str) -> None:
        #: Called once, when the entry's turn comes; it must not raise.
        self.run = run
        #: What it is, for statistics and watchdogs (as a task's name).
        self.name = name

    def __repr__(self) -> str:
        return f"<Deferred {self.name}>"


def _trio_reschedule(task: object, value: object) -> None:
    # Only reached on trio, which has imported outcome (its own dependency).
    sys.modules["trio"].lowlevel.reschedule(task, sys.modules["outcome"].Value(value))


def _ignore(value: object) -> None:
    pass


async def _park_trio(waiters: dict[object, object], shielded: bool) -> object:
    lowlevel = sys.modules["trio"].lowlevel
    task = lowlevel.current_task()
    waiters[task] = task

    def abort(_: object) -> object:
        if shielded:
            return lowlevel.Abort.FAILED  # stay parked until woken
        del waiters[task]
        return lowlevel.Abort.SUCCEEDED

    # trio never cancels a task it has rescheduled: no abandoned values.
    return await lowlevel.wait_task_rescheduled(abort)


@final
class WaitQueue:
    """A FIFO queue of parked tasks; not thread-safe, like the loop it runs on.

    Args:
        on_abandon: Called with the value handed to a waiter that was
            cancelled before it could take it (so the value is never lost).
    """

    __slots__ = ("_on_abandon", "_waiters")

    def __init__(self, on_abandon: Callable[[object], None] | None = None) -> None:
        # Arrival order; each waiter's key -> its task. On asyncio the key is
        # the future the task waits on (it carries the value handed over), on
        # trio the task itself. Made on first park: most queues (one per
        # buffer) never hold a waiter.
        self._waiters: dict[object, object] | None = None
        self._on_abandon = on_abandon or _ignore

    def __len__(self) -> int:
        return len(self._waiters) if self._waiters else 0

    def __bool__(self) -> bool:
        return bool(self._waiters)

    def statistics(self) -> WaitQueueStatistics:
        """Return how many tasks are parked, and who."""
        tasks = tuple(self._waiters.values()) if self._waiters else ()
        return WaitQueueStatistics(
            tasks_waiting=len(tasks), waiting=tuple(task_name(t) for t in tasks)
        )

    def first_task(self) -> object | None:
        """Return the longest-waiting task, or None."""
        if not self._waiters:
            return None
        task: object = next(iter(self._waiters.values()))
        return task

    async def park(self, *, shielded: bool = False) -> object:
        """Wait until :meth:`unpark` hands this task a value; return it.

        Always suspends, with nothing before it: a task that parks has reached
        its checkpoint. Cancelled before being woken, the task leaves the queue
        and the cancellation propagates; woken and then cancelled before it
        ran, the value goes to ``on_abandon`` and the cancellation propagates.

        With ``shielded=True`` cancellation is ignored until the task is woken,
        and is then raised at the task's next checkpoint, exactly once: on trio
        the abort is refused; on asyncio the task waits on a future that
        refuses to be cancelled, so a ``Task.cancel()`` only marks the task.
        After the park has taken its value, a cancel of an anyio scope is left
        to anyio, which sends it again at the task's next wait outside a
        shield; any other is marked again (``uncancel()`` then ``cancel()``, so
        ``cancelling()`` is unchanged).
        """
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = {}
        loop = _get_running_loop()
        if loop is None:
            return await _park_trio(waiters, shielded)
        future: asyncio.Future[object] = (
            _ShieldedFuture(loop=loop) if shielded else loop.create_future()
        )
        task = waiters[future] = asyncio_current_task(loop)
        try:
            return await future
        except BaseException as exc:
            if not future.done() or future.cancelled():
                waiters.pop(future, None)  # not woken: leave as if never asked
                raise
            if shielded and isinstance(exc, asyncio.CancelledError):
                # Woken, then the mark a cancel left was delivered: take the
                # value. A cancel of anyio's scope is sent again by anyio at
                # the task's next wait outside a shield; any other is marked
                # again for the task's next checkpoint. (Marking anyio's would
                # let it land inside a shield the task enters first.)
                assert task is not None  # a future is awaited by a task
                task.uncancel()
                message = exc.args[0] if exc.args else None
                if not anyio_redelivers(task, message):
                    task.cancel(message)
                return future.result()
            self._on_abandon(future.result())
            raise

    def defer(self, entry: Deferred) -> None:
        """Queue ``entry`` behind every waiter; never checkpoints.

        Only for a queue whose unparker runs the :class:`Deferred` entries
        :meth:`unpark` returns (the buffer lock's).
        """
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = {}
        waiters[entry] = entry

    def unpark(self, value: object = None) -> object | None:
        """Wake the longest waiter, handing it ``value``; never checkpoints.

        Returns:
            The task woken, the :class:`Deferred` entry whose turn it is (for
            the caller to run; nothing was woken), or None (and nothing
            happens) if nobody waits.
        """
        waiters = self._waiters
        while waiters:
            key = next(iter(waiters))
            task: object = waiters.pop(key)
            if key is task:  # trio, or a deferred entry
                if type(task) is not Deferred:
                    _trio_reschedule(task, value)
                return task
            future: asyncio.Future[object] = key  # type: ignore[assignment]
            if not future.done():
                future.set_result(value)
                return task
            # Cancelled on asyncio and not yet run: it leaves by itself.
        return None

    def unpark_all(self, value: object = None) -> int:
        """Wake every waiter, each with ``value``; return how many woke."""
        woken = 0
        while self.unpark(value) is not None:
            woken += 1
        return woken
