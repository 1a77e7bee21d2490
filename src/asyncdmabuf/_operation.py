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

import types
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, TypeVar, final

__all__ = ["BARE_YIELD", "BareYield", "Operation", "Prelude"]

T = TypeVar("T")


#: What an operation may pass before its coroutine starts: a checkpoint (a
#: coroutine on trio), stepped directly, or :data:`BARE_YIELD`.
Prelude = Generator[Any, Any, None] | Coroutine[Any, Any, None]


@final
class BareYield:
    """The prelude that is asyncio's checkpoint: one bare yield to the loop."""

    __slots__ = ()


#: A prelude of one bare yield (asyncio's checkpoint): nothing to step.
BARE_YIELD = BareYield()


@final
class Operation(Coroutine[Any, Any, T]):
    """A coroutine for one operation that can also undo it on ``async with`` exit.

    ``undo`` is called with the result; it returns None when it has undone
    the operation already (it never had to wait), else an awaitable that
    completes the undoing.

    An operation may be *deferred* (``coro`` None, ``make`` given): when it
    starts, ``prelude(target)`` says what to pass first (a checkpoint, when
    it can only be the first of its suspensions), and then ``make(target,
    arg, True)`` builds its coroutine, which knows a checkpoint just passed;
    with no prelude, ``make(target, arg, False)`` does it all. Awaited, it is
    then its own iterator: a suspension at the prelude keeps just it and the
    checkpoint alive (no coroutine, no wrapper, no closure), so the garbage
    collector sees as many objects alive across it as across any other
    checkpoint, and 10,000 tasks at it trigger no extra collections.
    """

    __slots__ = (
        "_arg",
        "_c",
        "_make",
        "_pre",
        "_prelude",
        "_result",
        "_target",
        "_undo",
    )

    def __init__(
        self,
        coro: Coroutine[Any, Any, T] | None,
        undo: Callable[[T], Awaitable[object] | None],
        make: Callable[[Any, Any, bool], Coroutine[Any, Any, T]] | None = None,
        prelude: Callable[[Any], Prelude | BareYield | None] | None = None,
        target: object = None,
        arg: object = None,
    ) -> None:
        self._c = coro  # the coroutine, once made
        self._undo = undo
        self._make = make
        self._prelude = prelude
        self._target = target
        self._arg = arg
        self._pre: Prelude | None = None  # the prelude, while it runs
        self._result: T | None = None

    @property
    def _coro(self) -> Coroutine[Any, Any, T]:
        """The operation's coroutine, made now if it is deferred and not started."""
        coro = self._c
        if coro is None:
            if self._pre is not None:
                raise RuntimeError(f"{self!r} is already running")
            assert self._make is not None
            coro = self._c = self._make(self._target, self._arg, False)
        return coro

    def _begin(self) -> Prelude | None:
        """Start a deferred operation's prelude; None if it has none now."""
        prelude = self._prelude
        self._prelude = None  # started: see __del__
        pre = prelude(self._target) if prelude is not None else None
        if type(pre) is BareYield:  # stepped by hand: a generator's yield
            pre = _bare_yield()
        self._pre = pre
        return pre

    def _after_prelude(self) -> Any:
        """The prelude has completed: make the coroutine and start it."""
        self._pre = None
        assert self._make is not None
        coro = self._c = self._make(self._target, self._arg, True)
        return coro.send(None)

    # -- the coroutine protocol, delegated -------------------------------------------

    def send(self, value: Any = None) -> Any:
        """Resume the operation (the coroutine protocol)."""
        coro = self._c
        if coro is not None:
            return coro.send(value)
        pre = self._pre
        if pre is None:
            pre = self._begin()
            if pre is None:
                return self._coro.send(value)
        try:
            return pre.send(value)
        except StopIteration:
            pass
        except BaseException:
            self._end()
            raise
        # _after_prelude, inline: the coroutine's StopIteration (the result)
        # then crosses one Python frame, not three.
        self._pre = None
        make = self._make
        assert make is not None
        coro = self._c = make(self._target, self._arg, True)
        return coro.send(None)

    #: Awaited, the operation is its own iterator (see :meth:`__await__`).
    __next__ = send

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        """Raise into the operation (the coroutine protocol)."""
        pre = self._pre
        if pre is None:  # its coroutine runs (made now if it had not started)
            coro = self._coro
            if val is None and tb is None:
                return coro.throw(typ)
            return coro.throw(typ, val, tb)  # pragma: no cover (old form)
        try:
            if val is None and tb is None:
                return pre.throw(typ)
            return pre.throw(typ, val, tb)  # pragma: no cover (old form)
        except StopIteration:  # the prelude took it and completed
            pass
        except BaseException:
            self._end()
            raise
        return self._after_prelude()

    def close(self) -> None:
        """Close the operation without finishing it."""
        pre = self._pre
        if pre is None:
            self._coro.close()
        else:
            pre.close()
            self._end()

    def _end(self) -> None:
        """The prelude raised or was closed: the operation is over, never run.

        Like a coroutine's after it raised, a later ``send`` raises
        ``RuntimeError`` (its coroutine is made closed).
        """
        self._pre = None
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        if self._c is None and self._pre is None:
            prelude = self._prelude
            if prelude is not None:
                self._prelude = None  # started: see __del__
                pre = prelude(self._target)
                if type(pre) is BareYield:
                    return self._yield_then_run()
                if pre is not None:
                    self._pre = pre
                    return self  # type: ignore[return-value]  # it steps its prelude
        return self._coro.__await__()

    def _yield_then_run(self) -> Generator[Any, None, T]:
        """Awaiting with a bare-yield prelude: yield, then run the coroutine.

        A plain generator, resumed by the loop at C speed; while it is
        suspended only it and the operation are alive.
        """
        yield  # asyncio's checkpoint; a cancellation is raised here
        assert self._make is not None
        coro = self._c = self._make(self._target, self._arg, True)
        return (yield from coro.__await__())

    def __del__(self) -> None:
        # A deferred operation makes no coroutine until it starts, so Python's
        # "coroutine ... was never awaited" would never come: say it here.
        if self._c is None and self._prelude is not None:
            warnings.warn(f"{self!r} was never awaited", RuntimeWarning, stacklevel=2)

    def __repr__(self) -> str:
        coro = self._c if self._c is not None else self._make
        return f"<Operation {getattr(coro, '__qualname__', coro)}>"

    # -- async with ------------------------------------------------------------------

    async def __aenter__(self) -> T:
        self._result = await self
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


@types.coroutine
def _bare_yield() -> Generator[None, None, None]:
    """A bare-yield prelude, stepped by :meth:`Operation.send` (``create_task``)."""
    yield
