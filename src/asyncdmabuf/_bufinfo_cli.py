"""``asyncdmabuf bufinfo``: the machine's buffers, as a table or as JSON.

:mod:`._sysinfo` reads ``/proc``; this module checks the arguments, renders the
result and picks the exit status: 0 done, 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._sysinfo import SysBuffer, SysInfo, scan

__all__ = ["add_arguments", "bufinfo_command", "render", "to_json"]

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130
#: The version of the JSON document's layout.
SCHEMA = "asyncdmabuf.bufinfo/1"
_PID_MAX = 2**22  # the kernel's PID_MAX_LIMIT


def _pid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 0 < value <= _PID_MAX:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return value


def _width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 40 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"a width is 40 to 1000 columns, not {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``bufinfo``'s options to its subparser."""
    parser.add_argument(
        "--pid",
        dest="pids",
        type=_pid,
        nargs="+",
        action="extend",
        metavar="PID",
        help="look at these processes only (their buffers' other holders are "
        "not looked for)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON document instead of tables"
    )
    parser.add_argument(
        "--width",
        type=_width,
        metavar="COLUMNS",
        help="draw the tables this wide (default: the terminal's, 80 if none)",
    )


def bufinfo_command(args: argparse.Namespace, console: Console, errors: Console) -> int:
    """Scan ``/proc`` and print what it holds; return the exit status.

    ``errors`` is the console for one-line errors (standard error).
    """
    pids: Sequence[int] | None = args.pids
    try:
        missing = [p for p in pids or () if not os.path.exists(f"/proc/{p}")]
        if missing:
            word = "process" if len(missing) == 1 else "processes"
            errors.print(
                f"[bold red]error:[/] no {word} {', '.join(map(str, missing))}",
                highlight=False,
            )
            return EXIT_USAGE
        try:
            info = scan(pids)
        except OSError as exc:  # /proc itself: not mounted, or hidden from us
            errors.print(f"[bold red]error:[/] cannot read /proc: {escape(str(exc))}")
            return EXIT_USAGE
        if args.json:
            sys.stdout.write(json.dumps(to_json(info, pids), indent=2) + "\n")
        else:
            if args.width is not None:
                console = Console(width=args.width)
            render(console, info)
    except KeyboardInterrupt:
        errors.print("interrupted", highlight=False)
        return EXIT_INTERRUPTED
    return EXIT_OK


# -- JSON ------------------------------------------------------------------------------


def _buffer_json(b: SysBuffer) -> dict[str, Any]:
    return {
        "st_dev": b.dev,
        "inode": b.inode,
        "kind": b.kind,
        "size_bytes": b.size,
        "name": b.name,
        "exporter": b.exporter,
        "holders": [
            {"pid": h.pid, "fd": h.fd, "writable": h.writable} for h in b.holders
        ],
        "mappings": [
            {
                "pid": m.pid,
                "start": m.start,
                "end": m.end,
                "size_bytes": m.size,
                "perms": m.perms,
            }
            for m in b.mappings
        ],
    }


def to_json(info: SysInfo, pids: Sequence[int] | None = None) -> dict[str, Any]:
    """Return the scan as the JSON document ``--json`` prints (layout :data:`SCHEMA`).

    Sizes are in bytes, in keys ending ``_bytes``; an unknown size is null.
    """
    return {
        "schema": SCHEMA,
        "pids": sorted(set(pids)) if pids is not None else None,
        "scanned_processes": info.scanned,
        "buffers": [_buffer_json(b) for b in info.buffers],
        "processes": [
            {
                "pid": p.pid,
                "command": p.command,
                "fds": p.fds,
                "buffers": p.buffers,
                "held_bytes": p.held_bytes,
                "mapped_bytes": p.mapped_bytes,
                "total_bytes": p.total_bytes,
            }
            for p in info.processes
        ],
        "uninspected": [
            {"pid": u.pid, "reason": u.reason, "detail": u.detail}
            for u in info.uninspected
        ],
        "totals": {
            "buffers": len(info.buffers),
            "size_bytes": info.total_bytes,
            "uninspected_processes": len(info.uninspected),
        },
    }


# -- tables ----------------------------------------------------------------------------


def human_size(n: int | None) -> str:
    """``4096`` -> ``4 KiB``, ``1536`` -> ``1.5 KiB``; None -> ``?``."""
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            exact = n % scale == 0
            return (f"{n // scale}" if exact else f"{n / scale:.1f}") + f" {unit}"
    return f"{n} B"


def _holders(b: SysBuffer) -> str:
    fds: dict[int, list[str]] = {}
    for h in b.holders:
        fds.setdefault(h.pid, []).append(str(h.fd) + ("" if h.writable else "r"))
    return " ".join(f"{pid}:{','.join(v)}" for pid, v in fds.items()) or "-"


def _mappers(b: SysBuffer) -> str:
    counts: dict[int, int] = {}
    for m in b.mappings:
        counts[m.pid] = counts.get(m.pid, 0) + 1
    return " ".join(f"{p}×{n}" if n > 1 else str(p) for p, n in counts.items()) or "-"


def _table(title: str, headers: Sequence[tuple[str, bool]]) -> Table:
    """A compact table; no header ever wraps (each column is at least its width)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
    for header, right in headers:
        table.add_column(
            header,
            justify="right" if right else "left",
            min_width=len(header),
            overflow="fold",
        )
    return table


def render(console: Console, info: SysInfo) -> None:
    """Print the buffers, the per-process totals and the footer."""
    if info.buffers:
        buffers = _table(
            "buffers",
            [
                ("inode", True),
                ("size", True),
                ("name", False),
                ("exporter", False),
                ("held by pid:fd", False),
                ("mapped by", False),
            ],
        )
        for b in info.buffers:
            exporter = b.exporter or "?"
            buffers.add_row(
                str(b.inode),
                human_size(b.size),
                escape(b.name or "<none>"),
                escape(exporter if b.kind == "memfd" else f"{exporter} (kernel)"),
                _holders(b),
                _mappers(b),
            )
        console.print(buffers)
        console.print(
            "[dim]an fd marked r is read-only; ×N: mapped N times[/]", highlight=False
        )
    if info.processes:
        procs = _table(
            "per process",
            [
                ("pid", True),
                ("command", False),
                ("fds", True),
                ("buffers", True),
                ("held", True),
                ("mapped", True),
                ("total", True),
            ],
        )
        for p in info.processes:
            procs.add_row(
                str(p.pid),
                escape(p.command),
                str(p.fds),
                str(p.buffers),
                human_size(p.held_bytes),
                human_size(p.mapped_bytes),
                human_size(p.total_bytes),
            )
        console.print(procs)
    console.print(footer(info), highlight=False, markup=False)


def footer(info: SysInfo) -> str:
    """The summary lines: objects and bytes in total, the processes not inspected."""
    objects = len(info.buffers)
    lines = [
        f"{objects} {'object' if objects == 1 else 'objects'}, "
        f"{info.total_bytes:,} bytes ({human_size(info.total_bytes)}) in total, "
        f"in {info.scanned} processes scanned"
    ]
    if info.uninspected:
        by_reason: dict[str, list[str]] = {}
        for u in info.uninspected:
            by_reason.setdefault(u.reason, []).append(str(u.pid))
        count = len(info.uninspected)
        lines.append(
            f"{count} {'process' if count == 1 else 'processes'} could not be "
            "inspected: "
            + "; ".join(f"{r} {', '.join(p)}" for r, p in sorted(by_reason.items()))
        )
    return "\n".join(lines)
