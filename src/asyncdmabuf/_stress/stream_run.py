"""A stream run from start to verdict: :func:`run_stream`.

This process is the publisher: it binds a stream on an abstract UNIX socket,
starts the subscriber processes (:mod:`.stream_child`) with a control socket
each, and once every one has subscribed, loans, sends and fills frames: it
``send``\\ s each frame with an acquire fence *first*, then writes the frame's
pattern and signals the fence. At the end it loans every buffer of the pool
back (which proves each came back), closes the stream, collects the
subscribers' reports, reaps them, and judges. Only the public stream API is
used.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any, final

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from .._backends import current_loop_label
from .._buffer import DmaBuf, live_buffers
from .._errors import DmaBufError
from .._exporter import Exporter
from .._fence import Fence
from .._stream import Frame, Publisher
from .config import run_exporter
from .report import Invariant, LatencySummary
from .stream import (
    MAX_LINE,
    StreamConfig,
    StreamProgress,
    StreamReport,
    SubscriberReport,
    fd_table,
    fds_left,
    fill_pattern,
    overflow_of,
)
from .watchdog import monitor as run_monitor
from .watchdog import no_hang, watchdog

__all__ = ["run_stream"]

#: Seconds a subscriber process has to start and subscribe.
READY_SECONDS = 60.0
#: Seconds the subscribers have, once the stream ends, to report and exit.
END_SECONDS = 30.0
#: Seconds a cancelled run has to fill the frame it was sending.
CLEANUP_SECONDS = 30.0
#: Seconds an interrupted run waits for its buffers to come back.
DRAIN_SECONDS = 5.0


@final
class Child:
    """One subscriber process, and what it said."""

    __slots__ = (
        "ended",
        "facts",
        "failed",
        "held_at_kill",
        "index",
        "killed",
        "overflow",
        "proc",
        "ready",
        "started",
        "stopped",
        "stream",
    )

    def __init__(
        self,
        index: int,
        overflow: str,
        proc: anyio.abc.Process,
        stream: anyio.abc.SocketStream,
    ) -> None:
        self.index = index
        self.overflow = overflow
        self.proc = proc
        self.stream = stream
        self.ready = anyio.Event()
        self.ended = anyio.Event()  # its report came, or its socket closed
        self.started = False
        self.facts: dict[str, Any] = {}
        self.failed: str | None = None
        self.killed = False
        self.held_at_kill: tuple[str, ...] = ()
        self.stopped = 0.0  # when it was killed (for its rate)


@final
class StreamRun:
    """The state of one stream run."""

    __slots__ = (
        "active",
        "children",
        "clock",
        "config",
        "deadline",
        "drained",
        "dropped",
        "errors",
        "hang_report",
        "hung",
        "interrupted",
        "kill_at",
        "last_progress",
        "loan_wait",
        "pub",
        "reused",
        "send_time",
        "sent",
        "sent_at_kill",
        "started",
        "victim_buffers",
        "waiting",
    )

    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.clock = time.perf_counter
        self.pub: Publisher | None = None
        self.children: list[Child] = []
        self.sent = 0
        self.started = self.last_progress = anyio.current_time()
        self.deadline = float("inf")
        self.loan_wait: array[float] = array("d")
        self.send_time: array[float] = array("d")
        self.errors: list[str] = []
        self.hung = self.interrupted = self.drained = False
        self.hang_report: tuple[str, ...] = ()
        self.active = anyio.CancelScope()
        self.waiting = "starting"
        #: The publisher's drop count per subscriber pid, read at the end.
        self.dropped: dict[int, int] = {}
        self.kill_at: float | None = None
        self.sent_at_kill = 0
        self.victim_buffers: tuple[str, ...] = ()
        #: Buffers loaned after the kill.
        self.reused: set[str] = set()

    def claim(self) -> bool:
        if self.config.frames is not None:
            return self.sent < self.config.frames
        return anyio.current_time() < self.deadline

    def progressed(self) -> None:
        self.last_progress = anyio.current_time()

    def progress(self) -> StreamProgress:
        stats = self.pub.statistics() if self.pub is not None else None
        return StreamProgress(
            frames_sent=self.sent,
            frames_total=self.config.frames,
            elapsed=anyio.current_time() - self.started,
            duration=self.config.duration if self.config.frames is None else None,
            dropped=stats.frames_dropped if stats else 0,
            subscribers=stats.subscribers if stats else 0,
        )


async def run_stream(
    config: StreamConfig,
    *,
    exporter: Exporter | None = None,
    monitor: Callable[[StreamProgress], object] | None = None,
    monitor_interval: float = 0.1,
    stop: anyio.Event | None = None,
) -> StreamReport:
    """Run a stream to subscriber processes on the current event loop; judge it.

    Args:
        config: What to run.
        exporter: Use this exporter instead of building ``config.exporter``.
        monitor: Called every ``monitor_interval`` seconds with the progress.
        monitor_interval: Seconds between monitor calls.
        stop: When set, the run stops sending, takes its buffers back (for a
            few seconds at most), ends the stream and is judged as usual; the
            report says ``interrupted``.

    Returns:
        The report; ``report.ok`` tells whether every invariant held.

    Raises:
        InvalidArgument: The exporter cannot be built.
        DmaBufError: The stream cannot be set up (a bind, an allocation), or
            a subscriber process does not start.
    """
    exporter, allocator = run_exporter(config, exporter)
    backend = current_loop_label() or "none"
    path = f"@asyncdmabuf-stress-{os.getpid()}-{secrets.token_hex(6)}"
    fds_before = fd_table()
    buffers_before = {id(buf) for buf in live_buffers()}
    run = StreamRun(config)
    layout_or_size = config.layout if config.layout is not None else config.frame_size
    elapsed = 0.0
    try:
        async with anyio.create_task_group() as tg:
            pub = await Publisher.bind(
                path, allocator, layout_or_size, buffers=config.buffers
            )
            async with pub:
                run.pub = pub
                await _start_children(run, tg, path, backend)
                run.started = run.last_progress = anyio.current_time()
                if config.frames is None:
                    assert config.duration is not None
                    run.deadline = run.started + config.duration
                start = time.perf_counter()
                await _drive(run, monitor, monitor_interval, stop)
                elapsed = time.perf_counter() - start
                run.dropped = {s.pid: s.dropped for s in pub.subscribers}
            run.pub = None
            # The stream has ended: each subscriber reads to its end and reports.
            with anyio.move_on_after(END_SECONDS):
                for child in run.children:
                    await child.ended.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _reap(run)
    subscribers = tuple(
        _subscriber_report(run, child, elapsed) for child in run.children
    )
    invariants = _judge(run, subscribers, fds_before, buffers_before)
    notes = []
    killed = [c for c in run.children if c.killed]
    if config.kill_after is not None and run.kill_at is None and killed:
        notes.append(
            "subscriber 0 was killed at the end of the run, before it held "
            "frames: the run was too short for the kill to come mid-stream"
        )
    return StreamReport(
        config=config,
        backend=backend,
        exporter=exporter.name,
        elapsed=elapsed,
        frames_sent=run.sent,
        frames_per_second=run.sent / elapsed if elapsed > 0 else 0.0,
        frames_dropped=sum(run.dropped.values()),
        loan_wait=LatencySummary.of(run.loan_wait),
        send_time=LatencySummary.of(run.send_time),
        subscribers=subscribers,
        sent_after_kill=run.sent - run.sent_at_kill if run.kill_at is not None else 0,
        reused_after_kill=tuple(sorted(run.reused)),
        invariants=invariants,
        hung=run.hung,
        interrupted=run.interrupted,
        hang_report=run.hang_report,
        notes=tuple(notes),
    )


# -- the subscriber processes ---------------------------------------------------------


async def _spawn(index: int, spec: dict[str, Any]) -> Child:
    mine, theirs = socket.socketpair()
    with theirs:
        try:
            proc = await anyio.open_process(
                [
                    sys.executable,
                    "-m",
                    "asyncdmabuf._stress.stream_child",
                    str(theirs.fileno()),
                    json.dumps(spec),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,
            )
        except BaseException:
            mine.close()
            raise
    stream = await anyio.abc.UNIXSocketStream.from_socket(mine)
    return Child(index, spec["overflow"], proc, stream)


async def _start_children(
    run: StreamRun, tg: anyio.abc.TaskGroup, path: str, backend: str
) -> None:
    """Start every subscriber and wait until each has subscribed.

    Raises:
        DmaBufError: A subscriber exited, or did not subscribe in time.
    """
    config = run.config
    for index in range(config.subscribers):
        victim = index == 0 and config.kill_after is not None
        spec = {
            "path": path,
            "backend": backend,
            "queue": config.queue,
            "overflow": overflow_of(config.overflow, index),
            "hold_after": config.kill_after if victim else None,
            "hold_count": max(1, config.buffers - 1),
        }
        child = await _spawn(index, spec)
        run.children.append(child)
        tg.start_soon(_listen, run, child, name=f"stress-subscriber-{index}")
    with anyio.move_on_after(READY_SECONDS):
        for child in run.children:
            await child.ready.wait()
    for child in run.children:
        if not child.started:
            why = child.failed or (
                "it exited" if child.ended.is_set() else "it did not subscribe in time"
            )
            raise DmaBufError(f"subscriber {child.index} did not start: {why}")


async def _listen(run: StreamRun, child: Child) -> None:
    """Read a subscriber's control lines until it closes its end."""
    reader = BufferedByteReceiveStream(child.stream)
    try:
        while True:
            line = await reader.receive_until(b"\n", MAX_LINE)
            facts: dict[str, Any] = json.loads(line)
            if facts.get("ready"):
                child.started = True
                child.ready.set()
            elif "holding" in facts:
                child.facts = facts
                _kill(run, child)
            elif facts.get("done"):
                child.facts = facts
            elif "failed" in facts:
                child.failed = str(facts["failed"])
    except (
        anyio.EndOfStream,
        anyio.IncompleteRead,  # closed, with no partial line
        anyio.BrokenResourceError,
        anyio.ClosedResourceError,
    ):
        pass
    except (anyio.DelimiterNotFound, ValueError) as exc:
        child.failed = f"a bad control line: {exc!r}"
    finally:
        child.ready.set()
        child.ended.set()


