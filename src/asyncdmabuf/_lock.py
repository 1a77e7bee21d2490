"""The buffer lock: first come, first served, with a free uncontended path.

A buffer's lock is taken by every map, unmap, attach and detach, so its cost is
most of what the framework adds to the exporter's own work. Compared with
:class:`anyio.Lock` it spends nothing on an uncontended acquire beyond the
checkpoint every async operation owes anyway, hands the lock straight to the
next waiter on release (so nobody can barge in ahead of the queue), and can be
asked how many tasks wait, which ``try_map`` needs.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from typing import final

import anyio
import anyio.lowlevel

__all__ = ["FifoLock", "native_checkpoint"]


def _asyncio_checkpoint() -> Awaitable[None]:
    return asyncio.sleep(0)  # exactly what anyio's asyncio checkpoint awaits


def _in_trio() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def native_checkpoint() -> Callable[[], Awaitable[None]]:
    """Return the running backend's own checkpoint function.

    It is what :func:`anyio.lowlevel.checkpoint` calls, without looking the
    backend up on every call. Outside an event loop, anyio's is returned.
    """
    if _in_trio():
        checkpoint: Callable[[], Awaitable[None]] = sys.modules[
            "trio"
        ].lowlevel.checkpoint
        return checkpoint
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.lowlevel.checkpoint
    return _asyncio_checkpoint


def _no_task() -> object:
    return _UNKNOWN


def native_current_task() -> Callable[[], object]:
    """Return the running backend's cheap "current task" function."""
    if _in_trio():
        current: Callable[[], object] = sys.modules["trio"].lowlevel.current_task
        return current
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _no_task
    return asyncio.current_task


def task_name(task: object) -> str:
    """Return a task's name, whichever backend it belongs to."""
    get_name = getattr(task, "get_name", None)  # asyncio
    if callable(get_name):
        return str(get_name())
    return str(getattr(task, "name", task))  # trio


_UNKNOWN = "<unknown task>"


@final
class FifoLock:
    """A non-reentrant async lock whose waiters are served in arrival order.

    A lock belongs to the event loop it was made in (like the buffer it
    guards); it is not thread-safe. It remembers which task holds it, for
    watchdogs (:func:`asyncdmabuf._buffer.lock_holder`).
    """

    __slots__ = ("_current_task", "_owner", "_waiters", "checkpoint")

    def __init__(self) -> None:
        self._owner: object | None = None
        self._waiters: deque[tuple[object, anyio.Event]] = deque()
        #: The backend's checkpoint, looked up once.
        self.checkpoint = native_checkpoint()
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
        return len(self._waiters)

    def contended(self) -> bool:
        """Return whether an acquire now would have to wait."""
        return self._owner is not None or bool(self._waiters)

    def acquire_nowait(self) -> bool:
        """Take the lock if nobody holds it or waits for it; never checkpoints."""
        if self._owner is not None or self._waiters:
            return False
        self._owner = self._current_task() or _UNKNOWN
        return True

    async def acquire(self) -> None:
        """Take the lock, after everyone who asked first (always a checkpoint).

        Cancelled while waiting, it leaves the queue as if it had never asked.
        """
        await self.checkpoint()
        if not self.acquire_nowait():
            await self.wait_turn()

    async def wait_turn(self) -> None:
        """Queue for the lock and return holding it (a checkpoint if it waits)."""
        turn = anyio.Event()
        entry = (self._current_task() or _UNKNOWN, turn)
        self._waiters.append(entry)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():
                self.release()  # it was handed to us as we were cancelled: pass it on
            else:
                self._waiters.remove(entry)
            raise

    def release(self) -> None:
        """Release the lock, handing it to the longest waiter if there is one."""
        if self._waiters:
            self._owner, turn = self._waiters.popleft()
            turn.set()  # ownership has passed on: the lock stays held
        else:
            self._owner = None
