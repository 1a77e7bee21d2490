"""The watchdog: it ends a run in which no operation completes for a while.

:func:`watchdog` and :func:`monitor` serve the stress and the stream runs.
For a stress run, :func:`who_waits` records who waits for what: for the
buffers' locks (through :func:`~asyncdmabuf._buffer.lock_holder`) and for a
device's memory (through the six fields of its statistics, when it has them),
and who holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import anyio

from .._buffer import lock_holder
from .._stats import device_statistics
from .report import Invariant
from .workload import Run

__all__ = ["Watched", "monitor", "no_hang", "watchdog", "who_waits"]


class Watched(Protocol):
    """What the watchdog reads and sets on a run (a stress or a stream run)."""

    last_progress: float
    hung: bool
    hang_report: tuple[str, ...]


W = TypeVar("W", bound=Watched)
P = TypeVar("P")


async def watchdog(
    run: W,
    limit: float,
    who_waits: Callable[[W, float], tuple[str, ...]],
    cancel: Callable[[], object],
) -> None:
    """End ``run`` once ``limit`` seconds pass without progress.

    Args:
        run: Its ``last_progress`` is watched; ``hung`` and ``hang_report``
            are set when it hangs.
        limit: Seconds without progress that count as a hang.
        who_waits: Describes who waits for what, given the seconds idle.
        cancel: Cancels the run's work.
    """
    while True:
        idle = anyio.current_time() - run.last_progress
        if idle >= limit:
            run.hang_report = who_waits(run, idle)
            run.hung = True
            cancel()
            return
        await anyio.sleep(max(limit - idle, limit / 1000))


async def monitor(
    progress: Callable[[], P], monitor: Callable[[P], object], interval: float
) -> None:
    """Call ``monitor`` with the ``progress()`` every ``interval`` seconds."""
    while True:
        monitor(progress())
        await anyio.sleep(interval)


def no_hang(run: Watched, limit: float, progress: str) -> Invariant:
    """The "no hang" invariant: ``progress`` came at least every ``limit`` s.

    Args:
        run: The run; it failed if the watchdog found it hung.
        limit: The watchdog's limit in seconds (0: off).
        progress: What counts as progress, e.g. "an operation completed".
    """
    if run.hung:
        return Invariant("no hang", False, "the watchdog fired: " + run.hang_report[0])
    off = "" if limit else " (off)"
    return Invariant("no hang", True, f"{progress} at least every {limit:g} s{off}")


def who_waits(run: Run, idle: float) -> tuple[str, ...]:
    """Describe who waits for what, and who holds it."""
    now = anyio.current_time()
    exporter = run.exporter
    stats = device_statistics(exporter)
    lines = [f"no operation completed for {idle:.1f} s; the workers:"]
    waiting_for_memory = 0
    for task in run.tasks:
        if task.action == "idle":
            continue
        what = task.action
        if task.buffer is not None:
            buf = run.buffers[task.buffer]
            holder, queued = lock_holder(buf)
            what = f"{task.action} {buf.name}"
            if holder == task.name and task.action == "map" and stats is not None:
                if stats.waiters:
                    waiting_for_memory += 1
                    what = (
                        f"waits for {kib(buf.size)} of memory on {exporter.name!r} "
                        f"to map {buf.name} (holding its lock)"
                    )
                else:
                    what = f"waits inside {exporter.name!r}'s map of {buf.name}"
            elif holder is not None and holder != task.name:
                what = (
                    f"waits for the lock of {buf.name}, held by {holder} "
                    f"({queued} queued)"
                )
        held = ", ".join(run.buffers[i].name or "?" for i in task.held)
        lines.append(
            f"  {task.name} {what} for {now - task.since:.1f} s"
            + (f"; holds {held} mapped" if held else "")
        )
    if stats is not None:
        pinned: dict[str, list[str]] = {}
        for task in run.tasks:
            for i in task.held:
                pinned.setdefault(run.buffers[i].name or "?", []).append(task.name)
        lines.append(
            f"{exporter.name!r}: {kib(stats.memory_in_use)} in use of "
            f"{kib(stats.memory_total)}, {kib(stats.memory_pinned)} pinned, "
            f"{stats.waiters} map(s) waiting for memory"
        )
        if pinned:
            lines.append(
                "  its memory is pinned by: "
                + "; ".join(
                    f"{b} (mapped by {', '.join(t)})" for b, t in pinned.items()
                )
            )
        if waiting_for_memory and stats.memory_pinned >= stats.memory_in_use:
            lines.append(
                "deadlock: tasks hold mappings that pin the memory while waiting "
                "for more; try_map with back-off (--map-mode try) never waits "
                "while holding a mapping, and so avoids it"
            )
    return tuple(lines)


def kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB"
