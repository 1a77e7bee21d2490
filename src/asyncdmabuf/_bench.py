"""``asyncdmabuf bench``: every micro-benchmark side by side, one table of ratios.

The benchmarks live in the checkout's ``benchmarks/`` package (not in the
wheel); this module finds it, imports its measuring functions and runs them
all in one process, one after the other, so that the ratios compare figures
taken on the same machine in the same minute.
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import anyio
from rich.console import Console
from rich.table import Table

from ._backends import BACKENDS

__all__ = ["Row", "find_benchmarks", "run_bench"]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: ours against a baseline."""

    group: str
    what: str
    ours: str
    baseline: str
    ratio: float
    goal: str
    met: bool | None
    """None when the line has no goal."""


def find_benchmarks() -> Path | None:
    """Return the checkout's ``benchmarks/`` folder, or None (e.g. from a wheel)."""
    here = Path(__file__).resolve()
    for root in (here.parents[2], Path.cwd()):
        folder = root / "benchmarks"
        if (folder / "__init__.py").is_file() and (folder / "bench_map.py").is_file():
            return folder
    return None


def _import(folder: Path, name: str) -> ModuleType:
    parent = str(folder.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    return importlib.import_module(f"benchmarks.{name}")


def _fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:,.2f} µs"


def _goal_le(ratio: float, limit: float) -> tuple[str, bool]:
    return f"<= {limit:g}x", ratio <= limit


def run_bench(console: Console, *, quick: bool, json_path: Path | None) -> int:
    """Run everything, print the table; 0 if every goal was met, else 1.

    Returns 2 when the benchmarks folder cannot be found.
    """
    folder = find_benchmarks()
    if folder is None:
        console.print(
            "benchmarks folder not found: `asyncdmabuf bench` runs from a "
            "checkout of asyncdmabuf (the wheel does not ship benchmarks/)"
        )
        return 2
    rows: list[Row] = []
    steps = [
        ("framework vs bare anyio locking", _map_rows),
        ("each backend vs asyncio (stress engine)", _backend_rows),
        ("fence vs anyio.Event", _fence_rows),
        ("CPU-access copy vs numpy.copyto", _cpu_rows),
        ("BufferPool reuse vs fresh allocation", _pool_rows),
        ("throughput vs tasks (one loop)", _scale_rows),
        ("hand-off to another process", _share_rows),
    ]
    for title, step in steps:
        with console.status(f"measuring: {title}"):
            rows.extend(step(folder, quick))
    table = Table(title="asyncdmabuf bench: ratios measured side by side in one run")
    for column in ("group", "measurement", "ours", "baseline", "ratio", "goal", "met"):
        table.add_column(column, justify="right" if column != "measurement" else "left")
    group = None
    for row in rows:
        table.add_row(
            row.group if row.group != group else "",
            row.what,
            row.ours,
            row.baseline,
            f"{row.ratio:.3g}x",
            row.goal,
            "" if row.met is None else ("yes" if row.met else "NO"),
            end_section=False,
        )
        group = row.group
    if not console.is_terminal:  # a log or a pipe: keep each row on one line
        console = Console(width=max(console.width, 150))
    console.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
        console.print(f"wrote {json_path}", highlight=False)
    missed = [row for row in rows if row.met is False]
    if missed:
        console.print(
            f"{len(missed)} goal(s) not met: "
            + "; ".join(f"{r.group}: {r.what}" for r in missed),
            highlight=False,
        )
    return 1 if missed else 0


def _available(label: str) -> bool:
    module = {"uvloop": "uvloop", "trio": "trio"}.get(label)
    if module is None:
        return True
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _map_rows(folder: Path, quick: bool) -> list[Row]:
    bench_map = _import(folder, "bench_map")
    results = bench_map.run(5_000 if quick else 20_000, 3 if quick else 7)
    rows = []
    base = results[0]
    for r in results:
        ratio = r.map_unmap / r.two_locks
        goal, met = _goal_le(ratio, 1.5)
        rows.append(
            Row(
                "framework vs anyio",
                f"{r.backend}: map+unmap vs 2x Lock acquire/release",
                _fmt_us(r.map_unmap),
                _fmt_us(r.two_locks),
                ratio,
                goal,
                met,
            )
        )
        ratio = r.try_map / r.nowait_lock
        goal, met = _goal_le(ratio, 3.0)
        rows.append(
            Row(
                "framework vs anyio",
                f"{r.backend}: try_map vs acquire_nowait+release",
                _fmt_us(r.try_map),
                _fmt_us(r.nowait_lock),
                ratio,
                goal,
                met,
            )
        )
    rows.extend(
        Row(
            "backend vs asyncio",
            f"{r.backend}: map+unmap time",
            _fmt_us(r.map_unmap),
            _fmt_us(base.map_unmap),
            r.map_unmap / base.map_unmap,
            "",
            None,
        )
        for r in results[1:]
    )
    return rows


