"""CPU access: its fixed cost, and copies through it against ``numpy.copyto``.

* an empty ``async with buf.cpu_access("w")`` (goal: at most 2 µs), shown
  against one bare ``anyio.lowlevel.checkpoint()``, the floor of any async
  operation; and an empty ``with buf.try_cpu_access("w")``, the same access
  without the checkpoint (same goal);
* a copy through each: ``async with buf.cpu_access("w") as view`` (or ``with
  buf.try_cpu_access("w") as view``) around a ``numpy.copyto`` into the view
  (begin/end CPU access, the view, the numpy wrapper, the copy) against the
  same ``numpy.copyto`` into the same mapped memfd pages with no framework
  around it (goals: at least 0.6x the bandwidth at 64 KiB, 0.9x at 1 MiB and
  beyond).

Every page is faulted in before timing; on every backend, rounds alternate (a
fresh loop per backend per round, the order of the sides reversed every other
round) and each figure is the median. Run:
``python benchmarks/bench_cpu.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import AsyncIterator

import anyio.lowlevel
import numpy as np

from asyncdmabuf import DmaBuf
from asyncdmabuf._bench import (
    Row,
    Side,
    Sides,
    alternate,
    compare,
    fmt_us,
    median,
    render,
    wide_console,
)
from asyncdmabuf.exporters import MemfdExporter

KIB, MIB = 1 << 10, 1 << 20
#: Copy sizes and their goals (bandwidth through cpu_access / numpy.copyto).
COPY_GOALS = {64 * KIB: 0.6, MIB: 0.9, 16 * MIB: 0.9, 64 * MIB: 0.9}
QUICK_SIZES = (64 * KIB, MIB)
#: The goal for an empty cpu_access, in seconds.
EMPTY_GOAL = 2e-6
#: Bytes copied per side per round (fewer copies of bigger buffers).
VOLUME = 256 * MIB


def human(size: int) -> str:
    """64 KiB, 1 MiB."""
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def fmt_gbps(rate: float) -> str:
    """Bytes per second as ``12.34 GB/s``."""
    return f"{rate / 1e9:.2f} GB/s"


@contextlib.asynccontextmanager
async def sides(
    sizes: tuple[int, ...], n_empty: int, volume: int
) -> AsyncIterator[Sides]:
    """The sides on the running loop: seconds per empty access, bytes/s copied."""
    exporter = MemfdExporter()
    bufs: list[DmaBuf] = []
    result: dict[str, Side] = {}
    try:
        empty = await exporter.allocate(4096, name="bench-cpu")
        bufs.append(empty)

        async def empty_access() -> float:
            start = time.perf_counter()
            for _ in range(n_empty):
                async with empty.cpu_access("w"):
                    pass
            return (time.perf_counter() - start) / n_empty

        async def empty_try() -> float:
            start = time.perf_counter()
            for _ in range(n_empty):
                with empty.try_cpu_access("w"):
                    pass
            return (time.perf_counter() - start) / n_empty

        async def checkpoint() -> float:
            start = time.perf_counter()
            for _ in range(n_empty):
                await anyio.lowlevel.checkpoint()
            return (time.perf_counter() - start) / n_empty

        result["empty cpu_access"] = empty_access
        result["empty try_cpu_access"] = empty_try
        result["checkpoint"] = checkpoint
        for size in sizes:
            buf = await exporter.allocate(size, name="bench-cpu")
            bufs.append(buf)
            ours, ours_try, bare = _copy_sides(buf, max(3, volume // size))
            result[f"{human(size)} cpu_access"] = ours
            result[f"{human(size)} try_cpu_access"] = ours_try
            result[f"{human(size)} numpy"] = bare
        for side in result.values():  # warm up (and fault every page in)
            await side()
        yield result
    finally:
        for buf in bufs:
            await buf.put()


def _copy_sides(buf: DmaBuf, reps: int) -> tuple[Side, Side, Side]:
    src = np.random.default_rng(0).integers(0, 256, buf.size, dtype=np.uint8)

    async def ours() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            async with buf.cpu_access("w") as view:
                arr = np.frombuffer(view, dtype=np.uint8)
                np.copyto(arr, src)
                del arr
        return buf.size * reps / (time.perf_counter() - start)

    async def ours_try() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            with buf.try_cpu_access("w") as view:
                arr = np.frombuffer(view, dtype=np.uint8)
                np.copyto(arr, src)
                del arr
        return buf.size * reps / (time.perf_counter() - start)

    async def bare() -> float:
        bare = buf.exporter.vmap(buf)  # the same bytes, outside the framework
        try:
            same = np.frombuffer(bare, dtype=np.uint8)
            start = time.perf_counter()
            for _ in range(reps):
                np.copyto(same, src)
            elapsed = time.perf_counter() - start
            del same
        finally:
            bare.release()
        return buf.size * reps / elapsed

    return ours, ours_try, bare


def rows(quick: bool) -> list[Row]:
    """The figures ``asyncdmabuf bench`` shows for this benchmark."""
    sizes = QUICK_SIZES if quick else tuple(COPY_GOALS)
    volume = VOLUME // 4 if quick else VOLUME
    samples = alternate(
        lambda: sides(sizes, 2_000 if quick else 10_000, volume), 5 if quick else 9
    )
    result = []
    for label, figures in samples.items():
        floor = median(figures["checkpoint"])
        for how in ("cpu_access", "try_cpu_access"):
            empty = figures[f"empty {how}"]
            value = median(empty)
            form = "async with" if how == "cpu_access" else "with"
            result.append(
                Row(
                    "CPU access",
                    f"{label}: empty {form} {how}('w') vs one checkpoint",
                    fmt_us(value),
                    fmt_us(floor),
                    value / floor,
                    f"<= {EMPTY_GOAL * 1e6:g} µs",
                    value <= EMPTY_GOAL,
                    len(empty),
                )
            )
            result.extend(
                compare(
                    "CPU access",
                    f"{label}: copy {human(size)} through {how} vs numpy.copyto",
                    figures[f"{human(size)} {how}"],
                    figures[f"{human(size)} numpy"],
                    fmt=fmt_gbps,
                    ge=COPY_GOALS[size],
                )
                for size in sizes
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, sizes")
    args = parser.parse_args()
    wide_console().print(render(rows(args.quick), "CPU access vs numpy.copyto"))


if __name__ == "__main__":
    main()
