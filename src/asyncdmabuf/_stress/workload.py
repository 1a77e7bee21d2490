"""The workload: many tasks attaching, mapping and unmapping shared buffers.

One operation of one task: pick a device and ``maps_per_op`` distinct buffers,
attach to each (dynamically, so an exporter may evict them while unmapped), map
them all at once (``block``: ``await map()`` one after the other; ``try``:
``try_map()``, and on :class:`Busy` unmap everything held, back off, map the
contended buffer blocking while holding nothing, then try the rest: waiting
only while holding nothing is what rules out the deadlock), then, through
``cpu_access``, check that each buffer holds exactly the pattern its last
writer left and write a new one; unmap, detach. Some blocking maps are
cancelled at random points (and retried), as ``-EINTR`` would interrupt them.
"""

from __future__ import annotations

import math
import random
import re
import struct
import time
from array import array
from collections import Counter
from collections.abc import Callable
from typing import final

import anyio
import anyio.lowlevel

from .._attachment import Attachment
from .._backends import native_clock
from .._buffer import DmaBuf
from .._device import Device
from .._errors import Busy, DmaBufError, InjectedFault
from .._exporter import Exporter
from .._sgtable import Direction, SgTable
from .config import StressConfig
from .instrument import MapTimes, Stamps
from .report import StressProgress

__all__ = ["BACKOFF_CAP", "CLEANUP_SECONDS", "MAX_TRY_ROUNDS", "Run", "Task", "worker"]

#: How many Busy rounds a ``try`` operation goes through before giving up.
MAX_TRY_ROUNDS = 32

#: The longest back-off, as a multiple of ``StressConfig.backoff``.
BACKOFF_CAP = 64

#: Cleanup (unmap, detach) is shielded, and bounded by this many seconds.
CLEANUP_SECONDS = 30.0

DIRECTIONS = (Direction.BIDIRECTIONAL, Direction.TO_DEVICE, Direction.FROM_DEVICE)

TILE = struct.Struct("<QQ")

#: A repr in a message (``<DmaBuf 'stress-3' ...>``), folded to group reasons.
_REPR = re.compile(r"<[^<>]*>")


@final
class Task:
    """What one worker is doing, for the watchdog."""

    __slots__ = ("action", "buffer", "clock", "held", "name", "since")

    def __init__(self, name: str, clock: Callable[[], float]) -> None:
        self.name = name
        self.clock = clock
        self.action = "idle"
        self.buffer: int | None = None
        self.held: list[int] = []
        self.since = 0.0

    def doing(self, action: str, buffer: int | None = None) -> None:
        self.action = action
        self.buffer = buffer
        self.since = self.clock()


@final
class Run:
    """The shared state of one run."""

    __slots__ = (
        "abandoned",
        "buffers",
        "busy",
        "busy_reasons",
        "bytes_verified",
        "cancellations",
        "clock",
        "config",
        "cpu_busy",
        "cpu_tried",
        "deadline",
        "devices",
        "errors",
        "expected",
        "exporter",
        "exporter_time",
        "faults",
        "hang_report",
        "hung",
        "interrupted",
        "issued",
        "last_progress",
        "lock_wait",
        "map_latency",
        "maps",
        "mismatch_detail",
        "mismatches",
        "move_notifies",
        "ops_done",
        "scheduler_delay",
        "stamps",
        "started",
        "tasks",
        "try_latency",
        "try_maps",
        "verifiable",
        "workers_scope",
    )

    def __init__(self, config: StressConfig, exporter: Exporter) -> None:
        self.config = config
        self.exporter = exporter
        self.devices = [Device(f"dev{i}") for i in range(config.devices)]
        self.buffers: list[DmaBuf] = []
        #: Per buffer, the tile its bytes repeat; None while it must read as zeros.
        self.expected: list[bytes | None] = [None] * config.buffers
        self.verifiable = config.verify and type(exporter).vmap is not Exporter.vmap
        self.clock = native_clock()
        self.tasks = [Task(f"worker-{i}", self.clock) for i in range(config.tasks)]
        self.map_latency: array[float] = array("d")
        #: What each blocking map's latency is made of (see MapTimes); empty
        #: when the exporter could not be instrumented.
        self.lock_wait: array[float] = array("d")
        self.exporter_time: array[float] = array("d")
        self.scheduler_delay: array[float] = array("d")
        #: Latencies are real time, read at the finest resolution there is
        #: (uvloop's loop clock counts milliseconds).
        self.stamps = Stamps(time.perf_counter)
        self.try_latency: array[float] = array("d")
        self.issued = self.ops_done = self.abandoned = 0
        self.maps = self.try_maps = self.busy = self.cancellations = 0
        self.busy_reasons: Counter[str] = Counter()
        self.faults = self.move_notifies = 0
        self.bytes_verified = self.mismatches = 0
        #: ``try_cpu_access`` calls (by ``try`` operations), and those Busy.
        self.cpu_tried = self.cpu_busy = 0
        self.mismatch_detail: str | None = None
        self.errors: list[str] = []
        self.started = self.last_progress = anyio.current_time()
        self.deadline = math.inf
        self.hung = False
        self.interrupted = False
        self.hang_report: tuple[str, ...] = ()
        self.workers_scope = anyio.CancelScope()

    def claim(self) -> bool:
        """Reserve the next operation; False when the run is over."""
        if self.config.ops is not None:
            if self.issued >= self.config.ops:
                return False
            self.issued += 1
            return True
        return self.clock() < self.deadline

    def completed(self) -> None:
        self.ops_done += 1
        self.last_progress = self.clock()

    def failed(self, exc: DmaBufError) -> None:
        """Count an error an operation met: an injected fault, or a finding."""
        if isinstance(exc, InjectedFault):
            self.faults += 1
        elif len(self.errors) < 10:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        else:
            self.errors[-1] = "... and more"

    def refused(self, exc: Busy) -> None:
        """Count a Busy ``try_map``, and why."""
        self.busy += 1
        self.busy_reasons[_REPR.sub("<buffer>", str(exc))] += 1

    def on_move(self, attachment: Attachment) -> None:
        self.move_notifies += 1

    def progress(self) -> StressProgress:
        return StressProgress(
            ops_done=self.ops_done,
            ops_total=self.config.ops,
            elapsed=anyio.current_time() - self.started,
            duration=self.config.duration if self.config.ops is None else None,
            busy=self.busy,
            cancellations=self.cancellations,
            faults=self.faults,
        )


