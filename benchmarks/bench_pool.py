"""Reusing pooled buffers against allocating fresh ones (the page-fault cost).

One round trip: get a buffer, fill every byte (as a producer would), give it
back. Fresh: ``MemfdExporter.allocate`` + fill + ``put``: every page faults in
anew. Pooled: ``BufferPool.acquire`` (which zeroes the reused buffer, as the
contract demands) + fill + ``release``: the pages stay resident. Rounds
alternate; each figure is the median. Run: ``python benchmarks/bench_pool.py``.

The second table is the pool's own cost, with no fill: one
``async with pool.buffer()`` round trip of a 4 KiB buffer (acquire, zero,
release) against two ``anyio.Lock`` acquire/release pairs (the floor of any
async hand-out and hand-back) and against ``allocate`` + ``put`` of a fresh one.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from dataclasses import dataclass

import anyio
from rich.console import Console
from rich.table import Table

from asyncdmabuf import BufferPool, DmaBuf
from asyncdmabuf._backends import BACKENDS
from asyncdmabuf._bench import Row, fmt_us
from asyncdmabuf.exporters import MemfdExporter

SIZES = (64 << 10, 1 << 20, 16 << 20)


@dataclass(frozen=True, slots=True)
class PoolResult:
    size: int
    fresh: float
    """Seconds per allocate + fill + put."""
    pooled: float
    """Seconds per acquire (zeroing) + fill + release."""

    @property
    def speedup(self) -> float:
        return self.fresh / self.pooled


async def _fill(buf: DmaBuf) -> None:
    async with buf.cpu_access("w") as view:
        chars = (ctypes.c_char * len(view)).from_buffer(view)
        ctypes.memset(ctypes.addressof(chars), 0xA5, len(view))
        del chars


async def measure(size: int, n: int, rounds: int) -> PoolResult:
    """Measure one size on the current event loop."""
    exporter = MemfdExporter()
    fresh: list[float] = []
    pooled: list[float] = []
    async with BufferPool(exporter, size, max_buffers=1, name="bench-pool") as pool:
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(n):
                buf = await exporter.allocate(size, name="bench-fresh")
                await _fill(buf)
                await buf.put()
            fresh.append((time.perf_counter() - start) / n)
            start = time.perf_counter()
            for _ in range(n):
                async with pool.buffer() as buf:
                    await _fill(buf)
            pooled.append((time.perf_counter() - start) / n)
    return PoolResult(size, statistics.median(fresh), statistics.median(pooled))


@dataclass(frozen=True, slots=True)
class OverheadResult:
    size: int
    pooled: float
    """Seconds per ``async with pool.buffer()`` (acquire, zero, release)."""
    locks: float
    """Seconds per two ``async with anyio.Lock()`` pairs."""
    fresh: float
    """Seconds per ``allocate`` + ``put``."""


async def measure_overhead(n: int, rounds: int, size: int = 4096) -> OverheadResult:
    """Measure a pool round trip against two lock pairs and a fresh buffer."""
    exporter = MemfdExporter()
    first, second = anyio.Lock(), anyio.Lock()
    pooled: list[float] = []
    locks: list[float] = []
    fresh: list[float] = []
    async with BufferPool(exporter, size, max_buffers=1, name="bench-pool") as pool:
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(n):
                async with pool.buffer():
                    pass
            pooled.append((time.perf_counter() - start) / n)
            start = time.perf_counter()
            for _ in range(n):
                async with first:
                    pass
                async with second:
                    pass
            locks.append((time.perf_counter() - start) / n)
            start = time.perf_counter()
            for _ in range(n):
                buf = await exporter.allocate(size, name="bench-fresh")
                await buf.put()
            fresh.append((time.perf_counter() - start) / n)
    return OverheadResult(
        size,
        statistics.median(pooled),
        statistics.median(locks),
        statistics.median(fresh),
    )


async def measure_all(sizes: tuple[int, ...], n: int, rounds: int) -> list[PoolResult]:
    """Measure every size, fewer round trips for big buffers."""
    return [
        await measure(size, max(2, n * (64 << 10) // size), rounds) for size in sizes
    ]


def rows(quick: bool) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark."""
    results = anyio.run(measure_all, SIZES, 50 if quick else 200, 3)
    return [
        Row(
            "buffer pool",
            f"{r.size >> 10} KiB: pooled get+fill+give back vs fresh",
            fmt_us(r.pooled),
            fmt_us(r.fresh),
            r.speedup,
            "> 1x",
            r.speedup > 1.0,
        )
        for r in results
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=200, help="round trips of 64 KiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--backend", default="asyncio", choices=("asyncio", "uvloop", "trio")
    )
    args = parser.parse_args()
    name, options = BACKENDS[args.backend]
    results = anyio.run(
        measure_all, SIZES, args.n, args.rounds, backend=name, backend_options=options
    )
    table = Table(title="get + fill + give back: fresh allocation vs BufferPool")
    for column in ("size", "fresh", "pooled (zeroed)", "speed-up"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            f"{r.size >> 10} KiB",
            f"{r.fresh * 1e6:,.1f} µs",
            f"{r.pooled * 1e6:,.1f} µs",
            f"{r.speedup:.2f}x",
        )
    console = Console()
    console.print(table)
    o = anyio.run(
        measure_overhead, args.n * 5, args.rounds, backend=name, backend_options=options
    )
    table = Table(title=f"the pool's own cost, {o.size >> 10} KiB, on {args.backend}")
    for column in ("round trip", "time", "vs pool"):
        table.add_column(column, justify="right")
    for label, seconds in (
        ("pool.buffer() (acquire, zero, release)", o.pooled),
        ("two anyio.Lock pairs", o.locks),
        ("allocate + put", o.fresh),
    ):
        table.add_row(label, f"{seconds * 1e6:,.2f} µs", f"{seconds / o.pooled:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
