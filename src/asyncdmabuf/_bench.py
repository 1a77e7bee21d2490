"""``asyncdmabuf bench``: every micro-benchmark side by side, one table of ratios.

The benchmarks live in the checkout's ``benchmarks/`` package (not in the
wheel); this module finds it, imports its measuring functions and runs them
all in one process, one after the other, so that the ratios compare figures
taken on the same machine in the same minute.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import anyio
from rich.console import Console
from rich.table import Table

from ._backends import BACKENDS

__all__ = [
    "BENCHMARKS",
    "Row",
    "backend_available",
    "find_benchmarks",
    "fmt_us",
    "goal_le",
    "load_benchmark",
    "run_bench",
]

#: The package the benchmarks live in, a top-level folder of the checkout.
PACKAGE = "benchmarks"
#: What ``asyncdmabuf bench`` measures, in order: a title, and the module of
#: ``benchmarks`` whose public ``rows(quick)`` measures it (None: the stress
#: engine, measured here).
BENCHMARKS: tuple[tuple[str, str | None], ...] = (
    ("framework vs bare anyio locking", "bench_map"),
    ("each backend vs asyncio (stress engine)", None),
    ("fence vs anyio.Event", "bench_fence"),
    ("CPU-access copy vs numpy.copyto", "bench_cpu"),
    ("BufferPool reuse vs fresh allocation", "bench_pool"),
    ("throughput vs tasks (one loop)", "bench_scale"),
    ("hand-off to another process", "bench_share"),
)


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


def load_benchmark(folder: Path, name: str) -> ModuleType:
    """Import ``benchmarks.<name>`` from the checkout's ``folder``.

    The ``benchmarks`` package is imported from its own folder, not by
    putting the checkout on ``sys.path``; an importable ``benchmarks`` package
    from elsewhere is not taken for it.
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


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:,.2f} µs"


def goal_le(ratio: float, limit: float) -> tuple[str, bool]:
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
    for title, name in BENCHMARKS:
        with console.status(f"measuring: {title}"):
            if name is None:
                rows.extend(_backend_rows(quick))
            else:
                rows.extend(load_benchmark(folder, name).rows(quick))
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


def backend_available(label: str) -> bool:
    module = {"uvloop": "uvloop", "trio": "trio"}.get(label)
    if module is None:
        return True
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _backend_rows(quick: bool) -> list[Row]:
    from ._stress import StressConfig, run_stress

    config = StressConfig(ops=3_000 if quick else 20_000)
    measured: dict[str, float] = {}
    for label, (backend, options) in BACKENDS.items():
        if not backend_available(label):
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
