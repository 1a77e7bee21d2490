"""The stress engine: many tasks attaching, mapping and unmapping, then a verdict.

:func:`run_stress` takes a :class:`StressConfig`, runs it on the current event
loop and returns a :class:`StressReport`; it prints nothing (the command line
in :mod:`._cli` draws progress and tables around it).

One operation of one task: pick a device and ``maps_per_op`` distinct buffers,
attach to each (dynamically, so a SimDevice may evict them while unmapped), map
them all at once (``block``: ``await map()`` one after the other; ``try``:
``try_map()``, and on :class:`Busy` unmap everything held, back off, map the
contended buffer blocking while holding nothing, then try the rest: waiting
only while holding nothing is what rules out the deadlock), then, through
``cpu_access``, check that each buffer holds exactly the pattern its last
writer left and write a new one; unmap, detach. Some blocking maps are
cancelled at random points (and retried), as ``-EINTR`` would interrupt them.

A watchdog ends a run in which no operation completes for a while and records
who waits for what: for the buffers' locks (through
:func:`~asyncdmabuf._buffer.lock_holder`) and for a SimDevice's memory, and who
holds them.
"""

from __future__ import annotations

import math
import os
import random
import struct
import time
import warnings
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, final, get_args

import anyio
import anyio.lowlevel

from ._attachment import Attachment
from ._backends import current_loop_label, native_clock
from ._buffer import DmaBuf, live_buffers, lock_holder
from ._device import Device
from ._errors import Busy, DmaBufError, InvalidArgument
from ._exporter import Exporter
from ._sgtable import Direction, SgTable
from ._validate import check_int

__all__ = [
    "FAULT_OPS",
    "Invariant",
    "LatencySummary",
    "MapMode",
    "StressConfig",
    "StressProgress",
    "StressReport",
    "make_exporter",
    "percentile",
    "run_stress",
]

MapMode = Literal["block", "try", "mixed"]
MAP_MODES: tuple[str, ...] = get_args(MapMode)

#: The SimDevice operations ``fault_rate`` applies to. Allocation and release
#: stay clean, so that every run can set up and tear down.
FAULT_OPS: tuple[str, ...] = (
    "attach",
    "map",
    "backing",
    "unmap",
    "detach",
    "begin_cpu_access",
    "end_cpu_access",
)
#: How many Busy rounds a ``try`` operation goes through before giving up.
MAX_TRY_ROUNDS = 32
#: The longest back-off, as a multiple of ``StressConfig.backoff``.
BACKOFF_CAP = 64
#: Cleanup (unmap, detach) is shielded, and bounded by this many seconds.
CLEANUP_SECONDS = 30.0
#: How many points of each latency distribution a report keeps (for plots).
QUANTILE_POINTS = 101
_DIRECTIONS = (Direction.BIDIRECTIONAL, Direction.TO_DEVICE, Direction.FROM_DEVICE)
_TILE = struct.Struct("<QQ")


