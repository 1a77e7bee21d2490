"""A producer that fences its own CPU writes: begin the access, then add the fence.

``cpu_access("w")`` waits for every ``READ``-or-stronger fence, the producer's
own ``WRITE`` fence included. Adding the fence first therefore waits on itself
forever; the documented pattern (docs/concepts.md, fences) begins the write
access first and adds the fence inside the block, so readers wait from then on.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from trio.testing import MockClock

import asyncdmabuf as dmabuf
from asyncdmabuf import Fence, Usage
from asyncdmabuf.exporters import MemfdExporter

from .helpers import wait_all_blocked

pytestmark = pytest.mark.anyio

SIZE = 4096
CHUNK = 512


async def _produce(buf: dmabuf.DmaBuf, started: anyio.Event, seen: list[bytes]) -> None:
    """The pattern: begin, fence, write in chunks (checkpointing), end, signal."""

    async def reader() -> None:
        async with buf.cpu_access("r") as view:  # waits for the WRITE fence
            seen.append(bytes(view))

    async with anyio.create_task_group() as tg:
        done = Fence()
        async with buf.cpu_access("w") as view:
            buf.resv.add_fence(done, Usage.WRITE)  # readers wait from here on
            started.set()
            tg.start_soon(reader)
            for offset in range(0, SIZE, CHUNK):
                view[offset : offset + CHUNK] = b"\x7f" * CHUNK
                await anyio.lowlevel.checkpoint()  # the reader gets to run here
                await wait_all_blocked()
                assert seen == []  # ...and is still waiting
        assert seen == []  # the bytes are written, but not yet published
        done.signal()
    assert seen == [b"\x7f" * SIZE]


async def test_reader_sees_only_the_finished_bytes() -> None:
    buf = await MemfdExporter().allocate(SIZE)
    seen: list[bytes] = []
    await _produce(buf, anyio.Event(), seen)
    assert buf.resv.test(Usage.BOOKKEEP)  # nothing left pending
    await buf.put()


async def test_a_reader_already_waiting_for_an_earlier_fence_still_waits() -> None:
    """A reader queued before the producer's fence is held by a device's fence."""
    buf = await MemfdExporter().allocate(SIZE)
    device = Fence()  # a device still reading the old contents
    buf.resv.add_fence(device, Usage.READ)
    seen: list[bytes] = []
    async with anyio.create_task_group() as tg:
        started = anyio.Event()
        tg.start_soon(_produce, buf, started, seen)
        await wait_all_blocked()
        assert not started.is_set()  # the writer waits for the device's READ fence
        device.signal()
        await started.wait()
    assert seen == [b"\x7f" * SIZE]
    await buf.put()


async def test_fencing_first_waits_on_itself() -> None:
    """The wrong order: the producer's own WRITE fence blocks its cpu_access("w")."""
    buf = await MemfdExporter().allocate(SIZE)
    done = Fence()
    buf.resv.add_fence(done, Usage.WRITE)
    entered: list[str] = []

    async def producer() -> None:
        async with buf.cpu_access("w"):
            entered.append("w")

    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        await wait_all_blocked()
        assert entered == []  # it waits for its own fence, which nobody signals
        assert buf.cpu_access_modes == ()
        tg.cancel_scope.cancel()
    done.signal()
    assert entered == []
    await buf.put()


async def _wrong_order_times_out() -> float:
    buf = await MemfdExporter().allocate(SIZE)
    done = Fence()
    buf.resv.add_fence(done, Usage.WRITE)
    start = anyio.current_time()
    with anyio.move_on_after(30) as scope:
        async with buf.cpu_access("w"):
            raise AssertionError("entered a write access behind its own fence")
    assert scope.cancelled_caught
    done.signal()
    await buf.put()
    return anyio.current_time() - start


def test_fencing_first_blocks_until_a_timeout_on_mock_clock() -> None:
    """On trio's MockClock: the wrong order waits until the timeout, 30 s later."""
    waited = anyio.run(
        _wrong_order_times_out,
        backend="trio",
        backend_options={"clock": MockClock(autojump_threshold=0)},
    )
    assert waited == 30