def _backend_rows(folder: Path, quick: bool) -> list[Row]:
    from ._stress import StressConfig, run_stress

    config = StressConfig(ops=3_000 if quick else 20_000)
    measured: dict[str, float] = {}
    for label, (backend, options) in BACKENDS.items():
        if not _available(label):
            continue
        report = anyio.run(run_stress, config, backend=backend, backend_options=options)
        measured[label] = report.ops_per_second
    base = measured.get("asyncio", 0.0)
    return [
        Row(
            "backend vs asyncio",
            f"{label}: stress ops/s (memfd, defaults)",
            f"{ops:,.0f}/s",
            f"{base:,.0f}/s",
            ops / base if base else 0.0,
            "",
            None,
        )
        for label, ops in measured.items()
    ]


def _fence_rows(folder: Path, quick: bool) -> list[Row]:
    bench_fence = _import(folder, "bench_fence")
    rows = []
    for label, (backend, options) in BACKENDS.items():
        if not _available(label):
            continue
        results: list[tuple[int, float, float]] = anyio.run(
            bench_fence._in_process,
            [100],
            10 if quick else 50,
            backend=backend,
            backend_options=options,
        )
        for n, fence_t, event_t in results:
            ratio = fence_t / event_t
            goal, met = _goal_le(ratio, 1.5)
            rows.append(
                Row(
                    "fence vs Event",
                    f"{label}: signal() waking {n} waiters",
                    _fmt_us(fence_t),
                    _fmt_us(event_t),
                    ratio,
                    goal,
                    met,
                )
            )
    return rows


def _cpu_rows(folder: Path, quick: bool) -> list[Row]:
    bench_cpu = _import(folder, "bench_cpu")
    sizes = (1 << 20, 16 << 20) if quick else bench_cpu.SIZES
    results = anyio.run(bench_cpu.measure_all, sizes, 10 if quick else 30)
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


def _pool_rows(folder: Path, quick: bool) -> list[Row]:
    bench_pool = _import(folder, "bench_pool")
    results = anyio.run(
        bench_pool.measure_all, bench_pool.SIZES, 50 if quick else 200, 3
    )
    return [
        Row(
            "buffer pool",
            f"{r.size >> 10} KiB: pooled get+fill+give back vs fresh",
            _fmt_us(r.pooled),
            _fmt_us(r.fresh),
            r.speedup,
            "> 1x",
            r.speedup > 1.0,
        )
        for r in results
    ]


def _scale_rows(folder: Path, quick: bool) -> list[Row]:
    bench_scale = _import(folder, "bench_scale")
    results = anyio.run(
        bench_scale.scaling, bench_scale.TASKS, 10_000 if quick else 50_000
    )
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


def _share_rows(folder: Path, quick: bool) -> list[Row]:
    bench_share = _import(folder, "bench_share")
    sizes = [4 << 10, 1 << 20] if quick else [4 << 10, 1 << 20, 64 << 20]

    def reps(size: int) -> int:
        return 20 if quick else 100

    def copy_reps(size: int) -> int:
        return 5 if size > 1 << 20 else (20 if quick else 50)

    ours = bench_share.time_dmabuf(sizes, reps, "asyncio")
    shm = bench_share.time_shm(sizes, reps)
    pickled = bench_share.time_pickle(sizes, copy_reps)
    rows = []
    median = statistics.median
    for i, size in enumerate(sizes):
        label = bench_share.human(size)
        mine = median(ours[i])
        ratio = mine / median(shm[i])
        goal, met = _goal_le(ratio, 2.0)
        rows.append(
            Row(
                "hand-off",
                f"{label}: send_buffer vs shared_memory by name",
                _fmt_us(mine),
                _fmt_us(median(shm[i])),
                ratio,
                goal,
                met,
            )
        )
        rows.append(
            Row(
                "hand-off",
                f"{label}: send_buffer vs pickle through a Pipe",
                _fmt_us(mine),
                _fmt_us(median(pickled[i])),
                mine / median(pickled[i]),
                "",
                None,
            )
        )
    return rows
