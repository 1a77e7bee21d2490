"""Streams across processes: fan-out, fences both ways, overflow, history, faults.

The publisher runs in the test (on each backend); subscribers run in other
processes (tests/stream_peer.py on the same backend), or the other way round
for a publisher's death. Everything is synchronised on what the peer reports.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf.exporters import MemfdExporter

from .helpers import fd_targets
from .peers import Peer, run_peer
from .stream_peer import fill

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PEER = Path(__file__).with_name("stream_peer.py")
LAYOUT = dmabuf.FrameLayout.for_format("GREY", 64, 64)
_names = itertools.count()


def address() -> str:
    return f"@asyncdmabuf-test-{os.getpid()}-{next(_names)}"


def peer_backend(backend: tuple[str, dict[str, object]]) -> str:
    if backend[0] == "trio":
        return "trio"
    return "uvloop" if backend[1].get("use_uvloop") else "asyncio"


@contextlib.asynccontextmanager
async def peer(
    role: str, path: str, *args: object, backend: tuple[str, dict[str, object]]
) -> AsyncIterator[Peer]:
    """Run stream_peer.py ROLE; it must exit 0 unless the test killed it."""
    env = dict(os.environ, PEER_BACKEND=peer_backend(backend))
    async with run_peer(PEER, [role, path, *map(str, args)], env) as child:
        yield child


async def produce(pub: dmabuf.Publisher, seq: int, **kwargs: Any) -> dmabuf.Frame:
    """Loan, fill with fill(seq), and return the frame (not sent yet)."""
    frame = await pub.loan()
    async with frame.buffer.cpu_access("w") as view:
        view[:] = bytes([fill(seq)]) * len(view)
        del view
    return frame


async def send(pub: dmabuf.Publisher, seq: int) -> None:
    await pub.send(await produce(pub, seq), metadata=str(seq).encode())


def assert_no_new_fds(before: dict[int, str]) -> None:
    """Fail if an fd is open now that was not in ``before`` (fd -> target)."""
    new = {fd: t for fd, t in fd_targets().items() if before.get(fd) != t}
    assert not new, f"fds left open: {new}"


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run (reading sockets) until ``condition()`` holds."""
    with anyio.fail_after(30):
        while not condition():
            await anyio.lowlevel.checkpoint()


@contextlib.asynccontextmanager
async def publisher(**kwargs: Any) -> AsyncIterator[tuple[dmabuf.Publisher, str]]:
    path = address()
    kwargs.setdefault("buffers", 3)
    async with await dmabuf.Publisher.bind(
        path, MemfdExporter(), LAYOUT, **kwargs
    ) as pub:
        yield pub, path


# -- fan-out ------------------------------------------------------------------------


async def test_fan_out_to_two_processes(anyio_backend: Any) -> None:
    before = fd_targets()
    frames = 12
    async with (
        publisher(buffers=3) as (pub, path),
        peer("receive", path, frames, 2, "block", backend=anyio_backend) as a,
        peer("receive", path, frames, 2, "block", backend=anyio_backend) as b,
    ):
        ready = {a: await a.facts(), b: await b.facts()}
        assert len(pub.subscribers) == 2
        await a.say()
        await b.say()
        for seq in range(frames):
            await send(pub, seq)
        for side in (a, b):
            facts = await side.facts()
            got = facts["frames"]
            assert [f["seq"] for f in got] == list(range(frames))
            assert all(f["ok"] for f in got)
            assert [f["meta"] for f in got] == [str(s) for s in range(frames)]
            # Each buffer's fd crossed once: 12 frames, 3 fds.
            assert facts["buffers"] == 3
            assert facts["dropped"] == 0
        await until(lambda: pub.statistics().buffers_free == 3)
        stats = pub.statistics()
        assert stats.frames_sent == frames
        assert stats.frames_dropped == 0
        await pub.aclose()
        for side in (a, b):
            assert (await side.facts())["end"]
            closed = await side.facts()
            assert closed["closed"]
            # Nothing is open there that was not before the first frame.
            was = ready[side]["fds"]
            assert {fd: t for fd, t in closed["fds"].items() if was.get(fd) != t} == {}
    assert_no_new_fds(before)


# -- fences -------------------------------------------------------------------------