def _kill(run: StreamRun, child: Child) -> None:
    """SIGKILL the subscriber, noting what the publisher counts it as holding."""
    if child.killed:
        return
    pub = run.pub
    if pub is not None and child.facts.get("holding"):
        for info in pub.subscribers:
            if info.pid == child.proc.pid:
                child.held_at_kill = tuple(f"stream-{i}" for i in info.buffers)
        run.victim_buffers = child.held_at_kill
        run.kill_at = anyio.current_time()
        run.sent_at_kill = run.sent
    with contextlib.suppress(ProcessLookupError):
        child.proc.kill()
    child.killed = True
    child.stopped = time.perf_counter()


async def _reap(run: StreamRun) -> None:
    """Wait for every subscriber to exit (killing one that does not), close up."""
    for child in run.children:
        with anyio.move_on_after(END_SECONDS) as scope:
            await child.proc.wait()
        if scope.cancelled_caught:
            run.errors.append(f"subscriber {child.index} did not exit: killed")
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            await child.proc.wait()
        await child.stream.aclose()
        await child.proc.aclose()


# -- the publisher ---------------------------------------------------------------------


async def _drive(
    run: StreamRun,
    monitor: Callable[[StreamProgress], object] | None,
    monitor_interval: float,
    stop: anyio.Event | None,
) -> None:
    """Publish, then take every buffer back, with the watchdog and ``stop`` beside."""
    async with anyio.create_task_group() as tg:
        if stop is not None:
            tg.start_soon(_stop_on, run, stop, name="stress-stop")
        if run.config.watchdog:
            tg.start_soon(
                watchdog,
                run,
                run.config.watchdog,
                _who_holds,
                lambda: run.active.cancel(),  # the drain gets a new scope
                name="stress-watchdog",
            )
        if monitor is not None:
            tg.start_soon(run_monitor, run.progress, monitor, monitor_interval)
        with run.active:
            await _publish(run)
        victim = run.children[0] if run.config.kill_after is not None else None
        if victim is not None and not victim.killed:
            _kill(run, victim)  # the run ended before it held its frames
        if not run.hung:
            run.active = anyio.CancelScope()
            if run.interrupted:
                run.active.deadline = anyio.current_time() + DRAIN_SECONDS
            run.progressed()
            with run.active:
                await _drain(run)
        tg.cancel_scope.cancel()


