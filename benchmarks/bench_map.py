"""What the framework adds on top of the locking it must do (issue 14).

Measured side by side in one run, on each backend:

* an uncontended ``await att.map() + await att.unmap()`` round trip against two
  bare ``anyio.Lock`` acquire/release pairs (map and unmap each take the lock
  once; goal: at most 0.5x on asyncio and uvloop, 0.9x on trio);
* ``att.try_map()`` alone against ``Lock.acquire_nowait() + release()``
  (goal: at most 1.2x on every backend).

Rounds alternate (a fresh loop per backend per round, the order of the sides
reversed every other round) and each figure is the median of the rounds, so
drift of the machine hits every side alike. Run:
``python benchmarks/bench_map.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import AsyncIterator

import anyio

import asyncdmabuf as dmabuf
from asyncdmabuf._bench import (
    Row,
    Samples,
    Sides,
    alternate,
    compare,
    render,
    wide_console,
)
from asyncdmabuf.exporters import MemfdExporter

TO_DEVICE = dmabuf.Direction.TO_DEVICE
#: The goal for map+unmap against two Lock pairs, by backend (issue 14).
MAP_GOAL = {"asyncio": 0.5, "uvloop": 0.5, "trio": 0.9}
#: The goal for try_map against acquire_nowait+release, on every backend.
TRY_MAP_GOAL = 1.2


@contextlib.asynccontextmanager
async def sides(n: int) -> AsyncIterator[Sides]:
    """The four sides on the running loop, ``n`` operations each, warmed up."""
    buf = await MemfdExporter().allocate(1 << 16)
    att = await buf.attach(dmabuf.Device("bench"))
    lock = anyio.Lock()
    batch = min(n, 1000)
    tables: list[dmabuf.SgTable] = []

    async def map_unmap(n: int = n) -> float:
        start = time.perf_counter()
        for _ in range(n):
            sgt = await att.map(TO_DEVICE)
            await att.unmap(sgt)
        return (time.perf_counter() - start) / n

    async def two_locks(n: int = n) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await lock.acquire()
            lock.release()
            await lock.acquire()
            lock.release()
        return (time.perf_counter() - start) / n

    async def try_map(n: int = n) -> float:
        timed = 0.0
        for _ in range(max(1, n // batch)):
            start = time.perf_counter()
            tables.extend(att.try_map(TO_DEVICE) for _ in range(batch))
            timed += time.perf_counter() - start
            for sgt in tables:  # not timed
                await att.unmap(sgt)
            tables.clear()
        return timed / (max(1, n // batch) * batch)

    async def nowait_lock(n: int = n) -> float:
        start = time.perf_counter()
        for _ in range(n):
            lock.acquire_nowait()
            lock.release()
        return (time.perf_counter() - start) / n

    try:
        for side in (map_unmap, two_locks, try_map, nowait_lock):  # warm up
            await side(max(1, n // 10))
        yield {
            "map+unmap": map_unmap,
            "2x Lock": two_locks,
            "try_map": try_map,
            "acquire_nowait+release": nowait_lock,
        }
    finally:
        await att.detach()
        await buf.put()


def measure(n: int, rounds: int) -> Samples:
    """Every side on every backend, ``rounds`` alternating rounds."""
    return alternate(lambda: sides(n), rounds)


def rows(quick: bool) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark."""
    samples = measure(3_000 if quick else 20_000, 5 if quick else 9)
    result = []
    for label, figures in samples.items():
        result.append(
            compare(
                "framework vs anyio",
                f"{label}: map+unmap vs 2x Lock acquire/release",
                figures["map+unmap"],
                figures["2x Lock"],
                le=MAP_GOAL.get(label, 0.5),
            )
        )
        result.append(
            compare(
                "framework vs anyio",
                f"{label}: try_map vs acquire_nowait+release",
                figures["try_map"],
                figures["acquire_nowait+release"],
                le=TRY_MAP_GOAL,
            )
        )
    base = samples.get("asyncio", {}).get("map+unmap", [])
    result.extend(
        compare(
            "backend vs asyncio",
            f"{label}: map+unmap time",
            figures["map+unmap"],
            base,
        )
        for label, figures in samples.items()
        if label != "asyncio"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    wide_console().print(render(rows(args.quick), "map / try_map vs bare locking"))


if __name__ == "__main__":
    main()
