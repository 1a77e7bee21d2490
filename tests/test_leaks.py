"""Leaks: many export/attach/map/unmap/detach/put cycles leave nothing behind.

The open fd count and tracemalloc's total after the cycles must be where they
were before (after a warm-up that fills caches), within a small fixed bound.
100,000 cycles run on uvloop with the memoryless exporter; the other backends,
and the memfd exporter (a real memfd and mmap per buffer), run fewer to keep CI
time sane. ``ASYNCDMABUF_SOAK=1`` runs ten times as many everywhere.
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import pytest

from asyncdmabuf import Device, Direction, DmaBuf
from asyncdmabuf.exporters import MemfdExporter, SimDevice

from .helpers import fd_count
from .reliability import SOAK, NullExporter

pytestmark = pytest.mark.anyio

BIDI = Direction.BIDIRECTIONAL
#: tracemalloc's total may move by this much (interned strings, free lists).
MEMORY_BOUND = 64 * 1024


async def _cycle(buf: DmaBuf, device: Device) -> None:
    att = await buf.attach(device)
    sgt = await att.map(BIDI)
    await att.unmap(sgt)
    await att.detach()
    await buf.put()


async def _measure(
    make: Callable[[], Awaitable[DmaBuf]], cycles: int, name: str, warm_up: int
) -> None:
    device = Device("gpu", max_segment_size=1 << 12)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        for _ in range(warm_up):
            await _cycle(await make(), device)
        gc.collect()
        fds, (memory, _) = fd_count(), tracemalloc.get_traced_memory()
        started = time.perf_counter()
        for _ in range(cycles):
            await _cycle(await make(), device)
        elapsed = time.perf_counter() - started
        gc.collect()
        fds_after, (memory_after, _) = fd_count(), tracemalloc.get_traced_memory()
    finally:
        if not tracing:
            tracemalloc.stop()
    print(
        f"{name}: {cycles} cycles in {elapsed:.1f} s; fds {fds} -> {fds_after}; "
        f"traced {memory} -> {memory_after} bytes ({memory_after - memory:+d})"
    )
    assert fds_after == fds
    assert abs(memory_after - memory) < MEMORY_BOUND


def _cycles(backend: str, options: dict[str, object], main: int, other: int) -> int:
    primary = backend == "asyncio" and options.get("use_uvloop")
    count = main if primary else other
    return count * 10 if SOAK else count


def _label(backend: tuple[str, dict[str, object]]) -> str:
    name, options = backend
    return "uvloop" if options.get("use_uvloop") else name


async def test_null_exporter_cycles_leak_nothing(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    """100,000 cycles on uvloop (5,000 elsewhere)."""
    exporter = NullExporter()

    async def make() -> DmaBuf:
        return exporter.make()

    name, options = anyio_backend
    cycles = _cycles(name, options, 100_000, 5_000)
    await _measure(make, cycles, f"null/{_label(anyio_backend)}", warm_up=2000)


async def test_memfd_cycles_leak_nothing(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    """A memfd and a mapping per buffer: every one closed, every byte freed."""
    heap = MemfdExporter()

    async def make() -> DmaBuf:
        buf = await heap.allocate(8192)
        os.close(buf.fd())
        return buf

    name, options = anyio_backend
    cycles = _cycles(name, options, 1000, 500)
    await _measure(make, cycles, f"memfd/{_label(anyio_backend)}", warm_up=300)


async def test_simdevice_cycles_leak_nothing(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    """Late allocation, a pin and its release per buffer; memory back to zero."""
    dev = SimDevice("sim", memory=1 << 20)

    async def make() -> DmaBuf:
        return await dev.allocate(8192)

    name, options = anyio_backend
    cycles = _cycles(name, options, 1000, 500)
    await _measure(make, cycles, f"simdev/{_label(anyio_backend)}", warm_up=300)
    stats = dev.statistics()
    assert (stats.buffers, stats.memory_in_use, stats.waiters) == (0, 0, 0)
