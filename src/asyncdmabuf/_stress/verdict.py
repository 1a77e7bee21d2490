"""The verdict: the invariants a run must leave holding."""

from __future__ import annotations

import warnings

import anyio

from .._buffer import live_buffers
from .._errors import DmaBufError
from .._stats import DeviceStatistics
from .report import Invariant
from .stream import fd_table
from .watchdog import no_hang
from .workload import Run

__all__ = ["detach_leftovers", "judge", "memfds", "put_all"]


def memfds() -> set[str]:
    """The fds of this process that are memfds, as ``fd -> target`` strings."""
    return {
        f"{fd} -> {target}"
        for fd, target in fd_table().items()
        if target.startswith("/memfd:")
    }


async def detach_leftovers(run: Run) -> tuple[int, int]:
    """Count (and undo) attachments and mappings the workers left behind."""
    attachments = mappings = 0
    with anyio.CancelScope(shield=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for buf in run.buffers:
            for att in buf.attachments:
                attachments += 1
                mappings += len(att.mappings)
                try:
                    await att.detach()
                except DmaBufError as exc:
                    run.failed(exc)
    return attachments, mappings


async def put_all(run: Run) -> list[str]:
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for buf in run.buffers:
            if buf.released:
                continue
            try:
                await buf.put()
            except DmaBufError as exc:
                errors.append(f"{buf.name}: {exc}")
    return errors


def judge(
    run: Run,
    leftovers: tuple[int, int],
    put_errors: list[str],
    fds_before: set[str],
    stats: DeviceStatistics | None,
) -> tuple[Invariant, ...]:
    attachments, mappings = leftovers
    ours = {id(buf) for buf in run.buffers}
    live = [buf for buf in live_buffers() if id(buf) in ours]
    new_fds = sorted(memfds() - fds_before)
    checks = [
        no_hang(run, run.config.watchdog, "an operation completed"),
        Invariant("no live mapping", mappings == 0, f"{mappings} left mapped"),
        Invariant(
            "no live attachment", attachments == 0, f"{attachments} left attached"
        ),
        Invariant(
            "no buffer left",
            not live and not put_errors,
            f"{len(live)} of {len(run.buffers)} still live"
            + (f"; put failed: {put_errors[0]}" if put_errors else ""),
        ),
        Invariant(
            "no fd left",
            not new_fds,
            f"{len(new_fds)} memfd(s) still open"
            + (f": {new_fds[0]}" if new_fds else ""),
        ),
    ]
    if stats is not None:
        clean = not (stats.memory_in_use or stats.memory_pinned or stats.waiters)
        checks.append(
            Invariant(
                "no device memory left",
                clean,
                f"{stats.memory_in_use} bytes in use, {stats.memory_pinned} pinned, "
                f"{stats.waiters} waiters",
            )
        )
    else:
        checks.append(
            Invariant(
                "no device memory left", True, "not checked (no device statistics)"
            )
        )
    if run.verifiable:
        checks.append(
            Invariant(
                "bytes intact",
                run.mismatches == 0,
                f"{run.bytes_verified:,} bytes read back"
                + (
                    f"; {run.mismatches} mismatch(es), first: {run.mismatch_detail}"
                    if run.mismatches
                    else ", every one as written"
                ),
            )
        )
    else:
        checks.append(Invariant("bytes intact", True, "not checked (no CPU view)"))
    checks.append(
        Invariant(
            "no unexpected error",
            not run.errors,
            run.errors[0] if run.errors else f"{run.faults} injected fault(s) only",
        )
    )
    return tuple(checks)
