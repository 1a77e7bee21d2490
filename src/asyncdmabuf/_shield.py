"""Running cleanup to completion, cheaply.

A shielded :class:`anyio.CancelScope` costs more than the lock it protects (on
trio several times more). Most cleanup ops (an unmap of resident memory, say)
never suspend, so :func:`run_to_completion` first steps the coroutine
synchronously and pays for the shield only when the coroutine really suspends.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, TypeVar, final

import anyio

__all__ = ["run_to_completion"]

T = TypeVar("T")


@final
class _Continue:
    """Await the rest of a coroutine that has already yielded ``signal``."""

    __slots__ = ("_coro", "_signal")

    def __init__(self, coro: Coroutine[Any, Any, Any], signal: object) -> None:
        self._coro = coro
        self._signal = signal

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, signal = self._coro, self._signal
        while True:
            try:
                sent = yield signal
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the event loop
                try:
                    signal = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    signal = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def run_to_completion(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end, shielded from cancellation.

    The coroutine first runs synchronously; if it suspends, the rest runs
    inside a shielded cancel scope. Either way no cancellation reaches it.
    This function is not itself a checkpoint when ``coro`` does not suspend.

    Returns:
        What ``coro`` returns; what it raises propagates.
    """
    try:
        signal = coro.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    with anyio.CancelScope(shield=True):
        result = await _Continue(coro, signal)
    return result
