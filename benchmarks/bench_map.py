"""What the framework adds on top of the locking it must do.

Measured side by side in one run, on each backend:

* an uncontended ``await att.map() + await att.unmap()`` round trip against two
  bare ``anyio.Lock`` acquire/release pairs (map and unmap each take the lock
  once; goal: at most 1.5x);
* ``att.try_map()`` alone against ``Lock.acquire_nowait() + release()``
  (goal: at most 3x).

Rounds of the two sides alternate, and each figure is the median of the rounds,
so drift of the machine hits both sides alike. Run: ``python benchmarks/bench_map.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from rich.console import Console
from rich.table import Table

import asyncdmabuf as dmabuf
from asyncdmabuf._backends import BACKENDS
from asyncdmabuf._bench import Row, fmt_us, goal_le
from asyncdmabuf.exporters import MemfdExporter

TO_DEVICE = dmabuf.Direction.TO_DEVICE


@dataclass(frozen=True, slots=True)
class Result:
    backend: str
    map_unmap: float
    two_locks: float
    try_map: float
    nowait_lock: float


async def _per_op(body: Callable[[int], Awaitable[None]], n: int) -> float:
    start = time.perf_counter()
    await body(n)
    return (time.perf_counter() - start) / n


async def _measure(n: int, rounds: int) -> tuple[float, float, float, float]:
    buf = await MemfdExporter().allocate(1 << 16)
    att = await buf.attach(dmabuf.Device("bench"))
    lock = anyio.Lock()

    async def map_unmap(n: int) -> None:
        for _ in range(n):
            sgt = await att.map(TO_DEVICE)
            await att.unmap(sgt)

    async def two_locks(n: int) -> None:
        for _ in range(n):
            await lock.acquire()
            lock.release()
            await lock.acquire()
            lock.release()

    batch = min(n, 1000)
    tables: list[dmabuf.SgTable] = []

    async def try_maps(n: int) -> None:
        for _ in range(n // batch):
            start = time.perf_counter()
            tables.extend(att.try_map(TO_DEVICE) for _ in range(batch))
            timed[0] += time.perf_counter() - start
            for sgt in tables:  # not timed
                await att.unmap(sgt)
            tables.clear()

    async def nowait_locks(n: int) -> None:
        for _ in range(n):
            lock.acquire_nowait()
            lock.release()

    samples: dict[str, list[float]] = {k: [] for k in ("mu", "ll", "tm", "nw")}
    await map_unmap(n // 10)  # warm up
    await two_locks(n // 10)
    for _ in range(rounds):
        samples["mu"].append(await _per_op(map_unmap, n))
        samples["ll"].append(await _per_op(two_locks, n))
        timed = [0.0]
        await try_maps(n)
        samples["tm"].append(timed[0] / (n // batch * batch))
        samples["nw"].append(await _per_op(nowait_locks, n))
    await att.detach()
    await buf.put()
    med = statistics.median
    return (
        med(samples["mu"]),
        med(samples["ll"]),
        med(samples["tm"]),
        med(samples["nw"]),
    )


def run(n: int, rounds: int) -> list[Result]:
    """Measure every backend in this process and return the results."""
    results = []
    for label, (backend, options) in BACKENDS.items():
        figures = anyio.run(
            _measure, n, rounds, backend=backend, backend_options=options
        )
        results.append(Result(label, *figures))
    return results


def render(results: list[Result]) -> Table:
    """Return the results as a table of times and ratios."""
    table = Table(title="map / try_map against the bare locking (median per op)")
    for column in (
        "backend",
        "map+unmap",
        "2x Lock",
        "ratio (goal <= 1.5)",
        "try_map",
        "acquire_nowait+release",
        "ratio (goal <= 3)",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.backend,
            f"{r.map_unmap * 1e6:.2f} us",
            f"{r.two_locks * 1e6:.2f} us",
            f"{r.map_unmap / r.two_locks:.2f}x",
            f"{r.try_map * 1e6:.2f} us",
            f"{r.nowait_lock * 1e6:.2f} us",
            f"{r.try_map / r.nowait_lock:.2f}x",
        )
    return table


def rows(quick: bool) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark."""
    results = run(5_000 if quick else 20_000, 3 if quick else 7)
    rows = []
    base = results[0]
    for r in results:
        ratio = r.map_unmap / r.two_locks
        goal, met = goal_le(ratio, 1.5)
        rows.append(
            Row(
                "framework vs anyio",
                f"{r.backend}: map+unmap vs 2x Lock acquire/release",
                fmt_us(r.map_unmap),
                fmt_us(r.two_locks),
                ratio,
                goal,
                met,
            )
        )
        ratio = r.try_map / r.nowait_lock
        goal, met = goal_le(ratio, 3.0)
        rows.append(
            Row(
                "framework vs anyio",
                f"{r.backend}: try_map vs acquire_nowait+release",
                fmt_us(r.try_map),
                fmt_us(r.nowait_lock),
                ratio,
                goal,
                met,
            )
        )
    rows.extend(
        Row(
            "backend vs asyncio",
            f"{r.backend}: map+unmap time",
            fmt_us(r.map_unmap),
            fmt_us(base.map_unmap),
            r.map_unmap / base.map_unmap,
            "",
            None,
        )
        for r in results[1:]
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20_000, help="operations per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    Console().print(render(run(args.n, args.rounds)))


if __name__ == "__main__":
    main()
