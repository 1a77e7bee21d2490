"""Checkpoint assertions that work on every backend.

On trio they are ``trio.testing.assert_checkpoints`` / ``assert_no_checkpoints``,
which count the task's schedule and cancel points. asyncio keeps no such count,
so there a witness task, scheduled just before the block, tells whether the
block let the event loop run (asyncio's ready queue is first in, first out;
trio's scheduler shuffles each batch, so the witness would prove nothing there).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import anyio
import anyio.abc
import trio.testing

from asyncdmabuf import Fence
from asyncdmabuf._backends import current_backend


@contextlib.asynccontextmanager
async def _checked(*, expected: bool) -> AsyncIterator[None]:
    if current_backend() == "trio":
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


async def wait_all_blocked() -> None:
    """Return once every other task is blocked (``wait_all_tasks_blocked``).

    anyio's asyncio version sleeps 0.1 s whenever a task is still runnable;
    this one only yields, so the many calls of these tests stay cheap. On
    trio it is trio's own.
    """
    if current_backend() == "trio":
        import trio.testing

        await trio.testing.wait_all_tasks_blocked()
        return
    this_task = asyncio.current_task()
    await asyncio.sleep(0)
    while True:
        for task in asyncio.all_tasks():
            if task is this_task:
                continue
            waiter = task._fut_waiter  # type: ignore[attr-defined]
            if waiter is None or waiter.done():
                await asyncio.sleep(0)
                break
        else:
            return


@contextlib.asynccontextmanager
async def stream_pair() -> AsyncIterator[
    tuple[anyio.abc.UNIXSocketStream, anyio.abc.UNIXSocketStream]
]:
    a, b = socket.socketpair()
    sa = await anyio.abc.UNIXSocketStream.from_socket(a)
    sb = await anyio.abc.UNIXSocketStream.from_socket(b)
    async with sa, sb:
        yield sa, sb


def fd_targets() -> dict[int, str]:
    """Every open fd of this process and what it refers to (``readlink``)."""
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the fd listdir itself used, closed by now
    return targets


def fd_count() -> int:
    """How many fds this process has open."""
    return len(os.listdir("/proc/self/fd"))


def imported_from(owner: Fence) -> Fence:
    """An imported fence for ``owner``, as another process would see it."""
    import weakref

    from asyncdmabuf import _fence

    fd = owner.export_fd()
    known = _fence._by_file
    _fence._by_file = weakref.WeakValueDictionary()
    try:
        return Fence.import_fd(fd)
    finally:
        _fence._by_file = known
        os.close(fd)


def run_example(script: Path, *args: str) -> str:
    """Run a docs example as a script; return its output, failing if it fails."""
    result = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
