"""CPU-access copy bandwidth against ``numpy.copyto`` on the same bytes.

Ours: ``async with buf.cpu_access("w") as view`` around a ``numpy.copyto`` into
the view (begin/end CPU access, the view, the numpy wrapper, the copy). The
baseline: the same ``numpy.copyto`` into the same mapped bytes, with no
framework around it. Both destinations are the same memfd pages, faulted in
before timing; rounds alternate and each figure is the median. Goal: ours at
least 0.9x the baseline's bandwidth. Run: ``python benchmarks/bench_cpu.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import anyio
import numpy as np
from rich.console import Console
from rich.table import Table

from asyncdmabuf._bench import Row
from asyncdmabuf.exporters import MemfdExporter

SIZES = (1 << 20, 16 << 20, 64 << 20)


@dataclass(frozen=True, slots=True)
class CopyResult:
    size: int
    ours: float
    """Bytes per second through ``cpu_access``."""
    numpy: float
    """Bytes per second of a bare ``numpy.copyto`` into the same bytes."""

    @property
    def ratio(self) -> float:
        return self.ours / self.numpy


async def measure(size: int, reps: int) -> CopyResult:
    """Measure one size on the current event loop."""
    src = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    exporter = MemfdExporter()
    async with await exporter.allocate(size, name="bench-cpu") as buf:
        bare = exporter.vmap(buf)  # the same bytes, outside the framework
        try:
            same = np.frombuffer(bare, dtype=np.uint8)
            np.copyto(same, src)  # fault every page in
            ours: list[float] = []
            theirs: list[float] = []
            for _ in range(reps):
                start = time.perf_counter()
                async with buf.cpu_access("w") as view:
                    arr = np.frombuffer(view, dtype=np.uint8)
                    np.copyto(arr, src)
                    del arr
                ours.append(time.perf_counter() - start)
                start = time.perf_counter()
                np.copyto(same, src)
                theirs.append(time.perf_counter() - start)
            del same
        finally:
            bare.release()
    return CopyResult(
        size, size / statistics.median(ours), size / statistics.median(theirs)
    )


async def measure_all(sizes: tuple[int, ...], reps: int) -> list[CopyResult]:
    """Measure every size."""
    return [await measure(size, reps) for size in sizes]


def rows(quick: bool) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark."""
    sizes = (1 << 20, 16 << 20) if quick else SIZES
    results = anyio.run(measure_all, sizes, 10 if quick else 30)
    return [
        Row(
            "CPU access",
            f"copy {r.size >> 20} MiB through cpu_access vs numpy.copyto",
            f"{r.ours / 1e9:.2f} GB/s",
            f"{r.numpy / 1e9:.2f} GB/s",
            r.ratio,
            ">= 0.9x",
            r.ratio >= 0.9,
        )
        for r in results
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    results = anyio.run(measure_all, SIZES, args.reps)
    table = Table(title="CPU-access copy vs numpy.copyto into the same bytes")
    for column in ("size", "cpu_access", "numpy.copyto", "ratio (goal >= 0.9)"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            f"{r.size >> 20} MiB",
            f"{r.ours / 1e9:.2f} GB/s",
            f"{r.numpy / 1e9:.2f} GB/s",
            f"{r.ratio:.2f}x",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