async def _publish(run: StreamRun) -> None:
    """Loan, send with an acquire fence, then fill and signal; until the end."""
    pub = run.pub
    assert pub is not None
    clock = run.clock
    while run.claim():
        run.waiting = "loan() waits for a buffer to come back"
        called = clock()
        frame = await pub.loan()
        run.loan_wait.append(clock() - called)
        if run.kill_at is not None and frame.buffer.name:
            run.reused.add(frame.buffer.name)
        fence = Fence()
        filled = False
        try:
            run.waiting = "send() waits for a blocking subscriber's queue"
            called = clock()
            await pub.send(frame, fence=fence)
            run.send_time.append(clock() - called)
            run.waiting = f"filling frame {run.sent} (the exporter's cpu_access)"
            await _fill(frame.buffer, run.sent)
            filled = True
            run.sent += 1
        finally:
            # Cancelled (a stop, the watchdog): a frame that went out is still
            # filled, so that whoever has it reads what it must; bounded.
            if not filled:
                with anyio.move_on_after(CLEANUP_SECONDS, shield=True) as scope:
                    if frame.released:  # sent, to some subscribers at least
                        await _fill(frame.buffer, run.sent)
                        run.sent += 1
                    else:
                        frame.release()
                if scope.cancelled_caught:
                    run.errors.append(
                        f"frame {run.sent} could not be filled in "
                        f"{CLEANUP_SECONDS:g} s: its subscribers read it unfilled"
                    )
            fence.signal()
        run.progressed()


