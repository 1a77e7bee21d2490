"""Streams in one process: arguments, checkpoints, cancellation, the transport."""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any

import anyio
import anyio.abc
import pytest
import trio.testing

import asyncdmabuf as dmabuf
from asyncdmabuf._stream import _publisher, _wire
from asyncdmabuf._stream._unix import UnixTransport, socket_address
from asyncdmabuf.exporters import MemfdExporter

from .helpers import assert_checkpoints, assert_no_checkpoints, fd_targets, stream_pair
from .test_stream import LAYOUT, address, assert_no_new_fds, publisher, send, until

pytestmark = pytest.mark.anyio


async def test_over_a_socketpair() -> None:
    async with stream_pair() as (a, b):
        pub = await dmabuf.Publisher.over(a, MemfdExporter(), 4096, buffers=2)
        async with pub, await dmabuf.subscribe(b) as sub:
            assert sub.layout is None
            assert pub.layout is None
            await send(pub, 3)
            async with await sub.receive() as frame:
                assert frame.layout is None
                assert frame.seq == 0
                assert frame.metadata == b"3"
                assert frame.timestamp > 0
            stats = pub.statistics()
            assert stats.frames_sent == 1
            assert stats.subscribers == 1


async def test_layout_travels() -> None:
    async with publisher() as (pub, path), await dmabuf.subscribe(path) as sub:
        assert sub.layout == LAYOUT
        await send(pub, 1)
        async with await sub.receive() as frame:
            assert frame.layout == LAYOUT
            async with frame.buffer.cpu_access("r") as view:
                (plane,) = LAYOUT.arrays(view)
                assert plane.shape == (64, 64)
                assert plane[63, 63] == 1
                del plane, view


async def test_loan_and_send_checkpoint_try_forms_do_not() -> None:
    async with publisher(buffers=2) as (pub, path), await dmabuf.subscribe(path) as sub:
        async with assert_checkpoints():
            frame = await pub.loan()
        async with assert_checkpoints():
            await pub.send(frame)
        async with assert_checkpoints():
            got = await sub.receive()
        got.release()
        async with assert_no_checkpoints():
            frame = pub.try_loan()
            pub.try_send(frame, metadata=b"x")
        await until(lambda: pub.statistics().buffers_free == 1)
        async with assert_no_checkpoints():
            sub.receive_nowait().release()
            with pytest.raises(dmabuf.Busy):
                sub.receive_nowait()


async def test_a_frame_dropped_before_its_acquire_fence_stays_out() -> None:
    async with stream_pair() as (a, b):
        pub = await dmabuf.Publisher.over(a, MemfdExporter(), 4096, buffers=3)
        async with pub, await dmabuf.subscribe(b, queue=1, overflow="drop-oldest"):
            await until(lambda: len(pub.subscribers) == 1)
            fences = [dmabuf.Fence() for _ in range(3)]
            bufs = []
            for fence in fences:  # 0 goes out, 1 waits, 2 drops 1
                frame = pub.try_loan()
                bufs.append(frame.buffer)
                pub.try_send(frame, fence=fence)
            assert pub.statistics().frames_dropped == 1
            # Nobody holds frame 1's buffer, but its producer still writes it.
            assert not bufs[1].resv.test(dmabuf.Usage.BOOKKEEP)
            with pytest.raises(dmabuf.Busy):
                pub.try_loan()
            fences[1].signal()
            async with assert_no_checkpoints():
                again = pub.try_loan()  # back at once: try_loan tests the resv
            assert again.buffer is bufs[1]
            again.release()
            fences[0].signal()
            fences[2].signal()


async def test_try_loan_busy_and_loan_waits() -> None:
    async with publisher(buffers=1) as (pub, _):
        frame = pub.try_loan()
        with pytest.raises(dmabuf.Busy):
            pub.try_loan()
        got = anyio.Event()

        async def loan() -> None:
            again = await pub.loan()
            got.set()
            again.release()

        async with anyio.create_task_group() as tg:
            tg.start_soon(loan)
            await anyio.lowlevel.checkpoint()
            assert not got.is_set()
            frame.release()  # unsent: straight back to the pool
        assert got.is_set()
        assert pub.statistics().buffers_free == 1


