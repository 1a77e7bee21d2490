"""The stream mode of stress: what it runs, the frames' bytes, what it reports.

One publisher (this process) streams frames through a small pool of buffers to
``subscribers`` real processes (:mod:`.stream_child`). Every frame's bytes are
a pattern derived from its ``seq`` (:func:`frame_bytes`), written by the
publisher *after* ``send`` and before it signals the frame's acquire fence, so
a subscriber that read before the fence would see the previous frame's bytes;
each subscriber compares every byte of every frame, releases it with a fence
of its own, reads the frame once more (its "device" still reads) and only then
signals that fence, so a buffer reused before its release fence signalled
shows as well. :mod:`.stream_run` runs it; this module holds the records.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from .._errors import InvalidArgument
from .._layout import FrameLayout
from .._stream._wire import MAX_BUFFERS, MAX_QUEUE
from .._validate import check_int, check_number
from .report import Invariant, LatencySummary, figure

__all__ = [
    "DEFAULT_LAYOUT",
    "MAX_LINE",
    "MAX_SUBSCRIBERS",
    "OVERFLOW_MODES",
    "Overflow",
    "StreamConfig",
    "StreamProgress",
    "StreamReport",
    "SubscriberReport",
    "fd_table",
    "fds_left",
    "fill_pattern",
    "first_difference",
    "frame_bytes",
    "frame_tile",
    "overflow_of",
]

Overflow = Literal["block", "drop-oldest", "mixed"]

OVERFLOW_MODES: tuple[str, ...] = get_args(Overflow)

#: The frames of a default stream run: 640x480 XRGB8888, 1.2 MB.
DEFAULT_LAYOUT = FrameLayout.for_format("XR24", 640, 480)

#: The most subscriber processes a run starts.
MAX_SUBSCRIBERS = 256

#: The longest control line a run reads from a subscriber (its report).
MAX_LINE = 1 << 20

#: One tile of a frame's pattern: ``seq + 1`` and a seq-scrambled word.
TILE = struct.Struct("<QQ")
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def frame_tile(seq: int) -> bytes:
    """The 16 bytes frame ``seq``'s pattern repeats (no two frames alike)."""
    return TILE.pack(seq + 1, ((seq + 1) * _GOLDEN) & _MASK)


def frame_bytes(seq: int, size: int) -> bytes:
    """Every byte frame ``seq`` must hold in a buffer of ``size`` bytes."""
    tile = frame_tile(seq)
    count, rest = divmod(size, TILE.size)
    return tile * count + tile[:rest]


def fill_pattern(target: memoryview | bytearray, seq: int) -> None:
    """Write frame ``seq``'s pattern into ``target`` in place, allocating nothing.

    The tile is written once, then the written part copied after itself,
    doubling: ``log2(size / 16)`` copies of memory, no per-byte Python.
    """
    view = memoryview(target)
    size = len(view)
    tile = frame_tile(seq)
    done = min(TILE.size, size)
    view[:done] = tile[:done]
    while done < size:
        step = min(done, size - done)
        view[done : done + step] = view[:step]
        done += step


def first_difference(data: bytes, expected: bytes) -> int:
    """The offset of the first byte where ``data`` differs (they do differ)."""
    step = 1 << 16
    at = 0
    while data[at : at + step] == expected[at : at + step]:
        at += step
    return next(
        i for i in range(at, min(len(data), len(expected))) if data[i] != expected[i]
    )


def fd_table() -> dict[str, str]:
    """Every open fd of this process and what it is (``fd -> target``)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return found


def fds_left(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The fds open in ``after`` that were not (as the same thing) in ``before``."""
    return sorted(
        f"{fd} -> {target}" for fd, target in after.items() if before.get(fd) != target
    )


