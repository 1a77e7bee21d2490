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

import anyio

__all__ = ["complete", "run_undo", "run_undo_sync"]


async def complete(result: Awaitable[None] | None) -> None:
    """Complete what an op that returns nothing gave: await it if it is awaitable.

    Not a checkpoint when the op was a plain function. Not shielded: for ops
    that may be cancelled (``attach``, ``begin_cpu_access``).
    """
    if result is not None:
        await result


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
