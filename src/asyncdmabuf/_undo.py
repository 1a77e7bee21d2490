"""Running an exporter's ops, soundly, whether or not they wait.

An op may be a coroutine function (it may wait: sleep, I/O, its own
``fail_after``) or a plain function (it never waits). Calling an op tells which
without guessing: a plain op has already done its work and returned None; an
async op returned a coroutine that has not started yet. Undo ops (``unmap``,
``detach``, ``release``, ``end_cpu_access``) must complete whatever happens to
the caller, so an async one runs from its very first step inside a shielded
cancel scope, where its own cancel scopes nest properly; a plain one costs
neither a scope nor a task switch.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import TypeVar

import anyio

__all__ = ["complete", "run_undo", "run_undo_sync"]

T = TypeVar("T")


async def complete(result: Awaitable[T] | T) -> T:
    """Return what an op gave: awaited if it is awaitable, as is if it is not."""
    if inspect.isawaitable(result):
        value: T = await result
        return value
    return result


async def run_undo(result: Awaitable[None] | None) -> None:
    """Complete what an undo op returned, shielded from cancellation.

    Not a checkpoint when the op was a plain function. What the op raises
    propagates.
    """
    if result is None:
        return
    with anyio.CancelScope(shield=True):
        await result


def run_undo_sync(result: Awaitable[None] | None) -> bool:
    """Complete an undo op without an event loop (for garbage collection).

    A plain op has finished already. A coroutine is stepped once: if it ends
    without suspending it has completed; if it would suspend it is closed.

    Returns:
        Whether the op completed.

    Raises:
        Exception: What the op raised.
    """
    if result is None:
        return True
    if not inspect.iscoroutine(result):
        return False
    try:
        result.send(None)
    except StopIteration:
        return True
    result.close()
    return False
