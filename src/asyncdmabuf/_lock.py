"""The buffer lock: first come, first served, with a free uncontended path.

A buffer's lock is taken by every map, unmap, attach and detach, so its cost is
most of what the framework adds to the exporter's own work. Compared with
:class:`anyio.Lock` it spends nothing on an uncontended acquire beyond the
checkpoint every async operation owes anyway, hands the lock straight to the
next waiter on release (so nobody can barge in ahead of the queue), and can be
asked how many tasks wait, which ``try_map`` needs. Waiters park on the one
:class:`~asyncdmabuf.lowlevel.WaitQueue`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import final

from ._backends import (
    UNKNOWN_TASK,
    native_checkpoint,
    native_checkpoint_if_cancelled,
    native_current_task,
    task_name,
)
from ._waitqueue import Deferred, WaitQueue

__all__ = ["FifoLock", "LockStatistics"]


@dataclass(frozen=True, slots=True)
class LockStatistics:
    """A snapshot of a lock, like trio's and anyio's ``LockStatistics``."""

    locked: bool
    """Whether the lock is held."""
    owner: str | None
    """The name of the task holding it, or None."""
    tasks_waiting: int
    """How many tasks wait for it."""

    @property
    def waiting(self) -> int:
        """Same as :attr:`tasks_waiting`."""
        return self.tasks_waiting


def _pass_on(lock: object) -> None:
    """A lock handed to a waiter cancelled before it ran: give it to the next."""
    assert isinstance(lock, FifoLock)
    lock.release()


@final
class FifoLock:
    """A non-reentrant async lock whose waiters are served in arrival order.

    A lock belongs to the event loop it was made in (like the buffer it
    guards); it is not thread-safe. It remembers which task holds it, for
    watchdogs and :meth:`statistics`.
    """

    __slots__ = (
        "_current_task",
        "_owner",
        "_queue",
        "checkpoint",
        "checkpoint_if_cancelled",
    )

    def __init__(self) -> None:
        self._owner: object | None = None
        self._queue: WaitQueue | None = None  # made on first contention
        #: The backend's checkpoint, looked up once.
        self.checkpoint = native_checkpoint()
        #: The backend's "raise a pending cancellation" (no scheduling).
        self.checkpoint_if_cancelled = native_checkpoint_if_cancelled()
        self._current_task = native_current_task()

    def locked(self) -> bool:
        """Return whether the lock is held."""
        return self._owner is not None

    @property
    def owner(self) -> object | None:
        """The task holding the lock, or None."""
        return self._owner

    @property
    def waiting(self) -> int:
        """How many tasks wait to acquire the lock."""
        return len(self._queue) if self._queue is not None else 0

    def statistics(self) -> LockStatistics:
        """Return a frozen snapshot: locked, owner, tasks waiting."""
        owner = self._owner
        return LockStatistics(
            locked=owner is not None,
            owner=None if owner is None else task_name(owner),
            tasks_waiting=self.waiting,
        )

    def contended(self) -> bool:
        """Return whether an acquire now would have to wait."""
        return self._owner is not None or bool(self._queue)

    def acquire_nowait(self) -> bool:
        """Take the lock if nobody holds it or waits for it; never checkpoints."""
        if self._owner is not None or self._queue:
            return False
        self._owner = self._current_task() or UNKNOWN_TASK
        return True

    async def acquire(self) -> None:
        """Take the lock, after everyone who asked first (always a checkpoint).

        A free lock is taken after a checkpoint; a contended one is queued for
        at once (the wait is the checkpoint). Cancelled while waiting, it
        leaves the queue as if it had never asked.
        """
        if self._owner is None and not self._queue:
            await self.checkpoint()
            if self.acquire_nowait():
                return
        await self.wait_turn()

    def wait_turn(self, *, shielded: bool = False) -> Awaitable[object]:
        """Queue for the lock and return holding it (always suspends).

        Call it when :meth:`acquire_nowait` failed: the wait is the checkpoint,
        so none is owed before it. With ``shielded=True`` it waits whatever
        cancellation comes (for undo operations, which must complete), without
        a cancel scope; the cancellation then surfaces at the caller's next
        checkpoint (see :meth:`WaitQueue.park`).
        """
        queue = self._queue
        if queue is None:
            queue = self._queue = WaitQueue(on_abandon=_pass_on)
        return queue.park(shielded=shielded)  # awaited by the caller: one frame less

    async def acquire_shielded(self) -> bool:
        """Take the lock whatever cancellation comes (for undo operations).

        Not a checkpoint when the lock is free; otherwise it queues, shielded.

        Returns:
            Whether it had to wait (so other tasks ran meanwhile).
        """
        if self.acquire_nowait():
            return False
        await self.wait_turn(shielded=True)
        return True

    def finish(self, waited: bool) -> Awaitable[None]:
        """End an undo operation with its checkpoint.

        An operation that waited has let other tasks run already: it only
        raises a pending cancellation (one a shielded wait held back, or one
        that came meanwhile). One that did not also yields.
        """
        return self.checkpoint_if_cancelled() if waited else self.checkpoint()

    def defer(self, run: Callable[[], None], name: str) -> None:
        """Run ``run`` holding the lock: now if it is free, else in its turn.

        Never waits and never checkpoints: for work that must be done under
        the lock by code that cannot wait (a synchronous ``__exit__``). A
        queued ``run`` is called by the :meth:`release` that hands it the
        lock, after everyone who asked first and before anyone who asks
        later. ``run`` must be a plain function that does not raise.
        """
        if self.acquire_nowait():
            try:
                run()
            finally:
                self.release()
            return
        queue = self._queue
        if queue is None:
            queue = self._queue = WaitQueue(on_abandon=_pass_on)
        queue.defer(Deferred(run, name))

    def release(self) -> None:
        """Release the lock, handing it to the longest waiter if there is one.

        Deferred work whose turn it is (:meth:`defer`) runs here, holding the
        lock, before the lock passes on.
        """
        queue = self._queue
        if queue is not None:
            while (task := queue.unpark(self)) is not None:
                self._owner = task  # ownership has passed on: the lock stays held
                if type(task) is not Deferred:
                    return
                task.run()  # a deferred entry's turn: run it, then pass on
        self._owner = None
