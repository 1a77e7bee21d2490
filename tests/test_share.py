"""Sharing buffers across processes: send_buffer / receive_buffer, get(fd), safety."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import select
import socket
import struct
import subprocess
import sys
import tomllib
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncdmabuf as dmabuf
from asyncdmabuf import _share
from asyncdmabuf.exporters import (
    DmaHeapExporter,
    MemfdExporter,
    _dmaheap,
    available,
    load,
)

from .exporters_for_tests import RecordingExporter
from .helpers import run_example, stream_pair, wait_all_blocked
from .peers import Peer, run_peer
from .share_peer import pattern

pytestmark = pytest.mark.anyio

PEER = Path(__file__).with_name("share_peer.py")
EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "frame_pipeline.py"
NOBODY = 65534


# -- helpers ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_pair() -> AsyncIterator[tuple[socket.socket, anyio.abc.UNIXSocketStream]]:
    """A blocking raw socket to craft messages with, and the stream that reads them."""
    a, b = socket.socketpair()
    with a:
        async with await anyio.abc.UNIXSocketStream.from_socket(b) as sb:
            yield a, sb


def _peer_env(backend: object) -> dict[str, str]:
    env = dict(os.environ)
    name = backend[0] if isinstance(backend, tuple) else str(backend)
    env["PEER_BACKEND"] = "trio" if name == "trio" else "asyncio"
    return env


@contextlib.asynccontextmanager
async def peer(command: str, *args: str, backend: object) -> AsyncIterator[Peer]:
    """Run share_peer.py COMMAND over a socketpair; it must exit 0 unless killed."""
    async with run_peer(PEER, [command, *args], _peer_env(backend)) as child:
        yield child


async def filled(size: int, name: str | None = None) -> dmabuf.DmaBuf:
    buf = await MemfdExporter().allocate(size, name=name)
    async with buf.cpu_access("w") as view:
        view[:] = pattern(size)
    return buf


async def crc_of(buf: dmabuf.DmaBuf) -> int:
    async with buf.cpu_access("r") as view:
        return zlib.crc32(view)


def holders(inode: int) -> int:
    """How many fds of this process refer to ``inode``."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/self/fd/{name}").st_ino == inode:
                count += 1
    return count


def record(
    size: int = 4096,
    *,
    magic: bytes = b"ADMB",
    version: int = 1,
    flags: int = 1,
    reserved: int = 0,
    name: bytes = b"",
    exporter: bytes = b"memfd",
    fmt: bytes = b"",
    length: int | None = None,
    extra: bytes = b"",
) -> bytes:
    body = struct.pack("<Q", size)
    for field in (name, exporter, fmt):
        body += struct.pack("<H", len(field)) + field
    body += extra
    n = len(body) if length is None else length
    return struct.pack("<4sBBHI", magic, version, flags, reserved, n) + body