async def test_fences_both_ways(anyio_backend: Any) -> None:
    async with (
        publisher(buffers=1) as (pub, path),
        peer("fences", path, backend=anyio_backend) as sub,
    ):
        assert (await sub.facts())["ready"]
        frame = await produce(pub, 0)
        acquire = dmabuf.Fence()
        buf = frame.buffer
        await pub.send(frame, fence=acquire)
        facts = await sub.facts()
        assert facts["received"]
        assert facts["readable"] is False  # the acquire fence is in its resv
        # The "device" writes after the subscriber has the frame, then signals.
        async with buf.cpu_access("w") as view:
            view[0] = 77
            del view
        acquire.signal()
        assert (await sub.facts())["first"] == 77  # it waited for the fence
        assert (await sub.facts())["released"]
        # The release has come back, but its fence is pending: no loan.
        await until(lambda: pub.subscribers[0].buffers == ())
        assert pub.subscribers[0].queued == 0
        with pytest.raises(dmabuf.Busy):
            pub.try_loan()
        assert pub.statistics().buffers_in_flight == 1
        await sub.say()
        assert (await sub.facts())["signalled"]
        with anyio.fail_after(30):
            again = await pub.loan()
        assert again.buffer is buf
        again.release()
        await sub.say()
        assert (await sub.facts())["closed"]


async def test_the_acquire_fence_gates_reuse(anyio_backend: Any) -> None:
    async with (
        publisher(buffers=1) as (pub, path),
        peer("release-unread", path, backend=anyio_backend) as sub,
    ):
        assert (await sub.facts())["ready"]
        frame = await pub.loan()
        buf = frame.buffer
        acquire = dmabuf.Fence()
        await pub.send(frame, fence=acquire)
        # The publisher's own resv holds the producer's write...
        assert not buf.resv.test(dmabuf.Usage.BOOKKEEP)
        # ...but not for implicit sync: the producer writes after send.
        assert buf.resv.test(dmabuf.Usage.READ)
        facts = await sub.facts()
        assert facts == {"released": True, "pending": True}
        await until(lambda: pub.subscribers[0].buffers == ())
        # Every subscriber released it, the acquire fence is pending: no loan.
        with pytest.raises(dmabuf.Busy):
            pub.try_loan()
        assert pub.statistics().buffers_in_flight == 1
        lent: list[dmabuf.Frame] = []

        async def borrow() -> None:
            lent.append(await pub.loan())

        async with anyio.create_task_group() as tg:
            tg.start_soon(borrow)
            await anyio.wait_all_tasks_blocked()
            assert lent == []  # loan() waits for the acquire fence
            acquire.signal()
        assert lent[0].buffer is buf
        lent[0].release()
        await sub.say()
        assert (await sub.facts())["closed"]


async def test_a_gone_subscribers_release_fences_count_as_failed(
    anyio_backend: Any,
) -> None:
    async with (
        publisher(buffers=1) as (pub, path),
        peer("fence-and-leave", path, backend=anyio_backend) as sub,
    ):
        assert (await sub.facts())["ready"]
        await send(pub, 0)
        assert (await sub.facts())["released"]
        await until(lambda: pub.subscribers[0].buffers == ())
        with pytest.raises(dmabuf.Busy):
            pub.try_loan()  # its release fence is pending
        assert pub.statistics().fences_cut == 0
        await sub.say()
        assert (await sub.facts())["left"]  # alive, its fence still pending
        await until(lambda: pub.statistics().subscribers == 0)
        # The fence counts as signalled with an error: the buffer is back.
        assert pub.statistics().fences_cut == 1
        with anyio.fail_after(30):
            again = await pub.loan()
        again.release()
        await sub.say()
        assert (await sub.facts())["closed"]


# -- overflow -----------------------------------------------------------------------


async def test_drop_oldest_never_blocks(anyio_backend: Any) -> None:
    async with (
        publisher(buffers=4) as (pub, path),
        peer("receive", path, 2, 1, "drop-oldest", backend=anyio_backend) as sub,
    ):
        assert (await sub.facts())["ready"]
        with anyio.fail_after(30):  # never waits for the subscriber
            for seq in range(6):
                await send(pub, seq)
        (info,) = pub.subscribers
        assert info.dropped == 4  # 0 went out; 1-4 dropped; 5 waits
        assert info.queued == 2
        assert pub.statistics().frames_dropped == 4
        assert pub.statistics().buffers_free == 2
        await sub.say()
        facts = await sub.facts()
        assert [f["seq"] for f in facts["frames"]] == [0, 5]
        assert all(f["ok"] for f in facts["frames"])
        assert facts["dropped"] == 4  # the seq gap it saw
        await pub.aclose()
        assert (await sub.facts())["end"]


