"""BufferPool: zeroed reuse, a bound with FIFO waiters, cancellation, closing."""

from __future__ import annotations

import os
from typing import ClassVar

import anyio
import anyio.lowlevel
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf import (
    BufferPool,
    DmaBuf,
    InvalidArgument,
)
from asyncdmabuf.exporters import MemfdExporter, SimDevice

from .exporters_for_tests import RecordingExporter
from .helpers import wait_all_blocked

pytestmark = pytest.mark.anyio

SIZE = 3 * 4096 + 17


async def _write(buf: DmaBuf, data: bytes, offset: int = 0) -> None:
    async with buf.cpu_access("w") as view:
        view[offset : offset + len(data)] = data
        del view


async def _bytes(buf: DmaBuf) -> bytes:
    async with buf.cpu_access("r") as view:
        data = view.tobytes()
        del view
    return data


async def _fill(buf: DmaBuf, byte: int) -> None:
    await _write(buf, bytes([byte]) * buf.size)


class NoCpuExporter(RecordingExporter):
    """Buffers without a CPU view: they cannot be zeroed, so never reused."""

    name: ClassVar[str] = "no-cpu"

    async def allocate(self, size: int, *, name: str | None = None) -> DmaBuf:
        await anyio.lowlevel.checkpoint()
        return self.make(size, name=name)


async def test_fresh_buffers_read_as_zeros() -> None:
    async with BufferPool(MemfdExporter(), SIZE, max_buffers=2) as pool:
        async with pool.buffer() as buf:
            assert buf.size == SIZE
            assert await _bytes(buf) == bytes(SIZE)
        stats = pool.statistics()
        assert (stats.allocated, stats.reused, stats.free, stats.lent) == (1, 0, 1, 0)


@pytest.mark.parametrize("make", [MemfdExporter, lambda: SimDevice("pooldev")])
async def test_a_reused_buffer_is_the_same_memory_zeroed(make: object) -> None:
    exporter = make()  # type: ignore[operator]
    async with BufferPool(exporter, SIZE, max_buffers=1, name="pooled") as pool:
        first = await pool.acquire()
        await _fill(first, 0xA5)
        pool.release(first)
        second = await pool.acquire()
        assert second is first
        assert second.name == "pooled"
        assert await _bytes(second) == bytes(SIZE)  # nothing of the last owner
        pool.release(second)
        stats = pool.statistics()
        assert (stats.allocated, stats.reused) == (1, 1)


async def test_the_bound_makes_acquirers_wait_first_come_first_served() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=2) as pool:
        held = [await pool.acquire(), await pool.acquire()]
        served: list[tuple[int, DmaBuf]] = []

        async def waiter(i: int) -> None:
            buf = await pool.acquire()
            served.append((i, buf))

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(waiter, i)
                await wait_all_blocked()
            assert pool.statistics().waiters == 3
            assert not served
            pool.release(held[1])
            await wait_all_blocked()
            assert [i for i, _ in served] == [0]
            assert served[0][1] is held[1]
            pool.release(held[0])
            await wait_all_blocked()
            assert [i for i, _ in served] == [0, 1]
            pool.release(served[0][1])
        assert [i for i, _ in served] == [0, 1, 2]
        for _, buf in served[1:]:
            pool.release(buf)
        assert pool.statistics().allocated == 2


async def test_a_cancelled_waiter_leaves_the_pool_as_it_was() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        buf = await pool.acquire()
        with anyio.move_on_after(0) as scope:
            await pool.acquire()
        assert scope.cancelled_caught
        assert pool.statistics().waiters == 0
        pool.release(buf)
        again = await pool.acquire()
        assert again is buf
        pool.release(again)


async def test_a_waiter_cancelled_after_being_served_passes_the_buffer_on() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        buf = await pool.acquire()
        got: list[DmaBuf] = []

        async with anyio.create_task_group() as tg:
            first_scope = anyio.CancelScope()

            async def first() -> None:
                with first_scope:
                    got.append(await pool.acquire())

            async def second() -> None:
                got.append(await pool.acquire())

            tg.start_soon(first)
            await wait_all_blocked()
            tg.start_soon(second)
            await wait_all_blocked()
            pool.release(buf)  # handed to first...
            first_scope.cancel()  # ...which is cancelled before it runs
        assert len(got) in (1, 2)
        for b in got:
            pool.release(b)
        stats = pool.statistics()
        assert (stats.allocated, stats.lent, stats.waiters) == (1, 0, 0)


async def test_release_refuses_what_it_cannot_take_back() -> None:
    exporter = MemfdExporter()
    async with BufferPool(exporter, 4096, max_buffers=2) as pool:
        stranger = await exporter.allocate(4096)
        with pytest.raises(InvalidArgument, match="not lent"):
            pool.release(stranger)
        await stranger.put()

        buf = await pool.acquire()
        att = await buf.attach(dmabuf.Device("dev"))
        with pytest.raises(InvalidArgument, match="attached"):
            pool.release(buf)
        await att.detach()

        # Another reference (through an fd): released, but never reused.
        fd = buf.fd()
        extra = dmabuf.get(fd)
        os.close(fd)
        pool.release(buf)
        assert pool.statistics().replaced == 1
        await extra.put()

        owned = await pool.acquire()
        assert owned is not buf
        assert buf.released  # the pool's reference, put by that acquire
        await owned.put()  # the owner put it: it leaves the pool
        with pytest.raises(InvalidArgument, match="put by its owner"):
            pool.release(owned)
        stats = pool.statistics()
        assert (stats.lent, stats.free) == (0, 0)


async def test_close_puts_everything_and_wakes_waiters() -> None:
    pool = BufferPool(MemfdExporter(), 4096, max_buffers=1)
    buf = await pool.acquire()
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await pool.acquire()
        except InvalidArgument as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await wait_all_blocked()
        tg.start_soon(pool.aclose)
        await wait_all_blocked()
        assert len(errors) == 1
        assert pool.closed
        assert not buf.released  # lent: put when it comes back
        pool.release(buf)
    assert buf.released
    with pytest.raises(InvalidArgument, match="closed"):
        await pool.acquire()


async def test_buffers_without_a_cpu_view_are_replaced_not_reused() -> None:
    exporter = NoCpuExporter()
    async with BufferPool(exporter, 4096, max_buffers=1) as pool:
        first = await pool.acquire()
        pool.release(first)
        second = await pool.acquire()
        assert second is not first
        assert exporter.released == [first]
        pool.release(second)
        assert pool.statistics().allocated == 2


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgument):
        BufferPool(MemfdExporter(), 0, max_buffers=1)
    with pytest.raises(InvalidArgument):
        BufferPool(MemfdExporter(), 4096, max_buffers=0)
    with pytest.raises(TypeError):
        BufferPool(MemfdExporter(), 4096, max_buffers=1.5)  # type: ignore[arg-type]
    assert "max 3" in repr(BufferPool(MemfdExporter(), 4096, max_buffers=3))
