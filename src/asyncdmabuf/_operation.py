"""What ``attach()`` and ``map()`` return: a coroutine and an async context manager.

``await op`` gives the result and leaves its undoing to the caller; ``async
with op as result`` undoes it on exit (``detach`` / ``unmap``). Because it is a
real :class:`collections.abc.Coroutine`, ``asyncio.create_task(att.map(d))``,
``tg.start_soon(att.map, d)`` and ``asyncio.gather`` take it too.

As with trio's ``async with lock``, the block checkpoints on entry; its exit
completes the undoing without a checkpoint of its own (it waits, shielded, only
if the buffer's lock is contended), so nested blocks unwind fully even in a
cancelled scope, and the cancellation surfaces at the next checkpoint.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, TypeVar, final

__all__ = ["Operation"]

T = TypeVar("T")


@final
class Operation(Coroutine[Any, Any, T]):
    """A coroutine for one operation that can also undo it on ``async with`` exit.

    ``undo`` is called with the result; it returns None when it has undone
    the operation already (it never had to wait), else an awaitable that
    completes the undoing.
    """

    __slots__ = ("_coro", "_result", "_undo")

    def __init__(
        self,
        coro: Coroutine[Any, Any, T],
        undo: Callable[[T], Awaitable[object] | None],
    ) -> None:
        self._coro = coro
        self._undo = undo
        self._result: T | None = None

    # -- the coroutine protocol, delegated -------------------------------------------

    def send(self, value: Any) -> Any:
        """Resume the operation (the coroutine protocol)."""
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        """Raise into the operation (the coroutine protocol)."""
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # pragma: no cover (old form)

    def close(self) -> None:
        """Close the operation without finishing it."""
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    def __repr__(self) -> str:
        return f"<Operation {getattr(self._coro, '__qualname__', self._coro)}>"

    # -- async with ------------------------------------------------------------------

    async def __aenter__(self) -> T:
        self._result = await self._coro
        return self._result

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        result, self._result = self._result, None
        if result is not None:
            pending = self._undo(result)  # None: undone already, without waiting
            if pending is not None:
                await pending
