"""The command line: ``asyncdmabuf stress`` and ``asyncdmabuf bench``.

argparse reads the options, :mod:`._stress` runs the workload on each chosen
backend, rich draws the progress and the report. Exit status: 0 when every
invariant held on every backend, 1 when one did not, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from . import _bufinfo_cli
from ._backends import BACKENDS
from ._errors import DmaBufError
from ._stress import (
    MAP_MODES,
    StressConfig,
    StressProgress,
    StressReport,
    available_exporters,
    run_stress,
)

__all__ = ["BACKENDS", "main", "parse_size"]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line, reported with exit status 2."""


def parse_size(text: str) -> int:
    """Parse ``4096``, ``64K``, ``1M``, ``2GiB`` into bytes.

    Raises:
        argparse.ArgumentTypeError: Not a positive size.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([kmgKMG]?)(?:i?[bB])?\s*", text)
    if not match or int(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
    return int(match[1]) * _UNITS[match[2].lower()]


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a rate is in [0, 1], not {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"seconds must be >= 0, not {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``asyncdmabuf``'s command line."""
    defaults = StressConfig()
    parser = argparse.ArgumentParser(
        prog="asyncdmabuf",
        description="The Linux dma-buf model for async Python: tools.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    stress = commands.add_parser(
        "stress",
        help="run the concurrency stress benchmark and check for leaks",
        description=(
            "Many tasks attach, map (blocking, try_map, mixed) and unmap shared "
            "buffers, with cancellations and faults injected; then a report and "
            "an invariant check. Exit status 0 only if every invariant held."
        ),
    )
    run = stress.add_argument_group("the run")
    run.add_argument(
        "--backend",
        choices=(*BACKENDS, "all"),
        default="asyncio",
        help="event loop; 'all' runs each in turn and compares (default: asyncio)",
    )
    run.add_argument(
        "--exporter",
        default=defaults.exporter,
        help="exporter entry-point name: memfd, simdev, or a third-party one "
        "(default: %(default)s)",
    )
    run.add_argument("--tasks", type=_count, default=defaults.tasks)
    run.add_argument("--buffers", type=_count, default=defaults.buffers)
    run.add_argument("--devices", type=_count, default=defaults.devices)
    run.add_argument(
        "--buffer-size",
        type=parse_size,
        default=defaults.buffer_size,
        metavar="SIZE",
        help="bytes per buffer, e.g. 4096, 64K, 1M (default: 64K)",
    )
    amount = run.add_mutually_exclusive_group()
    amount.add_argument(
        "--ops",
        type=_count,
        default=None,
        help=f"operations in total (default: {defaults.ops})",
    )
    amount.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS", help="run this long"
    )
    run.add_argument(
        "--map-mode",
        choices=MAP_MODES,
        default=defaults.map_mode,
        help="block: await map(); try: try_map() with back-off; mixed: either, "
        "per operation (default: %(default)s)",
    )
    run.add_argument(
        "--maps-per-op",
        type=_count,
        default=defaults.maps_per_op,
        help="buffers each operation maps at once (default: %(default)s)",
    )
    run.add_argument(
        "--cancel-rate",
        type=_rate,
        default=defaults.cancel_rate,
        help="chance a blocking map is cancelled at a random point "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--fault-rate",
        type=_rate,
        default=defaults.fault_rate,
        help="chance an exporter op fails, for exporters that inject faults "
        "(default: %(default)s)",
    )
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument(
        "--watchdog",
        type=_seconds,
        default=defaults.watchdog,
        metavar="SECONDS",
        help="report who waits for what and fail if no operation completes "
        "for this long; 0 turns it off (default: %(default)s)",
    )
    run.add_argument(
        "--backoff",
        type=_seconds,
        default=defaults.backoff,
        metavar="SECONDS",
        help="first back-off after Busy in try mode (default: %(default)s)",
    )
    run.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not write and check bytes in every operation",
    )
    sim = stress.add_argument_group(
        "device options (simdev, or any exporter whose constructor takes them)"
    )
    sim.add_argument(
        "--memory",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="device memory (default: room for every buffer)",
    )
    sim.add_argument("--alloc-latency", type=_seconds, default=0.0, metavar="SECONDS")
    sim.add_argument("--map-latency", type=_seconds, default=0.0, metavar="SECONDS")
    out = stress.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="FILE", help="write every figure")
    out.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="draw latency distributions and throughput (needs matplotlib: "
        "pip install 'asyncdmabuf[plot]')",
    )
    out.add_argument(
        "-q", "--quiet", action="store_true", help="no progress, a short report"
    )
    stress.set_defaults(handler=_stress_command)

    bench = commands.add_parser(
        "bench",
        help="run the micro-benchmarks and print one table of ratios",
        description="Run the benchmarks under benchmarks/ side by side in one run.",
    )
    bench.add_argument(
        "--quick", action="store_true", help="fewer repetitions, smaller sizes"
    )
    bench.add_argument("--json", type=Path, metavar="FILE", help="write every figure")
    bench.add_argument(
        "--strict", action="store_true", help="exit 1 if any goal is not met"
    )
    bench.set_defaults(handler=_bench_command)

    bufinfo = commands.add_parser(
        "bufinfo",
        help="list every buffer on the machine: who holds it, who maps it",
        description="Read /proc/*/fd, fdinfo and maps (no cooperation from the "
        "processes needed) and list every asyncdmabuf memfd and kernel dma-buf.",
    )
    _bufinfo_cli.add_arguments(bufinfo)
    bufinfo.set_defaults(handler=_bufinfo_cli.bufinfo_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace, Console], int] = args.handler
    console = Console()
    try:
        return handler(args, console)
    except (UsageError, DmaBufError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return EXIT_USAGE


# -- stress -------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> StressConfig:
    ops = args.ops
    if ops is None and args.duration is None:
        ops = StressConfig().ops
    try:
        return StressConfig(
            exporter=args.exporter,
            tasks=args.tasks,
            buffers=args.buffers,
            devices=args.devices,
            buffer_size=args.buffer_size,
            ops=ops,
            duration=args.duration,
            map_mode=args.map_mode,
            maps_per_op=args.maps_per_op,
            cancel_rate=args.cancel_rate,
            fault_rate=args.fault_rate,
            seed=args.seed,
            watchdog=args.watchdog,
            verify=args.verify,
            backoff=args.backoff,
            memory=args.memory,
            alloc_latency=args.alloc_latency,
            map_latency=args.map_latency,
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _load_pyplot() -> Any:
    """Import matplotlib's pyplot, headless.

    Raises:
        UsageError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, an optional extra: "
            "pip install 'asyncdmabuf[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stress_command(args: argparse.Namespace, console: Console) -> int:
    config = _config(args)
    plt = _load_pyplot() if args.plot else None
    known = available_exporters()
    if args.exporter not in known:
        raise UsageError(
            f"no exporter named {args.exporter!r} (registered: {', '.join(known)})"
        )
    labels = list(BACKENDS) if args.backend == "all" else [args.backend]
    amount = f"{config.ops:,} ops" if config.ops else f"{config.duration:g} s"
    console.print(
        f"[bold]asyncdmabuf stress[/]: {config.tasks} tasks, {config.buffers} "
        f"buffers of {_size(config.buffer_size)}, {config.devices} devices, "
        f"exporter {config.exporter}, map mode {config.map_mode}, {amount}, "
        f"seed {config.seed}",
        highlight=False,
    )
    reports: list[StressReport] = []
    skipped: list[str] = []
    for label in labels:
        backend, options = BACKENDS[label]
        if label == "uvloop" and not _has_uvloop():
            if args.backend == "all":
                skipped.append("uvloop (not installed)")
                continue
            raise UsageError(
                "uvloop is not installed: pip install 'asyncdmabuf[uvloop]'"
            )
        if label == "trio" and not _has_trio():
            if args.backend == "all":
                skipped.append("trio (not installed)")
                continue
            raise UsageError("trio is not installed: pip install 'asyncdmabuf[trio]'")
        report = _run_one(label, backend, options, config, console, args.quiet)
        reports.append(report)
        _print_report(console, report, quiet=args.quiet)
    if len(reports) > 1:
        console.print(_comparison(reports))
    for note in skipped:
        console.print(f"skipped: {note}", highlight=False)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "ok": all(r.ok for r in reports),
                    "runs": [r.to_dict() for r in reports],
                },
                indent=2,
            )
            + "\n"
        )
        console.print(f"wrote {args.json}", highlight=False)
    if plt is not None:
        _plot(plt, reports, args.plot)
        console.print(f"wrote {args.plot}", highlight=False)
    ok = all(r.ok for r in reports)
    console.print(
        "[bold green]every invariant held[/]"
        if ok
        else "[bold red]FAILED: an invariant did not hold[/]"
    )
    return EXIT_OK if ok else EXIT_FAILED


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _has_trio() -> bool:
    try:
        import trio  # noqa: F401
    except ImportError:
        return False
    return True


def _run_one(
    label: str,
    backend: str,
    options: dict[str, object],
    config: StressConfig,
    console: Console,
    quiet: bool,
) -> StressReport:
    progress = Progress(
        SpinnerColumn(),
        TextColumn(f"[bold]{label:<8}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )
    total = config.ops if config.ops is not None else None
    with progress:
        task: TaskID = progress.add_task(label, total=total, stats="")

        def monitor(p: StressProgress) -> None:
            progress.update(
                task,
                completed=p.ops_done,
                stats=f"busy {p.busy:,}  cancelled {p.cancellations:,}  "
                f"faults {p.faults:,}",
            )

        report: StressReport = anyio.run(
            _with_monitor, config, monitor, backend=backend, backend_options=options
        )
    return report


async def _with_monitor(
    config: StressConfig, monitor: Callable[[StressProgress], object]
) -> StressReport:
    return await run_stress(config, monitor=monitor)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def _print_report(console: Console, r: StressReport, *, quiet: bool) -> None:
    verdict = "[green]ok[/]" if r.ok else "[bold red]FAILED[/]"
    if quiet:
        console.print(
            f"{r.backend}: {r.ops:,} ops in {r.elapsed:.2f} s, "
            f"{r.ops_per_second:,.0f} ops/s, busy {r.busy:,}, cancelled "
            f"{r.cancellations:,}, faults {r.faults:,}, evictions {r.evictions:,}: "
            f"{verdict}",
            highlight=False,
        )
    else:
        figures = Table(
            title=f"{r.backend} / {r.exporter}: {verdict}", show_header=False
        )
        figures.add_column("figure")
        figures.add_column("value", justify="right")
        rows = [
            ("operations", f"{r.ops:,} in {r.elapsed:.2f} s"),
            ("throughput", f"{r.ops_per_second:,.0f} ops/s"),
            ("maps / try_maps", f"{r.maps:,} / {r.try_maps:,}"),
            ("Busy", f"{r.busy:,}"),
            ("cancelled maps", f"{r.cancellations:,}"),
            ("faults met / injected", f"{r.faults:,} / {r.faults_injected:,}"),
            ("evictions (move_notify)", f"{r.evictions:,} ({r.move_notifies:,})"),
            ("try ops abandoned", f"{r.abandoned:,}"),
            ("bytes verified", f"{r.bytes_verified:,}"),
        ]
        for row in rows:
            figures.add_row(*row)
        console.print(figures)
        latency = Table(title="latency, µs")
        for column in ("", "count", "p50", "p90", "p99", "max"):
            latency.add_column(column, justify="right")
        for name, s in (("map", r.map_latency), ("try_map", r.try_map_latency)):
            latency.add_row(
                name, f"{s.count:,}", _us(s.p50), _us(s.p90), _us(s.p99), _us(s.max)
            )
        console.print(latency)
        checks = Table(title="invariants")
        for column in ("invariant", "held", "evidence"):
            checks.add_column(column)
        for inv in r.invariants:
            checks.add_row(
                inv.name,
                "[green]yes[/]" if inv.ok else "[bold red]NO[/]",
                escape(inv.detail),
            )
        console.print(checks)
    if not quiet:
        for note in r.notes:
            console.print(f"note: {escape(note)}", highlight=False)
    elif not r.ok:
        for inv in r.invariants:
            if not inv.ok:
                console.print(f"  {inv.name}: {escape(inv.detail)}", highlight=False)
    if r.hang_report:
        console.print("[bold red]hung[/]: who waits for what", highlight=False)
        for line in r.hang_report:
            console.print(line, highlight=False, markup=False)


def _comparison(reports: list[StressReport]) -> Table:
    base = reports[0]
    table = Table(title=f"backends compared (ratios against {base.backend})")
    for column in (
        "backend",
        "ops/s",
        "vs " + base.backend,
        "map p50 µs",
        "map p99 µs",
        "try_map p50 µs",
        "Busy",
        "verdict",
    ):
        table.add_column(column, justify="right")
    for r in reports:
        ratio = r.ops_per_second / base.ops_per_second if base.ops_per_second else 0
        table.add_row(
            r.backend,
            f"{r.ops_per_second:,.0f}",
            f"{ratio:.2f}x",
            _us(r.map_latency.p50),
            _us(r.map_latency.p99),
            _us(r.try_map_latency.p50),
            f"{r.busy:,}",
            "ok" if r.ok else "FAILED",
        )
    return table


def _plot(plt: Any, reports: list[StressReport], path: Path) -> None:
    """Latency distributions (map, try_map) and throughput, per backend."""
    fig, (ax_map, ax_try, ax_ops) = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, attr, title in (
        (ax_map, "map_latency", "map() latency"),
        (ax_try, "try_map_latency", "try_map() latency"),
    ):
        for r in reports:
            summary = getattr(r, attr)
            if not summary.count:
                continue
            q = summary.quantiles
            xs = [max(v * 1e6, 1e-3) for v in q]
            ys = [i / (len(q) - 1) for i in range(len(q))]
            ax.step(xs, ys, where="post", label=r.backend)
        ax.set_xscale("log")
        ax.set_xlabel("µs")
        ax.set_ylabel("fraction of calls")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    names = [r.backend for r in reports]
    ax_ops.bar(names, [r.ops_per_second for r in reports], color="tab:blue")
    ax_ops.set_title("throughput")
    ax_ops.set_ylabel("operations / s")
    fig.suptitle(
        f"asyncdmabuf stress: {reports[0].exporter}, {reports[0].config.tasks} tasks"
        if reports
        else "asyncdmabuf stress"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- bench -----------------------------------------------------------------------------


def _bench_command(args: argparse.Namespace, console: Console) -> int:
    from ._bench import run_bench

    status = run_bench(console, quick=args.quick, json_path=args.json)
    return status if args.strict or status != 1 else EXIT_OK
