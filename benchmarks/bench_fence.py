"""How fast fences wake their waiters, in process and across processes.

Run: ``python benchmarks/bench_fence.py [--repeat R] [--sizes 1,10,100,1000]``

For each backend (asyncio, asyncio+uvloop, trio) and each N it measures, in
one run and interleaved, the time from ``fence.signal()`` until N tasks
parked in ``fence.wait()`` have all resumed, against the same for
``anyio.Event.set()`` and ``event.wait()``; the goal is a ratio of at most
1.5. It then measures a fence crossing processes: a child signals a fence
whose fd the parent imported, and the parent's ``wait()`` returns (median
latency, both sides reading the system-wide monotonic clock).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
from rich.console import Console
from rich.table import Table

from asyncdmabuf import Fence
from asyncdmabuf._backends import BACKENDS
from asyncdmabuf._bench import Row, Side, Sides, alternate, compare

CHILD = r"""
import os, socket, struct, sys, time
from asyncdmabuf import Fence

control = socket.socket(fileno=int(sys.argv[1]))
while (command := control.recv(1)) != b"q":
    if command == b"p":  # baseline: wake the parent through a bare socket
        control.sendall(struct.pack("<d", time.perf_counter()))
        continue
    fence = Fence()
    fd = fence.export_fd()
    socket.send_fds(control, [b"f"], [fd])
    os.close(fd)
    control.recv(1)  # go: the parent is waiting
    start = time.perf_counter()
    fence.signal()
    control.sendall(struct.pack("<d", start))
"""


async def _wake_time(
    n: int,
    make: Callable[[], tuple[Callable[[], Any], Callable[[], None]]],
) -> float:
    """Return the seconds from the trigger until ``n`` parked waiters all resumed."""
    wait, trigger = make()
    done = anyio.Event()
    parked = 0
    woken = 0

    async def waiter() -> None:
        nonlocal parked, woken
        parked += 1
        await wait()
        woken += 1
        if woken == n:
            done.set()

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(waiter)
        while parked < n:
            await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()  # each waiter parked right after counting
        start = time.perf_counter()
        trigger()
        await done.wait()
        elapsed = time.perf_counter() - start
    return elapsed


def _fence() -> tuple[Callable[[], Any], Callable[[], None]]:
    fence = Fence()
    return fence.wait, fence.signal


def _event() -> tuple[Callable[[], Any], Callable[[], None]]:
    event = anyio.Event()
    return event.wait, event.set


async def _in_process(sizes: list[int], repeat: int) -> list[tuple[int, float, float]]:
    rows = []
    for n in sizes:
        fence_times: list[float] = []
        event_times: list[float] = []
        for _ in range(3):  # warm up
            await _wake_time(n, _fence)
            await _wake_time(n, _event)
        for _ in range(repeat):
            fence_times.append(await _wake_time(n, _fence))
            event_times.append(await _wake_time(n, _event))
        rows.append((n, statistics.median(fence_times), statistics.median(event_times)))
    return rows


async def _cross_process(repeat: int) -> tuple[list[float], list[float]]:
    """Return the seconds from a child's signal to our wake, and a bare socket's."""
    parent, child = socket.socketpair()
    process = await anyio.open_process(
        [sys.executable, "-c", CHILD, str(child.fileno())], pass_fds=[child.fileno()]
    )
    child.close()
    fence_times: list[float] = []
    socket_times: list[float] = []
    async with process:
        try:
            for i in range(repeat + 5):
                parent.sendall(b"n")
                await anyio.wait_readable(parent)
                _, fds, _, _ = socket.recv_fds(parent, 1, 1)
                fence = Fence.import_fd(fds[0])
                os.close(fds[0])
                woke = 0.0

                async def waiter(fence: Fence) -> None:
                    nonlocal woke
                    await fence.wait()
                    woke = time.perf_counter()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiter, fence)
                    await anyio.wait_all_tasks_blocked()
                    parent.sendall(b"g")
                await anyio.wait_readable(parent)
                (start,) = struct.unpack("<d", parent.recv(8))
                parent.sendall(b"p")
                await anyio.wait_readable(parent)
                bare_woke = time.perf_counter()
                (bare_start,) = struct.unpack("<d", parent.recv(8))
                if i >= 5:  # warm up first
                    fence_times.append(woke - start)
                    socket_times.append(bare_woke - bare_start)
            parent.sendall(b"q")
        finally:
            parent.close()
    return fence_times, socket_times


def _percentiles(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return statistics.median(times), times[int(len(times) * 0.9)]


@contextlib.asynccontextmanager
async def wake_sides(n: int, repeat: int) -> AsyncIterator[Sides]:
    """Fence and Event waking ``n`` waiters: the median of ``repeat`` wakes."""

    def side(make: Callable[[], tuple[Callable[[], Any], Callable[[], None]]]) -> Side:
        async def measure() -> float:
            return statistics.median([await _wake_time(n, make) for _ in range(repeat)])

        return measure

    for _ in range(2):  # warm up
        await _wake_time(n, _fence)
        await _wake_time(n, _event)
    yield {"fence": side(_fence), "Event": side(_event)}


def rows(quick: bool) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark."""
    n = 100
    samples = alternate(lambda: wake_sides(n, 3 if quick else 10), 5 if quick else 9)
    return [
        compare(
            "fence vs Event",
            f"{label}: signal() waking {n} waiters",
            figures["fence"],
            figures["Event"],
            le=1.5,
        )
        for label, figures in samples.items()
    ]


def main() -> None:
    """Run every measurement and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--sizes", default="1,10,100,1000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    console = Console()

    wake = Table(title="fence.signal() vs anyio.Event.set() waking N waiters (median)")
    for column in ("backend", "N", "fence", "Event", "ratio", "goal <= 1.5"):
        wake.add_column(column, justify="right")
    cross = Table(title="a fence crossing processes: a child signals, we wake")
    for column in ("backend", "fence median", "fence p90", "bare socket median"):
        cross.add_column(column, justify="right")

    for label, (backend, options) in BACKENDS.items():
        opts = _opts(options)
        rows = anyio.run(_in_process, sizes, args.repeat, backend=backend, **opts)
        for n, fence_t, event_t in rows:
            ratio = fence_t / event_t
            wake.add_row(
                label,
                str(n),
                f"{fence_t * 1e6:,.1f} µs",
                f"{event_t * 1e6:,.1f} µs",
                f"{ratio:.2f}x",
                "yes" if ratio <= 1.5 else "NO",
            )
        fence_times, socket_times = anyio.run(
            _cross_process, args.repeat, backend=backend, **opts
        )
        median, p90 = _percentiles(fence_times)
        bare, _ = _percentiles(socket_times)
        cross.add_row(
            label,
            f"{median * 1e6:,.1f} µs",
            f"{p90 * 1e6:,.1f} µs",
            f"{bare * 1e6:,.1f} µs",
        )

    console.print(wake)
    console.print(cross)


def _opts(options: dict[str, Any]) -> dict[str, Any]:
    return {"backend_options": options} if options else {}


if __name__ == "__main__":
    main()
