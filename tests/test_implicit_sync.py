"""Fences on buffers: cpu_access waits, sync fds, bufinfo, SimDevice's DMA engine."""

from __future__ import annotations

import os
import sys
import textwrap

import anyio
import pytest
from anyio.streams.text import TextReceiveStream
from trio.testing import MockClock

import asyncdmabuf as dmabuf
from asyncdmabuf import Direction, Fence, Usage
from asyncdmabuf.exporters import MemfdExporter, SimDevice

from .helpers import assert_checkpoints, assert_no_checkpoints, wait_all_blocked

pytestmark = pytest.mark.anyio


async def _access_after(buf: dmabuf.DmaBuf, mode: str, done: list[str]) -> None:
    async with buf.cpu_access(mode) as _:  # type: ignore[arg-type]
        done.append(mode)


@pytest.mark.parametrize(
    ("usage", "mode", "waits"),
    [
        (Usage.KERNEL, "r", True),
        (Usage.WRITE, "r", True),
        (Usage.READ, "r", False),
        (Usage.BOOKKEEP, "r", False),
        (Usage.WRITE, "w", True),
        (Usage.READ, "w", True),
        (Usage.READ, "rw", True),
        (Usage.BOOKKEEP, "rw", False),
    ],
)
async def test_cpu_access_waits_for_the_right_fences(
    usage: Usage, mode: str, waits: bool
) -> None:
    buf = await MemfdExporter().allocate(4096)
    fence = Fence()
    buf.resv.add_fence(fence, usage)
    done: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_access_after, buf, mode, done)
        await wait_all_blocked()
        assert done == ([] if waits else [mode])
        fence.signal()
    assert done == [mode]
    await buf.put()


async def test_begin_cpu_access_is_a_checkpoint_even_with_no_fence() -> None:
    buf = await MemfdExporter().allocate(4096)
    async with assert_checkpoints():
        await buf.begin_cpu_access("r")
    await buf.end_cpu_access("r")
    await buf.put()


async def test_a_fence_added_while_queued_for_the_lock_is_waited_for() -> None:
    buf = await MemfdExporter().allocate(4096)
    first, second = Fence(), Fence()
    buf.resv.add_fence(first, Usage.WRITE)
    done: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_access_after, buf, "r", done)
        await wait_all_blocked()
        buf.resv.add_fence(second, Usage.WRITE)
        first.signal()
        await wait_all_blocked()
        assert done == []
        second.signal()
    assert done == ["r"]
    await buf.put()


async def test_cancelled_cpu_access_wait_leaves_nothing() -> None:
    buf = await MemfdExporter().allocate(4096)
    fence = Fence()
    buf.resv.add_fence(fence, Usage.WRITE)
    with anyio.move_on_after(0) as scope:
        await buf.begin_cpu_access("r")
    assert scope.cancelled_caught
    assert buf.cpu_access_modes == ()
    fence.signal()
    async with buf.cpu_access("r"):
        pass
    await buf.put()


async def test_sync_fds_carry_the_fences_between_buffers() -> None:
    a = await MemfdExporter().allocate(4096)
    b = await MemfdExporter().allocate(4096)
    writer = Fence()
    a.resv.add_fence(writer, Usage.WRITE)
    fd = a.export_sync_fd("r")
    try:
        b.import_sync_fd(fd, "w")  # readers and writers of b now wait too
    finally:
        os.close(fd)
    assert not b.resv.test_for_cpu("r")
    with pytest.raises(dmabuf.InvalidArgument):
        b.export_sync_fd("x")  # type: ignore[arg-type]
    writer.signal()
    async with b.cpu_access("r"):
        pass
    empty = b.export_sync_fd("rw")
    try:
        with anyio.fail_after(5):  # already readable: returns at once
            await anyio.wait_readable(empty)
    finally:
        os.close(empty)
    await a.put()
    await b.put()
    with pytest.raises(dmabuf.InvalidArgument):
        a.export_sync_fd("r")


async def test_bufinfo_shows_pending_fences_but_not_bookkeeping() -> None:
    buf = await MemfdExporter().allocate(4096, name="fenced")
    context = dmabuf.FenceContext("render", driver="gpu")
    write, book = context.fence(), Fence()
    buf.resv.add_fence(write, Usage.WRITE)
    buf.resv.add_fence(book, Usage.BOOKKEEP)
    (info,) = dmabuf.bufinfo()
    assert info.fences == (
        dmabuf.FenceInfo("WRITE", "gpu", "render", write.seqno, False),
    )
    assert f"WRITE fence: gpu render seq {write.seqno} unsignalled" in (
        dmabuf.format_bufinfo()
    )
    write.signal()
    book.signal()
    assert dmabuf.bufinfo()[0].fences == ()
    await buf.put()


