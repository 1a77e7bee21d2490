"""Streams against hostile peers written with raw sockets.

A peer that sends garbage, lies about buffer ids, seqs, layouts or credits,
sends fds where none belong or connects as another uid is disconnected (or
refused), with no fd left open on either side and other subscribers unaffected.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf._stream import _wire

from .helpers import fd_targets
from .test_stream import LAYOUT, assert_no_new_fds, peer, publisher, send, until

pytestmark = pytest.mark.anyio

FRAME = struct.Struct("<BBHBQqH")
RELEASE = struct.Struct("<BBHBQI")


def framed(message: bytes) -> bytes:
    return struct.pack("<I", len(message)) + message


def sendmsg(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def frame_message(buffer: int, flags: int, seq: int, meta: bytes = b"") -> bytes:
    return framed(FRAME.pack(1, 3, buffer, flags, seq, 0, len(meta)) + meta)


def release_message(buffer: int, seq: int, credits: int, fence: bool = False) -> bytes:
    return framed(RELEASE.pack(1, 4, buffer, 2 if fence else 0, seq, credits))


async def drain(sock: socket.socket) -> list[bytes]:
    """Read until the publisher hangs up; close every fd that came; return the data."""
    sock.setblocking(False)
    chunks = []
    with anyio.fail_after(30):
        while True:
            await anyio.wait_readable(sock)
            try:
                data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64))
            except ConnectionResetError:
                break
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
                    for fd in fds:
                        os.close(fd)
            if not data:
                break
            chunks.append(data)
    return chunks


async def read_some(sock: socket.socket, fds: list[int]) -> bytes:
    """Wait for what the publisher sends next; keep the fds that come."""
    sock.setblocking(False)
    with anyio.fail_after(30):
        while True:
            await anyio.wait_readable(sock)
            data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64))
            for _, _, payload in anc:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(got)
            return data


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("\0" + path[1:])
    return sock


def memfd(size: int = 4096) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


SUBSCRIBE = framed(_wire.Subscribe(2, "block").encode())


def _garbage(sock: socket.socket) -> None:
    sendmsg(sock, framed(b"hello, publisher"))


def _huge(sock: socket.socket) -> None:
    sendmsg(sock, struct.pack("<I", 0xFFFFFFFF) + b"x" * 64)


def _fd_with_subscribe(sock: socket.socket) -> None:
    fd = memfd()
    try:
        sendmsg(sock, SUBSCRIBE, [fd])
    finally:
        os.close(fd)


def _too_many_fds(sock: socket.socket) -> None:
    fds = [memfd() for _ in range(5)]
    try:
        sendmsg(sock, SUBSCRIBE, fds)
    finally:
        for fd in fds:
            os.close(fd)


def _half_then_close(sock: socket.socket) -> None:
    sendmsg(sock, SUBSCRIBE[:5])
    sock.shutdown(socket.SHUT_WR)


def _wrong_version(sock: socket.socket) -> None:
    sendmsg(sock, framed(b"\x09" + SUBSCRIBE[5:]))


def _bad_queue(sock: socket.socket) -> None:
    sendmsg(sock, framed(struct.pack("<BBIB", 1, 1, 0, 0)))


def _release_before_anything(sock: socket.socket) -> None:
    sendmsg(sock, SUBSCRIBE + release_message(0, 0, 0))


HANDSHAKES: dict[str, Callable[[socket.socket], None]] = {
    "garbage": _garbage,
    "huge-length": _huge,
    "fd-with-subscribe": _fd_with_subscribe,
    "too-many-fds": _too_many_fds,
    "half-then-close": _half_then_close,
    "wrong-version": _wrong_version,
    "bad-queue": _bad_queue,
    "release-unknown": _release_before_anything,
}


@contextlib.asynccontextmanager
async def with_good_subscriber(
    pub: dmabuf.Publisher, path: str
) -> AsyncIterator[dmabuf.Subscriber]:
    async with await dmabuf.subscribe(path, queue=4) as sub:
        yield sub


async def check_good(pub: dmabuf.Publisher, sub: dmabuf.Subscriber, seq: int) -> None:
    await send(pub, seq)
    async with await sub.receive() as frame:
        assert frame.seq == seq
        async with frame.buffer.cpu_access("r") as view:
            assert view[0] == view[-1] == seq
            del view


@pytest.mark.parametrize("attack", HANDSHAKES)
async def test_hostile_subscriber_is_disconnected(attack: str) -> None:
    before = fd_targets()
    async with (
        publisher(buffers=3) as (pub, path),
        with_good_subscriber(pub, path) as good,
    ):
        await check_good(pub, good, 0)
        with connect(path) as sock:
            HANDSHAKES[attack](sock)
            await drain(sock)  # the publisher hangs up
        await until(lambda: pub.statistics().refused == 1)
        assert len(pub.subscribers) == 1
        await check_good(pub, good, 1)
    assert_no_new_fds(before)


def _lie_buffer(sock: socket.socket, seq: int, buffer: int) -> None:
    sendmsg(sock, release_message(buffer + 1, seq, 1))


def _lie_seq(sock: socket.socket, seq: int, buffer: int) -> None:
    sendmsg(sock, release_message(buffer, seq + 7, 1))


def _lie_credits(sock: socket.socket, seq: int, buffer: int) -> None:
    sendmsg(sock, framed(struct.pack("<BBI", 1, 5, 99)))


def _release_twice(sock: socket.socket, seq: int, buffer: int) -> None:
    sendmsg(sock, release_message(buffer, seq, 1) + release_message(buffer, seq, 0))


def _pipe_as_fence(sock: socket.socket, seq: int, buffer: int) -> None:
    r, w = os.pipe()
    try:
        sendmsg(sock, release_message(buffer, seq, 1, fence=True), [r])
    finally:
        os.close(r)
        os.close(w)


def _fence_without_fd(sock: socket.socket, seq: int, buffer: int) -> None:
    sendmsg(sock, release_message(buffer, seq, 1, fence=True))


def _fd_with_release(sock: socket.socket, seq: int, buffer: int) -> None:
    fd = memfd()
    try:
        sendmsg(sock, release_message(buffer, seq, 1), [fd])
    finally:
        os.close(fd)


def _publisher_message(sock: socket.socket, seq: int, buffer: int) -> None:
    sendmsg(sock, frame_message(buffer, 0, seq))


LIES: dict[str, Callable[[socket.socket, int, int], None]] = {
    "wrong-buffer-id": _lie_buffer,
    "unknown-seq": _lie_seq,
    "too-many-credits": _lie_credits,
    "release-twice": _release_twice,
    "pipe-as-fence": _pipe_as_fence,
    "fence-without-fd": _fence_without_fd,
    "fd-with-release": _fd_with_release,
    "frame-from-subscriber": _publisher_message,
}


@pytest.mark.parametrize("lie", LIES)
async def test_lying_subscriber_gives_its_frames_back(lie: str) -> None:
    before = fd_targets()
    async with (
        publisher(buffers=3) as (pub, path),
        with_good_subscriber(pub, path) as good,
    ):
        with connect(path) as sock:
            sendmsg(sock, SUBSCRIBE)
            fds: list[int] = []
            welcome = await read_some(sock, fds)
            assert welcome  # the WELCOME
            await until(lambda: len(pub.subscribers) == 2)
            await send(pub, 0)
            data = await read_some(sock, fds)
            assert len(fds) == 1  # the buffer's fd, once
            for fd in fds:
                os.close(fd)
            _, _, buffer, flags, seq, _, _ = FRAME.unpack_from(data, 4)
            assert flags == _wire.HAS_BUFFER
            assert pub.subscribers[1].buffers == (buffer,)
            LIES[lie](sock, seq, buffer)
            await drain(sock)
        await until(lambda: len(pub.subscribers) == 1)
        assert pub.statistics().refused == 1
        async with await good.receive() as frame:  # the good one still has frame 0
            assert frame.seq == 0
        await until(lambda: pub.statistics().buffers_free == 3)
        await check_good(pub, good, 1)
    assert_no_new_fds(before)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as nobody")
@pytest.mark.slow
async def test_another_uid_is_refused(anyio_backend: Any) -> None:
    async with (
        publisher(buffers=2) as (pub, path),
        peer("as-uid", path, 65534, backend=anyio_backend) as other,
    ):
        assert (await other.facts())["refused"] is True
        assert pub.statistics().refused == 1
        assert pub.subscribers == ()


# -- hostile publishers -------------------------------------------------------------


def welcome(
    buffers: int = 2, history: int = 0, size: int = 4096, tail: bytes = b""
) -> bytes:
    return framed(struct.pack("<BBHHQB", 1, 2, buffers, history, size, 0) + tail)


def layout_welcome(width: int, size: int) -> bytes:
    body = struct.pack("<BBHHQB", 1, 2, 2, 0, size, 1)
    body += struct.pack("<IIIQB", LAYOUT.code, width, 64, 0, 1) + struct.pack(
        "<QI", 0, width
    )
    return framed(body)


@contextlib.asynccontextmanager
async def raw_publisher() -> AsyncIterator[
    tuple[socket.socket, anyio.abc.UNIXSocketStream]
]:
    a, b = socket.socketpair()
    with a:
        yield a, await anyio.abc.UNIXSocketStream.from_socket(b)


BAD_WELCOMES = {
    "garbage": framed(b"welcome!"),
    "no-buffers": welcome(buffers=0),
    "history-of-all": welcome(buffers=2, history=2),
    "layout-bigger-than-buffers": layout_welcome(64, 1024),
    "bad-layout": layout_welcome(0, 4096),
    "stray-tail": welcome(tail=b"xx"),
    "a-frame-first": frame_message(0, 0, 0),
}


@pytest.mark.parametrize("message", BAD_WELCOMES)
async def test_bad_welcome(message: str) -> None:
    before = fd_targets()
    async with raw_publisher() as (raw, stream):
        sendmsg(raw, BAD_WELCOMES[message])
        with pytest.raises(dmabuf.InvalidArgument):
            await dmabuf.subscribe(stream)
    assert_no_new_fds(before)


async def test_refused_subscription() -> None:
    async with raw_publisher() as (raw, stream):
        raw.shutdown(socket.SHUT_WR)
        with pytest.raises(anyio.BrokenResourceError):
            await dmabuf.subscribe(stream)


def _pipe_fd() -> list[int]:
    r, w = os.pipe()
    os.close(w)
    return [r]


def _small_memfd() -> list[int]:
    return [memfd(1024)]


def _two_memfds() -> list[int]:
    return [memfd(), memfd()]


def _fence_not_fence() -> list[int]:
    return [memfd(), memfd()]


BAD_FRAMES: dict[str, tuple[bytes, Callable[[], list[int]]]] = {
    "unknown-buffer": (frame_message(0, 0, 0), list),
    "buffer-out-of-range": (frame_message(7, 1, 0), lambda: [memfd()]),
    "pipe-as-buffer": (frame_message(0, 1, 0), _pipe_fd),
    "buffer-too-small": (frame_message(0, 1, 0), _small_memfd),
    "fd-where-none-belongs": (frame_message(0, 0, 0), lambda: [memfd()]),
    "two-fds-for-one": (frame_message(0, 1, 0), _two_memfds),
    "buffer-without-fd": (frame_message(0, 1, 0), list),
    "memfd-as-fence": (frame_message(0, 3, 0), _fence_not_fence),
    "unknown-flags": (frame_message(0, 0x81, 0), list),
    "metadata-length-lie": (framed(FRAME.pack(1, 3, 0, 0, 0, 0, 99) + b"x"), list),
    "release-from-publisher": (release_message(0, 0, 0), list),
}


@pytest.mark.parametrize("case", BAD_FRAMES)
async def test_bad_frame(case: str) -> None:
    message, make_fds = BAD_FRAMES[case]
    before = fd_targets()
    async with raw_publisher() as (raw, stream):
        sendmsg(raw, welcome())
        fds = make_fds()
        try:
            sendmsg(raw, message, fds)
        finally:
            for fd in fds:
                os.close(fd)
        async with await dmabuf.subscribe(stream) as sub:
            with pytest.raises(dmabuf.InvalidArgument):
                await sub.receive()
            with pytest.raises(anyio.BrokenResourceError):
                await sub.receive()
    assert_no_new_fds(before)


SEQUENCES = {
    "seq-backwards": [frame_message(0, 1, 5), frame_message(1, 1, 5)],
    "held-buffer-again": [frame_message(0, 1, 0), frame_message(0, 0, 1)],
    "buffer-fd-twice": [frame_message(0, 1, 0), frame_message(0, 1, 1)],
}


@pytest.mark.parametrize("case", SEQUENCES)
async def test_bad_sequence(case: str) -> None:
    before = fd_targets()
    async with raw_publisher() as (raw, stream):
        sendmsg(raw, welcome())
        for message in SEQUENCES[case]:
            flags = message[8]
            fds = [memfd()] if flags & 1 else []
            try:
                sendmsg(raw, message, fds)
            finally:
                for fd in fds:
                    os.close(fd)
        async with await dmabuf.subscribe(stream) as sub:
            first = await sub.receive()
            with pytest.raises(dmabuf.InvalidArgument):
                await sub.receive()
            # The frame it already had stays readable until the subscriber closes.
            async with first.buffer.cpu_access("r") as view:
                assert len(view) == 4096
                del view
    assert_no_new_fds(before)


async def test_subscriber_reads_a_foreign_memfd_stream() -> None:
    """A well-behaved raw publisher: the buffer fd crosses once, frames follow."""
    before = fd_targets()
    async with raw_publisher() as (raw, stream):
        fd = memfd()
        os.pwrite(fd, b"\x2a" * 4096, 0)
        try:
            sendmsg(raw, welcome(buffers=1) + b"", [])
            sendmsg(raw, frame_message(0, 1, 0, b"first"), [fd])
        finally:
            os.close(fd)
        async with await dmabuf.subscribe(stream) as sub:
            async with await sub.receive() as frame:
                assert frame.metadata == b"first"
                async with frame.buffer.cpu_access("r") as view:
                    assert view[0] == 0x2A
                    del view
            sendmsg(raw, frame_message(0, 0, 1, b"second"))
            async with await sub.receive() as frame:
                assert frame.seq == 1
            assert sub.statistics().buffers == 1
            # What the subscriber sent back: SUBSCRIBE, then two RELEASEs.
            raw.setblocking(False)
            back = raw.recv(4096)
            assert back[4:6] == bytes([1, 1])
            assert back.count(bytes([1, 4])) >= 2
    assert_no_new_fds(before)