async def test_loan_cancelled_leaves_nothing() -> None:
    async with publisher(buffers=1) as (pub, _):
        frame = pub.try_loan()
        with anyio.move_on_after(0.01):
            await pub.loan()
        frame.release()
        assert pub.statistics().buffers_free == 1


async def test_release_fence_of_an_unsent_loan_gates_reuse() -> None:
    async with publisher(buffers=1) as (pub, _):
        fence = dmabuf.Fence()
        pub.try_loan().release(fence=fence)
        with pytest.raises(dmabuf.Busy):
            pub.try_loan()
        fence.signal()
        with anyio.fail_after(10):
            (await pub.loan()).release()


async def test_no_subscribers_frames_come_straight_back() -> None:
    async with publisher(buffers=1) as (pub, _):
        for seq in range(3):
            await send(pub, seq)
        assert pub.statistics().buffers_free == 1
        assert pub.statistics().frames_sent == 3


async def test_frame_misuse() -> None:
    async with publisher(buffers=2) as (pub, path):
        frame = await pub.loan()
        with pytest.raises(TypeError):
            await pub.send("frame")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await pub.send(frame, fence="f")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await pub.send(frame, metadata="text")  # type: ignore[arg-type]
        with pytest.raises(dmabuf.InvalidArgument):
            await pub.send(frame, metadata=b"x" * 5000)
        with pytest.raises(TypeError):
            frame.release(fence=1)  # type: ignore[arg-type]
        await pub.send(frame)
        with pytest.raises(dmabuf.InvalidArgument):
            await pub.send(frame)  # sent already
        with pytest.raises(dmabuf.InvalidArgument):
            frame.release()
        async with publisher() as (other, _):
            theirs = await other.loan()
            with pytest.raises(dmabuf.InvalidArgument):
                await pub.send(theirs)
            theirs.release()
        async with await dmabuf.subscribe(path) as sub:
            await send(pub, 1)
            got = await sub.receive()
            got.release()
            with pytest.raises(dmabuf.InvalidArgument):
                got.release()
            assert "released" in repr(got)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"buffers": 0}, dmabuf.InvalidArgument),
        ({"buffers": 1000}, dmabuf.InvalidArgument),
        ({"buffers": "4"}, TypeError),
        ({"history": 4}, dmabuf.InvalidArgument),
        ({"history": -1}, dmabuf.InvalidArgument),
        ({"allow_uids": 5}, TypeError),
        ({"allow_uids": ["root"]}, TypeError),
    ],
)
async def test_bad_bind_arguments(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    kwargs = {"buffers": 4, **kwargs}
    with pytest.raises(error):
        await dmabuf.Publisher.bind(address(), MemfdExporter(), 4096, **kwargs)


async def test_bad_bind_targets() -> None:
    with pytest.raises(TypeError):
        await dmabuf.Publisher.bind(address(), object(), 4096)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await dmabuf.Publisher.bind(address(), MemfdExporter(), 4.5)  # type: ignore[arg-type]
    with pytest.raises(dmabuf.InvalidArgument):
        await dmabuf.Publisher.bind(address(), MemfdExporter(), 0)
    for path in ("", "@", "a\0b"):
        with pytest.raises(dmabuf.InvalidArgument):
            await dmabuf.Publisher.bind(path, MemfdExporter(), 4096)
    with pytest.raises(TypeError):
        socket_address(b"/tmp/x")  # type: ignore[arg-type]
    async with publisher() as (_, path):
        with pytest.raises(dmabuf.DmaBufError):  # EADDRINUSE
            await dmabuf.Publisher.bind(path, MemfdExporter(), 4096)


async def test_an_exporter_without_shareable_memory_is_refused() -> None:
    # SimDevice keeps its bytes in device memory: its buffers would travel as
    # empty files no subscriber accepts, so the stream refuses them up front,
    # as send_buffer refuses such a buffer (EINVAL), and leaks nothing.
    from asyncdmabuf.exporters import SimDevice

    before = fd_targets()
    path = address()
    with pytest.raises(dmabuf.InvalidArgument, match="no shareable memory") as info:
        await dmabuf.Publisher.bind(path, SimDevice("sim"), LAYOUT, buffers=2)
    assert info.value.errno == errno.EINVAL
    async with await dmabuf.Publisher.bind(path, MemfdExporter(), 4096):  # let go
        pass
    async with stream_pair() as (a, _):
        with pytest.raises(dmabuf.InvalidArgument, match="no shareable memory"):
            await dmabuf.Publisher.over(a, SimDevice("sim"), 4096, buffers=2)
        with pytest.raises(anyio.ClosedResourceError):  # the publisher's: closed
            await a.send(b"x")
    assert_no_new_fds(before)


async def test_bad_subscribe_arguments() -> None:
    with pytest.raises(dmabuf.InvalidArgument):
        await dmabuf.subscribe(address(), queue=0)
    with pytest.raises(dmabuf.InvalidArgument):
        await dmabuf.subscribe(address(), overflow="drop-newest")
    with pytest.raises(TypeError):
        await dmabuf.subscribe(address(), queue=None)  # type: ignore[arg-type]
    with pytest.raises(dmabuf.DmaBufError):  # nobody listens
        await dmabuf.subscribe(address())


async def test_filesystem_path_is_removed(tmp_path: Any) -> None:
    path = str(tmp_path / "cam.sock")
    async with await dmabuf.Publisher.bind(path, MemfdExporter(), 4096) as pub:
        assert os.stat(path)
        async with await dmabuf.subscribe(path):
            await until(lambda: len(pub.subscribers) == 1)
    with pytest.raises(FileNotFoundError):
        os.stat(path)


async def test_publisher_needs_async_with() -> None:
    pub = await dmabuf.Publisher.bind(address(), MemfdExporter(), 4096, buffers=1)
    with pytest.raises(dmabuf.InvalidArgument):
        pub.try_loan()
    with pytest.raises(dmabuf.InvalidArgument):
        await pub.loan()
    await pub.aclose()
    with pytest.raises(dmabuf.InvalidArgument):
        async with pub:
            pass


async def test_not_allowed_uid_is_refused() -> None:
    before = fd_targets()
    async with publisher(allow_uids=[os.geteuid() + 1]) as (pub, path):
        with pytest.raises(anyio.BrokenResourceError):
            await dmabuf.subscribe(path)
        assert pub.statistics().refused == 1
    with pytest.raises(dmabuf.InvalidArgument):
        async with publisher() as (pub, path):
            await dmabuf.subscribe(path, allow_uids=[os.geteuid() + 1])
    assert_no_new_fds(before)


async def test_subscriber_close_releases_everything() -> None:
    async with publisher(buffers=3) as (pub, path):
        sub = await dmabuf.subscribe(path, queue=3)
        for seq in range(3):
            await send(pub, seq)
        held = [await sub.receive() for _ in range(2)]
        assert sub.statistics().frames_held == 2
        await sub.aclose()
        assert all(frame.released for frame in held)
        with pytest.raises(anyio.ClosedResourceError):
            await sub.receive()
        await sub.aclose()  # twice is fine
        await until(lambda: pub.statistics().buffers_free == 3)
        assert pub.subscribers == ()


async def test_cancelled_block_send_reaches_those_before() -> None:
    async with (
        publisher(buffers=3) as (pub, path),
        await dmabuf.subscribe(path, queue=1) as sub,
    ):
        if True:
            await send(pub, 0)
            frame = await pub.loan()
            with anyio.move_on_after(0.05) as scope:
                await pub.send(frame)
            assert scope.cancelled_caught
            assert frame.released  # consumed, though nobody got it
            await until(lambda: pub.statistics().buffers_free == 2)
            (await sub.receive()).release()
            await send(pub, 2)
            got = await sub.receive()
            assert got.seq == 2
            assert sub.statistics().frames_dropped == 1
            got.release()


class TestVirtualTime:
    @pytest.fixture
    def anyio_backend(self) -> tuple[str, dict[str, object]]:
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})

    async def test_silent_connection_is_dropped_after_the_handshake_timeout(
        self,
    ) -> None:
        async with publisher() as (pub, path):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with sock:
                sock.connect("\0" + path[1:])
                await anyio.sleep(_publisher.HANDSHAKE_TIMEOUT - 1)  # virtual time
                assert pub.statistics().refused == 0
                await anyio.sleep(2)
                assert pub.statistics().refused == 1
                assert sock.recv(16) == b""  # hung up


