"""What ``Fence.import_fd`` accepts: our fence fds and kernel sync_files (12.15).

Any other fd, an arbitrary UNIX stream socket included, is refused with
``InvalidArgument``: it used to be taken for a fence that then sat pending
until its peer closed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import select
import socket
import struct
import weakref
from collections.abc import Iterator

import anyio
import pytest

from asyncdmabuf import Fence, InvalidArgument, _fence, _fence_fd
from asyncdmabuf._fdkind import ANON_INODE_FS_MAGIC, classify

from .helpers import wait_all_blocked

pytestmark = pytest.mark.usefixtures("no_socket_leaks")

PREFIX = b"\0asyncdmabuf-fence/"


def name_of(fd: int) -> object:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockname()


@pytest.mark.parametrize(
    "kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET]
)
def test_import_fd_refuses_a_plain_socketpair_end(kind: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    with a, b:
        for end in (a, b):
            with pytest.raises(InvalidArgument) as info:
                Fence.import_fd(end.fileno())
            assert info.value.errno == errno.EINVAL
            os.fstat(end.fileno())  # still the caller's, still open
        b.sendall(b"\0\0\0\0")  # even one that looks like a record
        with pytest.raises(InvalidArgument):
            Fence.import_fd(a.fileno())


def test_import_fd_refuses_a_socket_bound_to_another_name() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(b"\0not-a-fence/%d" % os.getpid())
        with pytest.raises(InvalidArgument):
            Fence.import_fd(sock.fileno())


@pytest.fixture
def eventfd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def test_import_fd_refuses_anonymous_inodes_that_are_not_sync_files(
    eventfd: int,
) -> None:
    """eventfd and epoll are anon_inode files too; only the exact sync_file is one."""
    assert classify(eventfd).magic == ANON_INODE_FS_MAGIC
    with select.epoll() as epoll:
        for fd in (eventfd, epoll.fileno()):
            with pytest.raises(InvalidArgument):
                Fence.import_fd(fd)


def test_fence_fds_are_named_and_imported() -> None:
    fence = Fence()
    pending, done = fence.export_fd(), Fence.stub().export_fd()
    try:
        for fd in (pending, done):
            name = name_of(fd)
            assert isinstance(name, bytes)
            assert name.startswith(PREFIX + b"%d/" % os.getpid())
        assert name_of(pending) != name_of(done)
        assert Fence.import_fd(pending) is fence
        known = _fence._by_file
        _fence._by_file = weakref.WeakValueDictionary()
        try:
            imported = Fence.import_fd(pending)  # as another process would
        finally:
            _fence._by_file = known
        assert imported is not fence
        assert not imported.signaled
        fence.signal()
        assert imported.signaled
        assert Fence.import_fd(done).signaled
    finally:
        os.close(pending)
        os.close(done)


def test_a_squatted_name_is_skipped() -> None:
    """Another process holding the next name does not stop this one making fences."""
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with squatter:
        upcoming = next(_fence_fd._names) + 1
        squatter.bind(PREFIX + b"%d/%d" % (os.getpid(), upcoming))
        fd = Fence.stub().export_fd()
        try:
            assert name_of(fd) != squatter.getsockname()
            assert Fence.import_fd(fd).signaled
        finally:
            os.close(fd)


# -- real kernel sync_files ----------------------------------------------------


@pytest.mark.anyio
async def test_sync_file_kind_is_awaited_by_polling(
    eventfd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync_file path on a stand-in: the exact link makes one, readiness signals.

    An eventfd is an anonymous inode like a sync_file; made to read as
    ``anon_inode:sync_file``, it is taken for one, and (the status ioctl
    failing on it) polling it readable is what signals it.
    """
    real = os.readlink
    target = f"/proc/self/fd/{eventfd}"
    monkeypatch.setattr(
        os, "readlink", lambda p: "anon_inode:sync_file" if p == target else real(p)
    )
    assert _fence_fd.classify(eventfd) == "sync_file"
    fence = Fence.import_fd(eventfd)
    assert Fence.import_fd(eventfd) is not fence  # sync_files share one inode
    assert not fence.signaled
    async with anyio.create_task_group() as tg:
        tg.start_soon(fence.wait)
        await wait_all_blocked()
        assert not fence.signaled
        os.eventfd_write(eventfd, 1)
    assert fence.signaled
    assert fence.error is None


UDMABUF_CREATE = 0x40187542  # _IOW('u', 0x42, struct udmabuf_create)
DMA_BUF_IOCTL_EXPORT_SYNC_FILE = 0xC0086202  # _IOWR('b', 2, 8 bytes)
DMA_BUF_SYNC_READ = 1


def _kernel_dma_buf() -> int:
    """Return a real kernel dma-buf fd, or skip saying why there is none."""
    if os.path.exists("/dev/udmabuf"):
        memfd = os.memfd_create("asyncdmabuf-test-udmabuf", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(memfd, 4096)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            dev = os.open("/dev/udmabuf", os.O_RDWR | os.O_CLOEXEC)
            try:
                arg = bytearray(struct.pack("=IIQQ", memfd, 0, 0, 4096))
                fd: int = fcntl.ioctl(dev, UDMABUF_CREATE, arg, True)
                return fd
            except OSError as exc:
                pytest.skip(f"/dev/udmabuf refused a buffer: {exc}")
            finally:
                os.close(dev)
        finally:
            os.close(memfd)
    pytest.skip("no /dev/udmabuf here: no kernel dma-buf to export a sync_file from")


def test_a_real_kernel_sync_file_is_a_fence() -> None:
    dmabuf = _kernel_dma_buf()
    try:
        arg = fcntl.ioctl(
            dmabuf,
            DMA_BUF_IOCTL_EXPORT_SYNC_FILE,
            struct.pack("=Ii", DMA_BUF_SYNC_READ, -1),
        )
    except OSError as exc:
        os.close(dmabuf)
        pytest.skip(f"this kernel cannot export a sync_file: {exc}")
    sync_file = struct.unpack("=Ii", arg)[1]
    try:
        assert _fence_fd.classify(sync_file) == "sync_file"
        fence = Fence.import_fd(sync_file)
        assert fence.signaled  # nothing is pending on a new buffer
        assert fence.error is None
        again = fence.export_fd()
        os.close(again)
    finally:
        os.close(sync_file)
        os.close(dmabuf)


def test_import_fd_refuses_an_o_path_fd_of_a_socket_file(
    tmp_path: pathlib.Path,
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "sock"))
        fd = os.open(tmp_path / "sock", os.O_PATH | os.O_CLOEXEC)
        try:
            with pytest.raises(InvalidArgument):
                Fence.import_fd(fd)
        finally:
            os.close(fd)
