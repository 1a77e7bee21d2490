"""The fd classifier: every kind of fd this machine can make, and get()'s verdict."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf import _fdkind
from asyncdmabuf.lowlevel import FdInfo, FdKind, classify

from .fds import PAGE, RESIZE, memfd, o_path_fd, pipe_fd, socket_fd
from .helpers import fd_count
from .test_hostile_peer import _line, ramfs_forgery, record


def _memfd(size: int = PAGE, seals: int = 0, flags: int = os.MFD_ALLOW_SEALING) -> int:
    sealable = bool(flags & os.MFD_ALLOW_SEALING)
    return memfd(size, seals, sealable=sealable, flags=flags & ~os.MFD_ALLOW_SEALING)


def _hugetlb_memfd() -> int:
    try:
        return _memfd(2 << 20, flags=os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    except OSError as exc:
        pytest.skip(f"no hugetlb memfd here (MFD_HUGETLB: {exc})")


def _tmpfs_file() -> int:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, PAGE)
    return fd


def _disk_file() -> int:
    return os.open(Path(__file__), os.O_RDONLY | os.O_CLOEXEC)


#: fd maker -> (kind, get()'s verdict: "buffer", "read-only" or an error class)
TABLE: dict[str, tuple[Callable[[], int], FdKind, object]] = {
    "memfd sealed": (lambda: _memfd(PAGE, RESIZE), FdKind.MEMFD, "buffer"),
    "memfd unsealed": (_memfd, FdKind.MEMFD, "buffer"),
    "memfd unsealable": (lambda: _memfd(flags=0), FdKind.OTHER, dmabuf.InvalidArgument),
    "memfd write-sealed": (
        lambda: _memfd(PAGE, RESIZE | fcntl.F_SEAL_WRITE),
        FdKind.MEMFD,
        "read-only",
    ),
    "memfd empty": (lambda: _memfd(0, RESIZE), FdKind.MEMFD, dmabuf.InvalidArgument),
    "hugetlb memfd": (_hugetlb_memfd, FdKind.MEMFD, "hugetlb"),
    "tmpfs file": (_tmpfs_file, FdKind.OTHER, dmabuf.InvalidArgument),
    "disk file": (_disk_file, FdKind.OTHER, dmabuf.InvalidArgument),
    "pipe": (pipe_fd, FdKind.PIPE, dmabuf.InvalidArgument),
    "socket": (socket_fd, FdKind.SOCKET, dmabuf.InvalidArgument),
    "eventfd": (
        lambda: os.eventfd(0, os.EFD_CLOEXEC),
        FdKind.OTHER,
        dmabuf.InvalidArgument,
    ),
    "directory": (
        lambda: os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
        FdKind.DIRECTORY,
        dmabuf.InvalidArgument,
    ),
    "/dev/zero": (
        lambda: os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC),
        FdKind.OTHER,
        dmabuf.InvalidArgument,
    ),
    "O_PATH": (o_path_fd, FdKind.OTHER, dmabuf.InvalidArgument),
}


def _hugetlb_verdict() -> object:
    """A hugetlb memfd maps only if a huge page is free (else ENOMEM)."""
    with open("/proc/meminfo") as f:
        free = next(
            int(line.split()[1]) for line in f if line.startswith("HugePages_Free")
        )
    return "buffer" if free else dmabuf.OutOfMemory


def _verdict(fd: int, info: FdInfo, expected: object) -> None:
    """Check what get() makes of ``fd``."""
    if expected == "hugetlb":
        expected = _hugetlb_verdict()
    if isinstance(expected, type):
        with pytest.raises(expected):
            dmabuf.get(fd)
        return
    buf = dmabuf.get(fd)
    try:
        assert buf.exporter.name == "import"
        assert buf.size == os.fstat(fd).st_size
        assert (expected == "buffer") is info.writable
        # get() sealed it against resizing: no peer can SIGBUS us now.
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & RESIZE == RESIZE
    finally:
        anyio.run(buf.put)


@pytest.mark.parametrize("case", list(TABLE))
def test_classifier_table(case: str) -> None:
    make, kind, expected = TABLE[case]
    fd = make()
    try:
        info = classify(fd)
        assert info.kind is kind, info
        st = os.fstat(fd)
        assert (info.dev, info.ino, info.mode) == (st.st_dev, st.st_ino, st.st_mode)
        assert info.memory is (kind in (FdKind.MEMFD, FdKind.DMA_BUF))
        before = fd_count()
        _verdict(fd, info, expected)
        assert fd_count() == before
    finally:
        os.close(fd)


def test_a_closed_fd_is_a_bad_file_descriptor() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(dmabuf.BadFileDescriptor):
        classify(r)
    with pytest.raises(dmabuf.BadFileDescriptor):
        dmabuf.get(r)


def test_classify_refuses_what_is_not_an_fd() -> None:
    with pytest.raises(TypeError):
        classify("3")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        classify(True)
    for number in (-1, 2**40):
        with pytest.raises(dmabuf.BadFileDescriptor):
            classify(number)


def test_magics_and_seals_come_from_the_kernel() -> None:
    fd = _memfd(PAGE, RESIZE)
    try:
        info = classify(fd)
        assert info.magic == _fdkind.TMPFS_MAGIC
        assert info.seals == RESIZE
        assert info.size == PAGE
        assert info.size_fixed
        assert info.writable
    finally:
        os.close(fd)


def test_statfs_layout_matches_statvfs() -> None:
    """The ctypes ``struct statfs`` agrees with what os.statvfs reads."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        raw = _fdkind._StatFs()
        assert _fdkind._libc_fstatfs(fd, raw) == 0
        vfs = os.fstatvfs(fd)
        assert (raw.f_bsize, raw.f_blocks, raw.f_files, raw.f_namelen) == (
            vfs.f_bsize,
            vfs.f_blocks,
            vfs.f_files,
            vfs.f_namemax,
        )
    finally:
        os.close(fd)


