"""The UNIX transport's serve() and its socket reader (the per-frame paths)."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

import anyio
import anyio.abc
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf._stream import _unix
from asyncdmabuf._stream._unix import UnixTransport

from .helpers import fd_targets, wait_all_blocked
from .test_stream import assert_no_new_fds, until

pytestmark = pytest.mark.anyio


def framed(message: bytes) -> bytes:
    return struct.pack("<I", len(message)) + message


def send_fd(sock: socket.socket, message: bytes, fd: int) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
    sock.sendmsg([framed(message)], rights)


class Collect:
    """A serve() handler that keeps what comes (and closes the fds)."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.messages: list[tuple[bytes, int]] = []
        self.fail_on = fail_on

    def __call__(self, message: bytes, fds: list[int]) -> None:
        self.messages.append((message, len(fds)))
        for fd in fds:
            os.close(fd)
        if message == self.fail_on:
            raise dmabuf.InvalidArgument("the handler refused it")


async def pair() -> tuple[socket.socket, UnixTransport]:
    ours, theirs = socket.socketpair()
    stream = await anyio.abc.UNIXSocketStream.from_socket(theirs)
    return ours, UnixTransport(stream)


async def serve_to_end(
    transport: UnixTransport, handle: Callable[[bytes, list[int]], None]
) -> BaseException:
    with anyio.fail_after(30):
        try:
            await transport.serve(handle)
        except Exception as exc:
            return exc
    raise AssertionError("serve() returned")  # pragma: no cover


async def test_serve_hands_over_messages_with_their_fds_then_the_end() -> None:
    before = fd_targets()
    sock, transport = await pair()
    r, w = os.pipe()
    try:
        sock.sendall(framed(b"one") + framed(b"two"))
        send_fd(sock, b"three", r)
        handle = Collect()
        async with anyio.create_task_group() as tg:
            result: list[BaseException] = []

            async def run() -> None:
                result.append(await serve_to_end(transport, handle))

            tg.start_soon(run)
            await until(lambda: len(handle.messages) == 3)
            sock.sendall(framed(b"four"))
            await until(lambda: len(handle.messages) == 4)
            sock.close()
        assert handle.messages == [
            (b"one", 0),
            (b"two", 0),
            (b"three", 1),
            (b"four", 0),
        ]
        assert isinstance(result[0], anyio.EndOfStream)
    finally:
        os.close(r)
        os.close(w)
        await transport.aclose()
    assert_no_new_fds(before)


async def test_what_the_handler_raises_ends_serve() -> None:
    before = fd_targets()
    sock, transport = await pair()
    with sock:
        r, w = os.pipe()
        sock.sendall(framed(b"ok") + framed(b"bad"))
        send_fd(sock, b"after", r)  # left unhandled: closed with the transport
        os.close(r)
        os.close(w)
        handle = Collect(fail_on=b"bad")
        exc = await serve_to_end(transport, handle)
        assert isinstance(exc, dmabuf.InvalidArgument)
        assert [m for m, _ in handle.messages] == [b"ok", b"bad"]
        await transport.aclose()
    assert_no_new_fds(before)


async def test_closing_from_the_handler_ends_serve() -> None:
    sock, transport = await pair()
    with sock:

        def handle(message: bytes, fds: list[int]) -> None:
            transport.close_nowait()  # as the publisher drops a peer

        sock.sendall(framed(b"one") + framed(b"two"))
        exc = await serve_to_end(transport, handle)
        assert isinstance(exc, anyio.ClosedResourceError)
        await transport.aclose()


async def test_a_framing_error_while_serving_closes_every_fd() -> None:
    before = fd_targets()
    sock, transport = await pair()
    with sock:
        r, w = os.pipe()
        send_fd(sock, b"fine", r)
        os.close(r)
        os.close(w)
        handle = Collect()
        async with anyio.create_task_group() as tg:
            result: list[BaseException] = []

            async def run() -> None:
                result.append(await serve_to_end(transport, handle))

            tg.start_soon(run)
            await until(lambda: bool(handle.messages))
            sock.sendall(struct.pack("<I", 10**6))  # too long: the framing breaks
        assert isinstance(result[0], dmabuf.InvalidArgument)
        assert handle.messages == [(b"fine", 1)]
        await transport.aclose()
    assert_no_new_fds(before)


async def test_more_than_a_batch_in_one_read_is_all_handled_in_order() -> None:
    sock, transport = await pair()
    count = 5 * _unix._BATCH + 3
    with sock:
        sock.sendall(b"".join(framed(b"%d" % i) for i in range(count)))
        handle = Collect()
        ran = []

        async def other() -> None:  # the loop runs between batches
            while len(handle.messages) < count:
                ran.append(len(handle.messages))
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(other)

            async def run() -> None:
                await serve_to_end(transport, handle)

            tg.start_soon(run)
            await until(lambda: len(handle.messages) == count)
            tg.cancel_scope.cancel()
        assert [m for m, _ in handle.messages] == [b"%d" % i for i in range(count)]
        assert any(0 < n < count for n in ran)
        await transport.aclose()


async def test_one_serve_at_a_time_and_a_cancelled_one_leaves_it_usable() -> None:
    sock, transport = await pair()
    with sock:
        handle = Collect()
        async with anyio.create_task_group() as tg:
            tg.start_soon(transport.serve, handle)
            await wait_all_blocked()
            with pytest.raises(anyio.BusyResourceError):
                await transport.serve(handle)
            tg.cancel_scope.cancel()
        sock.sendall(framed(b"later"))
        with anyio.fail_after(30):
            assert await transport.receive() == (b"later", [])
        assert handle.messages == []
        await transport.aclose()


async def test_receive_after_many_messages_came_unasked() -> None:
    sock, transport = await pair()
    count = 3 * _unix._BATCH
    with sock:

        async def late() -> None:
            await wait_all_blocked()
            sock.sendall(framed(b"x"))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(late)
                assert await transport.receive() == (b"x", [])  # it waited
            # Many messages arrive while nobody waits: the reader reads
            # ahead a bounded batch, then lets the socket be until asked.
            for i in range(count):
                sock.sendall(framed(b"%d" % i))
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            got = [await transport.receive() for _ in range(count)]
        assert [m for m, _ in got] == [b"%d" % i for i in range(count)]
        sock.close()
        for _ in range(5):  # the end, seen by the reader (on asyncio)
            await anyio.lowlevel.checkpoint()
        with pytest.raises(anyio.EndOfStream):
            await transport.receive()
        await transport.aclose()
