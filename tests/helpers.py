"""Checkpoint assertions that work on every backend.

On trio they are ``trio.testing.assert_checkpoints`` / ``assert_no_checkpoints``,
which count the task's schedule and cancel points. asyncio keeps no such count,
so there a witness task, scheduled just before the block, tells whether the
block let the event loop run (asyncio's ready queue is first in, first out;
trio's scheduler shuffles each batch, so the witness would prove nothing there).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, nullcontext

import anyio
import sniffio
import trio.testing


@contextlib.asynccontextmanager
async def _checked(*, expected: bool) -> AsyncIterator[None]:
    if sniffio.current_async_library() == "trio":
        import trio.testing

        if expected:
            with trio.testing.assert_checkpoints():
                yield
        else:
            with trio.testing.assert_no_checkpoints():
                yield
        return
    ran = anyio.Event()

    async def witness() -> None:
        ran.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(witness)
        yield
        if expected:
            assert ran.is_set(), "the block did not let other tasks run"
        else:
            assert not ran.is_set(), "the block let other tasks run"


def assert_checkpoints() -> contextlib.AbstractAsyncContextManager[None]:
    """Fail unless the body reaches a checkpoint."""
    return _checked(expected=True)


def assert_no_checkpoints() -> contextlib.AbstractAsyncContextManager[None]:
    """Fail if the body reaches a checkpoint."""
    return _checked(expected=False)


def checkpoints(backend: str) -> AbstractContextManager[object]:
    """Assert a checkpoint happens (on trio, where it can be observed)."""
    return trio.testing.assert_checkpoints() if backend == "trio" else nullcontext()


def no_checkpoints(backend: str) -> AbstractContextManager[object]:
    """Assert no checkpoint happens (on trio, where it can be observed)."""
    return trio.testing.assert_no_checkpoints() if backend == "trio" else nullcontext()
