"""``asyncdmabuf bench``: every micro-benchmark side by side, one table of ratios.

The benchmarks live in the checkout's ``benchmarks/`` package (not in the
wheel); this module finds it, imports its measuring functions and runs them
all in one process, one after the other, so that the ratios compare figures
taken on the same machine in the same minute.

How a figure is taken (:func:`alternate`): a benchmark names its *sides*
(ours and the bare baseline, each a coroutine function returning one
figure); every round starts a fresh event loop on each backend in turn and
measures every side once in it, the order of backends and of sides reversed
on every other round, so that drift of the machine (other processes, the CPU's
clock) hits every side alike. A row reports the median of the rounds.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._backends import BACKENDS

__all__ = [
    "BENCHMARKS",
    "Row",
    "Samples",
    "Sides",
    "alternate",
    "available_backends",
    "backend_available",
    "bench_names",
    "compare",
    "find_benchmarks",
    "fmt_rate",
    "fmt_us",
    "goal_ge",
    "goal_le",
    "load_benchmark",
    "machine",
    "median",
    "render",
    "run_bench",
    "wide_console",
]

#: The package the benchmarks live in, a top-level folder of the checkout.
PACKAGE = "benchmarks"
#: What ``asyncdmabuf bench`` measures, in order: a title, and the module of
#: ``benchmarks`` whose public ``rows(quick)`` measures it (None: the stress
#: engine, measured here).
BENCHMARKS: tuple[tuple[str, str | None], ...] = (
    ("framework vs bare anyio locking", "bench_map"),
    ("contended map+unmap vs a bare anyio.Lock", "bench_paths"),
    ("CPU access vs numpy.copyto", "bench_cpu"),
    ("BufferPool vs locks and fresh allocation", "bench_pool"),
    ("scale: tasks, buffers, memory per object", "bench_scale"),
    ("fence vs anyio.Event", "bench_fence"),
    ("each backend vs asyncio (stress engine)", None),
    ("hand-off to another process", "bench_share"),
    ("stream frames to other processes", "bench_stream"),
)

#: One round's figure of one side, measured on the running loop.
Side = Callable[[], Awaitable[float]]
#: The sides of one benchmark, by name, in the order they are measured.
Sides = Mapping[str, Side]
#: ``samples[backend][side]``: one figure per round.
Samples = dict[str, dict[str, list[float]]]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: ours against a baseline."""

    group: str
    what: str
    ours: str
    baseline: str
    ratio: float | None
    """ours / baseline (None: nothing to compare with, e.g. bytes per object)."""
    goal: str
    met: bool | None
    """None when the line has no goal."""
    rounds: int = 1
    """How many alternating rounds the medians are taken over."""


#: The name ``--only`` knows the stress engine's rows by.
STRESS = "stress"


def bench_names() -> list[str]:
    """The names of the benchmarks, as ``asyncdmabuf bench --only`` takes them."""
    return [name or STRESS for _, name in BENCHMARKS]


# -- finding and loading the benchmarks ----------------------------------------


def find_benchmarks() -> Path | None:
    """Return the checkout's ``benchmarks/`` folder, or None (e.g. from a wheel)."""
    here = Path(__file__).resolve()
    for root in (here.parents[2], Path.cwd()):
        folder = root / "benchmarks"
        if (folder / "__init__.py").is_file() and (folder / "bench_map.py").is_file():
            return folder
    return None


def load_benchmark(folder: Path, name: str) -> ModuleType:
    """Import ``benchmarks.<name>`` from the checkout's ``folder``.

    The ``benchmarks`` package is imported from its own folder, not by
    putting the checkout on ``sys.path``; an importable ``benchmarks`` package
    from elsewhere is not taken for it.

    Raises:
        ModuleNotFoundError: ``folder`` has no ``<name>.py``.
    """
    package = sys.modules.get(PACKAGE)
    init = (folder / "__init__.py").resolve()
    if package is None or Path(getattr(package, "__file__", "")).resolve() != init:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, init, submodule_search_locations=[str(folder)]
        )
        assert spec is not None
        assert spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{name}")


# -- measuring -----------------------------------------------------------------


def backend_available(label: str) -> bool:
    """Whether the backend ``label`` of :data:`BACKENDS` can run here."""
    module = {"uvloop": "uvloop", "trio": "trio"}.get(label)
    if module is None:
        return True
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def available_backends(labels: Sequence[str] | None = None) -> list[str]:
    """The labels of :data:`BACKENDS` (or of ``labels``) that can run here."""
    return [label for label in (labels or BACKENDS) if backend_available(label)]


