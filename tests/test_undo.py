"""Undo ops that really wait: shielded from their first step, on every backend.

Regression tests of issue 11: an exporter whose ``unmap`` / ``detach`` /
``release`` / ``end_cpu_access`` sleeps, or wraps its work in its own
``fail_after`` / ``move_on_after``, completes when the caller is cancelled, with
no hang and no "cancel scope that isn't the current task's" error.
"""

from __future__ import annotations

from typing import ClassVar

import anyio
import anyio.lowlevel
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf import Attachment, Direction, DmaBuf, Exporter, SgEntry, SgTable
from asyncdmabuf.lowlevel import check_cpu_mode

pytestmark = pytest.mark.anyio

BIDI = Direction.BIDIRECTIONAL


class SleepyExporter(Exporter):
    """Every undo op sleeps, inside a scope of its own when ``scoped``."""

    name: ClassVar[str] = "sleepy"

    def __init__(self, *, scoped: bool) -> None:
        self.scoped = scoped
        self.done: list[str] = []

    async def _nap(self, what: str) -> None:
        if self.scoped:
            with anyio.fail_after(5):
                await anyio.sleep(0.001)
            with anyio.move_on_after(5):
                await anyio.lowlevel.checkpoint()
        else:
            await anyio.sleep(0.001)
        self.done.append(what)

    async def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        size = attachment.buffer.size
        return SgTable(
            [SgEntry(0x1000, size, 0)], direction=direction, attachment=attachment
        )

    async def unmap(
        self, attachment: Attachment, sgt: SgTable, direction: Direction
    ) -> None:
        await self._nap("unmap")

    async def detach(self, buf: DmaBuf, attachment: Attachment) -> None:
        await self._nap("detach")

    async def end_cpu_access(self, buf: DmaBuf, mode: str) -> None:
        check_cpu_mode(mode)
        await self._nap("end_cpu_access")

    async def release(self, buf: DmaBuf) -> None:
        await self._nap("release")

    def vmap(self, buf: DmaBuf) -> memoryview:
        return memoryview(bytearray(buf.size))


@pytest.mark.parametrize("scoped", [False, True], ids=["sleep", "own-scopes"])
async def test_undo_ops_that_sleep_complete_in_a_cancelled_scope(scoped: bool) -> None:
    exp = SleepyExporter(scoped=scoped)
    buf = dmabuf.export(exp, 4096)
    att = await buf.attach(dmabuf.Device("d"))
    sgt = await att.map(BIDI)
    await buf.begin_cpu_access("r")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await buf.end_cpu_access("r")
    assert scope.cancelled_caught
    with anyio.CancelScope() as scope:
        scope.cancel()
        await att.unmap(sgt)
    assert not sgt.valid
    with anyio.CancelScope() as scope:
        scope.cancel()
        await att.detach()
    assert not att.attached
    with anyio.CancelScope() as scope:
        scope.cancel()
        await buf.put()
    assert buf.released
    assert exp.done == ["end_cpu_access", "unmap", "detach", "release"]


async def test_nested_async_with_unwinds_through_sleeping_undo_ops() -> None:
    exp = SleepyExporter(scoped=True)
    buf = dmabuf.export(exp, 4096)
    with anyio.CancelScope() as scope:
        async with buf, buf.attach(dmabuf.Device("d")) as att, att.map(BIDI):
            scope.cancel()
            async with buf.cpu_access("r"):
                pass  # pragma: no cover (the entry is a checkpoint)
    assert scope.cancelled_caught
    assert buf.released
    assert exp.done == ["unmap", "detach", "release"]


async def test_an_undo_op_timing_out_in_its_own_scope_is_its_error() -> None:
    class Stuck(SleepyExporter):
        async def unmap(
            self, attachment: Attachment, sgt: SgTable, direction: Direction
        ) -> None:
            with anyio.fail_after(0.001):
                await anyio.sleep_forever()

    buf = dmabuf.export(Stuck(scoped=False), 4096)
    att = await buf.attach(dmabuf.Device("d"))
    sgt = await att.map(BIDI)
    with pytest.raises(TimeoutError):
        await att.unmap(sgt)
    assert att.mappings == ()  # the framework forgot the table: the op had it
    assert not buf._lock.locked()
    await att.detach()
    await buf.put()


class PlainExporter(SleepyExporter):
    """Undo ops that never wait, written as plain functions."""

    def unmap(self, attachment: Attachment, sgt: SgTable, direction: Direction) -> None:  # type: ignore[override]
        self.done.append("unmap")

    def detach(self, buf: DmaBuf, attachment: Attachment) -> None:  # type: ignore[override]
        self.done.append("detach")

    def release(self, buf: DmaBuf) -> None:  # type: ignore[override]
        self.done.append("release")


async def test_plain_undo_ops_cost_no_checkpoint_in_async_with_exits() -> None:
    from .helpers import assert_no_checkpoints

    exp = PlainExporter(scoped=False)
    buf = dmabuf.export(exp, 4096)
    att = await buf.attach(dmabuf.Device("d"))
    op = att.map(BIDI)
    await op.__aenter__()
    async with assert_no_checkpoints():
        await op.__aexit__(None, None, None)
    await att.detach()
    await buf.put()
    assert exp.done == ["unmap", "detach", "release"]
