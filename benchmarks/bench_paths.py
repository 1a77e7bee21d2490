"""The framework's own cost on the paths of issue 14, side by side in one run.

* contended: ``tasks`` tasks map and unmap one buffer whose exporter's ``map``
  suspends once while the lock is held (as a device's does), against the same
  shape on a bare :class:`anyio.Lock` (acquire, suspend, release; acquire,
  release): throughput ratio (goal >= 0.8);
* an empty ``async with buf.cpu_access("w")`` (goal <= 2 us), and a 1 MiB and
  64 KiB copy through it against ``numpy.copyto`` into the same pages (goals
  >= 0.9x and >= 0.6x);
* Python memory per live memfd buffer, attachment and mapping (tracemalloc;
  goals <= 512, 256 and 256 bytes).

Rounds of the two sides alternate; figures are medians. Run:
``python benchmarks/bench_paths.py``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc
from dataclasses import dataclass
from typing import ClassVar

import anyio
import anyio.lowlevel
import numpy as np
from rich.console import Console
from rich.table import Table

import asyncdmabuf as dmabuf
from asyncdmabuf import Attachment, Direction, DmaBuf, Exporter, SgEntry, SgTable
from asyncdmabuf._backends import BACKENDS
from asyncdmabuf.exporters import MemfdExporter

TO_DEVICE = Direction.TO_DEVICE


class _Suspending(Exporter):
    """A map that suspends once with the lock held; undo ops that never wait."""

    name: ClassVar[str] = "suspending"

    async def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        await anyio.lowlevel.checkpoint()
        return SgTable(
            [SgEntry(0x1000, attachment.buffer.size, 0)],
            direction=direction,
            attachment=attachment,
        )

    def unmap(self, attachment: Attachment, sgt: SgTable, direction: Direction) -> None:
        pass

    def release(self, buf: DmaBuf) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Result:
    backend: str
    contended: float
    """ops/s through the framework."""
    bare: float
    """ops/s of the same shape on anyio.Lock."""
    empty_cpu: float
    """seconds per empty cpu_access."""
    copy_1m: float
    """throughput ratio of a 1 MiB copy through cpu_access to numpy.copyto."""
    copy_64k: float


async def _contended(tasks: int, ops: int) -> float:
    buf = dmabuf.export(_Suspending(), 4096)
    att = await buf.attach(dmabuf.Device("bench"))

    async def worker() -> None:
        for _ in range(ops):
            sgt = await att.map(TO_DEVICE)
            await att.unmap(sgt)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    elapsed = time.perf_counter() - start
    await att.detach()
    await buf.put()
    return tasks * ops / elapsed


async def _bare(tasks: int, ops: int) -> float:
    lock = anyio.Lock()

    async def worker() -> None:
        for _ in range(ops):
            async with lock:
                await anyio.lowlevel.checkpoint()
            async with lock:
                pass

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    return tasks * ops / (time.perf_counter() - start)


async def _empty_cpu(n: int) -> float:
    buf = await MemfdExporter().allocate(1 << 16)
    start = time.perf_counter()
    for _ in range(n):
        async with buf.cpu_access("w"):
            pass
    elapsed = time.perf_counter() - start
    await buf.put()
    return elapsed / n


async def _copy(size: int, n: int) -> float:
    buf = await MemfdExporter().allocate(size)
    src = np.ones(size, dtype=np.uint8)
    async with buf.cpu_access("w") as view:
        dst = np.frombuffer(view, dtype=np.uint8)
        start = time.perf_counter()
        for _ in range(n):
            np.copyto(dst, src)
        bare = time.perf_counter() - start
        del dst
    start = time.perf_counter()
    for _ in range(n):
        async with buf.cpu_access("w") as view:
            arr = np.frombuffer(view, dtype=np.uint8)
            np.copyto(arr, src)
            del arr
    ours = time.perf_counter() - start
    await buf.put()
    return bare / ours


async def _measure(tasks: int, ops: int, rounds: int) -> tuple[float, ...]:
    samples: list[list[float]] = [[] for _ in range(5)]
    for _ in range(rounds):
        samples[0].append(await _contended(tasks, ops))
        samples[1].append(await _bare(tasks, ops))
        samples[2].append(await _empty_cpu(5000))
        samples[3].append(await _copy(1 << 20, 200))
        samples[4].append(await _copy(1 << 16, 2000))
    return tuple(statistics.median(s) for s in samples)


def memory_per_object(n: int = 2000) -> tuple[float, float, float]:
    """Bytes of Python memory per live memfd buffer, attachment and mapping."""

    async def main() -> tuple[float, float, float]:
        exp = MemfdExporter()
        dev = dmabuf.Device("bench")
        warm = await exp.allocate(4096)  # first-use caches are not per object
        warm_att = await warm.attach(dev)
        await warm_att.unmap(await warm_att.map(TO_DEVICE))
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            bufs = [await exp.allocate(4096) for _ in range(n)]
            after_bufs = tracemalloc.get_traced_memory()[0]
            atts = [await buf.attach(dev) for buf in bufs]
            after_atts = tracemalloc.get_traced_memory()[0]
            sgts = [await att.map(TO_DEVICE) for att in atts]
            after_maps = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        figures = (
            (after_bufs - base - 8 * n) / n,  # less the list holding them
            (after_atts - after_bufs - 8 * n) / n,
            (after_maps - after_atts - 8 * n) / n,
        )
        for att, sgt in zip(atts, sgts, strict=True):
            await att.unmap(sgt)
            await att.detach()
        for buf in bufs:
            await buf.put()
        await warm_att.detach()
        await warm.put()
        return figures

    return anyio.run(main)


def run(tasks: int = 16, ops: int = 500, rounds: int = 5) -> list[Result]:
    """Measure every backend in this process."""
    results = []
    for label, (backend, options) in BACKENDS.items():
        figures = anyio.run(
            _measure, tasks, ops, rounds, backend=backend, backend_options=options
        )
        results.append(Result(label, *figures))
    return results


def render(results: list[Result], memory: tuple[float, float, float]) -> Table:
    table = Table(title="framework paths against their bare equivalents (medians)")
    for column in (
        "backend",
        "contended / Lock (>= 0.8)",
        "empty cpu_access (<= 2 us)",
        "1 MiB copy (>= 0.9)",
        "64 KiB copy (>= 0.6)",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.backend,
            f"{r.contended / r.bare:.2f}x",
            f"{r.empty_cpu * 1e6:.2f} us",
            f"{r.copy_1m:.2f}x",
            f"{r.copy_64k:.2f}x",
        )
    buf, att, mapping = memory
    table.caption = (
        f"Python memory per memfd buffer {buf:.0f} B (<= 512), per attachment "
        f"{att:.0f} B (<= 256), per mapping {mapping:.0f} B (<= 256)"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--ops", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = run(args.tasks, args.ops, args.rounds)
    Console().print(render(results, memory_per_object()))


if __name__ == "__main__":
    main()
