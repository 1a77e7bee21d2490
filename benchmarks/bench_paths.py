"""The contended path of issue 14: real queueing on one buffer's lock.

``tasks`` tasks map and unmap one buffer whose exporter's ``map`` suspends once
while the lock is held (as a device's does) and returns a fresh table over the
layout it keeps (as the built-in exporters do), against the same shape on a bare
:class:`anyio.Lock` (acquire, suspend, release; acquire, release): the
throughput ratio, on every backend (goal: at least 0.8x).

Rounds alternate (a fresh loop per backend per round, the order of the sides
reversed every other round); figures are medians. The uncontended paths are in
``bench_map.py``, CPU access in ``bench_cpu.py``, memory per object in
``bench_scale.py``. Run: ``python benchmarks/bench_paths.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, ClassVar

import anyio
import anyio.lowlevel

import asyncdmabuf as dmabuf
from asyncdmabuf import Attachment, Direction, DmaBuf, Exporter, SgEntry, SgTable
from asyncdmabuf._bench import (
    Row,
    Sides,
    alternate,
    compare,
    fmt_rate,
    render,
    wide_console,
)

TO_DEVICE = Direction.TO_DEVICE
#: The goal: contended throughput at least this fraction of the bare Lock's.
CONTENDED_GOAL = 0.8


class _Suspending(Exporter):
    """A map that suspends once with the lock held; undo ops that never wait.

    Like the built-in exporters, it keeps its buffer's layout and returns a
    fresh table over it (by position), so that what is measured is the
    framework, not the making of entries the bare side never makes.
    """

    name: ClassVar[str] = "suspending"

    async def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        await anyio.lowlevel.checkpoint()
        entries: tuple[SgEntry, ...] = attachment.buffer.priv
        return SgTable(entries, direction, attachment)

    def unmap(self, attachment: Attachment, sgt: SgTable, direction: Direction) -> None:
        pass

    def release(self, buf: DmaBuf) -> None:
        pass


@contextlib.asynccontextmanager
async def sides(tasks: int, ops: int) -> AsyncIterator[Sides]:
    """Contended map+unmap and the bare Lock shape, ops/s, on the running loop."""
    buf = dmabuf.export(_Suspending(), 4096, priv=(SgEntry(0x1000, 4096, 0),))
    att = await buf.attach(dmabuf.Device("bench"))
    lock = anyio.Lock()

    async def framework_worker(ops: int) -> None:
        for _ in range(ops):
            sgt = await att.map(TO_DEVICE)
            await att.unmap(sgt)

    async def bare_worker(ops: int) -> None:
        for _ in range(ops):
            async with lock:
                await anyio.lowlevel.checkpoint()
            async with lock:
                pass

    async def throughput(
        worker: Callable[[int], Coroutine[Any, Any, None]], ops: int = ops
    ) -> float:
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(worker, ops)
        return tasks * ops / (time.perf_counter() - start)

    async def framework() -> float:
        return await throughput(framework_worker)

    async def bare() -> float:
        return await throughput(bare_worker)

    try:
        await throughput(framework_worker, max(1, ops // 10))  # warm up
        await throughput(bare_worker, max(1, ops // 10))
        yield {"framework": framework, "anyio.Lock": bare}
    finally:
        await att.detach()
        await buf.put()


def rows(quick: bool, tasks: int = 16) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark."""
    ops = 150 if quick else 1_000
    samples = alternate(lambda: sides(tasks, ops), 5 if quick else 9)
    return [
        compare(
            "contended",
            f"{label}: {tasks} tasks map+unmap 1 buffer, map suspends, vs anyio.Lock",
            figures["framework"],
            figures["anyio.Lock"],
            fmt=fmt_rate,
            ge=CONTENDED_GOAL,
        )
        for label, figures in samples.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--tasks", type=int, default=16)
    args = parser.parse_args()
    table = render(rows(args.quick, args.tasks), "contended map+unmap vs anyio.Lock")
    wide_console().print(table)


if __name__ == "__main__":
    main()