def alternate(
    setup: Callable[[], contextlib.AbstractAsyncContextManager[Sides]],
    rounds: int,
    backends: Sequence[str] | None = None,
) -> Samples:
    """Measure every side of ``setup`` on every backend, in alternating rounds.

    Each round runs a fresh event loop per backend; in it ``setup()`` is
    entered (it prepares buffers, warms up, and yields the sides), every
    side is awaited once for one figure, and the block is left (cleanup).
    Odd rounds reverse the order of the backends and of the sides.

    Args:
        setup: Makes the sides of one round (an async context manager).
        rounds: How many figures each side gets per backend.
        backends: Labels of :data:`BACKENDS`; default all that can run.

    Returns:
        ``samples[backend][side]``, one figure per round.
    """
    labels = available_backends(backends)
    samples: Samples = {label: {} for label in labels}
    for i in range(rounds):
        reverse = i % 2 == 1
        for label in labels[::-1] if reverse else labels:
            backend, options = BACKENDS[label]
            figures = anyio.run(
                _one_round, setup, reverse, backend=backend, backend_options=options
            )
            for side, figure in figures.items():
                samples[label].setdefault(side, []).append(figure)
    return samples


async def _one_round(
    setup: Callable[[], contextlib.AbstractAsyncContextManager[Sides]],
    reverse: bool,
) -> dict[str, float]:
    async with setup() as sides:
        names = list(sides)
        figures: dict[str, float] = {}
        for name in names[::-1] if reverse else names:
            figures[name] = await sides[name]()
        return figures


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (nan for none)."""
    return statistics.median(values) if values else float("nan")


# -- rows ----------------------------------------------------------------------


def fmt_us(seconds: float) -> str:
    """Seconds as microseconds: ``12.34 µs``."""
    return f"{seconds * 1e6:,.2f} µs"


def fmt_rate(per_second: float) -> str:
    """A throughput: ``12,345/s``."""
    return f"{per_second:,.0f}/s"


def goal_le(ratio: float, limit: float) -> tuple[str, bool]:
    """A goal of at most ``limit`` times the baseline."""
    return f"<= {limit:g}x", ratio <= limit


def goal_ge(ratio: float, limit: float) -> tuple[str, bool]:
    """A goal of at least ``limit`` times the baseline."""
    return f">= {limit:g}x", ratio >= limit


def compare(
    group: str,
    what: str,
    ours: Sequence[float],
    baseline: Sequence[float],
    *,
    fmt: Callable[[float], str] = fmt_us,
    le: float | None = None,
    ge: float | None = None,
) -> Row:
    """A row of the medians of ``ours`` and ``baseline`` and their ratio.

    Args:
        group: The row's group in the table.
        what: What is measured.
        ours: One figure per round, through the framework.
        baseline: One figure per round, of the bare equivalent.
        fmt: How a figure is shown.
        le: The goal, if any: the ratio at most this.
        ge: The goal, if any: the ratio at least this.
    """
    mine, theirs = median(ours), median(baseline)
    ratio = mine / theirs if theirs else float("nan")
    goal, met = "", None
    if le is not None:
        goal, met = goal_le(ratio, le)
    elif ge is not None:
        goal, met = goal_ge(ratio, ge)
    return Row(group, what, fmt(mine), fmt(theirs), ratio, goal, met, len(ours))


# -- the machine ---------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the figures were measured on: CPU, memory, kernel, versions."""
    info: dict[str, str] = {}
    cpu = _first_value("/proc/cpuinfo", "model name") or platform.processor()
    family = _first_value("/proc/cpuinfo", "cpu family")
    model = _first_value("/proc/cpuinfo", "model")
    if family and model:
        cpu = f"{cpu} (family {family}, model {model})"
    info["cpu"] = f"{cpu or 'unknown'}, {os.cpu_count() or '?'} logical CPUs"
    memory = _first_value("/proc/meminfo", "MemTotal")
    if memory and memory.split()[0].isdigit():
        info["memory"] = f"{int(memory.split()[0]) / (1 << 20):.0f} GiB"
    info["kernel"] = f"{platform.system()} {platform.release()}"
    info["python"] = f"{platform.python_implementation()} {platform.python_version()}"
    versions = []
    for package in ("anyio", "trio", "uvloop", "numpy"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} absent")
    info["libraries"] = ", ".join(versions)
    with contextlib.suppress(OSError):
        info["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def _first_value(path: str, key: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            for line in file:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        return None
    return None


# -- the command ---------------------------------------------------------------


@dataclass(slots=True)
class _Run:
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def wide_console() -> Console:
    """A console that keeps each row on one line, even in a log or a pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 150))


def render(rows: Sequence[Row], title: str) -> Table:
    """The rows as one table."""
    table = Table(title=title)
    for column in ("group", "measurement", "ours", "baseline", "ratio", "goal", "met"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    group = None
    for row in rows:
        cells = (
            row.group if row.group != group else "",
            row.what,
            row.ours,
            row.baseline,
            "" if not row.ratio else f"{row.ratio:.3g}x",  # 0: nothing to compare
            row.goal,
            "" if row.met is None else ("yes" if row.met else "NO"),
        )
        table.add_row(*(Text(cell) for cell in cells))  # brackets are text, not markup
        group = row.group
    return table


def run_bench(
    console: Console,
    *,
    quick: bool,
    json_path: Path | None,
    strict: bool = False,
    only: Sequence[str] = (),
) -> int:
    """Run everything (or the benchmarks ``only`` names), print the table.

    Returns:
        The exit status: 0 when every benchmark ran (goals missed only count
        with ``strict``); 1 when a benchmark failed, or with ``strict`` when
        a goal was missed; 2 when the benchmarks folder cannot be found or
        ``only`` names none. A benchmark whose module is not in the folder is
        skipped, with a line that says so.
    """
    folder = find_benchmarks()
    if folder is None:
        console.print(
            "benchmarks folder not found: `asyncdmabuf bench` runs from a "
            "checkout of asyncdmabuf (the wheel does not ship benchmarks/)"
        )
        return 2
    unknown = set(only) - set(bench_names())
    if unknown:
        console.print(
            f"no benchmark {', '.join(sorted(unknown))}: "
            f"the names are {', '.join(bench_names())}",
            highlight=False,
        )
        return 2
    chosen = [
        (title, name)
        for title, name in BENCHMARKS
        if not only or (name or STRESS) in only
    ]
    if not console.is_terminal:  # a log or a pipe: keep each row on one line
        console.width = max(console.width, 150)
    info = machine()
    console.print(
        "measured on: " + "; ".join(f"{k} {v}" for k, v in info.items()),
        highlight=False,
    )
    run = _Run()
    start = time.perf_counter()
    for title, name in chosen:
        began = time.perf_counter()
        with console.status(f"measuring: {title}"):
            _run_one(console, folder, title, name, quick, run)
        run.seconds[title] = time.perf_counter() - began
    elapsed = time.perf_counter() - start
    console.print(
        render(
            run.rows,
            "asyncdmabuf bench"
            + (" --quick" if quick else "")
            + ": medians of alternating rounds, both sides in one run",
        )
    )
    took = f"measured in {elapsed:.0f} s"
    with contextlib.suppress(OSError):
        info["load average at the end"] = f"{os.getloadavg()[0]:.2f}"
        took += f" (load average {info['load average at the end']} at the end)"
    console.print(took, highlight=False)
    if json_path is not None:
        document: dict[str, Any] = {
            "quick": quick,
            "machine": info,
            "seconds": run.seconds,
            "skipped": run.skipped,
            "errors": run.errors,
            "rows": [asdict(row) for row in run.rows],
        }
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        console.print(f"wrote {json_path}", highlight=False)
    for line in run.skipped:
        console.print(f"skipped: {line}", highlight=False)
    for line in run.errors:
        console.print(f"FAILED: {line}", highlight=False)
    missed = [row for row in run.rows if row.met is False]
    goals = sum(row.met is not None for row in run.rows)
    console.print(
        f"{len(missed)} of {goals} goals not met (the rows marked NO)"
        if missed
        else f"all {goals} goals met",
        highlight=False,
    )
    if run.errors:
        return 1
    return 1 if strict and missed else 0


def _run_one(
    console: Console,
    folder: Path,
    title: str,
    name: str | None,
    quick: bool,
    run: _Run,
) -> None:
    if name is None:
        run.rows.extend(_backend_rows(quick))
        return
    if not (folder / f"{name}.py").is_file():
        run.skipped.append(f"{title}: benchmarks/{name}.py is not in this checkout")
        return
    try:
        rows = load_benchmark(folder, name).rows(quick)
    except Exception as exc:  # one benchmark's failure does not hide the others
        run.errors.append(
            f"{title} (benchmarks/{name}.py): {type(exc).__name__}: {exc}"
        )
        return
    run.rows.extend(rows)


@contextlib.asynccontextmanager
async def _stress_sides(ops: int) -> AsyncIterator[Sides]:
    from ._stress import StressConfig, run_stress

    config = StressConfig(ops=ops)

    async def ops_per_second() -> float:
        report = await run_stress(config)
        return report.ops_per_second

    yield {"ops/s": ops_per_second}


def _backend_rows(quick: bool) -> list[Row]:
    samples = alternate(
        lambda: _stress_sides(2_000 if quick else 10_000), 3 if quick else 5
    )
    base = samples.get("asyncio", {}).get("ops/s", [])
    return [
        compare(
            "backend vs asyncio",
            f"{label}: stress ops/s (memfd, defaults)",
            figures["ops/s"],
            base,
            fmt=fmt_rate,
        )
        for label, figures in samples.items()
        if label != "asyncio"
    ]
