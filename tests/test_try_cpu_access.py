"""``with buf.try_cpu_access(mode)``: CPU access that never waits.

The entry begins at once or raises ``Busy`` with nothing begun; it is never a
checkpoint; the exit ends the access at once or, when the block awaited and
another operation holds the lock by then, queues the end on the lock, where it
runs in its turn (after who asked before, before who asks later).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar

import anyio
import anyio.abc
import anyio.lowlevel
import numpy as np
import pytest

from asyncdmabuf import (
    Attachment,
    Busy,
    CpuMode,
    Device,
    DmaBuf,
    DmaBufError,
    Fence,
    InvalidArgument,
    Usage,
)
from asyncdmabuf.exporters import MemfdExporter, SimDevice

from .helpers import assert_no_checkpoints, wait_all_blocked

pytestmark = pytest.mark.anyio


class GatedMemfd(MemfdExporter):
    """Memfd buffers whose attach and detach can be held open (holding the lock).

    It records every CPU hook, and its ``end_cpu_access`` can be made to fail.
    """

    name: ClassVar[str] = "gated-memfd"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.gate: anyio.Event | None = None
        self.attach_started = anyio.Event()
        self.fail_end = False

    async def attach(self, buf: DmaBuf, attachment: Attachment) -> None:
        self.calls.append("attach")
        if self.gate is not None:
            self.attach_started.set()
            await self.gate.wait()
        result = super().attach(buf, attachment)
        if result is not None:
            await result

    async def detach(self, buf: DmaBuf, attachment: Attachment) -> None:
        self.calls.append("detach")
        if self.gate is not None:
            self.attach_started.set()
            await self.gate.wait()
        result = super().detach(buf, attachment)
        if result is not None:
            await result

    def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        self.calls.append(f"begin {mode}")
        super().begin_cpu_access(buf, mode)

    def end_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        self.calls.append(f"end {mode}")
        if self.fail_end:
            raise DmaBufError("the device refused the sync")


class AsyncEnd(MemfdExporter):
    """An exporter whose ``end_cpu_access`` is a coroutine function."""

    name: ClassVar[str] = "async-end"

    def __init__(self) -> None:
        super().__init__()
        self.begun = 0

    def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        self.begun += 1

    async def end_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        await anyio.lowlevel.checkpoint()


async def _attach_detach(buf: DmaBuf, name: str) -> None:
    async with buf.attach(Device(name)):
        pass


class DisguisedEnd(MemfdExporter):
    """A plain ``end_cpu_access`` that returns a coroutine which waits."""

    name: ClassVar[str] = "disguised-end"

    def end_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> Awaitable[None]:
        return self._end()

    async def _end(self) -> None:
        await anyio.lowlevel.checkpoint()


async def test_the_bytes_written_are_the_buffers_and_nothing_checkpoints() -> None:
    buf = await MemfdExporter().allocate(4096)
    async with assert_no_checkpoints():
        with buf.try_cpu_access("w") as view:
            np.frombuffer(view, dtype=np.uint8)[:] = 7
        with buf.try_cpu_access("r") as view:
            assert view.readonly
            assert bytes(view[:3]) == b"\x07\x07\x07"
    assert buf.cpu_access_modes == ()
    async with buf.cpu_access("r") as view:
        assert bytes(view) == b"\x07" * 4096
    await buf.put()


async def test_busy_while_another_operation_holds_the_lock() -> None:
    exporter = GatedMemfd()
    buf = await exporter.allocate(4096)
    exporter.gate = gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_attach_detach, buf, "dev")
        await exporter.attach_started.wait()
        with pytest.raises(Busy, match="locked"), buf.try_cpu_access("w"):
            pytest.fail("the block ran")
        assert buf.cpu_access_modes == ()
        assert "begin w" not in exporter.calls
        gate.set()
    assert not buf.lock_statistics().locked
    with buf.try_cpu_access("w"):
        pass
    await buf.put()


@pytest.mark.parametrize(
    ("usage", "mode", "busy"),
    [
        (Usage.WRITE, "r", True),
        (Usage.WRITE, "w", True),
        (Usage.READ, "r", False),
        (Usage.READ, "w", True),
        (Usage.BOOKKEEP, "rw", False),
    ],
)
async def test_busy_while_a_fence_the_access_waits_for_is_pending(
    usage: Usage, mode: CpuMode, busy: bool
) -> None:
    buf = await MemfdExporter().allocate(4096)
    fence = Fence()
    buf.resv.add_fence(fence, usage)
    if busy:
        with pytest.raises(Busy, match="fences pending"), buf.try_cpu_access(mode):
            pytest.fail("the block ran")
        assert buf.cpu_access_modes == ()
    else:
        with buf.try_cpu_access(mode):
            assert buf.cpu_access_modes == (mode,)
    fence.signal()
    with buf.try_cpu_access(mode):
        pass
    await buf.put()


async def test_busy_when_the_exporters_hooks_may_wait() -> None:
    """An async begin hook is closed unstarted; an async end hook refuses first."""
    sim = SimDevice("sim", memory=1 << 20)
    buf = await sim.allocate(4096)
    with (
        pytest.raises(Busy, match="begin_cpu_access would wait"),
        buf.try_cpu_access("w"),
    ):
        pytest.fail("the block ran")
    assert buf.cpu_access_modes == ()
    assert not buf.lock_statistics().locked
    await buf.put()

    exporter = AsyncEnd()
    buf = await exporter.allocate(4096)
    with pytest.raises(Busy, match="end_cpu_access may wait"), buf.try_cpu_access("w"):
        pytest.fail("the block ran")
    assert exporter.begun == 0  # refused before anything began
    async with buf.cpu_access("w"):  # the waiting form still works
        pass
    await buf.put()


async def _exit_behind(
    tg: anyio.abc.TaskGroup,
    buf: DmaBuf,
    exporter: GatedMemfd,
    holder: Callable[[], Coroutine[Any, Any, object]],
) -> anyio.Event:
    """Make a ``try_cpu_access("w")`` block's exit find the lock held.

    The block awaits; meanwhile ``holder`` (an attach or a detach) takes the
    lock and is held at the exporter's gate; then the block ends. Returns the
    gate, for the caller to open.
    """
    exporter.gate = gate = anyio.Event()
    body_may_exit = anyio.Event()

    async def access() -> None:
        with buf.try_cpu_access("w"):
            await body_may_exit.wait()
        exporter.calls.append("exit returned")

    tg.start_soon(access)
    await wait_all_blocked()
    tg.start_soon(holder)
    await exporter.attach_started.wait()
    body_may_exit.set()
    await wait_all_blocked()
    return gate


async def test_an_exit_behind_a_held_lock_ends_in_its_turn() -> None:
    """The end queues behind the holder and ahead of who asks later.

    The exit returns at once; a second attach that asks after it runs after
    the end.
    """
    exporter = GatedMemfd()
    buf = await exporter.allocate(4096)
    async with anyio.create_task_group() as tg:
        gate = await _exit_behind(
            tg, buf, exporter, functools.partial(_attach_detach, buf, "first")
        )
        assert exporter.calls[-1] == "exit returned"
        assert buf.cpu_access_modes == ("w",)  # not ended yet: its turn comes
        stats = buf.lock_statistics()
        assert stats.locked
        assert stats.tasks_waiting == 1
        exporter.gate = None
        tg.start_soon(_attach_detach, buf, "second")
        await wait_all_blocked()
        gate.set()
    assert [call for call in exporter.calls if call != "detach"] == [
        "begin w",
        "attach",
        "exit returned",
        "end w",
        "attach",
    ]
    assert buf.cpu_access_modes == ()
    assert not buf.lock_statistics().locked
    await buf.put()


async def test_a_deferred_end_that_fails_warns_and_frees_the_lock() -> None:
    exporter = GatedMemfd()
    buf = await exporter.allocate(4096)
    async with anyio.create_task_group() as tg:
        gate = await _exit_behind(
            tg, buf, exporter, functools.partial(_attach_detach, buf, "dev")
        )
        exporter.fail_end = True
        gate.set()
        with pytest.warns(RuntimeWarning, match="refused the sync"):
            await wait_all_blocked()
    assert buf.cpu_access_modes == ()
    assert not buf.lock_statistics().locked
    exporter.fail_end = False
    await buf.put()


async def test_a_last_put_queued_behind_a_deferred_end() -> None:
    exporter = GatedMemfd()
    buf = await exporter.allocate(4096)
    att = await buf.attach(Device("dev"))
    async with anyio.create_task_group() as tg:
        gate = await _exit_behind(tg, buf, exporter, att.detach)
        tg.start_soon(buf.put)  # the last put: it queues behind the end
        await wait_all_blocked()
        gate.set()
    assert exporter.calls == ["attach", "begin w", "detach", "exit returned", "end w"]
    assert buf.refcount == 0


async def test_an_end_hook_failing_at_once_raises_in_the_block() -> None:
    exporter = GatedMemfd()
    buf = await exporter.allocate(4096)
    exporter.fail_end = True
    with pytest.raises(DmaBufError, match="refused the sync"), buf.try_cpu_access("w"):
        pass
    assert buf.cpu_access_modes == ()  # counted as ended: the hook was called
    assert not buf.lock_statistics().locked
    exporter.fail_end = False
    await buf.put()


async def test_a_plain_end_hook_returning_a_wait_warns_and_ends() -> None:
    """The class check passes; the coroutine is stepped once, then closed."""
    buf = await DisguisedEnd().allocate(4096)
    with (
        pytest.warns(RuntimeWarning, match="would wait"),
        buf.try_cpu_access("w"),
    ):
        pass
    assert buf.cpu_access_modes == ()
    assert not buf.lock_statistics().locked
    await buf.put()


async def test_the_body_exception_propagates_and_the_access_ends() -> None:
    buf = await MemfdExporter().allocate(4096)
    with pytest.raises(KeyError, match="mine"), buf.try_cpu_access("w"):
        raise KeyError("mine")
    assert buf.cpu_access_modes == ()
    await buf.put()


async def test_a_cancelled_body_ends_the_access() -> None:
    buf = await MemfdExporter().allocate(4096)
    with anyio.CancelScope() as scope:
        with buf.try_cpu_access("w"):
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert buf.cpu_access_modes == ()
    await buf.put()


async def test_a_view_kept_past_exit_keeps_the_access_open() -> None:
    buf = await MemfdExporter().allocate(4096)
    with (
        pytest.raises(BufferError, match="stays open"),
        buf.try_cpu_access("rw") as view,
    ):
        kept = np.frombuffer(view, dtype=np.uint8)
    assert buf.cpu_access_modes == ("rw",)
    kept[0] = 9
    del kept
    gc.collect()
    await buf.end_cpu_access("rw")
    with buf.try_cpu_access("r") as view:
        assert view[0] == 9
    await buf.put()


async def test_an_exporter_without_a_cpu_mapping_ends_what_it_began() -> None:
    exporter = GatedMemfd()
    buf = await exporter.allocate(4096)
    exporter.vmap = _no_vmap  # type: ignore[method-assign]
    with (
        pytest.raises(InvalidArgument, match="no CPU mapping"),
        buf.try_cpu_access("w"),
    ):
        pytest.fail("the block ran")
    assert exporter.calls == ["begin w", "end w"]
    assert buf.cpu_access_modes == ()
    await buf.put()


def _no_vmap(buf: DmaBuf) -> memoryview:
    raise InvalidArgument("no CPU mapping here")


@pytest.mark.parametrize(
    ("mode", "error"),
    [(5, TypeError), (None, TypeError), (["w"], TypeError), ("x", InvalidArgument)],
)
async def test_bad_modes_and_a_released_buffer(
    mode: object, error: type[Exception]
) -> None:
    buf = await MemfdExporter().allocate(4096)
    with pytest.raises(error):
        buf.try_cpu_access(mode)  # type: ignore[arg-type]
    await buf.put()
    with pytest.raises(InvalidArgument, match="released"):
        buf.try_cpu_access("w")
