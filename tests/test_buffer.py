"""export / fd / get / put / release: API.md section 2."""

from __future__ import annotations

import gc
import os
import socket
import tempfile

import anyio
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf.exporters import MemfdExporter

from .exporters_for_tests import RecordingExporter
from .helpers import assert_checkpoints

pytestmark = pytest.mark.anyio


def test_export_checks_its_arguments() -> None:
    exp = RecordingExporter()
    with pytest.raises(TypeError):
        dmabuf.export(object(), 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dmabuf.export(exp, 10.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dmabuf.export(exp, True)
    for size in (0, -1):
        with pytest.raises(dmabuf.InvalidArgument):
            dmabuf.export(exp, size)
    with pytest.raises(dmabuf.InvalidArgument):
        dmabuf.export(exp, 10, name="x" * 33)
    with pytest.raises(TypeError):
        dmabuf.export(exp, 10, name=b"bytes")  # type: ignore[arg-type]
    assert dmabuf.bufinfo() == []


async def test_export_then_put_releases_exactly_once() -> None:
    exp = RecordingExporter()
    buf = exp.make(100, name="frame-0")
    assert (buf.size, buf.name, buf.exporter, buf.refcount) == (100, "frame-0", exp, 1)
    assert buf.priv == {"allocated": False}
    assert not buf.released
    fd = buf.fd()
    try:
        again = dmabuf.get(fd)
        assert again is buf
        assert buf.refcount == 2
        async with assert_checkpoints():
            await again.put()
        assert buf.refcount == 1
        assert exp.calls == []
        async with assert_checkpoints():
            await buf.put()
        assert buf.released
        assert exp.calls == ["release"]
        assert exp.released == [buf]
    finally:
        os.close(fd)


async def test_use_after_release_raises_invalid_argument() -> None:
    exp = RecordingExporter()
    buf = exp.make()
    async with buf.attach(dmabuf.Device("d")) as att:
        pass
    await buf.put()
    with pytest.raises(dmabuf.InvalidArgument):
        await buf.put()
    with pytest.raises(dmabuf.InvalidArgument):
        buf.fd()
    with pytest.raises(dmabuf.InvalidArgument):
        buf.set_name("x")
    with pytest.raises(dmabuf.InvalidArgument):
        buf.attach(dmabuf.Device("d"))
    with pytest.raises(dmabuf.InvalidArgument):
        buf.cpu_access("r")
    with pytest.raises(dmabuf.InvalidArgument):
        await buf.begin_cpu_access("r")
    with pytest.raises(dmabuf.InvalidArgument):
        _ = buf.inode
    with pytest.raises(dmabuf.InvalidArgument):
        att.map(dmabuf.Direction.TO_DEVICE)
    with pytest.raises(dmabuf.InvalidArgument):
        att.try_map(dmabuf.Direction.TO_DEVICE)
    assert exp.calls.count("release") == 1


async def test_last_put_completes_in_a_cancelled_scope() -> None:
    exp = RecordingExporter()
    buf = exp.make()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await buf.put()
    # put() did all its work, then delivered the cancellation at its checkpoint.
    assert scope.cancelled_caught
    assert buf.released
    assert exp.calls == ["release"]


async def test_async_with_puts_on_exit() -> None:
    exp = RecordingExporter()
    async with exp.make() as buf:
        assert buf.refcount == 1
    assert buf.released
    other = exp.make()
    await other.aclose()
    assert other.released


async def test_last_put_detaches_leftovers_with_a_warning() -> None:
    exp = RecordingExporter()
    buf = exp.make()
    att = await buf.attach(dmabuf.Device("gpu"))
    sgt = await att.map(dmabuf.Direction.TO_DEVICE)
    with pytest.warns(ResourceWarning, match="still attached to gpu"):
        await buf.put()
    assert not att.attached
    assert not sgt.valid
    assert exp.calls == ["attach gpu", "map gpu", "unmap gpu", "detach gpu", "release"]


def _abandon(exp: RecordingExporter) -> None:
    buf = exp.make()
    os.close(buf.fd())  # the buffer now owns a file, which the warning path closes


def test_buffer_dropped_without_put_warns() -> None:
    with pytest.warns(ResourceWarning, match="without its last put"):
        _abandon(RecordingExporter())
    gc.collect()
    assert dmabuf.bufinfo() == []


async def test_get_resolves_any_fd_of_the_open_file() -> None:
    buf = await MemfdExporter().allocate(4096)
    own = buf.fd()
    dup = os.dup(own)
    try:
        assert own != dup
        assert dmabuf.get(own) is buf
        assert dmabuf.get(dup) is buf
        assert buf.refcount == 3
        assert os.fstat(own).st_ino == buf.inode
    finally:
        os.close(own)
        os.close(dup)
    for _ in range(3):
        await buf.put()
    assert buf.released


async def test_fd_is_new_each_call_and_cloexec() -> None:
    buf = await MemfdExporter().allocate(4096)
    a, b = buf.fd(), buf.fd()
    try:
        assert a != b
        assert not os.get_inheritable(a)
    finally:
        os.close(a)
        os.close(b)
        await buf.put()


async def test_get_of_a_closed_fd_is_ebadf() -> None:
    buf = await MemfdExporter().allocate(4096)
    fd = buf.fd()
    os.close(fd)
    with pytest.raises(dmabuf.BadFileDescriptor):
        dmabuf.get(fd)
    with pytest.raises(dmabuf.BadFileDescriptor):
        dmabuf.get(-1)
    with pytest.raises(TypeError):
        dmabuf.get("3")  # type: ignore[arg-type]
    assert buf.refcount == 1
    await buf.put()


def test_get_of_something_that_is_not_memory_is_einval() -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        for fd in (r, w, a.fileno()):
            with pytest.raises(dmabuf.InvalidArgument):
                dmabuf.get(fd)
        with tempfile.TemporaryDirectory() as path:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with pytest.raises(dmabuf.InvalidArgument):
                    dmabuf.get(dfd)
            finally:
                os.close(dfd)
        with tempfile.TemporaryFile() as regular, pytest.raises(dmabuf.InvalidArgument):
            dmabuf.get(regular.fileno())
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


async def test_fd_of_a_buffer_without_memory_is_not_importable_after_release() -> None:
    exp = RecordingExporter()
    buf = exp.make()
    fd = buf.fd()
    try:
        assert dmabuf.get(fd) is buf
        await buf.put()
        await buf.put()
        # The buffer is gone; its (empty) file holds no bytes to import.
        with pytest.raises(dmabuf.InvalidArgument):
            dmabuf.get(fd)
    finally:
        os.close(fd)


async def test_get_imports_foreign_memfd_once() -> None:
    fd = os.memfd_create("foreign", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, b"hello")
        os.ftruncate(fd, 4096)
        buf = dmabuf.get(fd)
        assert buf.exporter.name == "import"
        assert buf.size == 4096
        assert dmabuf.get(fd) is buf
        assert buf.refcount == 2
        async with buf.cpu_access("r") as view:
            assert bytes(view[:5]) == b"hello"
        await buf.put()
        await buf.put()
    finally:
        os.close(fd)


async def test_set_name_follows_dma_buf_set_name() -> None:
    buf = RecordingExporter().make()
    buf.set_name("camera0")
    assert buf.name == "camera0"
    buf.set_name("é" * 16)  # 32 bytes of UTF-8
    with pytest.raises(dmabuf.InvalidArgument):
        buf.set_name("é" * 17)
    with pytest.raises(TypeError):
        buf.set_name(7)  # type: ignore[arg-type]
    buf.set_name(None)
    assert buf.name is None
    await buf.put()
