"""A hostile peer's attacks on a receiver, one test each.

Each test is an attack a process on the other end of the socket can make. The
receiver must answer every one with ``InvalidArgument`` (or, where the share
is sound, a buffer), keep no fd it was sent, and never die: no SIGBUS from a
file shrunk under its mapping, no stray ``ValueError``/``RuntimeError``.

1. A ramfs file named ``dmabuf:x`` on a detached mount (reads as
   ``/dmabuf:x``, like a kernel dma-buf), truncated after the send.
2. The same name on tmpfs and on a disk file.
3. Shrinking an unsealed memfd between the receiver's size check and its seal.
4. A memfd sealed against writes, sent as writable.
5. A receiving socket with ``SO_PASSCRED`` (credentials with every message).
6. More fds than a share carries (the kernel truncates the control data).
7. Garbage, a missing fd, a lying size, fds that are not memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf import _import
from asyncdmabuf._fd import seal_against_resizing
from asyncdmabuf.exporters import MemfdExporter

from .fds import o_path_fd, pipe_fd, socket_fd
from .helpers import fd_count

pytestmark = pytest.mark.anyio

PEER = Path(__file__).with_name("share_peer.py")
PAGE = 4096
F_SEAL_FUTURE_WRITE = 0x10


def record(size: int = PAGE, *, writable: bool = True, extra: bytes = b"") -> bytes:
    """A well-formed share record claiming ``size`` bytes."""
    body = struct.pack("<Q", size) + struct.pack("<H", 0) * 3 + extra
    return struct.pack("<4sBBHI", b"ADMB", 1, int(writable), 0, len(body)) + body


def memfd(size: int = PAGE, seals: int = 0, *, sealable: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
    fd = os.memfd_create("hostile", flags)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@contextlib.asynccontextmanager
async def receiver(
    *, passcred: bool = False
) -> AsyncIterator[tuple[socket.socket, anyio.abc.UNIXSocketStream]]:
    """The peer's raw socket and the receiver's stream."""
    raw, theirs = socket.socketpair()
    if passcred:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    with raw:
        async with await anyio.abc.UNIXSocketStream.from_socket(theirs) as stream:
            yield raw, stream


async def refused(message: bytes, fds: list[int], *, passcred: bool = False) -> str:
    """Send ``message`` with ``fds`` (closed after); return the receiver's refusal.

    Asserts that the receiver kept none of the fds.
    """
    try:
        async with receiver(passcred=passcred) as (raw, stream):
            before = fd_count()
            if fds:
                socket.send_fds(raw, [message], fds)
            else:
                raw.sendall(message)
            raw.shutdown(socket.SHUT_WR)
            with pytest.raises(dmabuf.InvalidArgument) as info:
                await dmabuf.receive_buffer(stream)
            assert fd_count() == before, "the receiver kept an fd it was sent"
    finally:
        for fd in fds:
            os.close(fd)
    return str(info.value)


# -- 1. the ramfs forgery -------------------------------------------------------------


def _line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


@contextlib.contextmanager
def ramfs_forgery(size: int = 2 * PAGE) -> Iterator[socket.socket]:
    """A peer (uid 65534, own user+mount namespace) about to send a forged fd.

    Yields the socket on which it sends the share; writing ``truncate\\n`` to
    it makes the peer truncate the file. Skips where namespaces are unavailable.
    """
    ours, theirs = socket.socketpair()
    ours.settimeout(60)
    with ours:
        with theirs:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(PEER),
                    "forge-ramfs",
                    *map(str, (theirs.fileno(), size)),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        try:
            line = _line(ours)
            if line.startswith("skip:"):
                pytest.skip(f"cannot forge a ramfs file here ({line[5:].strip()})")
            assert line == "ready /dmabuf:x"  # what readlink shows: a dma-buf's name
            yield ours
        finally:
            ours.close()
            try:
                assert proc.wait(timeout=60) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


async def test_ramfs_file_named_dmabuf_is_refused_and_its_truncation_harms_nobody() -> (
    None
):
    with ramfs_forgery() as sock:
        async with await anyio.abc.UNIXSocketStream.from_socket(sock) as stream:
            before = fd_count()
            with pytest.raises(dmabuf.InvalidArgument, match="not shareable memory"):
                await dmabuf.receive_buffer(stream)
            assert fd_count() == before
            # The peer now truncates the file: had the receiver mapped it, the
            # next touch of the mapping would be a SIGBUS.
            await stream.send(b"truncate\n")
            assert await stream.receive() == b"truncated\n"


# -- 2. the same name elsewhere --------------------------------------------------------


def _named_dmabuf(directory: str) -> int:
    path = os.path.join(directory, "dmabuf:x")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.unlink(path)
    os.ftruncate(fd, PAGE)
    return fd


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")
async def test_tmpfs_file_named_dmabuf_is_refused() -> None:
    message = await refused(record(), [_named_dmabuf("/dev/shm")])
    assert "not shareable memory" in message


async def test_disk_file_named_dmabuf_is_refused(tmp_path: Path) -> None:
    message = await refused(record(), [_named_dmabuf(str(tmp_path))])
    assert "not shareable memory" in message


# -- 3. the shrink race (hardening item 12) --------------------------------------------


@pytest.mark.parametrize("shrink_to", [PAGE, 0])
async def test_peer_shrinking_a_memfd_before_the_seal_gets_invalid_argument(
    monkeypatch: pytest.MonkeyPatch, shrink_to: int
) -> None:
    real_seal = seal_against_resizing

    def peer_shrinks_first(fd: int, seals: int) -> int:
        os.ftruncate(fd, shrink_to)  # the peer, between size check and seal
        return real_seal(fd, seals)

    monkeypatch.setattr(_import, "seal_against_resizing", peer_shrinks_first)
    message = await refused(record(2 * PAGE), [memfd(2 * PAGE)])
    assert "claims" in message or "no bytes" in message


async def test_a_memfd_that_shrank_before_the_seal_imports_at_its_new_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_seal = seal_against_resizing

    def peer_shrinks_first(fd: int, seals: int) -> int:
        os.ftruncate(fd, PAGE)
        return real_seal(fd, seals)

    monkeypatch.setattr(_import, "seal_against_resizing", peer_shrinks_first)
    fd = memfd(2 * PAGE)
    try:
        async with dmabuf.get(fd) as buf:
            assert buf.size == PAGE
            want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & want == want
    finally:
        os.close(fd)


# -- 4. write seals (hardening item 16) ------------------------------------------------


@pytest.mark.parametrize(
    "write_seal", [fcntl.F_SEAL_WRITE, F_SEAL_FUTURE_WRITE], ids=["WRITE", "FUTURE"]
)
async def test_a_write_sealed_memfd_arrives_read_only(write_seal: int) -> None:
    try:
        fd = memfd(PAGE, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | write_seal)
    except OSError as exc:  # F_SEAL_FUTURE_WRITE needs Linux 5.1
        pytest.skip(f"this kernel cannot add that seal: {exc}")
    try:
        async with receiver() as (raw, stream):
            socket.send_fds(raw, [record()], [fd])
            buf, info = await dmabuf.receive_buffer_with_info(stream)
            async with buf:
                assert info.writable is False
                with pytest.raises(dmabuf.InvalidArgument, match="read-only"):
                    await buf.begin_cpu_access("w")
                async with buf.cpu_access("r") as view:
                    assert bytes(view[:4]) == b"\0\0\0\0"
    finally:
        os.close(fd)


async def test_a_read_only_fd_arrives_read_only() -> None:
    fd = memfd(PAGE, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        async with receiver() as (raw, stream):
            socket.send_fds(raw, [record(writable=False)], [ro])
            buf, info = await dmabuf.receive_buffer_with_info(stream)
            async with buf:
                assert info.writable is False
    finally:
        os.close(ro)
        os.close(fd)


# -- 5. SO_PASSCRED (hardening item 8) -------------------------------------------------


async def test_a_passcred_receiver_gets_the_buffer_and_keeps_no_extra_fd() -> None:
    async with receiver(passcred=True) as (raw, stream):
        before = fd_count()
        fd = memfd(PAGE, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        socket.send_fds(raw, [record()], [fd])
        os.close(fd)
        buf, info = await dmabuf.receive_buffer_with_info(stream)
        async with buf:
            assert (info.size, buf.size, buf.exporter.name) == (PAGE, PAGE, "import")
        assert fd_count() == before


async def test_a_passcred_receiver_of_its_own_buffer_gets_the_same_object() -> None:
    async with receiver(passcred=True) as (raw, stream):
        mine = await anyio.abc.UNIXSocketStream.from_socket(raw.dup())
        async with mine, await MemfdExporter().allocate(PAGE) as buf:
            before = fd_count()
            await dmabuf.send_buffer(mine, buf)
            got = await dmabuf.receive_buffer(stream)
            assert got is buf
            await got.put()
            assert fd_count() == before


async def test_a_passcred_receiver_refuses_garbage_and_keeps_no_fd() -> None:
    message = await refused(b"garbage!" * 4, [memfd()], passcred=True)
    assert "magic" in message


# -- 6. too many fds -------------------------------------------------------------------


async def test_more_fds_than_a_share_carries_are_all_closed() -> None:
    fds = [memfd() for _ in range(40)]
    message = await refused(record(), fds)
    assert "fd" in message


# -- 7. garbage, missing fds, lies, fds that are not memory ------------------------


ATTACKS: dict[str, tuple[bytes, list[Callable[[], int]]]] = {
    "no fd": (record(), []),
    "garbage": (b"\xff" * 64, [memfd]),
    "size larger than the file": (record(2 * PAGE), [memfd]),
    "size smaller than the file": (record(PAGE // 2), [memfd]),
    "unsealable memfd": (record(), [lambda: memfd(sealable=False)]),
    "memfd sealed with F_SEAL_SEAL only": (record(), [lambda: memfd(PAGE, 1)]),
    "empty memfd": (record(), [lambda: memfd(0)]),
    "a pipe": (record(), [pipe_fd]),
    "a socket": (record(), [socket_fd]),
    "an eventfd": (record(), [lambda: os.eventfd(0, os.EFD_CLOEXEC)]),
    "a directory": (record(), [lambda: os.open("/", os.O_RDONLY | os.O_DIRECTORY)]),
    "/dev/zero": (record(), [lambda: os.open("/dev/zero", os.O_RDWR)]),
    "an O_PATH fd of a memfd": (record(), [o_path_fd]),
    "writable flag, read-only fd": (
        record(),
        [lambda: os.open("/dev/zero", os.O_RDONLY)],
    ),
    "stray bytes": (record(extra=b"x"), [memfd]),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attack_is_refused_without_leaking_an_fd(attack: str) -> None:
    message, makers = ATTACKS[attack]
    await refused(message, [make() for make in makers])


async def test_peer_closing_after_the_header_is_refused() -> None:
    await refused(record()[:12], [memfd()])
