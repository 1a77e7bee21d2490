"""Shared tools of the reliability tests (issue 7).

- :func:`cancel_at`: await a coroutine and cancel a scope just before its k-th
  suspension, on any backend, to cancel an operation at each of its checkpoints.
- :func:`assert_quiet` / :func:`assert_sim_exact`: the invariants that must hold
  between operations (no lock held, no waiter counted, tables consistent,
  SimDevice accounting exact).
- :class:`NullExporter`: the cheapest possible exporter (leak and fairness tests).
- :class:`FaultyExporter`: a CPU-mapped exporter that raises from any op on demand.
- Settings profiles: the CI budget, or a long soak with ``ASYNCDMABUF_SOAK=1``.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine, Generator
from typing import Any, ClassVar, TypeVar, final

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, settings

from asyncdmabuf import (
    Attachment,
    CpuMode,
    DmaBuf,
    DmaBufError,
    Exporter,
    SgEntry,
    SgTable,
    export,
)
from asyncdmabuf._backends import BACKENDS as _BACKENDS
from asyncdmabuf._sgtable import Direction
from asyncdmabuf.exporters import SimDevice
from asyncdmabuf.testing._conformance import _Stepper

from .helpers import wait_all_blocked

T = TypeVar("T")

#: True when the long versions should run (``make soak``).
SOAK = os.environ.get("ASYNCDMABUF_SOAK") == "1"

#: The backends, for sync tests that start their own event loops.
BACKENDS = [pytest.param(backend, id=label) for label, backend in _BACKENDS.items()]
Backend = tuple[str, dict[str, Any]]

settings.register_profile(
    "asyncdmabuf-ci",
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "asyncdmabuf-soak",
    parent=settings.get_profile("asyncdmabuf-ci"),
    max_examples=1500,
    stateful_step_count=120,
)
#: The profile the reliability tests build their settings on.
PROFILE = settings.get_profile("asyncdmabuf-soak" if SOAK else "asyncdmabuf-ci")


def budget(ci: int, soak: int) -> int:
    """``ci`` normally, ``soak`` under ``ASYNCDMABUF_SOAK=1``."""
    return soak if SOAK else ci


# -- cancelling at the k-th checkpoint ----------------------------------------------


async def cancel_at(coro: Coroutine[Any, Any, T], k: int) -> tuple[bool, int, T | None]:
    """Run ``coro`` in a scope cancelled at its ``k``-th suspension.

    Returns:
        ``(cancelled, suspensions, result)``: whether the cancellation reached
        the caller, how many times the coroutine suspended, and its result if
        it returned.
    """
    scope = anyio.CancelScope()
    stepper = _Stepper(coro, scope, k)
    result: T | None = None
    with scope:
        result = await stepper
    return scope.cancelled_caught, stepper.suspensions, result


async def run_or_cancel_when_blocked(
    coro: Coroutine[Any, Any, T],
) -> tuple[bool, T | None]:
    """Run ``coro``; cancel it if it blocks. Return ``(blocked, result)``.

    Blocking means every task waits (for a fence, memory, a lock nobody will
    release): the operation is cancelled then, as a signal would interrupt it.
    """
    result: T | None = None
    done = False

    async def watch(scope: anyio.CancelScope) -> None:
        await wait_all_blocked()
        if not done:
            scope.cancel()

    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(watch, scope)
            try:
                result = await coro
            except Exception as exc:  # raised below, not in an exception group
                error = exc
            finally:
                done = True
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return scope.cancelled_caught, result


# -- invariants ----------------------------------------------------------------------


def assert_quiet(*bufs: DmaBuf) -> None:
    """No lock held, no waiter counted, every table recorded where it should be."""
    for buf in bufs:
        assert not buf._lock.locked(), f"{buf!r}: lock left held"
        assert buf._lock.waiting == 0, (
            f"{buf!r}: {buf._lock.waiting} waiters left counted"
        )
        if buf.released:
            assert buf.attachments == ()
            continue
        for att in buf.attachments:
            assert att.attached
            assert att.buffer is buf
            for sgt in att.mappings:
                assert sgt.valid
                assert sgt.attachment is att
                assert sum(e.length for e in sgt) == buf.size


def assert_sim_exact(dev: SimDevice) -> None:
    """The device's counters agree with its buffers, page for page."""
    stats = dev.statistics()
    assert stats.waiters == 0, f"{stats.waiters} memory waiters left"
    assert dev._audit() == []


# -- exporters -----------------------------------------------------------------------

BASE = 0x1000