async def worker(run: Run, task: Task) -> None:
    config = run.config
    rng = random.Random(f"{config.seed}/{task.name}")
    while run.claim():
        await operation(run, task, rng)
        run.completed()
        task.doing("idle")


async def operation(run: Run, task: Task, rng: random.Random) -> None:
    config = run.config
    device = rng.choice(run.devices)
    picks = rng.sample(range(config.buffers), config.maps_per_op)
    mode = config.map_mode
    if mode == "mixed":
        mode = "block" if rng.random() < 0.5 else "try"
    direction = rng.choice(DIRECTIONS)
    attachments: list[tuple[int, Attachment]] = []
    tables: list[tuple[int, Attachment, SgTable]] = []
    try:
        for index in picks:
            task.doing("attach", index)
            attachments.append(
                (
                    index,
                    await run.buffers[index].attach(device, move_notify=run.on_move),
                )
            )
        if mode == "block":
            for index, att in attachments:
                sgt = await map_blocking(run, task, rng, index, att, direction)
                tables.append((index, att, sgt))
                task.held.append(index)
        elif not await map_trying(run, task, rng, attachments, tables, direction):
            run.abandoned += 1
            return
        if run.verifiable:
            for index, _, _ in tables:
                task.doing("cpu_access", index)
                await check_and_write(run, rng, index, trying=mode == "try")
    except DmaBufError as exc:
        run.failed(exc)
    finally:
        task.doing("cleanup")
        with anyio.move_on_after(CLEANUP_SECONDS, shield=True):
            await release_all(run, task, tables)
            for _, att in reversed(attachments):
                try:
                    await att.detach()
                except DmaBufError as exc:
                    run.failed(exc)


async def release_all(
    run: Run, task: Task, tables: list[tuple[int, Attachment, SgTable]]
) -> None:
    """Unmap every table held, newest first; the list ends empty."""
    while tables:
        index, att, sgt = tables.pop()
        task.held.remove(index)
        try:
            await att.unmap(sgt)
        except DmaBufError as exc:
            run.failed(exc)


async def map_blocking(
    run: Run,
    task: Task,
    rng: random.Random,
    index: int,
    att: Attachment,
    direction: Direction,
) -> SgTable:
    """``await att.map()``, sometimes cancelled at a random point and retried."""
    clock = run.stamps.clock
    while True:
        task.doing("map", index)
        run.stamps.take(att)
        called = clock()
        if rng.random() < run.config.cancel_rate:
            sgt = await map_cancelled_at_random(att, direction, rng.randrange(8))
            if sgt is None:
                run.cancellations += 1
                continue
        else:
            sgt = await att.map(direction)
        ended = clock()
        run.map_latency.append(ended - called)
        run.maps += 1
        moments = run.stamps.take(att)
        if moments is not None:
            times = MapTimes.of(called, *moments, ended)
            run.lock_wait.append(times.lock_wait)
            run.exporter_time.append(times.exporter)
            run.scheduler_delay.append(times.scheduler)
        return sgt