@dataclass(frozen=True, slots=True)
class StressConfig:
    """What to run; every field has a default that ``make run`` uses.

    Attributes:
        exporter: The exporter's entry-point name (``memfd``, ``simdev``...).
        tasks: Concurrent worker tasks.
        buffers: Buffers they share.
        devices: Importing devices they attach with.
        buffer_size: Bytes per buffer.
        ops: Operations to run in total; None to run for ``duration``.
        duration: Seconds to run when ``ops`` is None.
        map_mode: ``block``, ``try`` (with back-off) or ``mixed`` (per op).
        maps_per_op: Buffers each operation maps at once.
        cancel_rate: Chance that a blocking map is cancelled at a random point.
        fault_rate: Chance that a SimDevice operation fails (``FAULT_OPS``).
        seed: Seeds every random choice (and the SimDevice's faults).
        watchdog: Seconds without a completed operation that count as a hang;
            0 turns the watchdog off.
        verify: Check and rewrite the bytes through CPU access in every op.
        backoff: The first back-off of a ``try`` operation, in seconds.
        memory: SimDevice memory in bytes; None for room for every buffer.
        alloc_latency: SimDevice seconds to allocate a buffer's backing.
        map_latency: SimDevice seconds per map.
    """

    exporter: str = "memfd"
    tasks: int = 64
    buffers: int = 32
    devices: int = 4
    buffer_size: int = 64 << 10
    ops: int | None = 20_000
    duration: float | None = None
    map_mode: MapMode = "mixed"
    maps_per_op: int = 2
    cancel_rate: float = 0.02
    fault_rate: float = 0.0
    seed: int = 0
    watchdog: float = 10.0
    verify: bool = True
    backoff: float = 0.0005
    memory: int | None = None
    alloc_latency: float = 0.0
    map_latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("tasks", "buffers", "devices", "buffer_size", "maps_per_op"):
            check_int(getattr(self, name), name)
        if self.ops is not None:
            check_int(self.ops, "ops")
        elif self.duration is None or not self.duration > 0:
            raise InvalidArgument("give a positive ops count or duration")
        if self.maps_per_op > self.buffers:
            raise InvalidArgument(
                f"maps_per_op ({self.maps_per_op}) exceeds buffers ({self.buffers})"
            )
        if self.map_mode not in MAP_MODES:
            raise InvalidArgument(f"map_mode must be one of {', '.join(MAP_MODES)}")
        for name in ("cancel_rate", "fault_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidArgument(f"{name} must be in [0, 1], got {value}")
        for name in ("watchdog", "backoff", "alloc_latency", "map_latency"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgument(f"{name} must be finite and >= 0, got {value}")
        if self.memory is not None:
            check_int(self.memory, "memory")


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """A latency distribution, in seconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    quantiles: tuple[float, ...] = ()
    """``QUANTILE_POINTS`` evenly spaced quantiles, 0 to 1 (for plots)."""

    @classmethod
    def of(cls, samples: Sequence[float]) -> LatencySummary:
        """Summarise samples (any order); all zeros when there are none."""
        if not samples:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ordered = sorted(samples)
        last = len(ordered) - 1
        return cls(
            count=len(ordered),
            mean=math.fsum(ordered) / len(ordered),
            p50=percentile(ordered, 50),
            p90=percentile(ordered, 90),
            p99=percentile(ordered, 99),
            max=ordered[-1],
            quantiles=tuple(
                ordered[round(i * last / (QUANTILE_POINTS - 1))]
                for i in range(QUANTILE_POINTS)
            ),
        )


def percentile(ordered: Sequence[float], pct: float) -> float:
    """The nearest-rank ``pct``-th percentile of sorted, non-empty samples."""
    if not ordered:
        raise InvalidArgument("no samples")
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True, slots=True)
class Invariant:
    """One check of the verdict: what, whether it held, and the evidence."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class StressProgress:
    """A live view of a run, for progress displays."""

    ops_done: int
    ops_total: int | None
    elapsed: float
    duration: float | None
    busy: int
    cancellations: int
    faults: int


@dataclass(frozen=True, slots=True)
class StressReport:
    """Everything a run measured, and the verdict.

    Times are seconds; ``ok`` is True only if every invariant held.
    """

    config: StressConfig
    backend: str
    exporter: str
    elapsed: float
    ops: int
    ops_per_second: float
    abandoned: int
    """``try`` operations given up after ``MAX_TRY_ROUNDS`` Busy rounds."""
    maps: int
    try_maps: int
    busy: int
    cancellations: int
    faults: int
    """Injected faults the operations met (each one abandons its operation)."""
    faults_injected: int
    """Faults the exporter says it injected (SimDevice), 0 otherwise."""
    errors: tuple[str, ...]
    """Errors that no injected fault explains (at most the first 10)."""
    evictions: int
    move_notifies: int
    bytes_verified: int
    mismatches: int
    map_latency: LatencySummary
    try_map_latency: LatencySummary
    invariants: tuple[Invariant, ...]
    hung: bool
    hang_report: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every invariant held (the exit status is 0 only then)."""
        return all(inv.ok for inv in self.invariants)

    def to_dict(self) -> dict[str, Any]:
        """Every figure, as JSON-ready data."""
        data = asdict(self)
        data["ok"] = self.ok
        return data


# -- exporters -------------------------------------------------------------------


def make_exporter(config: StressConfig) -> Exporter:
    """Build the exporter ``config.exporter`` names, configured for the run.

    A SimDevice gets ``memory`` (default: room for every buffer), the
    latencies, ``seed`` and ``fault_rate``; any other exporter is built with
    no arguments.

    Raises:
        InvalidArgument: No exporter of that name, or it cannot be built.
        NoDevice: Its backing is missing on this machine.
    """
    from .exporters import SimDevice, load

    cls = load(config.exporter)
    if issubclass(cls, SimDevice):
        page = 4096
        memory = config.memory
        if memory is None:
            memory = config.buffers * -(-config.buffer_size // page) * page
        memory = -(-memory // page) * page
        faults = dict.fromkeys(FAULT_OPS, config.fault_rate)
        return SimDevice(
            "simdev0",
            memory=memory,
            alloc_latency=config.alloc_latency,
            map_latency=config.map_latency,
            seed=config.seed,
            faults=faults if config.fault_rate else None,  # type: ignore[arg-type]
        )
    try:
        return cls()
    except TypeError as exc:
        raise InvalidArgument(
            f"exporter {config.exporter!r} cannot be built without arguments: {exc}"
        ) from None


# -- the run ---------------------------------------------------------------------


@final
class _Task:
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
class _Run:
    """The shared state of one run."""

    __slots__ = (
        "abandoned",
        "buffers",
        "busy",
        "bytes_verified",
        "cancellations",
        "clock",
        "config",
        "deadline",
        "devices",
        "errors",
        "expected",
        "exporter",
        "faults",
        "hang_report",
        "hung",
        "issued",
        "last_progress",
        "map_latency",
        "maps",
        "mismatch_detail",
        "mismatches",
        "move_notifies",
        "ops_done",
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
        self.tasks = [_Task(f"worker-{i}", self.clock) for i in range(config.tasks)]
        self.map_latency: array[float] = array("d")
        self.try_latency: array[float] = array("d")
        self.issued = self.ops_done = self.abandoned = 0
        self.maps = self.try_maps = self.busy = self.cancellations = 0
        self.faults = self.move_notifies = 0
        self.bytes_verified = self.mismatches = 0
        self.mismatch_detail: str | None = None
        self.errors: list[str] = []
        self.started = self.last_progress = anyio.current_time()
        self.deadline = math.inf
        self.hung = False
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
        if "injected fault" in str(exc):
            self.faults += 1
        elif len(self.errors) < 10:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        else:
            self.errors[-1] = "... and more"

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


async def run_stress(
    config: StressConfig,
    *,
    exporter: Exporter | None = None,
    monitor: Callable[[StressProgress], object] | None = None,
    monitor_interval: float = 0.1,
) -> StressReport:
    """Run the stress workload on the current event loop and judge it.

    Args:
        config: What to run.
        exporter: Use this exporter instead of building ``config.exporter``.
        monitor: Called every ``monitor_interval`` seconds with the progress.
        monitor_interval: Seconds between monitor calls.

    Returns:
        The report; ``report.ok`` tells whether every invariant held.

    Raises:
        InvalidArgument: The exporter cannot be built, or has no ``allocate``.
        OutOfMemory: The buffers cannot be allocated.
    """
    if exporter is None:
        exporter = make_exporter(config)
    allocate = getattr(exporter, "allocate", None)
    if allocate is None:
        raise InvalidArgument(f"exporter {exporter.name!r} has no allocate(size)")
    backend = current_loop_label() or "none"
    fds_before = _memfds()
    run = _Run(config, exporter)
    stats_before = _sim_stats(exporter)
    notes: list[str] = []
    if config.fault_rate and stats_before is None:
        notes.append(f"exporter {exporter.name!r} injects no faults: fault_rate unused")
    if config.verify and not run.verifiable:
        notes.append(f"exporter {exporter.name!r} has no CPU view: bytes not checked")
    leftovers: tuple[int, int] = (0, 0)
    elapsed = 0.0
    try:
        for i in range(config.buffers):
            run.buffers.append(await allocate(config.buffer_size, name=f"stress-{i}"))
        run.started = run.last_progress = anyio.current_time()
        if config.ops is None:
            assert config.duration is not None
            run.deadline = run.started + config.duration
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            if config.watchdog:
                tg.start_soon(_watchdog, run, name="stress-watchdog")
            if monitor is not None:
                tg.start_soon(
                    _monitor, run, monitor, monitor_interval, name="stress-monitor"
                )
            with run.workers_scope:
                async with anyio.create_task_group() as workers:
                    for task in run.tasks:
                        workers.start_soon(_worker, run, task, name=task.name)
            tg.cancel_scope.cancel()
        elapsed = time.perf_counter() - start
        leftovers = await _detach_leftovers(run)
        if run.verifiable:
            await _final_check(run)
    finally:
        with anyio.CancelScope(shield=True):
            put_errors = await _put_all(run)
    stats_after = _sim_stats(exporter)
    invariants = _judge(run, leftovers, put_errors, fds_before, stats_after)
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
        invariants=invariants,
        hung=run.hung,
        hang_report=run.hang_report,
        notes=tuple(notes),
    )


def _memfds() -> set[str]:
    """The fds of this process that are memfds, as ``fd -> target`` strings."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("/memfd:"):
            found.add(f"{name} -> {target}")
    return found


def _sim_stats(exporter: Exporter) -> Any:
    statistics = getattr(exporter, "statistics", None)
    return None if statistics is None else statistics()


# -- workers ---------------------------------------------------------------------


async def _worker(run: _Run, task: _Task) -> None:
    config = run.config
    rng = random.Random(f"{config.seed}/{task.name}")
    while run.claim():
        await _operation(run, task, rng)
        run.completed()
        task.doing("idle")


async def _operation(run: _Run, task: _Task, rng: random.Random) -> None:
    config = run.config
    device = rng.choice(run.devices)
    picks = rng.sample(range(config.buffers), config.maps_per_op)
    mode = config.map_mode
    if mode == "mixed":
        mode = "block" if rng.random() < 0.5 else "try"
    direction = rng.choice(_DIRECTIONS)
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
                sgt = await _map_blocking(run, task, rng, index, att, direction)
                tables.append((index, att, sgt))
                task.held.append(index)
        elif not await _map_trying(run, task, rng, attachments, tables, direction):
            run.abandoned += 1
            return
        if run.verifiable:
            for index, _, _ in tables:
                task.doing("cpu_access", index)
                await _check_and_write(run, rng, index)
    except DmaBufError as exc:
        run.failed(exc)
    finally:
        task.doing("cleanup")
        with anyio.move_on_after(CLEANUP_SECONDS, shield=True):
            await _release(run, task, tables)
            for _, att in reversed(attachments):
                try:
                    await att.detach()
                except DmaBufError as exc:
                    run.failed(exc)


async def _release(
    run: _Run, task: _Task, tables: list[tuple[int, Attachment, SgTable]]
) -> None:
    """Unmap every table held, newest first; the list ends empty."""
    while tables:
        index, att, sgt = tables.pop()
        task.held.remove(index)
        try:
            await att.unmap(sgt)
        except DmaBufError as exc:
            run.failed(exc)


async def _map_blocking(
    run: _Run,
    task: _Task,
    rng: random.Random,
    index: int,
    att: Attachment,
    direction: Direction,
) -> SgTable:
    """``await att.map()``, sometimes cancelled at a random point and retried."""
    while True:
        task.doing("map", index)
        start = time.perf_counter()
        if rng.random() < run.config.cancel_rate:
            sgt = await _map_cancelled_at_random(att, direction, rng.randrange(8))
            if sgt is None:
                run.cancellations += 1
                continue
        else:
            sgt = await att.map(direction)
        run.map_latency.append(time.perf_counter() - start)
        run.maps += 1
        return sgt


async def _map_cancelled_at_random(
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


async def _map_trying(
    run: _Run,
    task: _Task,
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
            sgt = await _map_blocking(run, task, rng, index, att, direction)
            tables.append((index, att, sgt))
            task.held.append(index)
        for position in order:
            index, att = attachments[position]
            task.doing("try_map", index)
            start = time.perf_counter()
            try:
                sgt = att.try_map(direction)
            except Busy:
                run.try_latency.append(time.perf_counter() - start)
                run.try_maps += 1
                run.busy += 1
                contended = position
                break
            run.try_latency.append(time.perf_counter() - start)
            run.try_maps += 1
            tables.append((index, att, sgt))
            task.held.append(index)
        else:
            return True
        task.doing("back-off (unmapping)")
        await _release(run, task, tables)
        task.doing("back-off", attachments[contended][0])
        await anyio.sleep(rng.uniform(0, backoff))
        backoff = min(backoff * 2, run.config.backoff * BACKOFF_CAP)
    return False


def _tile(index: int, generation: int) -> bytes:
    return _TILE.pack(index + 1, generation)


def _pattern(tile: bytes | None, size: int) -> bytes:
    if tile is None:
        return bytes(size)
    return (tile * (size // len(tile) + 1))[:size]


async def _check_and_write(run: _Run, rng: random.Random, index: int) -> None:
    """Check the buffer holds its last writer's pattern, then write a new one.

    Check and write happen with no await between them, so no other task can
    slip in: the expected pattern is always the last one written.
    """
    buf = run.buffers[index]
    async with buf.cpu_access("rw") as view:
        _check(run, index, view)
        tile = _tile(index, rng.getrandbits(63))
        view[:] = _pattern(tile, buf.size)
        run.expected[index] = tile
        del view


def _check(run: _Run, index: int, view: memoryview) -> None:
    size = len(view)
    expected = _pattern(run.expected[index], size)
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


async def _final_check(run: _Run) -> None:
    """Read every buffer once more; an injected fault is retried, not judged."""
    for index, buf in enumerate(run.buffers):
        for _ in range(1000):
            try:
                async with buf.cpu_access("r") as view:
                    _check(run, index, view)
                    del view
            except DmaBufError as exc:
                run.failed(exc)
                continue
            break


async def _detach_leftovers(run: _Run) -> tuple[int, int]:
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


async def _put_all(run: _Run) -> list[str]:
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


# -- the watchdog ----------------------------------------------------------------


async def _watchdog(run: _Run) -> None:
    limit = run.config.watchdog
    while True:
        idle = anyio.current_time() - run.last_progress
        if idle >= limit:
            run.hang_report = _who_waits(run, idle)
            run.hung = True
            run.workers_scope.cancel()
            return
        await anyio.sleep(max(limit - idle, limit / 1000))


async def _monitor(
    run: _Run, monitor: Callable[[StressProgress], object], interval: float
) -> None:
    while True:
        monitor(run.progress())
        await anyio.sleep(interval)


def _who_waits(run: _Run, idle: float) -> tuple[str, ...]:
    """Describe who waits for what, and who holds it."""
    now = anyio.current_time()
    exporter = run.exporter
    stats = _sim_stats(exporter)
    lines = [f"no operation completed for {idle:.1f} s; the workers:"]
    waiting_for_memory = 0
    for task in run.tasks:
        if task.action == "idle":
            continue
        what = task.action
        if task.buffer is not None:
            buf = run.buffers[task.buffer]
            holder, queued = lock_holder(buf)
            what = f"{task.action} {buf.name}"
            if holder == task.name and task.action == "map" and stats is not None:
                if stats.waiters:
                    waiting_for_memory += 1
                    what = (
                        f"waits for {_kib(buf.size)} of memory on {exporter.name!r} "
                        f"to map {buf.name} (holding its lock)"
                    )
                else:
                    what = f"waits inside {exporter.name!r}'s map of {buf.name}"
            elif holder is not None and holder != task.name:
                what = (
                    f"waits for the lock of {buf.name}, held by {holder} "
                    f"({queued} queued)"
                )
        held = ", ".join(run.buffers[i].name or "?" for i in task.held)
        lines.append(
            f"  {task.name} {what} for {now - task.since:.1f} s"
            + (f"; holds {held} mapped" if held else "")
        )
    if stats is not None:
        pinned: dict[str, list[str]] = {}
        for task in run.tasks:
            for i in task.held:
                pinned.setdefault(run.buffers[i].name or "?", []).append(task.name)
        lines.append(
            f"{exporter.name!r}: {_kib(stats.memory_in_use)} in use of "
            f"{_kib(stats.memory_total)}, {_kib(stats.memory_pinned)} pinned, "
            f"{stats.waiters} map(s) waiting for memory"
        )
        if pinned:
            lines.append(
                "  its memory is pinned by: "
                + "; ".join(
                    f"{b} (mapped by {', '.join(t)})" for b, t in pinned.items()
                )
            )
        if waiting_for_memory and stats.memory_pinned >= stats.memory_in_use:
            lines.append(
                "deadlock: tasks hold mappings that pin the memory while waiting "
                "for more; try_map with back-off (--map-mode try) never waits "
                "while holding a mapping, and so avoids it"
            )
    return tuple(lines)


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB"


# -- the verdict -------------------------------------------------------------------


def _judge(
    run: _Run,
    leftovers: tuple[int, int],
    put_errors: list[str],
    fds_before: set[str],
    stats: Any,
) -> tuple[Invariant, ...]:
    attachments, mappings = leftovers
    ours = {id(buf) for buf in run.buffers}
    live = [buf for buf in live_buffers() if id(buf) in ours]
    new_fds = sorted(_memfds() - fds_before)
    checks = [
        Invariant(
            "no hang",
            not run.hung,
            "an operation completed at least every "
            f"{run.config.watchdog:g} s" + ("" if run.config.watchdog else " (off)")
            if not run.hung
            else "the watchdog fired: " + run.hang_report[0],
        ),
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
        clean = stats.memory_in_use == 0 and stats.waiters == 0 and stats.buffers == 0
        checks.append(
            Invariant(
                "no device memory left",
                clean,
                f"{stats.memory_in_use} bytes in use, {stats.buffers} buffers, "
                f"{stats.waiters} waiters",
            )
        )
    else:
        checks.append(
            Invariant("no device memory left", True, "exporter has no device memory")
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