class NullExporter(Exporter):
    """No memory, no bookkeeping: one fake-address entry per table."""

    name: ClassVar[str] = "null"

    def make(self, size: int = 4096) -> DmaBuf:
        return export(self, size)

    async def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        return self.try_map(attachment, direction)

    def try_map(self, attachment: Attachment, direction: Direction) -> SgTable:
        entries = attachment.priv
        if entries is None:
            entries = attachment.priv = (SgEntry(BASE, attachment.buffer.size, 0),)
        return SgTable(entries, direction=direction, attachment=attachment)

    async def unmap(
        self, attachment: Attachment, sgt: SgTable, direction: Direction
    ) -> None:
        pass

    async def release(self, buf: DmaBuf) -> None:
        pass


#: The ops :class:`FaultyExporter` can fail.
FAULTY_OPS = (
    "attach",
    "detach",
    "map",
    "try_map",
    "unmap",
    "release",
    "begin_cpu_access",
    "end_cpu_access",
    "vmap",
)


class InjectedError(DmaBufError):
    """What :class:`FaultyExporter` raises."""


class FaultyExporter(Exporter):
    """Bytes in a bytearray; ``fail`` names ops that raise :class:`InjectedError`.

    An op in ``fail`` raises when called, before doing anything, unless it is
    in ``fail_after``, where it raises after doing its work. ``calls`` counts
    every op call; ``live`` tracks what the exporter believes is allocated,
    attached, mapped and under CPU access, so tests can check it agrees with
    the framework after a fault.
    """

    name: ClassVar[str] = "faulty"

    def __init__(self) -> None:
        self.fail: set[str] = set()
        self.fail_after: set[str] = set()
        self.calls: dict[str, int] = dict.fromkeys(FAULTY_OPS, 0)
        self.injected = 0
        self.buffers = 0
        self.attached = 0
        self.mapped = 0
        self.cpu = 0

    def make(self, size: int = 4096) -> DmaBuf:
        self.buffers += 1
        return export(self, size, priv=bytearray(size))

    def _enter(self, op: str) -> None:
        self.calls[op] += 1
        if op in self.fail and op not in self.fail_after:
            self.injected += 1
            raise InjectedError(f"injected fault in {op} (before)")

    def _leave(self, op: str) -> None:
        if op in self.fail and op in self.fail_after:
            self.injected += 1
            raise InjectedError(f"injected fault in {op} (after)")

    async def attach(self, buf: DmaBuf, attachment: Attachment) -> None:
        self._enter("attach")
        self.attached += 1
        attachment.priv = (SgEntry(BASE, buf.size, 0),)
        try:
            self._leave("attach")
        except InjectedError:
            self.attached -= 1  # a refusing exporter undoes its own work
            raise

    async def detach(self, buf: DmaBuf, attachment: Attachment) -> None:
        self._enter("detach")
        self.attached -= 1
        self._leave("detach")

    def _table(self, attachment: Attachment, direction: Direction) -> SgTable:
        return SgTable(attachment.priv, direction=direction, attachment=attachment)

    async def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        self._enter("map")
        await anyio.lowlevel.checkpoint()
        sgt = self._table(attachment, direction)
        self._leave("map")
        self.mapped += 1
        return sgt

    def try_map(self, attachment: Attachment, direction: Direction) -> SgTable:
        self._enter("try_map")
        sgt = self._table(attachment, direction)
        self._leave("try_map")
        self.mapped += 1
        return sgt

    async def unmap(
        self, attachment: Attachment, sgt: SgTable, direction: Direction
    ) -> None:
        self._enter("unmap")
        self.mapped -= 1
        self._leave("unmap")

    async def release(self, buf: DmaBuf) -> None:
        self._enter("release")
        self.buffers -= 1
        self._leave("release")

    async def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        self._enter("begin_cpu_access")
        self.cpu += 1
        try:
            self._leave("begin_cpu_access")
        except InjectedError:
            self.cpu -= 1
            raise

    async def end_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        self._enter("end_cpu_access")
        self.cpu -= 1
        self._leave("end_cpu_access")

    def vmap(self, buf: DmaBuf) -> memoryview:
        self._enter("vmap")
        view = memoryview(buf.priv)
        try:
            self._leave("vmap")
        except InjectedError:
            view.release()
            raise
        return view


@final
class Continue:
    """Await the rest of a coroutine that has already yielded ``signal``.

    For tests that step a coroutine up to its first suspension by hand, then
    hand the rest to the event loop.
    """

    __slots__ = ("_coro", "_signal")

    def __init__(self, coro: Coroutine[Any, Any, Any], signal: object) -> None:
        self._coro = coro
        self._signal = signal

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, signal = self._coro, self._signal
        while True:
            try:
                sent = yield signal
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the event loop
                try:
                    signal = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    signal = coro.send(sent)
                except StopIteration as stop:
                    return stop.value
