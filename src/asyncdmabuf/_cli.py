"""The command line: ``asyncdmabuf stress`` and ``asyncdmabuf bench``.

argparse reads the options, which are all checked before any work starts;
:mod:`._stress` runs the workload on each chosen backend; rich draws the
progress and the report. Exit status (API section 9): 0 when every check held,
1 when one did not (an invariant, a leak, an error during the run), 2 for bad
usage (one line on stderr, no traceback), 130 when interrupted (SIGINT or
SIGTERM: the partial report, JSON and plot are still written).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import anyio
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from . import _bufinfo_cli
from ._backends import BACKENDS
from ._bench import bench_names
from ._errors import DmaBufError
from ._layout import FrameLayout
from ._stress import (
    MAP_MODES,
    StressConfig,
    StressProgress,
    StressReport,
    run_stress,
)
from ._stress.config import CLEAN_OPS, exporter_options, load_exporter
from ._stress.limits import check_fits, check_stream_fits
from ._stress.report import LatencySummary
from ._stress.stream import (
    OVERFLOW_MODES,
    StreamConfig,
    StreamProgress,
    StreamReport,
    overflow_of,
)
from ._stress.stream_run import run_stream
from ._stress.workload import MAX_TRY_ROUNDS

__all__ = ["BACKENDS", "main", "parse_size"]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A problem with the command line, reported with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, reporting a usage error in one line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def parse_size(text: str) -> int:
    """Parse ``4096``, ``64K``, ``1M``, ``2GiB`` into bytes.

    Raises:
        argparse.ArgumentTypeError: Not a positive size.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([kmgKMG]?)(?:i?[bB])?\s*", text)
    if not match or int(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
    return int(match[1]) * _UNITS[match[2].lower()]


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _rate(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a rate is in [0, 1], not {text}")
    return value


def _seconds(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"seconds must be >= 0, not {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"seconds must be > 0, not {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _layout(text: str) -> FrameLayout:
    """Parse ``XR24:1920x1080`` into a layout (``FOURCC:WIDTHxHEIGHT``)."""
    match = re.fullmatch(r"\s*(\w{1,4})\s*:\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"not FOURCC:WIDTHxHEIGHT (e.g. XR24:1920x1080): {text!r}"
        )
    try:
        return FrameLayout.for_format(match[1], int(match[2]), int(match[3]))
    except (TypeError, DmaBufError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``asyncdmabuf``'s command line."""
    defaults = StressConfig()
    parser = _Parser(
        prog="asyncdmabuf",
        description="The Linux dma-buf model for async Python: tools.",
    )
    parser.add_argument(
        "--version", action="version", version=f"asyncdmabuf {_version()}"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    stress = commands.add_parser(
        "stress",
        help="run the concurrency stress benchmark and check for leaks",
        description=(
            "Many tasks attach, map (blocking, try_map, mixed) and unmap shared "
            "buffers, with cancellations and faults injected; then a report and "
            "an invariant check. With --stream, this process publishes a stream "
            "of frames to subscriber processes, which check every byte of every "
            "frame. Exit status 0 if every invariant held, 1 if "
            "one did not, 2 for bad usage, 130 when interrupted."
        ),
    )
    run = stress.add_argument_group("the run")
    run.add_argument(
        "--backend",
        choices=(*BACKENDS, "all"),
        default="all",
        help="event loop; 'all' runs each in turn and compares (default: all)",
    )
    run.add_argument(
        "--exporter",
        default=defaults.exporter,
        help="exporter entry-point name (memfd, simdev, a third-party one) or "
        "module:Class (default: %(default)s)",
    )
    run.add_argument(
        "--tasks", type=_count, default=None, help=f"(default: {defaults.tasks})"
    )
    run.add_argument(
        "--buffers",
        type=_count,
        default=None,
        help=f"(default: {defaults.buffers}; with --stream, the stream's pool: "
        f"{StreamConfig().buffers})",
    )
    run.add_argument(
        "--devices", type=_count, default=None, help=f"(default: {defaults.devices})"
    )
    run.add_argument(
        "--buffer-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="bytes per buffer, e.g. 4096, 64K, 1M (default: 64K); with "
        "--stream, frames of plain bytes of this size instead of --layout",
    )
    amount = run.add_mutually_exclusive_group()
    amount.add_argument(
        "--ops",
        type=_count,
        default=None,
        help=f"operations in total (default: {defaults.ops})",
    )
    amount.add_argument(
        "--duration",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="run this long",
    )
    amount.add_argument(
        "--frames",
        type=_count,
        default=None,
        help=f"with --stream: frames to send (default: {StreamConfig().frames})",
    )
    run.add_argument(
        "--map-mode",
        choices=MAP_MODES,
        default=None,
        help="block: await map(); try: try_map() with back-off; mixed: either, "
        f"per operation (default: {defaults.map_mode})",
    )
    run.add_argument(
        "--map-hold",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="time every blocking map spends in the exporter with the buffer's "
        "lock held, as a device's map does; 0: the exporter as it is "
        f"(default: {defaults.map_hold})",
    )
    run.add_argument(
        "--maps-per-op",
        type=_count,
        default=None,
        help=f"buffers each operation maps at once (default: {defaults.maps_per_op})",
    )
    run.add_argument(
        "--cancel-rate",
        type=_rate,
        default=None,
        help="chance a blocking map is cancelled at a random point "
        f"(default: {defaults.cancel_rate})",
    )
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument(
        "--watchdog",
        type=_seconds,
        default=defaults.watchdog,
        metavar="SECONDS",
        help="report who waits for what and fail if no operation completes "
        "(with --stream: no frame is sent) for this long; 0 turns it off "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--backoff",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"first back-off after Busy in try mode (default: {defaults.backoff})",
    )
    run.add_argument(
        "--no-verify",
        dest="verify",
        action="store_const",
        const=False,
        default=None,
        help="do not write and check bytes in every operation",
    )
    streams = stress.add_argument_group(
        "stream mode: one publisher, subscriber processes, every frame checked"
    )
    stream_defaults = StreamConfig()
    streams.add_argument(
        "--stream",
        action="store_true",
        help="stream frames to subscriber processes instead (see docs/stress.md)",
    )
    streams.add_argument(
        "--subscribers",
        type=_count,
        default=None,
        help=f"subscriber processes (default: {stream_defaults.subscribers})",
    )
    streams.add_argument(
        "--layout",
        type=_layout,
        default=None,
        metavar="FOURCC:WxH",
        help="the frames' format and size, e.g. XR24:1920x1080, NV12:640x480 "
        f"(default: {stream_defaults.shape.replace(' ', ':')})",
    )
    streams.add_argument(
        "--overflow",
        choices=OVERFLOW_MODES,
        default=None,
        help="each subscriber's overflow; mixed: block and drop-oldest in turn "
        f"(default: {stream_defaults.overflow})",
    )
    streams.add_argument(
        "--queue",
        type=_count,
        default=None,
        help=f"each subscriber's queue (default: {stream_defaults.queue})",
    )
    streams.add_argument(
        "--kill-subscriber",
        type=_whole,
        default=None,
        metavar="FRAMES",
        help="fault: subscriber 0 holds every frame after this many, and is "
        "SIGKILLed holding them; the publisher must go on and get them back",
    )
    sim = stress.add_argument_group(
        "device options (simdev, or any exporter whose constructor takes them; "
        "refused for the others)"
    )
    sim.add_argument(
        "--memory",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="device memory (default: room for every buffer)",
    )
    sim.add_argument("--alloc-latency", type=_seconds, default=None, metavar="SECONDS")
    sim.add_argument("--map-latency", type=_seconds, default=None, metavar="SECONDS")
    sim.add_argument(
        "--fault-rate",
        type=_rate,
        default=None,
        help="chance an exporter op fails, for exporters that inject faults "
        "(a fault_ops tuple and a faults= argument; default: 0)",
    )
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
        "--strict",
        action="store_true",
        help="exit 1 if any goal is not met (always: 1 if a benchmark fails)",
    )
    bench.add_argument(
        "--only",
        action="append",
        default=[],
        choices=bench_names(),
        metavar="NAME",
        help="run only this benchmark (may be repeated): " + ", ".join(bench_names()),
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
    """Run the command line; return the exit status (0, 1, 2 or 130)."""
    console = Console()
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        with _sigterm_interrupts():
            try:
                args = build_parser().parse_args(argv)
            except UsageError as exc:
                errors.print(f"error: {escape(str(exc))}")
                return EXIT_USAGE
            handler: Callable[[argparse.Namespace, Console, Console], int]
            handler = args.handler
            try:
                return handler(args, console, errors)
            except UsageError as exc:
                errors.print(f"[bold red]error:[/] {escape(str(exc))}")
                return EXIT_USAGE
    except KeyboardInterrupt:
        errors.print("interrupted")
        return EXIT_INTERRUPTED


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Make SIGTERM interrupt like SIGINT while the command runs (main thread)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- stress: checking the command line ----------------------------------------------


#: Options of the stress workload that mean nothing to --stream, and the
#: other way round: (flag, attribute).
_WORKLOAD_ONLY = (
    ("--tasks", "tasks"),
    ("--devices", "devices"),
    ("--ops", "ops"),
    ("--map-mode", "map_mode"),
    ("--map-hold", "map_hold"),
    ("--maps-per-op", "maps_per_op"),
    ("--cancel-rate", "cancel_rate"),
    ("--backoff", "backoff"),
    ("--no-verify", "verify"),
    ("--fault-rate", "fault_rate"),
    ("--plot", "plot"),
)
_STREAM_ONLY = (
    ("--subscribers", "subscribers"),
    ("--frames", "frames"),
    ("--layout", "layout"),
    ("--overflow", "overflow"),
    ("--queue", "queue"),
    ("--kill-subscriber", "kill_subscriber"),
)


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _check_exporter_options(args: argparse.Namespace) -> None:
    """Refuse an exporter option the exporter's constructor does not take.

    Raises:
        UsageError: The exporter cannot be found, or does not take an option
            that was given.
    """
    try:
        cls = load_exporter(args.exporter)
    except DmaBufError as exc:
        raise UsageError(str(exc)) from None
    takes = exporter_options(cls)
    for flag, key in (
        ("--memory", "memory"),
        ("--alloc-latency", "alloc_latency"),
        ("--map-latency", "map_latency"),
    ):
        if getattr(args, key) is not None and key not in takes:
            raise UsageError(
                f"{flag} is for exporters whose constructor takes {key}=; "
                f"{args.exporter!r} does not"
            )
    if args.fault_rate and not (
        "faults" in takes and set(getattr(cls, "fault_ops", ())) - CLEAN_OPS
    ):
        raise UsageError(
            f"--fault-rate is for exporters that inject faults (a fault_ops "
            f"tuple and a faults= argument); {args.exporter!r} does not"
        )


def _config(args: argparse.Namespace) -> StressConfig:
    """Build the run's configuration, checking every option against the exporter.

    Raises:
        UsageError: An option is out of range, the exporter cannot be found,
            does not take an option that was given, or the machine cannot
            hold the run.
    """
    for flag, key in _STREAM_ONLY:
        if getattr(args, key) is not None:
            raise UsageError(f"{flag} is an option of --stream")
    _check_exporter_options(args)
    defaults = StressConfig()
    ops = args.ops
    if ops is None and args.duration is None:
        ops = defaults.ops
    try:
        config = StressConfig(
            exporter=args.exporter,
            tasks=_given(args.tasks, defaults.tasks),
            buffers=_given(args.buffers, defaults.buffers),
            devices=_given(args.devices, defaults.devices),
            buffer_size=_given(args.buffer_size, defaults.buffer_size),
            ops=ops,
            duration=args.duration,
            map_mode=_given(args.map_mode, defaults.map_mode),
            maps_per_op=_given(args.maps_per_op, defaults.maps_per_op),
            cancel_rate=_given(args.cancel_rate, defaults.cancel_rate),
            fault_rate=args.fault_rate or 0.0,
            seed=args.seed,
            watchdog=args.watchdog,
            verify=_given(args.verify, defaults.verify),
            backoff=_given(args.backoff, defaults.backoff),
            memory=args.memory,
            alloc_latency=args.alloc_latency or 0.0,
            map_latency=args.map_latency or 0.0,
            map_hold=_given(args.map_hold, defaults.map_hold),
        )
        check_fits(config)
    except (TypeError, ValueError, DmaBufError) as exc:
        raise UsageError(str(exc)) from None
    return config


def _stream_config(args: argparse.Namespace) -> StreamConfig:
    """Build a ``--stream`` run's configuration, checking every option.

    Raises:
        UsageError: An option of the stress workload was given, --layout
            and --buffer-size both, a value is out of range, the exporter
            does not take an option, or the machine cannot hold the run.
    """
    for flag, key in _WORKLOAD_ONLY:
        if getattr(args, key) is not None:
            raise UsageError(f"{flag} is not an option of --stream")
    if args.layout is not None and args.buffer_size is not None:
        raise UsageError(
            "--layout and --buffer-size both give the frames' size: give one"
        )
    _check_exporter_options(args)
    defaults = StreamConfig()
    frames = args.frames
    if frames is None and args.duration is None:
        frames = defaults.frames
    kill = args.kill_subscriber
    if kill is not None and frames is not None and kill >= frames:
        raise UsageError(
            f"--kill-subscriber {kill:,} must be below --frames {frames:,}: "
            "the kill would never come"
        )
    try:
        config = StreamConfig(
            exporter=args.exporter,
            subscribers=_given(args.subscribers, defaults.subscribers),
            buffers=_given(args.buffers, defaults.buffers),
            layout=None
            if args.buffer_size is not None
            else args.layout or defaults.layout,
            frame_size=_given(args.buffer_size, 0),
            frames=frames,
            duration=args.duration,
            overflow=_given(args.overflow, defaults.overflow),
            queue=_given(args.queue, defaults.queue),
            kill_after=kill,
            seed=args.seed,
            watchdog=args.watchdog,
            memory=args.memory,
            alloc_latency=args.alloc_latency or 0.0,
            map_latency=args.map_latency or 0.0,
        )
        check_stream_fits(config)
    except (TypeError, ValueError, DmaBufError) as exc:
        raise UsageError(_flags(str(exc))) from None
    return config


def _flags(message: str) -> str:
    """Name the command line's flags in a StreamConfig message (``buffers`` ...)."""
    for word in ("subscribers", "buffers", "queue"):
        message = re.sub(rf"^(\[\w+\] )?{word}\b", rf"\g<1>--{word}", message)
    return message


def _check_writable(path: Path | None, flag: str) -> None:
    """Refuse an output path that cannot be written, before any work.

    The folder is tried by creating (and removing) a file in it, which also
    holds for root and for read-only file systems.

    Raises:
        UsageError: Its folder does not exist or refuses a new file, or it is
            a folder, or it exists and cannot be overwritten.
    """
    if path is None:
        return
    folder = path.parent
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: no directory {folder}")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".asyncdmabuf-"):
            pass
    except OSError as exc:
        raise UsageError(
            f"{flag} {path}: cannot write in {folder}: {exc.strerror}"
        ) from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable")


def _load_pyplot() -> Any:
    """Import matplotlib's pyplot, headless, its warnings silenced.

    Raises:
        UsageError: matplotlib is not installed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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


def _backends(choice: str) -> tuple[list[str], list[str]]:
    """The backends to run, and those skipped (not installed, with ``all``).

    Raises:
        UsageError: The backend chosen by name is not installed.
    """
    labels = list(BACKENDS) if choice == "all" else [choice]
    run, skipped = [], []
    for label in labels:
        missing = (label == "uvloop" and not _has("uvloop")) or (
            label == "trio" and not _has("trio")
        )
        if not missing:
            run.append(label)
        elif choice == "all":
            skipped.append(f"{label} (not installed)")
        else:
            raise UsageError(
                f"{label} is not installed: pip install 'asyncdmabuf[{label}]'"
            )
    return run, skipped


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# -- stress: running -------------------------------------------------------------------


@dataclass
class _Outcome:
    """What the runs gave: their reports, and how the command ended."""

    reports: list[Any] = field(default_factory=list)
    """The reports: StressReport, or StreamReport with --stream."""
    interrupted: bool = False
    error: str | None = None


#: Runs one backend: (label, anyio backend, its options) -> (report, stopped).
_RunOne = Callable[[str, str, dict[str, object]], tuple[Any, bool]]


def _stress_command(args: argparse.Namespace, console: Console, errors: Console) -> int:
    if args.stream:
        return _stream_command(args, console)
    config = _config(args)
    _check_writable(args.json, "--json")
    _check_writable(args.plot, "--plot")
    plt = _load_pyplot() if args.plot else None
    labels, skipped = _backends(args.backend)
    amount = f"{config.ops:,} ops" if config.ops else f"{config.duration:g} s"
    console.print(
        f"[bold]asyncdmabuf stress[/]: {config.tasks} tasks, {config.buffers} "
        f"buffers of {_size(config.buffer_size)}, {config.devices} devices, "
        f"exporter {config.exporter},",
        highlight=False,
    )
    console.print(
        f"map mode {config.map_mode}, map hold {config.map_hold * 1e6:g} µs, "
        f"{amount}, seed {config.seed}",
        highlight=False,
    )

    run_one: _RunOne = functools.partial(
        _run_shown,
        runner=run_stress,
        config=config,
        count=config.ops,
        unit="ops",
        shown=_stress_shown,
        console=console,
        quiet=args.quiet,
    )
    outcome = _run_backends(labels, run_one, console, _one_line)
    _print_reports(console, outcome.reports, quiet=args.quiet)
    if plt is not None and outcome.reports:
        _plot(plt, outcome.reports, args.plot)
    return _finish(console, outcome, skipped, args.json, args.plot if plt else None)


def _run_backends(
    labels: list[str],
    run_one: _RunOne,
    console: Console,
    one_line: Callable[[Any], str],
) -> _Outcome:
    """Run each backend in turn until one is interrupted or an error stops it."""
    outcome = _Outcome()
    for label in labels:
        backend, options = BACKENDS[label]
        try:
            report, stopped = run_one(label, backend, options)
        except KeyboardInterrupt:  # before the loop could catch the signal
            outcome.interrupted = True
            break
        except DmaBufError as exc:  # a failed check: the run could not go on
            outcome.error = f"{label}: {type(exc).__name__}: {exc}"
            break
        except BaseExceptionGroup as group:  # from a task group (trio)
            outcome.interrupted, outcome.error = _unwrap(group, label)
            break
        outcome.reports.append(report)
        console.print(one_line(report), highlight=False)
        if stopped:
            outcome.interrupted = True
            break
    return outcome


def _finish(
    console: Console,
    outcome: _Outcome,
    skipped: list[str],
    json_path: Path | None,
    plot_path: Path | None,
) -> int:
    """Write the JSON, print the verdict, and return the exit status."""
    for note in skipped:
        console.print(f"skipped: {note}", highlight=False)
    if json_path:
        _write_json(json_path, outcome)
        console.print(f"wrote {json_path}", highlight=False)
    if plot_path is not None and outcome.reports:
        console.print(f"wrote {plot_path}", highlight=False)
    ok = outcome.error is None and all(r.ok for r in outcome.reports)
    if outcome.error is not None:
        console.print(
            f"[bold red]FAILED: an error stopped the run[/]: {escape(outcome.error)}"
        )
    elif not ok:
        console.print("[bold red]FAILED: an invariant did not hold[/]")
    if outcome.interrupted:
        console.print(
            "[bold yellow]interrupted[/]: the figures above are partial",
            highlight=False,
        )
        return EXIT_INTERRUPTED
    if ok:
        console.print("[bold green]every invariant held[/]")
    return EXIT_OK if ok else EXIT_FAILED


def _unwrap(
    group: BaseExceptionGroup[BaseException], label: str
) -> tuple[bool, str | None]:
    """Whether ``group`` holds an interrupt, and its first DmaBufError.

    Raises:
        BaseExceptionGroup: It holds anything else (a bug: the traceback).
    """
    interrupts, rest = group.split(KeyboardInterrupt)
    found, rest = rest.split(DmaBufError) if rest is not None else (None, None)
    if rest is not None:
        raise group
    error = None
    if found is not None:
        first = found.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        error = f"{label}: {type(first).__name__}: {first}"
    return interrupts is not None, error


def _write_json(path: Path, outcome: _Outcome) -> None:
    data = {
        "ok": outcome.error is None and all(r.ok for r in outcome.reports),
        "interrupted": outcome.interrupted,
        "error": outcome.error,
        "units": "durations *_s in seconds, latencies *_us in microseconds, "
        "sizes *_bytes in bytes",
        "runs": [r.to_dict() for r in outcome.reports],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


class _Countdown(ProgressColumn):
    """Seconds done of the total, for a run given a ``--duration``."""

    def render(self, task: Any) -> str:
        return f"{task.completed:.0f}/{task.total:.0f} s"


def _progress(label: str, console: Console, timed: bool, live: bool) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn(f"[bold]{label:<8}[/]"),
        BarColumn(bar_width=20),
        _Countdown() if timed else MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        transient=True,
        disable=not live,
    )


def _stress_shown(p: StressProgress) -> tuple[int, str]:
    """A stress run's progress: operations done, and its statistics."""
    return p.ops_done, f"busy {p.busy:,} cancelled {p.cancellations:,}"


def _run_shown(
    label: str,
    backend: str,
    options: dict[str, object],
    *,
    runner: Callable[..., Any],
    config: Any,
    count: int | None,
    unit: str,
    shown: Callable[[Any], tuple[int, str]],
    console: Console,
    quiet: bool,
) -> tuple[Any, bool]:
    """Run ``runner`` on one backend, its progress shown.

    Args:
        label: The backend's label.
        backend: The anyio backend.
        options: Its options.
        runner: ``run_stress`` or ``run_stream``.
        config: The run's configuration.
        count: How many ``unit`` it does, or None for ``config.duration``.
        unit: What it counts (``ops``, ``frames``).
        shown: The count done and the statistics, from a progress record.
        console: Where the progress goes: a live bar on a terminal, else a
            line a second.
        quiet: No progress at all.

    Returns:
        The report, and whether a signal stopped the run.
    """
    timed = count is None
    live = not quiet and console.is_terminal
    progress = _progress(label, console, timed, live)
    total = config.duration if timed else count
    printed = [-1.0]  # when the last plain progress line was printed
    with progress:
        task: TaskID = progress.add_task(label, total=total, stats="")

        def monitor(p: Any) -> None:
            done_count, stats = shown(p)
            done = min(p.elapsed, total or 0.0) if timed else done_count
            progress.update(task, completed=done, stats=stats)
            if not live and not quiet and p.elapsed - printed[0] >= 1.0:
                printed[0] = p.elapsed
                console.print(
                    f"{label}: {done_count:,} {unit} in {p.elapsed:.1f} s, {stats}",
                    highlight=False,
                )

        return anyio.run(
            _with_signals,
            runner,
            config,
            monitor,
            backend=backend,
            backend_options=options,
        )


async def _with_signals(
    runner: Callable[..., Any], config: Any, monitor: Callable[[Any], object]
) -> tuple[Any, bool]:
    """Run ``runner``; SIGINT or SIGTERM stops it early (the report still comes)."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(_stop_on_signal, stop)
        report = await runner(config, monitor=monitor, stop=stop)
        tg.cancel_scope.cancel()
    return report, stop.is_set()


async def _stop_on_signal(
    stop: anyio.Event, *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            stop.set()


# -- stress: the report ----------------------------------------------------------------


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def _served(r: StressReport) -> str:
    if not r.try_maps:
        return "-"
    return f"{100 * (r.try_maps - r.busy) / r.try_maps:.1f}"


def _verdict(r: StressReport | StreamReport) -> str:
    if r.interrupted:
        return "interrupted" if r.ok else "FAILED"
    return "ok" if r.ok else "FAILED"


def _one_line(r: StressReport) -> str:
    return (
        f"{r.backend}: {r.ops:,} ops in {r.elapsed:.2f} s, "
        f"{r.ops_per_second:,.0f} ops/s, Busy {r.busy:,}, "
        f"cancelled {r.cancellations:,}: {_verdict(r)}"
    )


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    return table


def _figures(reports: list[StressReport]) -> Table:
    base = reports[0]
    table = _table("what happened", "", *(r.backend for r in reports))

    def row(name: str, cell: Callable[[StressReport], str]) -> None:
        table.add_row(name, *(cell(r) for r in reports))

    row("operations (1)", lambda r: f"{r.ops:,}")
    row("elapsed, s", lambda r: f"{r.elapsed:.2f}")
    row("throughput, ops/s", lambda r: f"{r.ops_per_second:,.0f}")
    if len(reports) > 1:
        row(
            f"vs {base.backend}",
            lambda r: (
                f"{r.ops_per_second / base.ops_per_second:.2f}x"
                if base.ops_per_second
                else "-"
            ),
        )
    row("blocking maps (2)", lambda r: f"{r.maps:,}")
    row("try_map calls (2)", lambda r: f"{r.try_maps:,}")
    row("  of them Busy", lambda r: f"{r.busy:,}")
    row("  served, %", _served)
    row("cancelled maps", lambda r: f"{r.cancellations:,}")
    row("faults met / injected", lambda r: f"{r.faults:,} / {r.faults_injected:,}")
    row("evictions (move_notify)", lambda r: f"{r.evictions:,} ({r.move_notifies:,})")
    row("try ops abandoned (3)", lambda r: f"{r.abandoned:,}")
    row("try_cpu_access / Busy", lambda r: f"{r.cpu_tried:,} / {r.cpu_busy:,}")
    row("MiB verified", lambda r: f"{r.bytes_verified / (1 << 20):,.0f}")
    row("verdict", _verdict)
    return table


def _latency(reports: list[StressReport]) -> Table:
    table = _table(
        "latency, µs: a blocking map is lock wait + exporter + scheduler",
        "",
        "",
        "mean",
        "p50",
        "p90",
        "p99",
        "max",
    )
    for r in reports:
        parts = [
            ("map", r.map_latency),
            ("lock wait", r.lock_wait),
            ("exporter", r.exporter_time),
            ("scheduler", r.scheduler_delay),
            ("try_map", r.try_map_latency),
        ]
        for i, (name, s) in enumerate(parts):
            if name not in ("map", "try_map") and not s.count:
                continue
            table.add_row(
                r.backend if i == 0 else "",
                name,
                *(_us(getattr(s, q)) for q in ("mean", "p50", "p90", "p99", "max")),
                end_section=i == len(parts) - 1 and r is not reports[-1],
            )
    return table


def _invariants(reports: Sequence[StressReport | StreamReport]) -> Table:
    if len(reports) == 1:
        table = _table("invariants", "invariant", "held", "evidence")
        table.columns[1].justify = "left"
        table.columns[2].justify = "left"
        table.columns[2].no_wrap = False
        for inv in reports[0].invariants:
            held = "[green]yes[/]" if inv.ok else "[bold red]NO[/]"
            table.add_row(inv.name, held, escape(inv.detail))
        return table
    table = _table("invariants held", "invariant", *(r.backend for r in reports))
    for i, inv in enumerate(reports[0].invariants):
        cells = []
        for r in reports:
            ok = r.invariants[i].ok if i < len(r.invariants) else False
            cells.append("[green]yes[/]" if ok else "[bold red]NO[/]")
        table.add_row(inv.name, *cells)
    return table


_FOOTNOTES = (
    "(1) whole operations: attach, map, check and write, unmap, detach of "
    "--maps-per-op buffers each; abandoned ones included.",
    "(2) each buffer an operation maps is one blocking map or one served "
    "try_map; a Busy try_map and a cancelled map are retried, and in try mode "
    "a Busy gives back what the operation held and maps it again, so the two "
    "counts add up to more than operations x --maps-per-op.",
    f"(3) try operations that met Busy {MAX_TRY_ROUNDS} rounds in a row and "
    "gave up, mapping nothing (counted in operations).",
)


def _print_reports(
    console: Console, reports: list[StressReport], *, quiet: bool
) -> None:
    if not reports:
        return
    if not quiet:
        console.print(_figures(reports))
        for note in _FOOTNOTES:
            console.print(note, highlight=False, style="dim")
        console.print(_latency(reports))
        console.print(_invariants(reports))
    _print_findings(console, reports, quiet=quiet)


def _print_findings(
    console: Console, reports: Sequence[StressReport | StreamReport], *, quiet: bool
) -> None:
    """The invariants that failed, the notes, and who waited for what."""
    for r in reports:
        if len(reports) > 1 or quiet:
            for inv in r.invariants:
                if not inv.ok:
                    console.print(
                        f"  {r.backend}: {inv.name}: {escape(inv.detail)}",
                        highlight=False,
                    )
        if not quiet:
            for note in r.notes:
                console.print(f"note ({r.backend}): {escape(note)}", highlight=False)
        if r.hang_report:
            title = "hung" if r.hung else "stuck when interrupted"
            console.print(
                f"[bold red]{title}[/] ({r.backend}): who waits for what",
                highlight=False,
            )
            for line in r.hang_report:
                console.print(line, highlight=False, markup=False)


# -- stress --stream ------------------------------------------------------------------


def _stream_command(args: argparse.Namespace, console: Console) -> int:
    config = _stream_config(args)
    _check_writable(args.json, "--json")
    labels, skipped = _backends(args.backend)
    modes = ", ".join(
        overflow_of(config.overflow, i) for i in range(min(config.subscribers, 2))
    )
    if config.subscribers > 2:
        modes += ", ..."
    amount = f"{config.frames:,} frames" if config.frames else f"{config.duration:g} s"
    console.print(
        f"[bold]asyncdmabuf stress --stream[/]: {config.subscribers} subscriber "
        f"processes ({modes}),",
        highlight=False,
    )
    console.print(
        f"queue {config.queue}, {config.buffers} buffers of {config.shape} "
        f"({_bytes(config.buffer_size)}), exporter {config.exporter}, {amount},",
        highlight=False,
    )
    kill = (
        f"; subscriber 0 SIGKILLed holding frames after {config.kill_after:,}"
        if config.kill_after is not None
        else ""
    )
    console.print(
        f"fences both ways, every byte of every frame compared{kill}",
        highlight=False,
    )

    run_one: _RunOne = functools.partial(
        _run_shown,
        runner=run_stream,
        config=config,
        count=config.frames,
        unit="frames",
        shown=_stream_shown,
        console=console,
        quiet=args.quiet,
    )
    outcome = _run_backends(labels, run_one, console, _stream_one_line)
    if outcome.reports:
        if not args.quiet:
            console.print(_stream_figures(outcome.reports))
            console.print(_subscriber_table(outcome.reports))
            killed = any(r.config.kill_after is not None for r in outcome.reports)
            for note in _STREAM_FOOTNOTES[: 2 if killed else 1]:
                console.print(note, highlight=False, style="dim")
            console.print(_invariants(outcome.reports))
        _print_findings(console, outcome.reports, quiet=args.quiet)
    return _finish(console, outcome, skipped, args.json, None)


def _stream_shown(p: StreamProgress) -> tuple[int, str]:
    """A stream run's progress: frames sent, and its statistics."""
    return p.frames_sent, f"{p.subscribers} subscribers, dropped {p.dropped:,}"


def _bytes(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):,.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):,.1f} KiB"
    return f"{n} B"


def _stream_one_line(r: StreamReport) -> str:
    return (
        f"{r.backend}: {r.frames_sent:,} frames in {r.elapsed:.2f} s, "
        f"{r.frames_per_second:,.0f} frames/s to {len(r.subscribers)} "
        f"subscribers, dropped {r.frames_dropped:,}: {_verdict(r)}"
    )


def _stream_figures(reports: list[StreamReport]) -> Table:
    table = _table("the publisher", "", *(r.backend for r in reports))

    def row(name: str, cell: Callable[[StreamReport], str]) -> None:
        table.add_row(name, *(cell(r) for r in reports))

    row("frames sent", lambda r: f"{r.frames_sent:,}")
    row("elapsed, s", lambda r: f"{r.elapsed:.2f}")
    row("frames/s", lambda r: f"{r.frames_per_second:,.0f}")
    row("MiB/s to each subscriber", lambda r: _mib_rate(r))
    row("frames dropped (1)", lambda r: f"{r.frames_dropped:,}")
    row("loan() wait p50/p99, µs", lambda r: _pair(r.loan_wait))
    row("send() p50/p99, µs", lambda r: _pair(r.send_time))
    if any(r.config.kill_after is not None for r in reports):
        row("sent after the kill (2)", lambda r: f"{r.sent_after_kill:,}")
    row("verdict", _verdict)
    return table


def _mib_rate(r: StreamReport) -> str:
    return f"{r.frames_per_second * r.config.buffer_size / (1 << 20):,.0f}"


def _pair(s: LatencySummary) -> str:
    return f"{s.p50 * 1e6:,.0f} / {s.p99 * 1e6:,.0f}"


def _subscriber_table(reports: list[StreamReport]) -> Table:
    table = _table(
        "subscribers: latency is send() to the release fence signalled, µs",
        "",
        "sub",
        "overflow",
        "frames",
        "fps",
        "drops",
        "p50",
        "p99",
        "max",
    )
    for r in reports:
        for i, s in enumerate(r.subscribers):
            table.add_row(
                r.backend if i == 0 else "",
                f"{s.index}*" if s.killed else str(s.index),
                s.overflow,
                f"{s.received:,}",
                f"{s.frames_per_second:,.0f}",
                f"{s.gaps:,}",
                *(f"{getattr(s.latency, q) * 1e6:,.0f}" for q in ("p50", "p99", "max")),
                end_section=i == len(r.subscribers) - 1 and r is not reports[-1],
            )
    return table


_STREAM_FOOTNOTES = (
    "(1) by drop-oldest subscribers' queues; a subscriber's drops are the seq "
    "gaps it saw, which must equal what the publisher dropped for it.",
    "(2) frames the publisher sent after SIGKILLing subscriber 0 (marked *) "
    "while it held frames; their buffers must all come back.",
)


def _plot(plt: Any, reports: list[StressReport], path: Path) -> None:
    """Latency distributions (map, try_map) and throughput, per backend."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _draw(plt, reports, path)


def _draw(plt: Any, reports: list[StressReport], path: Path) -> None:
    fig, (ax_map, ax_try, ax_ops) = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, attr, title in (
        (ax_map, "map_latency", "map() latency"),
        (ax_try, "try_map_latency", "try_map() latency"),
    ):
        drawn = False
        for r in reports:
            summary = getattr(r, attr)
            if not summary.count:
                continue
            q = summary.quantiles
            xs = [max(v * 1e6, 1e-3) for v in q]
            ys = [i / (len(q) - 1) for i in range(len(q))]
            ax.step(xs, ys, where="post", label=f"{r.backend} ({_verdict(r)})")
            drawn = True
        if drawn:
            ax.set_xscale("log")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no calls", ha="center", va="center")
        ax.set_xlabel("µs")
        ax.set_ylabel("fraction of calls")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    names = [r.backend for r in reports]
    colors = ["tab:blue" if r.ok else "tab:red" for r in reports]
    ax_ops.bar(names, [r.ops_per_second for r in reports], color=colors)
    ax_ops.set_title("throughput")
    ax_ops.set_ylabel("operations / s")
    failed = [r.backend for r in reports if not r.ok]
    title = (
        f"asyncdmabuf stress: {reports[0].exporter}, {reports[0].config.tasks} tasks"
    )
    if failed:
        title = f"FAILED ({', '.join(failed)}): {title}"
    elif any(r.interrupted for r in reports):
        title = f"interrupted: {title}"
    fig.suptitle(title, color="tab:red" if failed else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- bench -----------------------------------------------------------------------------


def _bench_command(args: argparse.Namespace, console: Console, errors: Console) -> int:
    from ._bench import run_bench

    _check_writable(args.json, "--json")
    return run_bench(
        console,
        quick=args.quick,
        json_path=args.json,
        strict=args.strict,
        only=args.only,
    )
