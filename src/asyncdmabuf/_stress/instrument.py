"""Timestamps inside the exporter, and the map hold, for one stress run.

The framework calls the exporter's ops with the buffer's lock held and
releases the lock as soon as an op returns. So the moment an op starts is the
moment its task got the lock and ran, and the moment an op ends is (to within
a few statements of bookkeeping) the moment the lock is let go. For the
length of a run, :func:`instrumented` gives the exporter a subclass of its own
class (same name, no new state) whose ``map``, ``unmap``, ``attach`` and
``detach`` record these moments, and whose ``map`` first holds the lock for
``StressConfig.map_hold`` seconds, as a device's map does while it programs
its IOMMU. ``try_map`` is left as it is: it must never wait.

From those moments and two taken by the worker around ``await att.map()``,
:class:`MapTimes` splits a map's latency into what it is made of.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio

from .._exporter import Exporter
from .._sgtable import SgTable

if TYPE_CHECKING:
    from .._attachment import Attachment
    from .._buffer import DmaBuf
    from .._types import Direction

__all__ = ["Clock", "MapTimes", "Stamps", "instrumented"]

Clock = Callable[[], float]


class MapTimes(NamedTuple):
    """What one blocking map's latency is made of, in seconds."""

    total: float
    """From the call of ``map()`` until it returned."""
    lock_wait: float
    """From the call until the lock was last let go by another holder
    (0 when it was free): the time the lock kept this map out."""
    exporter: float
    """In the exporter's ``map`` with the lock held: the map hold (without
    the event loop's delay in ending it), a device's allocation or wait for
    memory."""
    scheduler: float
    """The rest: this task ready to run, waiting for the event loop (its
    first checkpoint, the wake-up after the lock was handed to it, the
    return)."""

    @classmethod
    def of(
        cls,
        called: float,
        released: float,
        locked: float,
        left: float,
        overslept: float,
        ended: float,
    ) -> MapTimes:
        """Split a map from its moments.

        ``released`` is the lock's last release before ``locked`` (-inf if
        never), ``overslept`` how much longer than the map hold the hold's
        sleep took (the event loop's delay in waking it).
        """
        lock_wait = max(0.0, min(released, locked) - called)
        exporter = left - locked - overslept
        scheduler = max(0.0, (locked - called - lock_wait) + overslept + (ended - left))
        return cls(ended - called, lock_wait, exporter, scheduler)


class Stamps:
    """The moments the instrumented exporter records, per buffer and attachment."""

    __slots__ = ("clock", "maps", "released")

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        #: id(buffer) -> when its lock was last let go by an op.
        self.released: dict[int, float] = {}
        #: attachment -> (last release before, lock taken, exporter done,
        #: the hold's oversleep).
        self.maps: dict[Attachment, tuple[float, float, float, float]] = {}

    def let_go(self, buf: DmaBuf) -> None:
        self.released[id(buf)] = self.clock()

    def take(self, att: Attachment) -> tuple[float, float, float, float] | None:
        """Forget and return the moments of ``att``'s last map, if any."""
        return self.maps.pop(att, None)


def _timed(
    op: Callable[..., Awaitable[None] | None],
    stamps: Stamps,
    buffer_of: Callable[..., DmaBuf],
) -> Callable[..., Awaitable[None] | None]:
    """Wrap an op (plain or async) to record when it let the lock go."""

    def wrapper(self: Exporter, *args: Any) -> Awaitable[None] | None:
        buf = buffer_of(*args)
        try:
            result = op(self, *args)
        except BaseException:
            stamps.let_go(buf)
            raise
        if result is None:
            stamps.let_go(buf)
            return None
        return _then_let_go(result, stamps, buf)

    return wrapper


async def _then_let_go(result: Awaitable[None], stamps: Stamps, buf: DmaBuf) -> None:
    try:
        await result
    finally:
        stamps.let_go(buf)


def _by_attachment(attachment: Attachment, *rest: object) -> DmaBuf:
    return attachment.buffer


def _by_buffer(buf: DmaBuf, *rest: object) -> DmaBuf:
    return buf


@contextmanager
def instrumented(exporter: Exporter, stamps: Stamps, hold: float) -> Iterator[bool]:
    """Instrument ``exporter`` for the block; yield whether that was possible.

    Its class is swapped for a same-named subclass and restored on exit; an
    exporter whose class cannot be swapped (a layout of its own) runs as it
    is, without the breakdown or the hold.
    """
    cls = type(exporter)
    base_map = cls.map
    clock = stamps.clock

    async def map(
        self: Exporter, attachment: Attachment, direction: Direction
    ) -> SgTable:
        buf = attachment.buffer
        released = stamps.released.get(id(buf), -math.inf)
        locked = clock()
        overslept = 0.0
        try:
            if hold:
                await anyio.sleep(hold)
                overslept = max(0.0, clock() - locked - hold)
            result = base_map(self, attachment, direction)
            sgt = result if isinstance(result, SgTable) else await result
        finally:
            left = clock()
            stamps.maps[attachment] = (released, locked, left, overslept)
            stamps.released[id(buf)] = left
        return sgt

    namespace: dict[str, Any] = {
        "__slots__": (),
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "map": map,
        "unmap": _timed(cls.unmap, stamps, _by_attachment),
        "attach": _timed(cls.attach, stamps, _by_buffer),
        "detach": _timed(cls.detach, stamps, _by_buffer),
    }
    try:
        meta: Any = type(cls)
        sub = meta(cls.__name__, (cls,), namespace)
        exporter.__class__ = sub
    except TypeError:
        yield False
        return
    assert not inspect.isabstract(sub)
    try:
        yield True
    finally:
        exporter.__class__ = cls