# -- the transport ------------------------------------------------------------------


async def test_transport_messages_and_fds() -> None:
    a, b = socket.socketpair()
    with a:
        stream = await anyio.abc.UNIXSocketStream.from_socket(b)
        transport = UnixTransport(stream)
        assert transport.peer.pid == os.getpid()
        r, w = os.pipe()
        try:
            # Three messages in one write but the fds with the second sendmsg.
            a.sendall(struct.pack("<I", 3) + b"one" + struct.pack("<I", 3) + b"two")
            a.sendmsg(
                [struct.pack("<I", 5) + b"three"],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))],
            )
            got = [await transport.receive() for _ in range(3)]
        finally:
            os.close(r)
            os.close(w)
        assert [m for m, _ in got] == [b"one", b"two", b"three"]
        assert [len(f) for _, f in got] == [0, 0, 1]
        os.close(got[2][1][0])
        with pytest.raises(dmabuf.Busy):
            transport.receive_nowait()
        a.sendall(struct.pack("<I", 10**6))
        with pytest.raises(dmabuf.InvalidArgument):
            await transport.receive()
        with pytest.raises(anyio.BrokenResourceError):
            await transport.receive()
        with pytest.raises(dmabuf.InvalidArgument):
            transport.send_nowait(b"x" * (_wire.MAX_METADATA * 4))
        await transport.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            transport.send_nowait(b"late")


