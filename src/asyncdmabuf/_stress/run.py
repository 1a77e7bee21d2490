"""A stress run from start to verdict: :func:`run_stress`."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from .._backends import current_loop_label
from .._exporter import Exporter
from .._stats import device_statistics
from .config import StressConfig, injects_faults, run_exporter
from .instrument import instrumented
from .report import LatencySummary, StressProgress, StressReport
from .verdict import detach_leftovers, judge, memfds, put_all
from .watchdog import monitor as run_monitor
from .watchdog import watchdog, who_waits
from .workload import Run, final_check, worker

__all__ = ["run_stress"]

#: How long without a completed operation makes an interrupted run say who
#: waits for what.
STUCK_SECONDS = 1.0

#: How many Busy reasons a report keeps.
BUSY_REASONS = 5


async def run_stress(
    config: StressConfig,
    *,
    exporter: Exporter | None = None,
    monitor: Callable[[StressProgress], object] | None = None,
    monitor_interval: float = 0.1,
    stop: anyio.Event | None = None,
) -> StressReport:
    """Run the stress workload on the current event loop and judge it.

    Args:
        config: What to run.
        exporter: Use this exporter instead of building ``config.exporter``.
        monitor: Called every ``monitor_interval`` seconds with the progress.
        monitor_interval: Seconds between monitor calls.
        stop: When set, the workers are cancelled and the run ends early
            (cleaned up and judged as usual); the report says ``interrupted``
            and, if an operation had been waiting for a second or more, who
            waits for what.

    Returns:
        The report; ``report.ok`` tells whether every invariant held.

    Raises:
        InvalidArgument: The exporter cannot be built, or has no ``allocate``.
        OutOfMemory: The buffers cannot be allocated.
    """
    exporter, allocator = run_exporter(config, exporter)
    backend = current_loop_label() or "none"
    fds_before = memfds()
    run = Run(config, exporter)
    stats_before = device_statistics(exporter)
    notes: list[str] = []
    if config.fault_rate and not injects_faults(exporter):
        notes.append(f"exporter {exporter.name!r} injects no faults: fault_rate unused")
    if config.verify and not run.verifiable:
        notes.append(f"exporter {exporter.name!r} has no CPU view: bytes not checked")
    leftovers: tuple[int, int] = (0, 0)
    elapsed = 0.0
    try:
        for i in range(config.buffers):
            run.buffers.append(
                await allocator.allocate(config.buffer_size, name=f"stress-{i}")
            )
        run.started = run.last_progress = anyio.current_time()
        if config.ops is None:
            assert config.duration is not None
            run.deadline = run.started + config.duration
        start = time.perf_counter()
        with instrumented(exporter, run.stamps, config.map_hold) as measured:
            await _run_workers(run, monitor, monitor_interval, stop)
        if not measured:
            notes.append(
                f"exporter {exporter.name!r} could not be instrumented: "
                "no map hold, no latency breakdown"
            )
        elapsed = time.perf_counter() - start
        leftovers = await detach_leftovers(run)
        if run.verifiable:
            await final_check(run)
    finally:
        with anyio.CancelScope(shield=True):
            put_errors = await put_all(run)
    stats_after = device_statistics(exporter)
    invariants = judge(run, leftovers, put_errors, fds_before, stats_after)
    faults_injected = evictions = 0
    if stats_after is not None and stats_before is not None:
        faults_injected = stats_after.faults_injected - stats_before.faults_injected
        evictions = stats_after.evictions - stats_before.evictions
    return StressReport(
        config=config,
        backend=backend,
        exporter=exporter.name,
        elapsed=elapsed,
        ops=run.ops_done,
        ops_per_second=run.ops_done / elapsed if elapsed > 0 else 0.0,
        abandoned=run.abandoned,
        maps=run.maps,
        try_maps=run.try_maps,
        busy=run.busy,
        cancellations=run.cancellations,
        faults=run.faults,
        faults_injected=faults_injected,
        errors=tuple(run.errors),
        evictions=evictions,
        move_notifies=run.move_notifies,
        bytes_verified=run.bytes_verified,
        mismatches=run.mismatches,
        map_latency=LatencySummary.of(run.map_latency),
        try_map_latency=LatencySummary.of(run.try_latency),
        lock_wait=LatencySummary.of(run.lock_wait),
        exporter_time=LatencySummary.of(run.exporter_time),
        scheduler_delay=LatencySummary.of(run.scheduler_delay),
        invariants=invariants,
        hung=run.hung,
        interrupted=run.interrupted,
        hang_report=run.hang_report,
        notes=tuple(notes + _busy_notes(run)),
        busy_reasons=tuple(run.busy_reasons.most_common(BUSY_REASONS)),
        cpu_tried=run.cpu_tried,
        cpu_busy=run.cpu_busy,
    )


async def _run_workers(
    run: Run,
    monitor: Callable[[StressProgress], object] | None,
    monitor_interval: float,
    stop: anyio.Event | None,
) -> None:
    """Run the workers, with the watchdog, the monitor and ``stop`` beside them."""
    async with anyio.create_task_group() as tg:
        if stop is not None:
            tg.start_soon(_stop_on, run, stop, name="stress-stop")
        if run.config.watchdog:
            tg.start_soon(
                watchdog,
                run,
                run.config.watchdog,
                who_waits,
                run.workers_scope.cancel,
                name="stress-watchdog",
            )
        if monitor is not None:
            tg.start_soon(
                run_monitor,
                run.progress,
                monitor,
                monitor_interval,
                name="stress-monitor",
            )
        with run.workers_scope:
            async with anyio.create_task_group() as workers:
                for task in run.tasks:
                    workers.start_soon(worker, run, task, name=task.name)
        tg.cancel_scope.cancel()


async def _stop_on(run: Run, stop: anyio.Event) -> None:
    await stop.wait()
    run.interrupted = True
    idle = anyio.current_time() - run.last_progress
    if idle >= STUCK_SECONDS and not run.hang_report:
        run.hang_report = who_waits(run, idle)
    run.workers_scope.cancel()


def _busy_notes(run: Run) -> list[str]:
    """Say why ``try_map`` was Busy when it mostly was (issue 12.20)."""
    if not run.busy or run.busy * 2 < run.try_maps:
        return []
    reason, count = run.busy_reasons.most_common(1)[0]
    return [
        f"{run.busy:,} of {run.try_maps:,} try_map calls were Busy; most often "
        f"({count:,}): {reason}"
    ]