def sealed_memfd(size: int = 4096, seals: int | None = None) -> int:
    fd = os.memfd_create("share-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals is None:
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@contextlib.contextmanager
def inotify_delete_self(fd: int) -> Iterator[Any]:
    """Watch the file behind ``fd``; the returned probe tells whether it is gone.

    The kernel sends IN_DELETE_SELF for a memfd when its last holder (fd or
    mapping, in any process) goes, just before its pages are freed.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    ifd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    if ifd < 0:
        pytest.skip(f"inotify: {os.strerror(ctypes.get_errno())}")
    try:
        in_delete_self = 0x400
        if (
            libc.inotify_add_watch(ifd, f"/proc/self/fd/{fd}".encode(), in_delete_self)
            < 0
        ):
            pytest.skip(f"inotify_add_watch: {os.strerror(ctypes.get_errno())}")

        def gone() -> bool:
            if not select.select([ifd], [], [], 0)[0]:
                return False
            data = os.read(ifd, 4096)
            masks = []
            while data:
                _, mask, _, length = struct.unpack_from("iIII", data)
                masks.append(mask)
                data = data[16 + length :]
            return any(mask & in_delete_self for mask in masks)

        yield gone
    finally:
        os.close(ifd)


# -- send and receive in one process ------------------------------------------------


async def test_roundtrip_in_one_process_gives_the_same_buffer() -> None:
    async with stream_pair() as (a, b), await filled(8192, name="frame-0") as buf:
        await dmabuf.send_buffer(a, buf, format="GREY 64x128")
        got, info = await dmabuf.receive_buffer_with_info(b)
        assert got is buf
        assert buf.refcount == 2
        assert info == dmabuf.ShareInfo(
            size=8192,
            name="frame-0",
            exporter="memfd",
            format="GREY 64x128",
            writable=True,
            pid=os.getpid(),
            uid=os.getuid(),
            gid=os.getgid(),
        )
        await got.put()
        await dmabuf.send_buffer(a, buf, writable=False)
        again = await dmabuf.receive_buffer(b, require_same_uid=True)
        assert again is buf
        await again.put()
        assert buf.refcount == 1


async def test_send_checks_its_arguments() -> None:
    async with stream_pair() as (a, _b), await filled(4096) as buf:
        with pytest.raises(TypeError):
            await dmabuf.send_buffer(object(), buf)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await dmabuf.send_buffer(a, 3)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await dmabuf.send_buffer(a, buf, writable=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await dmabuf.send_buffer(a, buf, format=b"x")  # type: ignore[arg-type]
        with pytest.raises(dmabuf.InvalidArgument):
            await dmabuf.send_buffer(a, buf, format="x" * 1025)
        with pytest.raises(TypeError):
            await dmabuf.receive_buffer(object())  # type: ignore[arg-type]
    with pytest.raises(dmabuf.InvalidArgument):
        await dmabuf.send_buffer(a, buf)  # released


async def test_send_refuses_a_buffer_without_shareable_memory() -> None:
    exporter = RecordingExporter()
    buf = exporter.make(4096)
    async with stream_pair() as (a, _b), buf:
        with pytest.raises(dmabuf.InvalidArgument, match="no shareable memory"):
            await dmabuf.send_buffer(a, buf)


async def test_clean_close_before_a_message_is_end_of_stream() -> None:
    async with stream_pair() as (a, b):
        await a.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await dmabuf.receive_buffer(b)


async def test_nothing_named_is_created_anywhere(tmp_path: Path) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    cwd_before = set(os.listdir("."))
    async with stream_pair() as (a, b), await filled(1 << 16, name="secret") as buf:
        await dmabuf.send_buffer(a, buf)
        got = await dmabuf.receive_buffer(b)
        fd = buf.fd()
        try:
            assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
            assert os.fstat(fd).st_nlink == 0  # no name in any directory
        finally:
            os.close(fd)
        await got.put()
    assert set(os.listdir("/dev/shm")) == shm_before
    assert set(os.listdir(".")) == cwd_before
    assert not os.listdir(tmp_path)


# -- the receiver checks everything ---------------------------------------------------


def _pipe_end() -> int:
    r, w = os.pipe()
    os.close(r)
    return w


def _dir_fd() -> int:
    return os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _disk_file() -> int:
    fd = os.open(Path(__file__), os.O_RDONLY | os.O_CLOEXEC)
    return fd


BAD_SHARES: dict[str, tuple[bytes, list[Any]]] = {
    "no fd": (record(), []),
    "two fds": (record(), [sealed_memfd, sealed_memfd]),
    "a pipe": (record(), [_pipe_end]),
    "a directory": (record(), [_dir_fd]),
    "a file on disk": (record(), [_disk_file]),
    "size larger than the file": (record(8192), [sealed_memfd]),
    "size smaller than the file": (record(100), [sealed_memfd]),
    "size zero": (record(0), [sealed_memfd]),
    "empty memfd": (record(), [lambda: sealed_memfd(0)]),
    "unsealable memfd": (record(), [lambda: sealed_memfd(seals=fcntl.F_SEAL_SEAL)]),
    "bad magic": (record(magic=b"XXXX"), [sealed_memfd]),
    "bad version": (record(version=2), [sealed_memfd]),
    "unknown flags": (record(flags=0x81), [sealed_memfd]),
    "reserved bits": (record(reserved=1), [sealed_memfd]),
    "huge body": (record(length=1 << 30), [sealed_memfd]),
    "tiny body": (record(length=3), [sealed_memfd]),
    "stray bytes": (record(extra=b"x"), [sealed_memfd]),
    "name not utf-8": (record(name=b"\xff\xfe"), [sealed_memfd]),
    "name too long": (record(name=b"n" * 33), [sealed_memfd]),
    "read-only flag, writable fd": (record(flags=0), [sealed_memfd]),
}


@pytest.mark.parametrize("case", list(BAD_SHARES))
async def test_receiver_refuses_a_bad_share_and_closes_its_fds(case: str) -> None:
    message, makers = BAD_SHARES[case]
    fds = [make() for make in makers]
    inodes = {os.fstat(fd).st_ino: holders(os.fstat(fd).st_ino) for fd in fds}
    try:
        async with raw_pair() as (raw, stream):
            if fds:
                socket.send_fds(raw, [message], fds)
            else:
                raw.sendall(message)
            raw.shutdown(socket.SHUT_WR)
            with pytest.raises(dmabuf.InvalidArgument):
                await dmabuf.receive_buffer(stream)
            # Every fd received was closed again: only the test's own remain.
            assert {ino: holders(ino) for ino in inodes} == inodes
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("cut", [1, 11, 12, 20])
async def test_peer_closing_mid_message_is_invalid(cut: int) -> None:
    fd = sealed_memfd()
    try:
        async with raw_pair() as (raw, stream):
            socket.send_fds(raw, [record()[:cut]], [fd])
            raw.shutdown(socket.SHUT_WR)
            with pytest.raises(dmabuf.InvalidArgument, match="mid-message"):
                await dmabuf.receive_buffer(stream)
            assert holders(os.fstat(fd).st_ino) == 1
    finally:
        os.close(fd)


async def test_fds_arriving_after_the_header_are_refused() -> None:
    fd = sealed_memfd()
    try:
        async with raw_pair() as (raw, stream):
            message = record()
            raw.sendall(message[:12])
            socket.send_fds(raw, [message[12:]], [fd])
            # The share arrives whole, just split: the fd with the body is taken.
            got = await dmabuf.receive_buffer(stream)
            assert got.exporter.name == "import"
            await got.put()
            raw.sendall(message)
            socket.send_fds(raw, [b"x"], [fd])
            raw.shutdown(socket.SHUT_WR)
            with pytest.raises(dmabuf.InvalidArgument):
                await dmabuf.receive_buffer(stream)
            assert holders(os.fstat(fd).st_ino) == 1
    finally:
        os.close(fd)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.binary(max_size=64),
    position=st.integers(min_value=0, max_value=40),
    with_fd=st.booleans(),
)
async def test_garbage_never_crashes_or_leaks(
    data: bytes, position: int, with_fd: bool
) -> None:
    message = record()
    message = message[:position] + data + message[position + len(data) :]
    fd = sealed_memfd()
    try:
        async with raw_pair() as (raw, stream):
            if with_fd:
                socket.send_fds(raw, [message], [fd])
            else:
                raw.sendall(message)
            raw.shutdown(socket.SHUT_WR)
            try:
                buf = await dmabuf.receive_buffer(stream)
            except dmabuf.InvalidArgument:
                pass
            except anyio.EndOfStream:
                assert not message
            else:
                assert buf.size == 4096
                await buf.put()
            assert holders(os.fstat(fd).st_ino) == 1
    finally:
        os.close(fd)


async def test_a_file_is_imported_again_after_its_last_put() -> None:
    fd = sealed_memfd()
    try:
        first = dmabuf.get(fd)
        await first.put()
        second = dmabuf.get(fd)  # while `first` is still referenced
        assert second is not first
        assert second.refcount == 1
        await second.put()
    finally:
        os.close(fd)


async def test_a_read_only_import_is_only_shared_read_only() -> None:
    fd = sealed_memfd()
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        async with dmabuf.get(ro) as buf, stream_pair() as (a, b):
            with pytest.raises(dmabuf.InvalidArgument, match="read-only"):
                await dmabuf.send_buffer(a, buf)
            await dmabuf.send_buffer(a, buf, writable=False)
            got, info = await dmabuf.receive_buffer_with_info(b)
            assert got is buf
            assert not info.writable
            await got.put()
    finally:
        os.close(ro)
        os.close(fd)


async def test_a_memfd_sealed_against_writes_is_imported_read_only() -> None:
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    fd = sealed_memfd(seals=seals)
    try:
        async with dmabuf.get(fd) as buf:
            async with buf.cpu_access("r") as view:
                assert bytes(view[:4]) == b"\0\0\0\0"
            with pytest.raises(dmabuf.InvalidArgument, match="read-only"):
                await buf.begin_cpu_access("w")
    finally:
        os.close(fd)


# -- another process ------------------------------------------------------------------


async def test_share_with_another_process_is_zero_copy_and_sealed(
    anyio_backend: object,
) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    async with (
        await filled(1 << 20, name="frame") as buf,
        peer("inspect", backend=anyio_backend) as other,
    ):
        await dmabuf.send_buffer(other.stream, buf, format="RGBA 512x512")
        facts = await other.facts()
        assert facts["size"] == buf.size
        assert facts["name"] == "frame"
        assert facts["exporter"] == "memfd"
        assert facts["format"] == "RGBA 512x512"
        assert facts["writable"] is True
        assert facts["refcount"] == 1
        assert facts["inode"] == buf.inode
        assert facts["crc"] == zlib.crc32(pattern(buf.size))
        # The peer cannot resize (SIGBUS for us) or add seals to the file.
        assert facts["ftruncate_shrink"] == errno.EPERM
        assert facts["ftruncate_grow"] == errno.EPERM
        assert facts["add_seals"] == errno.EPERM
        # ...and the owner keeps reading every byte.
        async with buf.cpu_access("rw") as view:
            assert bytes(view[:8]) == b"peerdone"  # its write, our memory
            assert bytes(view[8:]) == pattern(buf.size)[8:]
            view[-4:] = b"tail"
        await other.say("crc")
        assert (await other.facts())["crc"] == await crc_of(buf)
        await other.say("exit")
    assert set(os.listdir("/dev/shm")) == shm_before


async def test_read_only_share_cannot_be_written_by_the_peer(
    anyio_backend: object,
) -> None:
    async with await filled(1 << 16) as buf:
        async with peer("inspect", backend=anyio_backend) as other:
            await dmabuf.send_buffer(other.stream, buf, writable=False)
            facts = await other.facts()
            assert facts["writable"] is False
            assert facts["crc"] == zlib.crc32(pattern(buf.size))
            assert facts["cpu_write"] == "InvalidArgument"
            assert facts["pwrite"] == errno.EBADF
            assert facts["mmap_write"] == errno.EACCES
            assert facts["ftruncate_shrink"] != 0
            assert facts["ftruncate_grow"] != 0
            # The owner still writes, and the peer sees it.
            async with buf.cpu_access("w") as view:
                view[:4] = b"mine"
            await other.say("crc")
            assert (await other.facts())["crc"] == await crc_of(buf)
            await other.say("exit")
        async with buf.cpu_access("r") as view:
            assert bytes(view[4:]) == pattern(buf.size)[4:]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as nobody")
async def test_read_only_share_cannot_be_reopened_writable_by_another_uid(
    anyio_backend: object,
) -> None:
    async with (
        await filled(4096) as buf,
        peer("inspect-as", str(NOBODY), backend=anyio_backend) as other,
    ):
        await dmabuf.send_buffer(other.stream, buf, writable=False)
        facts = await other.facts()
        assert facts["reopen_rw"] == errno.EACCES
        assert facts["mmap_write"] == errno.EACCES
        await other.say("exit")


async def test_receiver_killed_holding_a_mapping_leaves_the_sender_working(
    anyio_backend: object,
) -> None:
    buf = await filled(1 << 20, name="victim")
    fd = buf.fd()
    try:
        with inotify_delete_self(fd) as gone:
            async with peer("inspect", backend=anyio_backend) as other:
                await dmabuf.send_buffer(other.stream, buf)
                facts = await other.facts()
                await other.say("hold")
                assert (await other.facts())["holding"]
                maps = await anyio.Path(f"/proc/{facts['pid']}/maps").read_text()
                assert f" {buf.inode} " in maps
                other.proc.kill()
                assert await other.proc.wait() == -9
                # The peer's end is gone: sending fails cleanly, nothing leaks.
                with pytest.raises(anyio.BrokenResourceError):
                    await dmabuf.send_buffer(other.stream, buf)
            assert not gone()
            async with buf.cpu_access("r") as view:
                assert bytes(view[:8]) == b"peerdone"
                assert bytes(view[8:]) == pattern(buf.size)[8:]
            async with stream_pair() as (a, b):
                await dmabuf.send_buffer(a, buf)
                assert await dmabuf.receive_buffer(b) is buf
            await buf.put()
            await buf.put()
            assert not gone()  # our own fd still holds it
            os.close(fd)
            fd = -1
            assert gone()  # the last holder went: the kernel frees the pages
    finally:
        if fd >= 0:
            os.close(fd)
        if not buf.released:
            with anyio.CancelScope(shield=True):
                while not buf.released:
                    await buf.put()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as nobody")
async def test_require_same_uid_refuses_another_uid(anyio_backend: object) -> None:
    address = f"\0asyncdmabuf-test-{os.getpid()}-{id(object())}"
    async with await anyio.create_unix_listener(address) as listener:
        proc = await anyio.open_process(
            [sys.executable, str(PEER), "send-from", address[1:], str(NOBODY)],
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=None,
            env=_peer_env(anyio_backend),
        )
        async with proc:
            stream = await listener.accept()
            assert isinstance(stream, anyio.abc.UNIXSocketStream)
            async with stream:
                with pytest.raises(dmabuf.InvalidArgument, match="uid 65534"):
                    await dmabuf.receive_buffer(stream, require_same_uid=True)
                buf, info = await dmabuf.receive_buffer_with_info(stream)
                assert info.uid == NOBODY
                assert info.pid == proc.pid
                await buf.put()
        assert proc.returncode == 0


# -- get(fd) on fds received by any means -------------------------------------------


async def test_get_fds_received_by_scm_rights(anyio_backend: object) -> None:
    async with peer("send-memfd", backend=anyio_backend) as other:
        _, first = await other.stream.receive_fds(1, 1)
        _, second = await other.stream.receive_fds(1, 1)
        try:
            assert len(first) == len(second) == 1
            a = dmabuf.get(first[0])
            b = dmabuf.get(second[0])
            assert a is b
            assert a.refcount == 2
            assert a.exporter.name == "import"
            async with a.cpu_access("r") as view:
                assert bytes(view) == pattern(8192)
            await b.put()
            await a.put()
        finally:
            os.close(first[0])
            os.close(second[0])
        await other.say("done")


def _pidfd_getfd(pid: int, target: int) -> int:
    numbers = {"x86_64": 438, "aarch64": 438, "riscv64": 438}
    number = numbers.get(platform.machine())
    if number is None:
        pytest.skip(f"pidfd_getfd's syscall number on {platform.machine()} is unknown")
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        pytest.skip(f"pidfd_open not permitted here: {exc}")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.syscall(number, pidfd, target, 0))
        if fd < 0:
            err = ctypes.get_errno()
            pytest.skip(f"pidfd_getfd not permitted here: {os.strerror(err)}")
        return fd
    finally:
        os.close(pidfd)


async def test_get_an_fd_taken_with_pidfd_getfd(anyio_backend: object) -> None:
    async with peer("hold-memfd", backend=anyio_backend) as other:
        try:
            target = (await other.facts())["fd"]
            fd = _pidfd_getfd(other.proc.pid, target)
            try:
                async with dmabuf.get(fd) as buf:
                    assert dmabuf.get(fd) is buf
                    await buf.put()
                    async with buf.cpu_access("r") as view:
                        assert bytes(view) == pattern(4096, seed=7)
            finally:
                os.close(fd)
        finally:
            await other.say("done")


async def test_get_an_fd_inherited_by_a_child(anyio_backend: object) -> None:
    async with await filled(1 << 16) as buf:
        fd = buf.fd()
        try:
            result = await anyio.run_process(
                [sys.executable, str(PEER), "inherited", str(fd)],
                pass_fds=(fd,),
                stdout=None,
                stderr=None,
                env=_peer_env(anyio_backend),
            )
        finally:
            os.close(fd)
        assert result.returncode == 0
        async with buf.cpu_access("r") as view:
            assert bytes(view[:8]) == b"childsaw"


# -- real kernel dma-bufs -------------------------------------------------------------


def _heap() -> DmaHeapExporter:
    try:
        return DmaHeapExporter()
    except dmabuf.NoDevice as exc:
        pytest.skip(str(exc))


def test_dmaheap_without_the_heap_is_no_device() -> None:
    with pytest.raises(dmabuf.NoDevice):
        DmaHeapExporter(heap="asyncdmabuf-no-such-heap")
    with pytest.raises(dmabuf.InvalidArgument):
        DmaHeapExporter(heap="../../etc/passwd")
    with pytest.raises(TypeError):
        DmaHeapExporter(heap=3)  # type: ignore[arg-type]


def test_dmaheap_ioctl_numbers_match_the_kernel_headers() -> None:
    assert _dmaheap.DMA_HEAP_IOCTL_ALLOC == 0xC0184800
    assert _dmaheap.DMA_BUF_IOCTL_SYNC == 0x40086200
    assert _dmaheap.DMA_BUF_SET_NAME_B == 0x40086201


def test_dmaheap_is_registered() -> None:
    pyproject = tomllib.loads(
        (Path(__file__).parents[1] / "pyproject.toml").read_text()
    )
    group = pyproject["project"]["entry-points"]["asyncdmabuf.exporters"]
    assert group["dmaheap"] == "asyncdmabuf.exporters:DmaHeapExporter"
    if "dmaheap" not in available():
        # A stale *.egg-info earlier on sys.path hides the installed metadata.
        pytest.skip("the installed entry points are stale: pip install -e . again")
    assert load("dmaheap") is DmaHeapExporter


async def test_dmaheap_buffers_share_and_import() -> None:
    heap = _heap()
    async with await heap.allocate(5000, name="heap") as buf, stream_pair() as (a, b):
        assert buf.size == 8192
        async with buf.cpu_access("w") as view:
            view[:] = pattern(buf.size)
        fd = buf.fd()
        try:
            assert os.readlink(f"/proc/self/fd/{fd}").startswith(
                ("/dmabuf:", "anon_inode:dmabuf")
            )
        finally:
            os.close(fd)
        await dmabuf.send_buffer(a, buf)
        got = await dmabuf.receive_buffer(b)
        assert got is buf
        await got.put()


# -- the example -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_frame_pipeline_example_runs(backend: str) -> None:
    args = ["--frames=40", "--size=65536", "--pool=3", f"--backend={backend}"]
    assert "40 frames" in run_example(EXAMPLE, *args)


def test_share_module_limits() -> None:
    assert _share.MAX_BODY < 4096
    assert record()[:4] == _share.MAGIC


async def test_a_second_receive_at_once_on_one_stream_is_busy() -> None:
    async with raw_pair() as (raw, stream):
        async with anyio.create_task_group() as tg:
            tg.start_soon(dmabuf.receive_buffer, stream)
            await wait_all_blocked()
            with pytest.raises(anyio.BusyResourceError):
                await dmabuf.receive_buffer(stream)
            tg.cancel_scope.cancel()
        # The cancelled receive let go of the stream: the next one works.
        fd = sealed_memfd()
        socket.send_fds(raw, [record()], [fd])
        os.close(fd)
        async with await dmabuf.receive_buffer(stream) as buf:
            assert buf.size == 4096
