"""What asyncdmabuf knows about the event loops it runs on, in one place.

Which backend is running, its own checkpoint, its current task, its clock and
how a task parks and is woken: every other module asks here, so there is one
answer to each question and no dependency on ``sniffio``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import types
import weakref
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, Literal, final

import anyio
import anyio.lowlevel

__all__ = [
    "ASYNCIO_CHECKPOINT",
    "BACKENDS",
    "Backend",
    "anyio_redelivers",
    "asyncio_current_task",
    "asyncio_loop",
    "current_backend",
    "current_loop_label",
    "current_time",
    "native_checkpoint",
    "native_checkpoint_if_cancelled",
    "native_clock",
    "native_current_task",
    "task_name",
]

#: Backend label -> (anyio backend name, backend options), as ``anyio.run`` and
#: anyio's pytest plugin take them: asyncio, asyncio on uvloop's event loop, and
#: trio. Read it; don't change it.
BACKENDS: Mapping[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}

Backend = Literal["asyncio", "trio"]

#: What a task is called when no event loop runs (or the loop cannot say).
UNKNOWN_TASK = "<unknown task>"


def _in_trio() -> bool:
    trio = sys.modules.get("trio")  # never import trio just to ask
    return trio is not None and bool(trio.lowlevel.in_trio_run())


def current_backend() -> Backend | None:
    """Return the backend running in this thread: ``"asyncio"``, ``"trio"`` or None.

    uvloop is asyncio here: it runs asyncio's tasks with asyncio's API.
    """
    if asyncio._get_running_loop() is not None:
        return "asyncio"
    if _in_trio():
        return "trio"
    return None


def asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """Return the running asyncio loop if it can watch a socket, else None.

    None on trio, outside a loop, and on a loop without ``add_reader``.
    """
    loop = asyncio._get_running_loop()
    if loop is None or not hasattr(loop, "add_reader"):
        return None
    return loop


def current_loop_label() -> str | None:
    """Return the :data:`BACKENDS` label of the running loop (uvloop told apart)."""
    backend = current_backend()
    if backend != "asyncio":
        return backend
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


@types.coroutine
def _asyncio_checkpoint() -> Generator[None, None, None]:
    # What asyncio.sleep(0) (anyio's asyncio checkpoint) does, one bare yield
    # to the loop, without the two calls it takes to get there.
    yield


#: asyncio's checkpoint, as :func:`native_checkpoint` gives it: one bare yield.
#: Code that drives an await itself (a generator) may yield None in its place
#: and make no generator for it.
ASYNCIO_CHECKPOINT: Callable[[], Awaitable[None]] = _asyncio_checkpoint


def native_checkpoint() -> Callable[[], Awaitable[None]]:
    """Return the running backend's own checkpoint function.

    It is what :func:`anyio.lowlevel.checkpoint` calls, without looking the
    backend up on every call. Outside an event loop, anyio's is returned.
    """
    backend = current_backend()
    if backend == "trio":
        checkpoint: Callable[[], Awaitable[None]] = sys.modules[
            "trio"
        ].lowlevel.checkpoint
        return checkpoint
    if backend == "asyncio":
        return _asyncio_checkpoint
    return anyio.lowlevel.checkpoint


def _no_task() -> object:
    return None


#: One "current task" function per asyncio loop (see native_current_task).
_task_getters: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, Callable[[], object]
] = weakref.WeakKeyDictionary()


#: ``asyncio_current_task(loop)``: the task running on ``loop``, or None. On
#: 3.11 this reads asyncio's task table directly (``asyncio.current_task`` is a
#: Python function there that looks the loop up again); on 3.12+ it is
#: ``asyncio.current_task``, already cheap.
asyncio_current_task: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]
if inspect.isbuiltin(asyncio.current_task) or not isinstance(
    getattr(asyncio.tasks, "_current_tasks", None), dict
):
    asyncio_current_task = asyncio.current_task  # pragma: no cover (3.12+)
else:
    asyncio_current_task = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]


def native_current_task() -> Callable[[], object]:
    """Return the running backend's cheap "current task" function.

    On Python 3.11 :func:`asyncio.current_task` is a Python function that asks
    for the running loop on every call (a ``getpid()`` each time); for the loop
    running now the task table lookup is done directly instead. Outside an
    event loop the function returned gives None.
    """
    backend = current_backend()
    if backend == "trio":
        current: Callable[[], object] = sys.modules["trio"].lowlevel.current_task
        return current
    if backend != "asyncio":
        return _no_task
    if asyncio_current_task is asyncio.current_task:  # pragma: no cover (3.12+)
        return asyncio.current_task
    loop = asyncio.get_running_loop()
    getter = _task_getters.get(loop)
    if getter is None:
        getter = _task_getters[loop] = functools.partial(asyncio_current_task, loop)
    return getter


def native_checkpoint_if_cancelled() -> Callable[[], Awaitable[None]]:
    """Return the running backend's "raise if cancelled" (no scheduling).

    For operations that already let other tasks run (they waited) but must
    still deliver a pending cancellation. On asyncio it yields only if the
    task is marked for cancellation (a shielded park leaves that mark) or an
    enclosing anyio cancel scope is cancelled: what anyio's own looks at,
    without its backend lookup.
    """
    backend = current_backend()
    if backend == "trio":
        check: Callable[[], Awaitable[None]] = sys.modules[
            "trio"
        ].lowlevel.checkpoint_if_cancelled
        return check
    if backend == "asyncio" and _anyio_task_states() is not None:
        loop = asyncio.get_running_loop()
        bound = _cancel_checks.get(loop)
        if bound is None:
            bound = _cancel_checks[loop] = functools.partial(
                _asyncio_checkpoint_if_cancelled, loop
            )
        return bound
    return anyio.lowlevel.checkpoint_if_cancelled


#: One "raise if cancelled" per asyncio loop, bound to it: on 3.11 asking for
#: the running loop costs a ``getpid()`` each time.
_cancel_checks: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, Callable[[], Awaitable[None]]
] = weakref.WeakKeyDictionary()


#: anyio's asyncio task states (task -> its innermost cancel scope), once found.
_task_states: Any = None


def _anyio_task_states() -> Any:
    """Find anyio's asyncio task states, or None if this anyio keeps none."""
    global _task_states
    if _task_states is None:
        module = sys.modules.get("anyio._backends._asyncio")
        states = getattr(module, "_task_states", None)
        scope = getattr(module, "CancelScope", None)
        names = ("_cancel_called", "_shield", "_parent_scope")
        if states is not None and all(hasattr(scope, name) for name in names):
            _task_states = states
    return _task_states