def test_ramfs_file_is_other_whatever_its_name() -> None:
    with ramfs_forgery() as sock:
        _, fds, _, _ = socket.recv_fds(sock, 64, 1)
        (fd,) = fds
        try:
            assert os.readlink(f"/proc/self/fd/{fd}") == "/dmabuf:x"
            info = classify(fd)
            assert (info.kind, info.magic) == (FdKind.OTHER, _fdkind.RAMFS_MAGIC)
            with pytest.raises(dmabuf.InvalidArgument):
                dmabuf.get(fd)
        finally:
            os.close(fd)
        sock.sendall(b"truncate\n")
        assert _line(sock) == "truncated"


# -- real kernel dma-bufs and sync_files ---------------------------------------------


def _iow(kind: str, nr: int, size: int, direction: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


@contextlib.contextmanager
def _kernel_dmabuf() -> Iterator[int]:
    """A real dma-buf fd from udmabuf or the system dma-heap, or skip saying why."""
    if os.path.exists("/dev/udmabuf"):
        dev = os.open("/dev/udmabuf", os.O_RDWR | os.O_CLOEXEC)
        memfd = _memfd(PAGE, fcntl.F_SEAL_SHRINK)
        try:
            # struct udmabuf_create {u32 memfd; u32 flags (CLOEXEC); u64 offset, size}
            create = bytearray(struct.pack("=IIQQ", memfd, 0x01, 0, PAGE))
            fd = fcntl.ioctl(dev, _iow("u", 0x42, len(create), 1), create, True)
        finally:
            os.close(memfd)
            os.close(dev)
    elif os.path.exists("/dev/dma_heap/system"):
        heap = os.open("/dev/dma_heap/system", os.O_RDONLY | os.O_CLOEXEC)
        try:
            request = bytearray(
                struct.pack("=QIIQ", PAGE, 0, os.O_RDWR | os.O_CLOEXEC, 0)
            )
            fcntl.ioctl(heap, _iow("H", 0, len(request), 3), request, True)
        finally:
            os.close(heap)
        fd = struct.unpack("=QIIQ", request)[1]
    else:
        pytest.skip("neither /dev/udmabuf nor /dev/dma_heap/system exists here")
    try:
        yield fd
    finally:
        os.close(fd)


def test_a_real_kernel_dmabuf_is_accepted() -> None:
    with _kernel_dmabuf() as fd:
        info = classify(fd)
        assert (info.kind, info.magic) == (FdKind.DMA_BUF, _fdkind.DMA_BUF_MAGIC)
        assert info.size == PAGE
        assert info.size_fixed
        buf = dmabuf.get(fd)
        try:
            again = dmabuf.get(fd)
            anyio.run(again.put)
            assert again is buf
            assert (buf.size, buf.exporter.name) == (PAGE, "import")
        finally:
            anyio.run(buf.put)


def test_a_real_kernel_sync_file_is_a_sync_file() -> None:
    path = "/sys/kernel/debug/sync/sw_sync"
    try:
        timeline = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        pytest.skip(f"no sw_sync to make a kernel sync_file with ({path}: {exc})")
    try:
        data = bytearray(struct.pack("=I32si", 1, b"test", 0))
        fcntl.ioctl(timeline, _iow("W", 0, len(data), 3), data, True)
        fence = struct.unpack("=I32si", data)[2]
        try:
            assert classify(fence).kind is FdKind.SYNC_FILE
            with pytest.raises(dmabuf.InvalidArgument):
                dmabuf.get(fence)
        finally:
            os.close(fence)
    finally:
        os.close(timeline)


# -- classified once per hand-off -----------------------------------------------------


@pytest.mark.anyio
async def test_a_received_fd_is_classified_once_per_hand_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: collections.Counter[str] = collections.Counter()
    real_fstatfs, real_fstat = _fdkind._fstatfs, os.fstat

    def fstatfs(fd: int) -> int:
        calls["fstatfs"] += 1
        return real_fstatfs(fd)

    def fstat(fd: int) -> os.stat_result:
        calls["fstat"] += 1
        return real_fstat(fd)

    raw, theirs = socket.socketpair()
    with raw:
        async with await anyio.abc.UNIXSocketStream.from_socket(theirs) as stream:
            for seals, fstats in ((RESIZE, 2), (0, 3)):
                fd = _memfd(PAGE, seals)
                socket.send_fds(raw, [record()], [fd])
                os.close(fd)
                calls.clear()
                monkeypatch.setattr(_fdkind, "_fstatfs", fstatfs)
                monkeypatch.setattr(os, "fstat", fstat)
                buf = await dmabuf.receive_buffer(stream)
                monkeypatch.undo()
                await buf.put()
                # classify once; the size again only after sealing; the
                # buffer's identity when it adopts its fd.
                assert calls == {"fstatfs": 1, "fstat": fstats}
