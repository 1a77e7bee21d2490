"""Scale: many tasks on one event loop, and many live buffers.

1. Throughput against the number of tasks: the stress engine
   (``asyncdmabuf stress``'s) with 10, 100, 1,000 and 10,000 tasks sharing
   1,000 memfd buffers of 4 KiB on one event loop; each operation attaches,
   maps, unmaps and detaches one buffer (``--no-verify``: the framework's cost,
   not memcpy's). Throughput must not collapse as tasks grow.
2. Memory per live buffer and per attachment, measured with ``tracemalloc``
   over 100,000 buffers. The fd limit here is 20,000 and a memfd buffer holds
   one fd for its life, so these buffers come from exporters without memory of
   their own: a memoryless exporter defined here (the framework's own cost) and
   a ``SimDevice`` (which also keeps per-buffer state). Neither opens an fd
   until ``buf.fd()`` is called.

Run: ``python benchmarks/bench_scale.py [--quick] [--backend trio]``.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import anyio
from rich.console import Console
from rich.table import Table

import asyncdmabuf as dmabuf
from asyncdmabuf import Attachment, Direction, DmaBuf, Exporter, SgEntry, SgTable
from asyncdmabuf._backends import BACKENDS
from asyncdmabuf._bench import Row
from asyncdmabuf._stress import StressConfig, run_stress
from asyncdmabuf.exporters import SimDevice

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


def rows(quick: bool) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark."""
    results = anyio.run(scaling, TASKS, 10_000 if quick else 50_000)
    base = results[0]
    return [
        Row(
            "scale",
            f"{r.tasks:,} tasks over 1,000 buffers: ops/s",
            f"{r.ops_per_second:,.0f}/s",
            f"{base.ops_per_second:,.0f}/s",
            r.ops_per_second / base.ops_per_second,
            ">= 0.5x",
            r.ok and r.ops_per_second >= 0.5 * base.ops_per_second,
        )
        for r in results
    ]


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
    console = Console()
    rows = anyio.run(scaling, TASKS, args.ops, backend=backend, backend_options=options)
    table = Table(
        title=f"throughput vs tasks on one {args.backend} loop, 1,000 buffers"
    )
    for column in ("tasks", "ops", "ops/s", f"vs {TASKS[0]} tasks", "invariants"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            f"{r.tasks:,}",
            f"{r.ops:,}",
            f"{r.ops_per_second:,.0f}",
            f"{r.ops_per_second / rows[0].ops_per_second:.2f}x",
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