def _scope_cancelled(task: asyncio.Task[Any]) -> bool:
    """Whether an anyio cancel scope around ``task`` is cancelled (and unshielded)."""
    state = _task_states.get(task)
    scope = state.cancel_scope if state is not None else None
    while scope is not None:
        if scope._cancel_called:
            return True
        if scope._shield:
            return False
        scope = scope._parent_scope
    return False


#: How anyio's asyncio backend words the cancellations its cancel scopes send.
_ANYIO_CANCEL = "Cancelled via cancel scope "


def anyio_redelivers(task: asyncio.Task[Any], message: object) -> bool:
    """Whether anyio will send ``task`` this cancellation again by itself.

    True when ``message`` is one of anyio's cancel-scope cancellations and a
    cancelled anyio scope is still visible to ``task`` (no shield in between):
    anyio then cancels the task again at its next wait, for as long as the
    task stays inside that scope unshielded, and never inside a shield it
    enters meanwhile. A cancellation held back for a while (a shielded park)
    can then be forgotten; any other must be marked again.
    """
    return (
        isinstance(message, str)
        and message.startswith(_ANYIO_CANCEL)
        and _anyio_task_states() is not None
        and _scope_cancelled(task)
    )


@final
class _Ready:
    """An awaitable that is done at once: awaiting it never suspends."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        # An empty tuple's iterator: done at once, and cheaper than a generator.
        return iter(())  # type: ignore[return-value]


_READY = _Ready()


def _asyncio_checkpoint_if_cancelled(
    loop: asyncio.AbstractEventLoop,
) -> Awaitable[None]:
    task = asyncio_current_task(loop)
    if task is not None and (task._must_cancel or _scope_cancelled(task)):  # type: ignore[attr-defined]
        return asyncio.sleep(0)  # the cancellation is raised there
    return _READY


def task_name(task: object) -> str:
    """Return a task's name, whichever backend it belongs to."""
    if task is None:
        return UNKNOWN_TASK
    get_name = getattr(task, "get_name", None)  # asyncio
    if callable(get_name):
        return str(get_name())
    return str(getattr(task, "name", task))  # trio


def current_time() -> float:
    """Return the running backend's clock (trio's ``MockClock`` included)."""
    return anyio.current_time()


def native_clock() -> Callable[[], float]:
    """Return the running backend's clock function, looked up once.

    It reads what :func:`anyio.current_time` reads, without the dispatch.
    """
    if current_backend() == "trio":
        clock: Callable[[], float] = sys.modules["trio"].current_time
        return clock
    if current_backend() == "asyncio":
        return asyncio.get_running_loop().time
    return anyio.current_time