async def _fill(buf: DmaBuf, seq: int) -> None:
    """Write frame ``seq``'s pattern, as the producer's device would."""
    async with buf.cpu_access("w") as view:
        fill_pattern(view, seq)
        del view


async def _drain(run: StreamRun) -> None:
    """Loan every buffer of the pool (each came back), then give them back."""
    pub = run.pub
    assert pub is not None
    loans: list[Frame] = []
    run.waiting = "the end: loan() waits for every buffer to come back"
    try:
        for _ in range(run.config.buffers):
            frame = await pub.loan()
            loans.append(frame)
            if run.kill_at is not None and frame.buffer.name:
                run.reused.add(frame.buffer.name)
            run.progressed()
        run.drained = True
        run.dropped = {s.pid: s.dropped for s in pub.subscribers}
    finally:
        for frame in loans:
            frame.release()


async def _stop_on(run: StreamRun, stop: anyio.Event) -> None:
    await stop.wait()
    run.interrupted = True
    run.active.cancel()


def _who_holds(run: StreamRun, idle: float) -> tuple[str, ...]:
    """Say what the publisher waits for, and which subscriber holds what."""
    lines = [f"nothing moved for {idle:.1f} s: {run.waiting}"]
    pub = run.pub
    if pub is not None:
        stats = pub.statistics()
        lines.append(
            f"buffers: {stats.buffers_free} free, {stats.buffers_loaned} loaned, "
            f"{stats.buffers_in_flight} in flight of {stats.buffers_total}"
        )
        for info in pub.subscribers:
            held = ", ".join(f"stream-{i}" for i in info.buffers) or "nothing"
            lines.append(
                f"  subscriber pid {info.pid} ({info.overflow}, queue {info.queue}):"
                f" {info.queued} queued, {info.held} held, holds {held}"
            )
    return tuple(lines)


