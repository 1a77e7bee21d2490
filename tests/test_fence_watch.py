"""Exported fds of imported fences: one watcher per process, nothing left (12.5).

``export_sync_fd`` of a buffer holding fences of other processes used to start
a thread per call, holding N+1 fds, which outlived the exported fd, and to add
a callback to every component fence. Now one watcher thread serves every such
export, exists only while one is pending, and lets go of an export (and its
fds) as soon as every holder of the exported fd has closed it.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import weakref
from collections.abc import Iterator

import anyio
import pytest

from asyncdmabuf import Fence, Reservation, Usage, _fence, _fence_watch
from asyncdmabuf.exporters import MemfdExporter

from .helpers import fd_count, imported_from

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_socket_leaks")]

EXPORTS = 100


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def links(fence: Fence) -> int:
    """Callbacks and array links a fence keeps."""
    return len(fence._callbacks or ()) + len(fence._parents or ())


def wait_for_watcher_to_end() -> None:
    thread = _fence_watch.watcher_thread()
    if thread is not None:
        thread.join(timeout=10)
    assert not _fence_watch.statistics().running


@pytest.fixture
def owners() -> Iterator[list[Fence]]:
    """Two fences of "another process", never signalled unless a test does."""
    fences = [Fence(), Fence()]
    yield fences
    for fence in fences:
        if not fence.signaled:
            fence.signal()


@pytest.fixture
def resv(owners: list[Fence]) -> Iterator[Reservation]:
    """A reservation holding the owners' fences, imported."""
    resv = Reservation()
    for owner in owners:
        resv.add_fence(imported_from(owner), Usage.WRITE)
    yield resv
    for owner in owners:
        if not owner.signaled:
            owner.signal()
    assert resv.test(Usage.BOOKKEEP)  # noticing the signals closes their fds


def test_export_sync_fd_of_never_signalling_imported_fences_starts_one_thread(
    resv: Reservation,
) -> None:
    components = [f for f, _ in resv.fences()]
    threads, fds = threading.active_count(), fd_count()
    outs = [resv.export_sync_fd("r") for _ in range(EXPORTS)]
    try:
        assert threading.active_count() <= threads + 1
        stats = _fence_watch.statistics()
        assert stats.exports == EXPORTS
        assert stats.watched_fds == len(components)  # shared by every export
        # Per export: the fd returned and the write end the watcher finishes;
        # then one duplicate per component, the epoll set and its eventfd.
        assert fd_count() - fds == 2 * EXPORTS + len(components) + 2
        assert [links(f) for f in components] == [0] * len(components)
        assert not any(readable(fd) for fd in outs)
    finally:
        for fd in outs:
            os.close(fd)
    wait_for_watcher_to_end()
    assert threading.active_count() == threads
    assert fd_count() == fds
    assert _fence_watch.statistics().exports == 0
    assert [links(f) for f in components] == [0] * len(components)


async def test_the_watcher_finishes_exports_when_the_fences_signal(
    owners: list[Fence], resv: Reservation
) -> None:
    outs = [resv.export_sync_fd("r") for _ in range(3)]
    try:
        owners[1].signal(errno.ETIMEDOUT)
        assert not any(readable(fd) for fd in outs)  # Fence.all: one left
        owners[0].signal()
        for fd in outs:
            with anyio.fail_after(10):
                await anyio.wait_readable(fd)
            error = Fence.import_fd(fd).error
            assert isinstance(error, OSError)
            assert error.errno == errno.ETIMEDOUT
        wait_for_watcher_to_end()  # finished: nothing left to watch
    finally:
        for fd in outs:
            os.close(fd)


async def test_closing_one_export_leaves_the_others_watched(
    owners: list[Fence], resv: Reservation
) -> None:
    first, second = resv.export_sync_fd("r"), resv.export_sync_fd("r")
    try:
        os.close(first)
        for owner in owners:
            owner.signal()
        with anyio.fail_after(10):
            await anyio.wait_readable(second)
    finally:
        os.close(second)
    wait_for_watcher_to_end()
    assert _fence_watch.statistics() == _fence_watch.WatcherStatistics(0, 0, False)


async def test_released_buffer_keeps_its_snapshot_and_nothing_more(
    owners: list[Fence],
) -> None:
    """Like a kernel sync_file the fd outlives the buffer; closing it ends all."""
    buf = await MemfdExporter().allocate(4096)
    for owner in owners:
        fd = owner.export_fd()
        known = _fence._by_file
        _fence._by_file = weakref.WeakValueDictionary()
        try:
            buf.import_sync_fd(fd, "w")
        finally:
            _fence._by_file = known
            os.close(fd)
    threads, fds = threading.active_count(), fd_count()
    out = buf.export_sync_fd("rw")
    await buf.put()
    del buf
    try:
        assert not readable(out)
        for owner in owners:
            owner.signal()
        with anyio.fail_after(10):
            await anyio.wait_readable(out)
    finally:
        os.close(out)
    wait_for_watcher_to_end()
    assert threading.active_count() == threads
    assert fd_count() <= fds


async def test_nested_export_of_imported_and_local_fences() -> None:
    """any(all(imported, imported), local): the watcher evaluates the nest."""
    owners = [Fence(), Fence(), Fence()]
    imported = [imported_from(owner) for owner in owners]
    local = Fence()
    nest = Fence.any(Fence.all(imported[0], imported[1]), Fence.all(imported[2], local))
    out = nest.export_fd()
    try:
        owners[0].signal()
        owners[2].signal(errno.EIO)
        assert not readable(out)
        assert [links(f) for f in imported] == [0, 0, 0]
        assert links(local) == 1  # it tells the watcher at its signal
        local.signal()
        assert links(local) == 0
        with anyio.fail_after(10):
            await anyio.wait_readable(out)
        error = Fence.import_fd(out).error
        assert isinstance(error, OSError)
        assert error.errno == errno.EIO
    finally:
        os.close(out)
        owners[1].signal()
    wait_for_watcher_to_end()


async def test_a_holder_shutting_its_end_does_not_end_the_export(
    owners: list[Fence], resv: Reservation
) -> None:
    """Only every holder closing the fd lets it go; a shutdown for writing does not."""
    out = resv.export_sync_fd("r")
    other = os.dup(out)
    try:
        with socket.socket(fileno=os.dup(out)) as sock:
            sock.shutdown(socket.SHUT_WR)
        os.close(out)
        out = -1
        for owner in owners:
            owner.signal(errno.ENOLINK)
        with anyio.fail_after(10):
            await anyio.wait_readable(other)
        error = Fence.import_fd(other).error
        assert isinstance(error, OSError)
        assert error.errno == errno.ENOLINK
    finally:
        os.close(other)
        if out >= 0:
            os.close(out)
    wait_for_watcher_to_end()
