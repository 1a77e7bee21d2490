"""Scale: many tasks on one event loop, and memory per live object (issue 14).

1. Per-op cost at scale: 1,000 memfd buffers of 4 KiB, each attached once;
   10,000 tasks (ten per buffer) each map and unmap their buffer, against one
   task doing the same operations over the same buffers: the cost per
   map+unmap, on every backend (goal: at most 1.15x). The clock runs from
   the release of a start barrier (every task parked on it) until the last
   task is done, so each task's one wake-up is counted; spawning is not.
   Reported beside it, without a goal: the same shape on two bare
   ``anyio.Lock`` acquire/release pairs per op (what the loop itself does
   with 10,000 tasks).
2. Python memory per live memfd buffer, attachment and mapping
   (``tracemalloc``; goals: at most 512, 256 and 256 bytes), over as many
   buffers as the fd limit allows, up to 100,000 (each holds one fd).
3. Full run only: the stress engine (``asyncdmabuf stress``'s) with 10 and
   10,000 tasks sharing 1,000 buffers, each operation attaching, mapping,
   unmapping and detaching one buffer (``--no-verify``); throughput must not
   collapse (goal: at least 0.5x).

Rounds alternate (a fresh loop per backend per round, the order of the sides
reversed every other round); figures are medians. The script's own run adds
memory per object over 100,000 buffers of exporters without memory of their
own (a memoryless exporter defined here, and a ``SimDevice``).

Run: ``python benchmarks/bench_scale.py [--quick] [--backend trio]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

import anyio
import anyio.lowlevel
from rich.table import Table

import asyncdmabuf as dmabuf
from asyncdmabuf import Attachment, Direction, DmaBuf, Exporter, SgEntry, SgTable
from asyncdmabuf._backends import BACKENDS
from asyncdmabuf._bench import (
    Row,
    Sides,
    alternate,
    compare,
    fmt_rate,
    render,
    wide_console,
)
from asyncdmabuf._stress import StressConfig, run_stress
from asyncdmabuf.exporters import MemfdExporter, SimDevice

#: The goal: per-op cost at 10,000 tasks at most this times that at 1 task.
SCALE_GOAL = 1.15
#: Bytes of Python memory per live memfd buffer, attachment, mapping (goals).
MEMORY_GOALS = {"buffer": 512, "attachment": 256, "mapping": 256}

TASKS = (10, 100, 1_000, 10_000)


class NullExporter(Exporter):
    """Buffers with no memory at all: what the framework alone costs."""

    name: ClassVar[str] = "null"

    async def allocate(self, size: int, *, name: str | None = None) -> DmaBuf:
        return dmabuf.export(self, size, name=name)

    async def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        return self.try_map(attachment, direction)

    def try_map(self, attachment: Attachment, direction: Direction) -> SgTable:
        entry = SgEntry(dma_address=0x1000, length=attachment.buffer.size, offset=0)
        return SgTable([entry], direction=direction, attachment=attachment)

    async def unmap(
        self, attachment: Attachment, sgt: SgTable, direction: Direction
    ) -> None:
        pass

    async def release(self, buf: DmaBuf) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Throughput:
    tasks: int
    ops: int
    ops_per_second: float
    ok: bool


@dataclass(frozen=True, slots=True)
class Footprint:
    exporter: str
    buffers: int
    per_buffer: float
    """Bytes of Python heap per live buffer."""
    per_attachment: float
    """Bytes per attachment (one device attached to each buffer)."""
    per_mapping: float
    """Bytes per live mapping (each attachment mapped once)."""
    seconds: float
    """Wall time to create, attach, map, unmap, detach and put them all."""


async def throughput(tasks: int, buffers: int, ops: int) -> Throughput:
    """Stress-engine ops/s with ``tasks`` tasks over ``buffers`` buffers."""
    config = StressConfig(
        tasks=tasks,
        buffers=buffers,
        devices=4,
        buffer_size=4096,
        ops=ops,
        map_mode="block",
        maps_per_op=1,
        cancel_rate=0.0,
        verify=False,
        watchdog=60.0,
    )
    report = await run_stress(config)
    return Throughput(tasks, report.ops, report.ops_per_second, report.ok)


async def footprint(
    name: str, make: Callable[[int], Exporter], n: int, *, mapped: bool = True
) -> Footprint:
    """Heap bytes per buffer, attachment and mapping, over ``n`` of each.

    With ``mapped=False`` nothing is mapped (a SimDevice gives each resident
    buffer an mmap of its own, and 100,000 exceed ``vm.max_map_count``).
    """
    exporter = make(n)
    allocate = exporter.allocate  # type: ignore[attr-defined]
    device = dmabuf.Device("scale")
    warm: DmaBuf = await allocate(4096)  # first-use caches are not per object
    warm_att = await warm.attach(device)
    if mapped:
        await warm_att.unmap(await warm_att.map(Direction.TO_DEVICE))
    await warm_att.detach()
    gc.collect()
    start = time.perf_counter()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        bufs: list[DmaBuf] = [await allocate(4096) for _ in range(n)]
        after_bufs = tracemalloc.get_traced_memory()[0]
        atts = [await buf.attach(device) for buf in bufs]
        after_atts = tracemalloc.get_traced_memory()[0]
        tables = [await att.map(Direction.TO_DEVICE) for att in atts if mapped]
        after_maps = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    for sgt in tables:
        await sgt.attachment.unmap(sgt)
    for att in atts:
        await att.detach()
    for buf in bufs:
        await buf.put()
    await warm.put()
    # The lists themselves hold one pointer per item: count them out.
    pointer = 8
    return Footprint(
        exporter=name,
        buffers=n,
        per_buffer=(after_bufs - base) / n - pointer,
        per_attachment=(after_atts - after_bufs) / n - pointer,
        per_mapping=((after_maps - after_atts) / n - pointer) if mapped else math.nan,
        seconds=time.perf_counter() - start,
    )


async def footprints(n: int) -> list[Footprint]:
    """The memoryless exporter's and SimDevice's footprints."""
    return [
        await footprint("memoryless", lambda n: NullExporter(), n),
        await footprint(
            "simdev",
            lambda n: SimDevice("scale", memory=max(n, 1) * 4096),
            n,
            mapped=False,
        ),
    ]


async def scaling(tasks: tuple[int, ...], ops: int) -> list[Throughput]:
    """Throughput at each task count, 1,000 buffers (fewer if fewer tasks)."""
    return [await throughput(t, 1_000, ops) for t in tasks]


@contextlib.asynccontextmanager
async def scale_sides(
    tasks: int, buffers: int, ops: int, *, bare: bool = False
) -> AsyncIterator[Sides]:
    """Seconds per map+unmap with ``tasks`` tasks and with one, ``ops`` each.

    With ``bare``, the reference instead: two ``anyio.Lock`` pairs per op (in
    loops of their own, so that neither shape's garbage is the other's).
    """
    exporter = MemfdExporter()
    device = dmabuf.Device("scale")
    bufs = [await exporter.allocate(4096) for _ in range(buffers)]
    atts = [await buf.attach(device) for buf in bufs]
    locks = [anyio.Lock() for _ in range(buffers)] if bare else []

    async def per_op(tasks: int, ops: int) -> float:
        go = anyio.Event()
        ready = 0
        ended = 0.0

        async def worker(k: int) -> None:
            nonlocal ready, ended
            att = atts[k % len(atts)]
            ready += 1
            await go.wait()
            for j in range(ops):
                if tasks == 1:
                    att = atts[j % len(atts)]
                sgt = await att.map(Direction.TO_DEVICE)
                await att.unmap(sgt)
            ended = time.perf_counter()

        async def bare_worker(k: int) -> None:  # map and unmap: one pair each
            nonlocal ready, ended
            lock = locks[k % len(locks)]
            ready += 1
            await go.wait()
            for j in range(ops):
                if tasks == 1:
                    lock = locks[j % len(locks)]
                await lock.acquire()
                lock.release()
                await lock.acquire()
                lock.release()
            ended = time.perf_counter()

        async with anyio.create_task_group() as tg:
            for k in range(tasks):
                tg.start_soon(bare_worker if bare else worker, k)
            while ready < tasks:
                await anyio.lowlevel.checkpoint()
            start = time.perf_counter()
            go.set()
        return (ended - start) / (tasks * ops)

    async def many() -> float:
        return await per_op(tasks, ops)

    async def one() -> float:  # a per-op figure: fewer ops are as good
        return await per_op(1, min(tasks * ops, 10 * buffers))

    try:
        await per_op(1, buffers)  # warm up: every buffer mapped (locked) once
        yield {f"{tasks:,} tasks": many, "1 task": one}
    finally:
        for att in atts:
            await att.detach()
        for buf in bufs:
            await buf.put()


@contextlib.asynccontextmanager
async def stress_sides(tasks: tuple[int, ...], ops: int) -> AsyncIterator[Sides]:
    """Stress-engine ops/s at each task count, 1,000 buffers."""

    def side(n: int) -> Callable[[], Awaitable[float]]:
        async def measure() -> float:
            return (await throughput(n, 1_000, ops)).ops_per_second

        return measure

    yield {f"{n:,} tasks": side(n) for n in tasks}


async def memfd_footprint(quick: bool) -> Footprint:
    """Memory per memfd buffer, attachment and mapping, over many of them.

    100,000 buffers, or as many as the fd limit allows (a memfd buffer holds
    its fds for its life); 2,000 when ``quick``.
    """
    exporter = MemfdExporter()
    before = len(os.listdir("/proc/self/fd"))
    probe = await exporter.allocate(4096)
    per_buffer = max(1, len(os.listdir("/proc/self/fd")) - before)
    await probe.put()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fits = (soft - before - 1_000) // per_buffer
    n = 2_000 if quick else max(1_000, min(100_000, fits))
    return await footprint("memfd", lambda n: exporter, n)


def rows(quick: bool) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark."""
    tasks, buffers = 10_000, 1_000
    samples = alternate(
        lambda: scale_sides(tasks, buffers, 2 if quick else 10), 3 if quick else 5
    )
    result = [
        compare(
            "scale",
            f"{label}: map+unmap, {tasks:,} tasks x {buffers:,} buffers vs 1 task",
            figures[f"{tasks:,} tasks"],
            figures["1 task"],
            le=SCALE_GOAL,
        )
        for label, figures in samples.items()
    ]
    # For context, no goal: the same shape on bare anyio.Lock pairs, the share
    # of the ratio that is the event loop's (and anyio's) own at 10,000 tasks.
    reference = alternate(
        lambda: scale_sides(tasks, buffers, 2 if quick else 10, bare=True),
        3 if quick else 5,
    )
    result.extend(
        compare(
            "scale",
            f"{label}: reference, 2x anyio.Lock pairs, {tasks:,} tasks vs 1 task",
            figures[f"{tasks:,} tasks"],
            figures["1 task"],
        )
        for label, figures in reference.items()
    )
    memory = anyio.run(memfd_footprint, quick)
    n = memory.buffers
    for what, value in (
        ("buffer", memory.per_buffer),
        ("attachment", memory.per_attachment),
        ("mapping", memory.per_mapping),
    ):
        goal = MEMORY_GOALS[what]
        result.append(
            Row(
                "memory",
                f"Python memory per live memfd {what} ({n:,} live, tracemalloc)",
                f"{value:,.0f} B",
                "",
                None,
                f"<= {goal} B",
                value <= goal,
            )
        )
    if not quick:
        counts = (TASKS[0], TASKS[-1])
        stress = alternate(lambda: stress_sides(counts, 20_000), 3, ["asyncio"])
        for label, figures in stress.items():
            result.append(
                compare(
                    "scale",
                    f"{label}: stress ops/s, {counts[-1]:,} vs {counts[0]} tasks "
                    "over 1,000 buffers",
                    figures[f"{counts[-1]:,} tasks"],
                    figures[f"{counts[0]:,} tasks"],
                    fmt=fmt_rate,
                    ge=0.5,
                )
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=list(BACKENDS), default="asyncio")
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--buffers", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="20,000 ops, 10,000 bufs")
    args = parser.parse_args()
    if args.quick:
        args.ops, args.buffers = 20_000, 10_000
    backend, options = BACKENDS[args.backend]
    console = wide_console()
    console.print(render(rows(args.quick), "per-op cost and memory at scale"))
    counts = anyio.run(
        scaling, TASKS, args.ops, backend=backend, backend_options=options
    )
    table = Table(
        title=f"throughput vs tasks on one {args.backend} loop, 1,000 buffers"
    )
    for column in ("tasks", "ops", "ops/s", f"vs {TASKS[0]} tasks", "invariants"):
        table.add_column(column, justify="right")
    for r in counts:
        table.add_row(
            f"{r.tasks:,}",
            f"{r.ops:,}",
            f"{r.ops_per_second:,.0f}",
            f"{r.ops_per_second / counts[0].ops_per_second:.2f}x",
            "held" if r.ok else "FAILED",
        )
    console.print(table)
    prints = anyio.run(
        footprints, args.buffers, backend=backend, backend_options=options
    )
    mem = Table(title=f"memory per object over {args.buffers:,} live buffers")
    for column in ("exporter", "per buffer", "per attachment", "per mapping", "time"):
        mem.add_column(column, justify="right")
    for f in prints:
        mem.add_row(
            f.exporter,
            f"{f.per_buffer:,.0f} B",
            f"{f.per_attachment:,.0f} B",
            # SimDevice is not mapped: 100,000 resident buffers would each be
            # an mmap, past the kernel's vm.max_map_count (65,530).
            "not measured" if math.isnan(f.per_mapping) else f"{f.per_mapping:,.0f} B",
            f"{f.seconds:.1f} s",
        )
    console.print(mem)


if __name__ == "__main__":
    main()
