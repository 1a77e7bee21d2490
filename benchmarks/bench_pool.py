"""BufferPool: its own cost against bare locking, and reuse against fresh memory.

The pool's own cost, on every backend, a 4 KiB buffer, no fill:

* ``buf = await pool.acquire(); pool.release(buf)`` (take a free buffer,
  zero it, give it back: what allocate + put is through a pool) against two
  ``anyio.Lock`` acquire/release pairs, the floor of any async hand-out and
  hand-back (goal: at most 1.2x, issue 14);
* ``async with pool.buffer()`` (acquire; on exit zero, then release), the
  same against the same: it suspends twice, once to acquire and once in the
  CPU access that zeroes, so it is shown without a goal;
* a fresh ``MemfdExporter.allocate`` + ``put`` against ``os.memfd_create`` +
  ``ftruncate`` + ``mmap`` (and their undoing) done bare, for reference.

Reuse against fresh memory (asyncio): get a buffer, fill every byte (as a
producer would), give it back. Fresh: ``allocate`` + fill + ``put``, every page
faults in anew; pooled: ``acquire`` (zeroing) + fill + ``release``, the pages
stay resident (goal: faster).

Rounds alternate (a fresh loop per backend per round, the order of the sides
reversed every other round); figures are medians. Run:
``python benchmarks/bench_pool.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import time
from collections.abc import AsyncIterator

import anyio

from asyncdmabuf import BufferPool, DmaBuf
from asyncdmabuf._bench import (
    Row,
    Side,
    Sides,
    alternate,
    compare,
    render,
    wide_console,
)
from asyncdmabuf.exporters import MemfdExporter

KIB, MIB = 1 << 10, 1 << 20
SIZES = (64 * KIB, MIB, 16 * MIB)
QUICK_SIZES = (64 * KIB, MIB)
#: The goal: a pool's acquire + release at most this times two Lock pairs.
POOL_GOAL = 1.2


def human(size: int) -> str:
    """64 KiB, 1 MiB."""
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


@contextlib.asynccontextmanager
async def overhead_sides(n: int, size: int = 4 * KIB) -> AsyncIterator[Sides]:
    """The pool's own cost and its baselines, seconds per round trip."""
    exporter = MemfdExporter()
    first, second = anyio.Lock(), anyio.Lock()
    async with BufferPool(exporter, size, max_buffers=1, name="bench-pool") as pool:

        async def acquire_release(n: int = n) -> float:
            start = time.perf_counter()
            for _ in range(n):
                pool.release(await pool.acquire())
            return (time.perf_counter() - start) / n

        async def block(n: int = n) -> float:
            start = time.perf_counter()
            for _ in range(n):
                async with pool.buffer():
                    pass
            return (time.perf_counter() - start) / n

        async def locks(n: int = n) -> float:
            start = time.perf_counter()
            for _ in range(n):
                async with first:
                    pass
                async with second:
                    pass
            return (time.perf_counter() - start) / n

        async def fresh(n: int = max(1, n // 4)) -> float:
            start = time.perf_counter()
            for _ in range(n):
                buf = await exporter.allocate(size, name="bench-fresh")
                await buf.put()
            return (time.perf_counter() - start) / n

        async def bare(n: int = max(1, n // 4)) -> float:
            start = time.perf_counter()
            for _ in range(n):
                fd = os.memfd_create("bench-bare", os.MFD_CLOEXEC)
                os.ftruncate(fd, size)
                mapped = mmap.mmap(fd, size)
                mapped.close()
                os.close(fd)
            return (time.perf_counter() - start) / n

        for side in (acquire_release, block, locks, fresh, bare):  # warm up
            await side(max(1, n // 10))
        yield {
            "acquire+release": acquire_release,
            "pool.buffer()": block,
            "2x Lock": locks,
            "allocate+put": fresh,
            "bare memfd": bare,
        }


async def _fill(buf: DmaBuf) -> None:
    async with buf.cpu_access("w") as view:
        chars = (ctypes.c_char * len(view)).from_buffer(view)
        ctypes.memset(ctypes.addressof(chars), 0xA5, len(view))
        del chars


@contextlib.asynccontextmanager
async def reuse_sides(sizes: tuple[int, ...], volume: int) -> AsyncIterator[Sides]:
    """Pooled against fresh get + fill + give back, seconds per round trip."""
    exporter = MemfdExporter()
    result: dict[str, Side] = {}
    async with contextlib.AsyncExitStack() as stack:
        for size in sizes:
            pool = await stack.enter_async_context(
                BufferPool(exporter, size, max_buffers=1, name="bench-pool")
            )
            n = max(2, volume // size)
            result[f"{human(size)} pooled"] = _pooled(pool, n)
            result[f"{human(size)} fresh"] = _fresh(exporter, size, n)
        for side in result.values():  # warm up
            await side()
        yield result


def _pooled(pool: BufferPool, n: int) -> Side:
    async def side() -> float:
        start = time.perf_counter()
        for _ in range(n):
            buf = await pool.acquire()
            await _fill(buf)
            pool.release(buf)
        return (time.perf_counter() - start) / n

    return side


def _fresh(exporter: MemfdExporter, size: int, n: int) -> Side:
    async def side() -> float:
        start = time.perf_counter()
        for _ in range(n):
            buf = await exporter.allocate(size, name="bench-fresh")
            await _fill(buf)
            await buf.put()
        return (time.perf_counter() - start) / n

    return side


def rows(quick: bool) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark."""
    rounds = 5 if quick else 9
    samples = alternate(lambda: overhead_sides(1_500 if quick else 10_000), rounds)
    result = []
    for label, figures in samples.items():
        result.append(
            compare(
                "buffer pool",
                f"{label}: 4 KiB acquire+release (zeroing) vs 2x Lock pairs",
                figures["acquire+release"],
                figures["2x Lock"],
                le=POOL_GOAL,
            )
        )
        result.append(
            compare(
                "buffer pool",
                f"{label}: 4 KiB async with pool.buffer() vs 2x Lock pairs",
                figures["pool.buffer()"],
                figures["2x Lock"],
            )
        )
        result.append(
            compare(
                "buffer pool",
                f"{label}: 4 KiB allocate+put vs bare memfd+ftruncate+mmap+close",
                figures["allocate+put"],
                figures["bare memfd"],
            )
        )
    sizes = QUICK_SIZES if quick else SIZES
    volume = (16 if quick else 64) * MIB
    reuse = alternate(lambda: reuse_sides(sizes, volume), 3, ["asyncio"])
    for label, figures in reuse.items():
        for size in sizes:
            row = compare(
                "buffer pool",
                f"{label}: {human(size)} pooled get+fill+give back vs fresh",
                figures[f"{human(size)} pooled"],
                figures[f"{human(size)} fresh"],
                le=1.0,
            )
            result.append(row)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, sizes")
    args = parser.parse_args()
    wide_console().print(render(rows(args.quick), "BufferPool"))


if __name__ == "__main__":
    main()