async def test_cancelled_send_sends_nothing_and_keeps_the_loan() -> None:
    async with publisher(buffers=2) as (pub, path), await dmabuf.subscribe(path) as sub:
        frame = await pub.loan()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pub.send(frame)
        assert scope.cancelled_caught
        assert not frame.released  # the checkpoint came before anything went
        assert pub.statistics().frames_sent == 0
        await pub.send(frame, metadata=b"kept")
        async with await sub.receive() as got:
            assert (got.seq, got.metadata) == (0, b"kept")


async def test_cancelled_receive_with_a_frame_there_takes_nothing() -> None:
    async with publisher(buffers=2) as (pub, path), await dmabuf.subscribe(path) as sub:
        await send(pub, 0)
        await until(sub._transport.poll_nowait)  # the frame has come
        with anyio.CancelScope() as scope:
            scope.cancel()
            await sub.receive()
        assert scope.cancelled_caught
        assert sub.statistics().frames_received == 0
        async with assert_checkpoints():
            got = await sub.receive()  # there already: still a checkpoint
        assert got.seq == 0
        got.release()


async def test_releases_that_come_together_are_all_handled() -> None:
    async with (
        publisher(buffers=3) as (pub, path),
        await dmabuf.subscribe(path, queue=3) as sub,
    ):
        for seq in range(3):
            await send(pub, seq)
        frames = [await sub.receive() for _ in range(3)]
        for frame in frames:  # three releases, most likely in one read
            frame.release()
        await until(lambda: pub.statistics().buffers_free == 3)
        assert pub.subscribers[0].held == 0
        for seq in range(3, 6):  # and the credits came back with them
            await send(pub, seq)
            (await sub.receive()).release()


async def test_transport_poll_and_receive_after_busy() -> None:
    a, b = socket.socketpair()
    with a:
        stream = await anyio.abc.UNIXSocketStream.from_socket(b)
        transport = UnixTransport(stream)
        assert not transport.poll_nowait()
        with pytest.raises(dmabuf.Busy):
            transport.receive_nowait()
        # What comes after a read that found nothing is still received.
        a.sendall(struct.pack("<I", 3) + b"one" + struct.pack("<I", 3) + b"two")
        assert await transport.receive() == (b"one", [])
        assert transport.poll_nowait()  # "two" waits; poll takes nothing
        assert transport.poll_nowait()
        async with assert_checkpoints():
            assert await transport.receive() == (b"two", [])
        with pytest.raises(dmabuf.Busy):
            transport.receive_nowait()

        async def late() -> None:
            await anyio.wait_all_tasks_blocked()
            a.sendall(struct.pack("<I", 5) + b"three")

        async with anyio.create_task_group() as tg:
            tg.start_soon(late)
            assert await transport.receive() == (b"three", [])
        a.shutdown(socket.SHUT_WR)
        await until(transport.poll_nowait)  # the end is there to be raised
        with pytest.raises(anyio.EndOfStream):
            transport.receive_nowait()
        await transport.aclose()
        assert transport.poll_nowait()
        with pytest.raises(anyio.ClosedResourceError):
            transport.receive_nowait()