async def test_block_waits_for_the_subscriber(anyio_backend: Any) -> None:
    async with (
        publisher(buffers=4) as (pub, path),
        peer("receive", path, 3, 1, "block", backend=anyio_backend) as sub,
    ):
        assert (await sub.facts())["ready"]
        await send(pub, 0)
        frame = await produce(pub, 1)
        with pytest.raises(dmabuf.Busy):
            pub.try_send(frame)
        assert not frame.released  # try_send sent nothing
        sent = anyio.Event()

        async def blocked() -> None:
            await pub.send(frame)
            sent.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked)
            await anyio.lowlevel.checkpoint()
            assert not sent.is_set()
            assert pub.subscribers[0].queued == 1
            await sub.say()  # it reads: the credit lets send go on
            with anyio.fail_after(30):
                await sent.wait()
        await send(pub, 2)
        facts = await sub.facts()
        assert [f["seq"] for f in facts["frames"]] == [0, 1, 2]
        assert all(f["ok"] for f in facts["frames"])
        assert pub.statistics().frames_dropped == 0
        await pub.aclose()
        assert (await sub.facts())["end"]


# -- history ------------------------------------------------------------------------


async def test_history_for_late_joiners(anyio_backend: Any) -> None:
    async with publisher(buffers=4, history=2) as (pub, path):
        for seq in range(5):
            await send(pub, seq)
        assert pub.statistics().buffers_free == 2  # the history holds two
        async with peer("receive", path, 3, 4, "block", backend=anyio_backend) as sub:
            assert (await sub.facts())["ready"]
            await send(pub, 5)
            await sub.say()
            facts = await sub.facts()
            assert [f["seq"] for f in facts["frames"]] == [3, 4, 5]
            assert all(f["ok"] for f in facts["frames"])
            await pub.aclose()
            assert (await sub.facts())["end"]


async def test_history_beyond_the_queue(anyio_backend: Any) -> None:
    # A late joiner gets the K latest frames even with a queue shorter than K.
    async with publisher(buffers=4, history=3) as (pub, path):
        for seq in range(5):
            await send(pub, seq)
        async with peer("receive", path, 4, 1, "block", backend=anyio_backend) as sub:
            assert (await sub.facts())["ready"]
            await until(lambda: pub.subscribers[0].queued == 3)
            frame = await produce(pub, 5)
            with pytest.raises(dmabuf.Busy):  # its queue is over-full: backpressure
                pub.try_send(frame)
            await sub.say()
            await pub.send(frame)  # waits until the history is taken
            facts = await sub.facts()
            assert [f["seq"] for f in facts["frames"]] == [2, 3, 4, 5]
            assert all(f["ok"] for f in facts["frames"])
            await pub.aclose()
            assert (await sub.facts())["end"]


# -- faults -------------------------------------------------------------------------


async def test_sigkill_of_a_subscriber_holding_frames(anyio_backend: Any) -> None:
    async with (
        publisher(buffers=3) as (pub, path),
        peer("hold", path, 2, backend=anyio_backend) as victim,
        peer("receive", path, 3, 2, "block", backend=anyio_backend) as other,
    ):
        assert (await victim.facts())["ready"]
        assert (await other.facts())["ready"]
        await other.say()
        await send(pub, 0)
        await send(pub, 1)
        assert (await victim.facts())["holding"] == [0, 1]
        assert pub.statistics().buffers_free <= 1
        victim.proc.send_signal(signal.SIGKILL)
        await until(lambda: len(pub.subscribers) == 1)
        # Every frame it held is back: all three buffers can be loaned.
        await until(lambda: pub.statistics().buffers_free == 3)
        await send(pub, 2)  # the publisher goes on, the other is unaffected
        facts = await other.facts()
        assert [f["seq"] for f in facts["frames"]] == [0, 1, 2]
        assert all(f["ok"] for f in facts["frames"])
        await pub.aclose()
        assert (await other.facts())["end"]


async def test_publisher_death_ends_iteration(anyio_backend: Any) -> None:
    path = address()
    before = fd_targets()
    async with peer("publish", path, 3, backend=anyio_backend) as pub:
        assert (await pub.facts())["ready"]
        async with await dmabuf.subscribe(path, queue=3) as sub:
            await pub.say()
            held = [await sub.receive() for _ in range(3)]
            assert (await pub.facts())["sent"] == 3
            pub.proc.send_signal(signal.SIGKILL)
            seen = [frame async for frame in sub]  # ends with EndOfStream
            assert seen == []
            with pytest.raises(anyio.EndOfStream):
                await sub.receive()
            for frame in held:  # still readable
                async with frame.buffer.cpu_access("r") as view:
                    assert view[0] == view[-1] == fill(frame.seq)
                    del view
                frame.release()  # nobody to give it to: no error
            assert sub.statistics().frames_held == 0
    assert_no_new_fds(before)