async def map_cancelled_at_random(
    att: Attachment, direction: Direction, ticks: int
) -> SgTable | None:
    """Map, while another task cancels the map after ``ticks`` scheduler passes.

    Returns None when the cancellation won (the map left nothing behind).
    """
    result: SgTable | None = None
    error: DmaBufError | None = None

    async def cancel_later(scope: anyio.CancelScope) -> None:
        for _ in range(ticks):
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(cancel_later, scope)
            try:
                result = await att.map(direction)
            except DmaBufError as exc:
                error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


async def map_trying(
    run: Run,
    task: Task,
    rng: random.Random,
    attachments: list[tuple[int, Attachment]],
    tables: list[tuple[int, Attachment, SgTable]],
    direction: Direction,
) -> bool:
    """Map every attachment, waiting only while holding nothing.

    ``try_map`` each in turn; on Busy, unmap all held, back off, then map the
    contended one blocking (holding nothing, so it cannot close a cycle) and
    try the rest. Returns False after ``MAX_TRY_ROUNDS`` Busy rounds.
    """
    backoff = run.config.backoff
    contended: int | None = None
    for _ in range(MAX_TRY_ROUNDS):
        order = list(range(len(attachments)))
        if contended is not None:
            order.remove(contended)
            index, att = attachments[contended]
            sgt = await map_blocking(run, task, rng, index, att, direction)
            tables.append((index, att, sgt))
            task.held.append(index)
        for position in order:
            index, att = attachments[position]
            task.doing("try_map", index)
            start = time.perf_counter()
            try:
                sgt = att.try_map(direction)
            except Busy as exc:
                run.try_latency.append(time.perf_counter() - start)
                run.try_maps += 1
                run.refused(exc)
                contended = position
                break
            run.try_latency.append(time.perf_counter() - start)
            run.try_maps += 1
            tables.append((index, att, sgt))
            task.held.append(index)
        else:
            return True
        task.doing("back-off (unmapping)")
        await release_all(run, task, tables)
        task.doing("back-off", attachments[contended][0])
        await anyio.sleep(rng.uniform(0, backoff))
        backoff = min(backoff * 2, run.config.backoff * BACKOFF_CAP)
    return False


def make_tile(index: int, generation: int) -> bytes:
    return TILE.pack(index + 1, generation)


def pattern(tile: bytes | None, size: int) -> bytes:
    if tile is None:
        return bytes(size)
    return (tile * (size // len(tile) + 1))[:size]


async def check_and_write(
    run: Run, rng: random.Random, index: int, *, trying: bool = False
) -> None:
    """Check the buffer holds its last writer's pattern, then write a new one.

    Check and write happen with no await between them, so no other task can
    slip in: the expected pattern is always the last one written. A ``try``
    operation (``trying``) first tries ``try_cpu_access``, and waits in
    ``cpu_access`` only if that is Busy.
    """
    buf = run.buffers[index]
    if trying:
        run.cpu_tried += 1
        try:
            with buf.try_cpu_access("rw") as view:
                _check_and_write(run, rng, index, view)
                del view
            return
        except Busy:  # at entry: nothing began
            run.cpu_busy += 1
    async with buf.cpu_access("rw") as view:
        _check_and_write(run, rng, index, view)
        del view


def _check_and_write(
    run: Run, rng: random.Random, index: int, view: memoryview
) -> None:
    check_bytes(run, index, view)
    tile = make_tile(index, rng.getrandbits(63))
    view[:] = pattern(tile, len(view))
    run.expected[index] = tile


def check_bytes(run: Run, index: int, view: memoryview) -> None:
    size = len(view)
    expected = pattern(run.expected[index], size)
    data = view.tobytes()
    run.bytes_verified += size
    if data != expected:
        run.mismatches += 1
        if run.mismatch_detail is None:
            at = next(i for i in range(size) if data[i] != expected[i])
            run.mismatch_detail = (
                f"stress-{index}: byte {at} is {data[at]:#04x}, "
                f"expected {expected[at]:#04x}"
            )


async def final_check(run: Run) -> None:
    """Read every buffer once more; an injected fault is retried, not judged."""
    for index, buf in enumerate(run.buffers):
        for _ in range(1000):
            try:
                async with buf.cpu_access("r") as view:
                    check_bytes(run, index, view)
                    del view
            except DmaBufError as exc:
                run.failed(exc)
                continue
            break
