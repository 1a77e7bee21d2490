"""Bad input: every public function, fed garbage, answers as documented.

Wrong types give ``TypeError``; bad values (negative, zero, huge sizes, unknown
directions and modes, closed and foreign fds, released buffers, tables of other
attachments, a hostile socket peer) give the documented ``DmaBufError``
subclass with its errno. And nothing changes: ``bufinfo()`` is the same after
the call as before, no fd is left open.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.abc
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf import (
    BadFileDescriptor,
    Device,
    Direction,
    Fence,
    InvalidArgument,
    OutOfMemory,
    Usage,
)
from asyncdmabuf.exporters import MemfdExporter, SimDevice

from .helpers import fd_count
from .reliability import NullExporter

pytestmark = pytest.mark.anyio

PAGE = 4096
HUGE = 2**64
#: Values that are not ints (or are bools, which are not sizes).
NOT_INTS: list[object] = [1.0, 4096.0, "4096", None, True, False, b"1", [1]]
BAD_SIZES: list[int] = [0, -1, -(2**63)]
Call = Callable[[], Awaitable[object]]


async def _unchanged(call: Call, error: type[BaseException], code: int | None) -> None:
    """Run ``call``; it must raise ``error`` (with ``code``) and change nothing."""
    before, fds = dmabuf.bufinfo(), fd_count()
    with pytest.raises(error) as info:
        await call()
    if code is not None:
        assert isinstance(info.value, OSError)
        assert info.value.errno == code
    assert dmabuf.bufinfo() == before
    assert fd_count() == fds


def _sync(fn: Callable[[], object]) -> Call:
    async def call() -> object:
        return fn()

    return call


@pytest.mark.parametrize("size", NOT_INTS)
async def test_sizes_of_the_wrong_type(size: object) -> None:
    dev = SimDevice("sim", memory=16 * PAGE)
    for call in (
        lambda: MemfdExporter().allocate(size),  # type: ignore[arg-type]
        lambda: dev.allocate(size),  # type: ignore[arg-type]
        _sync(lambda: dmabuf.export(NullExporter(), size)),  # type: ignore[arg-type]
    ):
        await _unchanged(call, TypeError, None)


@pytest.mark.parametrize("size", BAD_SIZES)
async def test_sizes_out_of_range(size: int) -> None:
    dev = SimDevice("sim", memory=16 * PAGE)
    for call in (
        lambda: MemfdExporter().allocate(size),
        lambda: dev.allocate(size),
        _sync(lambda: dmabuf.export(NullExporter(), size)),
    ):
        await _unchanged(call, InvalidArgument, errno.EINVAL)


async def test_sizes_that_can_never_fit() -> None:
    dev = SimDevice("sim", memory=16 * PAGE)
    await _unchanged(lambda: dev.allocate(17 * PAGE), OutOfMemory, errno.ENOMEM)
    await _unchanged(lambda: dev.allocate(HUGE), OutOfMemory, errno.ENOMEM)
    for huge in (HUGE, 2**63 - 1):  # beyond off_t; beyond any mapping
        await _unchanged(
            partial(MemfdExporter().allocate, huge), OutOfMemory, errno.ENOMEM
        )


@pytest.mark.parametrize(
    ("name", "error"),
    [
        (b"x", TypeError),
        (1, TypeError),
        ("x" * 33, InvalidArgument),
        ("é" * 17, InvalidArgument),
        ("a\0b", InvalidArgument),
        ("\ud800", InvalidArgument),
    ],
)
async def test_bad_names(name: object, error: type[Exception]) -> None:
    buf = NullExporter().make()
    try:
        await _unchanged(_sync(lambda: buf.set_name(name)), error, None)  # type: ignore[arg-type]
        await _unchanged(
            lambda: MemfdExporter().allocate(PAGE, name=name),  # type: ignore[arg-type]
            error,
            None,
        )
        assert buf.name is None
    finally:
        await buf.put()


@pytest.mark.parametrize("direction", [4, -1, HUGE, 1.0, "BIDIRECTIONAL", None, True])
async def test_bad_directions(direction: object) -> None:
    buf = NullExporter().make()
    att = await buf.attach(Device("gpu"))
    error = InvalidArgument if type(direction) is int else TypeError
    await _unchanged(_sync(lambda: att.map(direction)), error, None)  # type: ignore[arg-type]
    await _unchanged(_sync(lambda: att.try_map(direction)), error, None)  # type: ignore[arg-type]
    assert att.mappings == ()
    await att.detach()
    await buf.put()


@pytest.mark.parametrize("mode", ["", "x", "wr", "R", 1, None, b"r"])
async def test_bad_cpu_modes(mode: object) -> None:
    buf = await MemfdExporter().allocate(PAGE)
    error = InvalidArgument if isinstance(mode, str) else TypeError
    await _unchanged(_sync(lambda: buf.cpu_access(mode)), error, None)  # type: ignore[arg-type]
    await _unchanged(lambda: buf.begin_cpu_access(mode), error, None)  # type: ignore[arg-type]
    await _unchanged(lambda: buf.end_cpu_access(mode), error, None)  # type: ignore[arg-type]
    await _unchanged(_sync(lambda: buf.export_sync_fd(mode)), error, None)  # type: ignore[arg-type]
    assert buf.cpu_access_modes == ()
    await buf.put()


async def test_bad_fds() -> None:
    r, w = os.pipe()
    os.close(w)
    empty = os.memfd_create("asyncdmabuf:empty")
    closed = 1_000_000  # beyond any fd limit here: never open
    assert str(closed) not in os.listdir("/proc/self/fd")
    try:
        await _unchanged(
            _sync(lambda: dmabuf.get(closed)), BadFileDescriptor, errno.EBADF
        )
        await _unchanged(_sync(lambda: dmabuf.get(-1)), BadFileDescriptor, errno.EBADF)
        for huge in (2**31, HUGE):
            await _unchanged(
                _sync(partial(dmabuf.get, huge)),
                BadFileDescriptor,
                errno.EBADF,
            )
            await _unchanged(
                _sync(partial(Fence.import_fd, huge)),
                BadFileDescriptor,
                errno.EBADF,
            )
        await _unchanged(_sync(lambda: dmabuf.get(r)), InvalidArgument, errno.EINVAL)
        await _unchanged(
            _sync(lambda: dmabuf.get(empty)), InvalidArgument, errno.EINVAL
        )
        not_fds: list[Any] = [1.0, "3", None, True]
        for fd in not_fds:
            await _unchanged(_sync(partial(dmabuf.get, fd)), TypeError, None)
        await _unchanged(
            _sync(lambda: Fence.import_fd(closed)), BadFileDescriptor, errno.EBADF
        )
        await _unchanged(
            _sync(lambda: Fence.import_fd(r)), InvalidArgument, errno.EINVAL
        )
        buf = await MemfdExporter().allocate(PAGE)
        await _unchanged(
            _sync(lambda: buf.import_sync_fd(empty, "r")), InvalidArgument, errno.EINVAL
        )
        await _unchanged(
            _sync(lambda: buf.import_sync_fd(closed, "r")), BadFileDescriptor, None
        )
        await buf.put()
    finally:
        os.close(r)
        os.close(empty)


async def test_released_buffers_refuse_everything() -> None:
    buf = await MemfdExporter().allocate(PAGE)
    att = await buf.attach(Device("gpu"))
    sgt = await att.map(Direction.TO_DEVICE)
    await att.unmap(sgt)
    await att.detach()
    await buf.put()
    calls: list[Call] = [
        buf.put,
        _sync(buf.fd),
        _sync(lambda: buf.set_name("x")),
        _sync(lambda: buf.attach(Device("gpu"))),
        _sync(lambda: buf.cpu_access("r")),
        lambda: buf.begin_cpu_access("r"),
        _sync(lambda: buf.export_sync_fd("r")),
        _sync(lambda: att.map(Direction.TO_DEVICE)),
        _sync(lambda: att.try_map(Direction.TO_DEVICE)),
        att.detach,
        lambda: att.unmap(sgt),
    ]
    for call in calls:
        await _unchanged(call, InvalidArgument, errno.EINVAL)


async def test_wrong_types_for_objects() -> None:
    buf = NullExporter().make()
    att = await buf.attach(Device("gpu"))
    try:
        for device in (None, "gpu", 1, object()):
            await _unchanged(_sync(partial(buf.attach, device)), TypeError, None)  # type: ignore[arg-type]
        await _unchanged(
            _sync(lambda: buf.attach(Device("x"), move_notify=1)),  # type: ignore[arg-type]
            TypeError,
            None,
        )
        not_tables: list[Any] = [None, [], (dmabuf.SgEntry(0, PAGE, 0),), "sgt"]
        for table in not_tables:
            await _unchanged(partial(att.unmap, table), TypeError, None)
        not_exporters: list[Any] = [None, object(), MemfdExporter]
        for exporter in not_exporters:
            await _unchanged(
                _sync(partial(dmabuf.export, exporter, PAGE)),
                TypeError,
                None,
            )
        await _unchanged(
            _sync(lambda: buf.resv.add_fence(None, Usage.READ)),  # type: ignore[arg-type]
            TypeError,
            None,
        )
        await _unchanged(
            _sync(lambda: buf.resv.add_fence(Fence(), 7)),  # type: ignore[arg-type]
            InvalidArgument,
            errno.EINVAL,
        )
        await _unchanged(lambda: buf.resv.wait(None), TypeError, None)  # type: ignore[arg-type]
        fence = Fence()
        fence.signal()
        await _unchanged(_sync(fence.signal), InvalidArgument, errno.EINVAL)
        await _unchanged(_sync(lambda: Fence().signal(-5)), InvalidArgument, None)
        await _unchanged(_sync(lambda: Fence().signal("x")), TypeError, None)  # type: ignore[arg-type]
    finally:
        await att.detach()
        await buf.put()


async def test_tables_of_other_attachments() -> None:
    exp = NullExporter()
    one, two = exp.make(), exp.make()
    a = await one.attach(Device("a"))
    b = await one.attach(Device("b"))
    c = await two.attach(Device("c"))
    sgt = await a.map(Direction.BIDIRECTIONAL)
    for other in (b, c):
        await _unchanged(partial(other.unmap, sgt), InvalidArgument, errno.EINVAL)
    assert a.mappings == (sgt,)
    assert sgt.valid
    await a.unmap(sgt)
    await _unchanged(lambda: a.unmap(sgt), InvalidArgument, errno.EINVAL)
    dev = SimDevice("sim", memory=16 * PAGE)
    d = await one.attach(dev.device)
    foreign = await b.map(Direction.BIDIRECTIONAL)
    mine = await d.map(Direction.BIDIRECTIONAL)
    await _unchanged(lambda: dev.copy(foreign, mine), InvalidArgument, errno.EINVAL)
    await _unchanged(lambda: dev.copy(mine, mine, nbytes=-1), InvalidArgument, None)
    await _unchanged(lambda: dev.copy(mine, mine, nbytes=HUGE), InvalidArgument, None)
    await _unchanged(lambda: dev.copy(mine, mine, src_offset=1.5), TypeError, None)  # type: ignore[arg-type]
    await _unchanged(lambda: dev.copy(mine, None), TypeError, None)  # type: ignore[arg-type]
    for att in (a, b, c, d):
        for table in att.mappings:
            await att.unmap(table)
        await att.detach()
    await one.put()
    await two.put()


# -- a hostile peer ------------------------------------------------------------


@asynccontextmanager
async def _peer() -> AsyncIterator[tuple[socket.socket, anyio.abc.UNIXSocketStream]]:
    a, b = socket.socketpair()
    with a:
        async with await anyio.abc.UNIXSocketStream.from_socket(b) as stream:
            yield a, stream


def _record(
    size: int = PAGE,
    *,
    magic: bytes = b"ADMB",
    version: int = 1,
    flags: int = 1,
    length: int | None = None,
    tail: bytes = b"",
) -> bytes:
    body = size.to_bytes(8, "little") + bytes(6) + tail
    n = len(body) if length is None else length
    return magic + bytes([version, flags]) + bytes(2) + n.to_bytes(4, "little") + body


def _memfd(size: int, *, seal: bool = True) -> int:
    fd = os.memfd_create("asyncdmabuf:peer", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


HOSTILE: dict[str, tuple[bytes, str | None]] = {
    "bad magic": (_record(magic=b"EVIL"), "memfd"),
    "bad version": (_record(version=9), "memfd"),
    "unknown flags": (_record(flags=0x80), "memfd"),
    "body too long": (_record(length=1 << 20), "memfd"),
    "body too short": (_record(length=3), "memfd"),
    "size lies": (_record(size=64 * PAGE), "memfd"),
    "size zero": (_record(size=0), "memfd"),
    "size huge": (_record(size=2**64 - 1), "memfd"),
    "no fd": (_record(), None),
    "two fds": (_record(), "two"),
    "a pipe": (_record(), "pipe"),
    "read-only fd, writable flag": (_record(), "readonly"),
    "stray bytes": (_record(tail=b"junk"), "memfd"),
    "cut short": (_record()[:10], "memfd"),
    "garbage": (os.urandom(64), "memfd"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_garbage_from_a_socket_peer(case: str) -> None:
    data, kind = HOSTILE[case]
    before, fds = dmabuf.bufinfo(), fd_count()
    sent: list[int] = []
    if kind in ("memfd", "two"):
        sent.append(_memfd(PAGE))
    if kind == "two":
        sent.append(_memfd(PAGE))
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        sent.append(r)
    if kind == "readonly":
        fd = _memfd(PAGE)
        sent.append(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY))
        os.close(fd)
    async with _peer() as (raw, stream):
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(sent))] if sent else []
        )
        raw.sendmsg([data], ancillary)
        raw.shutdown(socket.SHUT_WR)  # a peer that stops mid-message
        for fd in sent:
            os.close(fd)
        with pytest.raises(InvalidArgument) as info:
            await dmabuf.receive_buffer(stream)
        assert info.value.errno == errno.EINVAL
    assert dmabuf.bufinfo() == before
    assert fd_count() == fds


def _fd_bytes(fds: list[int]) -> bytes:
    return b"".join(fd.to_bytes(4, "little", signed=True) for fd in fds)


async def test_bad_arguments_to_send_and_receive() -> None:
    buf = await MemfdExporter().allocate(PAGE)
    null = NullExporter().make()
    async with _peer() as (_, stream):
        await _unchanged(lambda: dmabuf.send_buffer(None, buf), TypeError, None)  # type: ignore[arg-type]
        await _unchanged(lambda: dmabuf.send_buffer(stream, None), TypeError, None)  # type: ignore[arg-type]
        await _unchanged(
            lambda: dmabuf.send_buffer(stream, buf, writable=1),  # type: ignore[arg-type]
            TypeError,
            None,
        )
        await _unchanged(
            lambda: dmabuf.send_buffer(stream, buf, format="x" * 2000),
            InvalidArgument,
            errno.EINVAL,
        )
        await _unchanged(
            lambda: dmabuf.send_buffer(stream, null), InvalidArgument, errno.EINVAL
        )
        await _unchanged(lambda: dmabuf.receive_buffer(None), TypeError, None)  # type: ignore[arg-type]
        await _unchanged(
            lambda: dmabuf.receive_buffer(stream, require_same_uid=1),  # type: ignore[arg-type]
            TypeError,
            None,
        )
    await null.put()
    await buf.put()
    await _unchanged(
        lambda: dmabuf.send_buffer(stream, buf), InvalidArgument, errno.EINVAL
    )