async def _pipeline() -> None:
    dev = SimDevice("dma", memory=1 << 20, dma_latency=1.0)
    src = await MemfdExporter().allocate(4096)
    dst = await MemfdExporter().allocate(4096)
    async with src.cpu_access("w") as view:
        view[:] = b"\x5a" * 4096
    seen: list[tuple[float, bytes]] = []

    async def reader() -> None:
        # No explicit wait: the copy's WRITE fence on dst orders this read.
        async with dst.cpu_access("r") as view:
            seen.append((anyio.current_time(), bytes(view[:4])))

    async with (
        src.attach(dev.device) as sa,
        dst.attach(dev.device) as da,
        sa.map(Direction.TO_DEVICE) as s,
        da.map(Direction.FROM_DEVICE) as d,
    ):
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(dev.copy, s, d)
            await wait_all_blocked()
            tg.start_soon(reader)
    assert seen == [(start + 1.0, b"\x5a" * 4)]
    await src.put()
    await dst.put()


def test_pipeline_on_mock_clock() -> None:
    """A reader scheduled during a DMA copy sees the copied bytes, 1 s later."""
    anyio.run(
        _pipeline,
        backend="trio",
        backend_options={"clock": MockClock(autojump_threshold=0)},
    )


CHILD = textwrap.dedent(
    """
    import os, sys, anyio, asyncdmabuf as dmabuf

    async def main(buf_fd: int, fence_fd: int) -> None:
        buf = dmabuf.get(buf_fd)
        buf.import_sync_fd(fence_fd, "w")
        os.close(buf_fd); os.close(fence_fd)
        print("ready", flush=True)
        async with buf.cpu_access("r") as view:
            print(bytes(view[:5]).decode(), flush=True)
        await buf.put()

    anyio.run(main, int(sys.argv[1]), int(sys.argv[2]))
    """
)


async def test_another_process_sees_the_bytes_only_after_the_fence() -> None:
    buf = await MemfdExporter().allocate(4096)
    fence = Fence()
    buf_fd, fence_fd = buf.fd(), fence.export_fd()
    try:
        async with await anyio.open_process(
            [sys.executable, "-c", CHILD, str(buf_fd), str(fence_fd)],
            pass_fds=(buf_fd, fence_fd),
        ) as child:
            assert child.stdout is not None
            lines = TextReceiveStream(child.stdout)
            first = await lines.receive()
            assert first.startswith("ready")
            # The child now waits in cpu_access("r") for our fence.
            async with buf.cpu_access("w") as view:
                view[:5] = b"hello"
            fence.signal()
            rest = first[len("ready\n") :] + "".join([chunk async for chunk in lines])
            assert await child.wait() == 0
        assert rest.strip() == "hello"
    finally:
        os.close(buf_fd)
        os.close(fence_fd)
        await buf.put()


async def test_a_fence_on_a_buffer_that_had_none_while_queued_is_waited_for() -> None:
    # The access queues behind a held lock before the buffer has a reservation;
    # the holder adds the first fence before it lets go: the access waits for it.
    buf = await MemfdExporter().allocate(4096)
    assert buf.pending_resv() is None
    fence = Fence()
    done: list[str] = []
    assert buf._lock.acquire_nowait()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_access_after, buf, "r", done)
        await wait_all_blocked()
        buf.resv.add_fence(fence, Usage.WRITE)
        buf._lock.release()
        await wait_all_blocked()
        assert done == []
        fence.signal()
    assert done == ["r"]
    await buf.put()


async def test_an_uncontended_cpu_access_checkpoints_at_entry_only() -> None:
    buf = await MemfdExporter().allocate(4096)
    access = buf.cpu_access("w")
    async with assert_checkpoints():
        view = await access.__aenter__()
    view[:1] = b"x"
    async with assert_no_checkpoints():
        await access.__aexit__(None, None, None)
    assert not buf.cpu_access_open
    await buf.put()


async def test_a_cancelled_scope_stops_cpu_access_at_its_checkpoint() -> None:
    buf = await MemfdExporter().allocate(4096)
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with buf.cpu_access("w"):
            pytest.fail("the access began in a cancelled scope")
    assert scope.cancelled_caught
    assert not buf.cpu_access_open
    assert not buf._lock.locked()
    await buf.put()