# -- the verdict -----------------------------------------------------------------------


def _subscriber_report(
    run: StreamRun, child: Child, elapsed: float
) -> SubscriberReport:
    facts = child.facts
    latency = facts.get("latency") or [0, 0.0, 0.0, 0.0, 0.0, 0.0, []]
    count, mean, p50, p90, p99, most, quantiles = latency
    received = int(facts.get("received", 0))
    span = elapsed
    if child.killed and run.kill_at is not None:
        span = max(run.kill_at - run.started, 1e-9)
    errors = [str(e) for e in facts.get("errors", [])]
    if child.failed:
        errors.insert(0, child.failed)
    pid = child.proc.pid
    return SubscriberReport(
        index=child.index,
        pid=pid,
        overflow=child.overflow,
        queue=run.config.queue,
        received=received,
        gaps=int(facts.get("gaps", 0)),
        dropped=run.dropped.get(pid),
        verified=int(facts.get("verified", 0)),
        bytes_verified=int(facts.get("bytes_verified", 0)),
        mismatches=int(facts.get("mismatches", 0)),
        first_mismatch=facts.get("first_mismatch"),
        late_checks=int(facts.get("late_checks", 0)),
        late_mismatches=int(facts.get("late_mismatches", 0)),
        out_of_order=int(facts.get("out_of_order", 0)),
        frames_per_second=received / span if span > 0 else 0.0,
        latency=LatencySummary(
            count, mean, p50, p90, p99, most, tuple(float(q) for q in quantiles)
        ),
        fds_left=tuple(facts.get("fds_left", ())),
        buffers_left=int(facts.get("buffers_left", 0)),
        exit_status=child.proc.returncode,
        killed=child.killed,
        held_at_kill=child.held_at_kill,
        errors=tuple(errors),
    )