def overflow_of(mode: str, index: int) -> str:
    """Subscriber ``index``'s overflow: ``mixed`` alternates, block first."""
    if mode == "mixed":
        return "block" if index % 2 == 0 else "drop-oldest"
    return mode


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """What a stream run does; every field has a default.

    Attributes:
        exporter: The exporter's entry-point name (or ``module:Class``).
        subscribers: Subscriber processes.
        buffers: Buffers the stream owns.
        layout: The frames' layout; None for plain bytes of ``frame_size``.
        frame_size: Bytes per frame when ``layout`` is None.
        frames: Frames to send; None to run for ``duration``.
        duration: Seconds to run when ``frames`` is None.
        overflow: Each subscriber's overflow: ``block``, ``drop-oldest``, or
            ``mixed`` (alternating, the first one blocking).
        queue: Each subscriber's queue.
        kill_after: SIGKILL subscriber 0 once it has received this many
            frames and then held the next ones without releasing them;
            None for no kill.
        seed: Passed to the exporter.
        watchdog: Seconds without a frame sent (or a buffer back, at the
            end) that count as a hang; 0 turns it off.
        memory: Device memory, for exporters that take ``memory``.
        alloc_latency: Seconds to allocate a backing (``alloc_latency``).
        map_latency: Seconds of a backing's first map (``map_latency``).
    """

    exporter: str = "memfd"
    subscribers: int = 2
    buffers: int = 4
    layout: FrameLayout | None = DEFAULT_LAYOUT
    frame_size: int = 0
    frames: int | None = 2000
    duration: float | None = None
    overflow: Overflow = "mixed"
    queue: int = 2
    kill_after: int | None = None
    seed: int = 0
    watchdog: float = 10.0
    memory: int | None = None
    alloc_latency: float = 0.0
    map_latency: float = 0.0

    def __post_init__(self) -> None:
        check_int(self.subscribers, "subscribers", 1, MAX_SUBSCRIBERS)
        check_int(self.buffers, "buffers", 1, MAX_BUFFERS)
        check_int(self.queue, "queue", 1, MAX_QUEUE)
        if self.layout is None:
            check_int(self.frame_size, "frame_size")
        elif not isinstance(self.layout, FrameLayout):
            raise TypeError(f"layout is a FrameLayout, not {self.layout!r}")
        if self.frames is not None:
            check_int(self.frames, "frames")
        elif (
            self.duration is None
            or check_number(self.duration, "duration") <= 0
            or self.duration == math.inf
        ):
            raise InvalidArgument("give a positive frames count or duration")
        if self.overflow not in OVERFLOW_MODES:
            raise InvalidArgument(
                f"overflow must be one of {', '.join(OVERFLOW_MODES)}"
            )
        if self.kill_after is not None:
            check_int(self.kill_after, "kill_after", 0)
            if self.frames is not None and self.kill_after >= self.frames:
                raise InvalidArgument(
                    f"kill_after ({self.kill_after}) must be below frames "
                    f"({self.frames}): the kill would never come"
                )
        for name in ("watchdog", "alloc_latency", "map_latency"):
            value = check_number(getattr(self, name), name)
            if value == math.inf:
                raise InvalidArgument(f"{name} must be finite, got {value}")
        if self.memory is not None:
            check_int(self.memory, "memory")

    @property
    def buffer_size(self) -> int:
        """Bytes per buffer: the layout's size, or ``frame_size``."""
        return self.layout.size if self.layout is not None else self.frame_size

    @property
    def fault_rate(self) -> float:
        """No faults are injected in stream mode (the exporter is built clean)."""
        return 0.0

    @property
    def shape(self) -> str:
        """The frames, in words: ``XR24 640x480`` or ``4096 bytes``."""
        if self.layout is None:
            return f"{self.frame_size} bytes"
        return f"{self.layout.fourcc} {self.layout.width}x{self.layout.height}"


@dataclass(frozen=True, slots=True)
class StreamProgress:
    """A live view of a stream run, for progress displays."""

    frames_sent: int
    frames_total: int | None
    elapsed: float
    duration: float | None
    dropped: int
    subscribers: int


@dataclass(frozen=True, slots=True)
class SubscriberReport:
    """What one subscriber process saw, and how it ended."""

    index: int
    pid: int
    overflow: str
    queue: int
    received: int
    gaps: int
    """Frames missing between the ones received (seq gaps): drops it saw."""
    dropped: int | None
    """Frames the publisher dropped for it (None: it was gone before the count)."""
    verified: int
    """Frames whose every byte was compared with the pattern."""
    bytes_verified: int
    mismatches: int
    first_mismatch: str | None
    late_checks: int
    """Frames read again after their release, before the release fence signalled."""
    late_mismatches: int
    out_of_order: int
    frames_per_second: float
    latency: LatencySummary
    """Per frame: from the publisher's ``send`` to the release fence signalled."""
    fds_left: tuple[str, ...]
    buffers_left: int
    exit_status: int | None
    killed: bool
    held_at_kill: tuple[str, ...]
    """The buffers the publisher counted as held by it when it was killed."""
    errors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StreamReport:
    """Everything a stream run measured, and the verdict; times in seconds."""

    config: StreamConfig
    backend: str
    exporter: str
    elapsed: float
    frames_sent: int
    frames_per_second: float
    frames_dropped: int
    loan_wait: LatencySummary
    """How long each ``loan()`` waited for a buffer to come back."""
    send_time: LatencySummary
    """How long each ``send()`` took (waiting for ``block`` subscribers)."""
    subscribers: tuple[SubscriberReport, ...]
    sent_after_kill: int
    reused_after_kill: tuple[str, ...]
    invariants: tuple[Invariant, ...]
    hung: bool
    interrupted: bool = False
    hang_report: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every invariant held (the exit status is 0 only then)."""
        return all(inv.ok for inv in self.invariants)

    def to_dict(self) -> dict[str, Any]:
        """Every figure, as JSON-ready data, each key naming its unit."""
        data: dict[str, Any] = {"mode": "stream"}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "config":
                config = asdict(value)
                config["layout"] = self.config.shape
                config["buffer_size_bytes"] = self.config.buffer_size
                for key in ("duration", "watchdog", "alloc_latency", "map_latency"):
                    config[f"{key}_s"] = config.pop(key)
                config["frame_size_bytes"] = config.pop("frame_size")
                config["memory_bytes"] = config.pop("memory")
                data["config"] = config
            elif field.name == "subscribers":
                data["subscribers"] = [_subscriber_dict(s) for s in value]
            else:
                key, item = figure(field.name, value)
                data[key] = item
        data["ok"] = self.ok
        return data


def _subscriber_dict(report: SubscriberReport) -> dict[str, Any]:
    return dict(figure(f.name, getattr(report, f.name)) for f in fields(report))