def _children_left(run: StreamRun) -> list[int]:
    """Pids of our subscriber processes that still exist as our children."""
    me = os.getpid()
    left = []
    for child in run.children:
        try:
            with open(f"/proc/{child.proc.pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(me):
            left.append(child.proc.pid)
    return left


def _judge(
    run: StreamRun,
    subs: tuple[SubscriberReport, ...],
    fds_before: dict[str, str],
    buffers_before: set[int],
) -> tuple[Invariant, ...]:
    config = run.config
    sent = run.sent
    complete = run.drained and not run.interrupted
    checks = [no_hang(run, config.watchdog, "a frame was sent or a buffer came back")]
    frames = sum(s.received for s in subs)
    verified = sum(s.verified for s in subs)
    bad = [s for s in subs if s.mismatches]
    checks.append(
        Invariant(
            "every frame's bytes intact",
            verified == frames and not bad,
            f"{verified:,} of {frames:,} frames received compared byte for byte "
            f"({sum(s.bytes_verified for s in subs) / (1 << 20):,.0f} MiB)"
            + (
                f"; {sum(s.mismatches for s in subs)} mismatch(es), first: "
                f"{bad[0].first_mismatch}"
                if bad
                else ", every one as written"
            ),
        )
    )
    late = sum(s.late_checks for s in subs)
    late_bad = sum(s.late_mismatches for s in subs)
    checks.append(
        Invariant(
            "no reuse before the release fence",
            late_bad == 0,
            f"{late:,} frames read again after release, before their release "
            f"fence signalled: {late_bad} overwritten",
        )
    )
    checks.append(_order_check(subs, sent, complete))
    checks.append(
        Invariant(
            "every buffer back",
            run.drained or run.interrupted or run.hung,
            f"all {config.buffers} buffers loaned back at the end"
            if run.drained
            else (
                "not checked: the run hung"
                if run.hung
                else "not checked: interrupted before they came back"
                if run.interrupted
                else "they did not all come back"
            ),
        )
    )
    if config.kill_after is not None:
        checks.append(_kill_check(run, subs))
    publisher_fds = fds_left(fds_before, fd_table())
    sub_fds = [(s, s.fds_left) for s in subs if s.fds_left]
    checks.append(
        Invariant(
            "no fd left",
            not publisher_fds and not sub_fds,
            (
                f"publisher: {len(publisher_fds)} new fd(s)"
                + (f" ({publisher_fds[0]})" if publisher_fds else "")
                + "; subscribers: "
                + (
                    ", ".join(f"{s.index}: {fds[0]}" for s, fds in sub_fds)
                    if sub_fds
                    else "none"
                )
            ),
        )
    )
    leftover = [b for b in live_buffers() if id(b) not in buffers_before]
    sub_bufs = sum(s.buffers_left for s in subs)
    checks.append(
        Invariant(
            "no buffer left",
            not leftover and not sub_bufs,
            f"publisher: {len(leftover)} live; subscribers: {sub_bufs} live",
        )
    )
    left = _children_left(run)
    statuses = [s.exit_status for s in subs if s.exit_status != (-9 if s.killed else 0)]
    checks.append(
        Invariant(
            "no child process left",
            not left and not statuses,
            f"{len(subs)} subscriber process(es) reaped"
            + (f"; still running: {left}" if left else "")
            + (f"; unexpected exit status: {statuses}" if statuses else ""),
        )
    )
    errors = list(run.errors) + [
        f"subscriber {s.index}: {e}" for s in subs for e in s.errors
    ]
    checks.append(
        Invariant(
            "no unexpected error",
            not errors,
            errors[0] if errors else "none",
        )
    )
    return tuple(checks)


def _order_check(
    subs: tuple[SubscriberReport, ...], sent: int, complete: bool
) -> Invariant:
    """Frames in order; a blocking subscriber got every one, a dropping one
    every one but those the publisher says it dropped."""
    problems = []
    for s in subs:
        if s.out_of_order:
            problems.append(f"subscriber {s.index}: {s.out_of_order} out of order")
        if s.killed:
            if s.overflow == "block" and s.gaps:
                problems.append(f"subscriber {s.index}: {s.gaps} missing before kill")
            continue
        if not complete:
            continue
        if s.overflow == "block" and (s.received != sent or s.gaps):
            problems.append(
                f"subscriber {s.index} (block): {s.received:,} of {sent:,} frames"
            )
        elif s.overflow == "drop-oldest" and (
            s.received + s.gaps != sent or s.gaps != s.dropped
        ):
            problems.append(
                f"subscriber {s.index} (drop-oldest): {s.received:,} received + "
                f"{s.gaps:,} missing != {sent:,} sent, or the publisher dropped "
                f"{s.dropped}"
            )
    detail = (
        f"{sent:,} frames sent in order; blocking subscribers got every one, "
        "dropping ones every one but those dropped"
        if complete
        else "in order (counts not compared: the run ended early)"
    )
    return Invariant(
        "frames in order, none lost", not problems, problems[0] if problems else detail
    )


def _kill_check(run: StreamRun, subs: tuple[SubscriberReport, ...]) -> Invariant:
    victim = subs[0] if subs else None
    if victim is None or not victim.killed:
        return Invariant("a killed subscriber's frames come back", False, "no kill")
    if run.kill_at is None:
        return Invariant(
            "a killed subscriber's frames come back",
            run.drained or run.interrupted,
            "killed at the end of the run (it never held its frames)",
        )
    held = set(run.victim_buffers)
    missing = sorted(held - run.reused)
    after = run.sent - run.sent_at_kill
    ok = not missing and (run.drained or run.interrupted)
    return Invariant(
        "a killed subscriber's frames come back",
        ok,
        f"SIGKILLed holding {len(held)} buffer(s) "
        f"({', '.join(sorted(held)) or 'none'}) after frame {run.sent_at_kill:,}; "
        f"the publisher sent {after:,} more"
        + (
            f"; never loaned again: {', '.join(missing)}"
            if missing
            else "; every one loaned again"
        ),
    )
