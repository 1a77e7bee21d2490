"""Reservation objects: the kernel's dma_resv semantics (st-dma-resv.c), sync fds."""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncdmabuf import (
    BadFileDescriptor,
    Fence,
    FenceContext,
    InvalidArgument,
    Reservation,
    Usage,
    _fence,
)

from .helpers import checkpoints, no_checkpoints, wait_all_blocked

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_socket_leaks")]

USAGES = list(Usage)


# -- helpers -------------------------------------------------------------------


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@contextmanager
def foreign() -> Iterator[None]:
    """Import fds as another process would, not knowing this process's fences."""
    known = _fence._by_file
    _fence._by_file = weakref.WeakValueDictionary()
    try:
        yield
    finally:
        _fence._by_file = known


def listed(resv: Reservation, usage: Usage = Usage.BOOKKEEP) -> list[tuple[int, Usage]]:
    """The pending fences as (id, usage), for comparing."""
    return [(id(f), u) for f, u in resv.fences(usage)]


# -- test and wait for each usage combination (st-dma-resv.c) ------------------


@pytest.mark.parametrize("added", USAGES, ids=[u.name for u in USAGES])
@pytest.mark.parametrize("asked", USAGES, ids=[u.name for u in USAGES])
def test_test_each_usage(added: Usage, asked: Usage) -> None:
    resv = Reservation()
    fence = Fence()
    resv.add_fence(fence, added)
    assert resv.test(asked) == (added > asked)
    assert [f for f, _ in resv.fences(asked)] == ([fence] if added <= asked else [])
    fence.signal()
    assert resv.test(asked)
    assert resv.fences() == ()


@pytest.mark.parametrize("added", USAGES, ids=[u.name for u in USAGES])
@pytest.mark.parametrize("asked", USAGES, ids=[u.name for u in USAGES])
async def test_wait_each_usage(
    added: Usage, asked: Usage, anyio_backend_name: str
) -> None:
    resv = Reservation()
    fence = Fence()
    resv.add_fence(fence, added)
    done = False

    async def waiter() -> None:
        nonlocal done
        with checkpoints(anyio_backend_name):
            await resv.wait(asked)
        done = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await wait_all_blocked()
        assert done == (added > asked)
        fence.signal()
    assert done


async def test_wait_with_nothing_checkpoints_and_test_never_does(
    anyio_backend_name: str,
) -> None:
    resv = Reservation()
    with checkpoints(anyio_backend_name):
        await resv.wait(Usage.BOOKKEEP)
    fence = Fence()
    with no_checkpoints(anyio_backend_name):
        resv.add_fence(fence, Usage.WRITE)
        assert not resv.test(Usage.WRITE)
        assert not resv.test_for_cpu("r")
        assert resv.fences()
        fd = resv.export_sync_fd("rw")
        other = Reservation()
        other.import_sync_fd(fd, "w")
        os.close(fd)
        fence.signal()
        assert resv.test(Usage.BOOKKEEP)
        assert other.test(Usage.BOOKKEEP)


async def test_wait_considers_fences_added_while_waiting() -> None:
    resv = Reservation()
    first, second = Fence(), Fence()
    resv.add_fence(first, Usage.WRITE)
    done = False

    async def waiter() -> None:
        nonlocal done
        await resv.wait(Usage.READ)
        done = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await wait_all_blocked()
        resv.add_fence(second, Usage.READ)
        first.signal()
        await wait_all_blocked()
        assert not done
        second.signal()
    assert done
    assert resv.test(Usage.BOOKKEEP)


async def test_wait_ignores_errors() -> None:
    resv = Reservation()
    fence = Fence()
    resv.add_fence(fence, Usage.KERNEL)
    fence.signal(errno.EIO)
    await resv.wait(Usage.KERNEL)
    assert resv.test(Usage.KERNEL)


async def test_cancelled_wait_leaves_nothing_and_retry_works() -> None:
    resv = Reservation()
    fence = Fence()
    resv.add_fence(fence, Usage.WRITE)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(resv.wait, Usage.WRITE)
            tg.start_soon(resv.wait_for_cpu, "rw")
            await wait_all_blocked()
            assert fence._queue is not None
            assert fence._queue.statistics().tasks_waiting == 2
            scope.cancel()
    assert scope.cancelled_caught
    assert fence._queue is None or not fence._queue.statistics().tasks_waiting
    assert [f for f, _ in resv.fences()] == [fence]
    async with anyio.create_task_group() as tg:
        tg.start_soon(resv.wait, Usage.WRITE)
        await wait_all_blocked()
        fence.signal()
    assert resv.test(Usage.WRITE)


# -- adding, pruning, replacing ------------------------------------------------


def test_signalled_fences_are_pruned() -> None:
    resv = Reservation()
    fences = [Fence() for _ in range(3)]
    for fence in fences:
        resv.add_fence(fence, Usage.READ)
    fences[1].signal()
    assert [f for f, _ in resv.fences()] == [fences[0], fences[2]]
    done = Fence()
    done.signal()
    resv.add_fence(done, Usage.KERNEL)
    assert [f for f, _ in resv.fences()] == [fences[0], fences[2]]
    assert "2 pending" in repr(resv)
    for fence in (fences[0], fences[2]):
        fence.signal()
    assert resv.fences() == ()


def test_newer_fence_of_same_context_replaces_older() -> None:
    ctx = FenceContext()
    resv = Reservation()
    old, new = ctx.fence(), ctx.fence()
    resv.add_fence(old, Usage.WRITE)
    resv.add_fence(new, Usage.WRITE)
    assert listed(resv) == [(id(new), Usage.WRITE)]


def test_usage_may_be_raised() -> None:
    ctx = FenceContext()
    resv = Reservation()
    old, new = ctx.fence(), ctx.fence()
    resv.add_fence(old, Usage.READ)
    resv.add_fence(new, Usage.WRITE)
    assert listed(resv) == [(id(new), Usage.WRITE)]
    again = Fence()
    resv.add_fence(again, Usage.BOOKKEEP)
    resv.add_fence(again, Usage.KERNEL)
    assert listed(resv) == [(id(new), Usage.WRITE), (id(again), Usage.KERNEL)]


def test_usage_is_never_lowered() -> None:
    ctx = FenceContext()
    resv = Reservation()
    old, new = ctx.fence(), ctx.fence()
    resv.add_fence(old, Usage.WRITE)
    resv.add_fence(new, Usage.READ)
    # The newer READ fence must not make readers skip the older write.
    assert listed(resv) == [(id(old), Usage.WRITE), (id(new), Usage.READ)]
    assert not resv.test(Usage.WRITE)
    same = Fence()
    resv.add_fence(same, Usage.KERNEL)
    resv.add_fence(same, Usage.READ)
    assert (id(same), Usage.KERNEL) in listed(resv)
    assert (id(same), Usage.READ) not in listed(resv)


def test_older_fence_of_same_context_is_redundant() -> None:
    ctx = FenceContext()
    resv = Reservation()
    old, new = ctx.fence(), ctx.fence()
    resv.add_fence(new, Usage.WRITE)
    resv.add_fence(old, Usage.READ)
    assert listed(resv) == [(id(new), Usage.WRITE)]
    new.signal()  # signals old first: nothing was lost
    assert old.signaled
    assert resv.test(Usage.BOOKKEEP)


def test_older_fence_with_stronger_usage_is_kept_beside_newer() -> None:
    ctx = FenceContext()
    resv = Reservation()
    old, new = ctx.fence(), ctx.fence()
    resv.add_fence(new, Usage.WRITE)
    resv.add_fence(old, Usage.KERNEL)
    assert listed(resv) == [(id(new), Usage.WRITE), (id(old), Usage.KERNEL)]
    old.signal()
    assert not resv.test(Usage.WRITE)
    new.signal()
    assert resv.test(Usage.WRITE)


def test_fences_of_other_contexts_are_all_kept() -> None:
    resv = Reservation()
    fences = [Fence(), FenceContext().fence(), Fence()]
    for fence in fences:
        resv.add_fence(fence, Usage.WRITE)
    assert [f for f, _ in resv.fences()] == fences
    for fence in fences:
        fence.signal()


def test_fences_filters_by_usage_for_bufinfo() -> None:
    resv = Reservation()
    fences = {usage: Fence() for usage in Usage}
    for usage, fence in fences.items():
        resv.add_fence(fence, usage)
    assert [u for _, u in resv.fences(Usage.READ)] == [
        Usage.KERNEL,
        Usage.WRITE,
        Usage.READ,
    ]
    assert len(resv.fences()) == 4
    for fence in fences.values():
        fence.signal()


def test_bad_arguments() -> None:
    resv = Reservation()
    with pytest.raises(TypeError):
        resv.add_fence("fence", Usage.READ)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        resv.add_fence(Fence(), "READ")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        resv.test(True)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        resv.test(7)  # type: ignore[arg-type]
    assert resv.test(1)  # type: ignore[arg-type]  # a plain int usage is accepted
    assert resv.fences() == ()


@given(
    steps=st.lists(
        st.one_of(
            st.tuples(
                st.just("add"),
                st.integers(0, 2),  # which timeline (2: a fence of its own)
                st.integers(1, 6),  # seqno
                st.sampled_from(USAGES),
            ),
            st.tuples(st.just("signal"), st.integers(0, 30)),
        ),
        max_size=30,
    )
)
def test_test_matches_a_model(steps: list[tuple[object, ...]]) -> None:
    """test(u) is true exactly when every fence ever added with usage <= u signalled."""
    contexts = [FenceContext(), FenceContext()]
    resv = Reservation()
    added: list[tuple[Fence, Usage]] = []
    for step in steps:
        if step[0] == "add":
            _, which, seqno, usage = step
            assert isinstance(which, int)
            assert isinstance(seqno, int)
            assert isinstance(usage, Usage)
            fence = (
                Fence(context=contexts[which], seqno=seqno) if which < 2 else Fence()
            )
            resv.add_fence(fence, usage)
            added.append((fence, usage))
        elif added:
            index = step[1]
            assert isinstance(index, int)
            fence = added[index % len(added)][0]
            if not fence.signaled:
                fence.signal()
        for usage in Usage:
            expected = all(f.signaled for f, u in added if u <= usage)
            assert resv.test(usage) == expected
        assert all(not f.signaled for f, _ in resv.fences())


# -- implicit sync for the CPU -------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "reader_waits", "writer_waits"),
    [
        (Usage.KERNEL, True, True),
        (Usage.WRITE, True, True),
        (Usage.READ, False, True),
        (Usage.BOOKKEEP, False, False),
    ],
)
async def test_wait_for_cpu(
    usage: Usage, reader_waits: bool, writer_waits: bool
) -> None:
    resv = Reservation()
    fence = Fence()
    resv.add_fence(fence, usage)
    assert resv.test_for_cpu("r") == (not reader_waits)
    assert resv.test_for_cpu("w") == (not writer_waits)
    assert resv.test_for_cpu("rw") == (not writer_waits)
    done: list[str] = []

    async def access(mode: str) -> None:
        await resv.wait_for_cpu(mode)
        done.append(mode)

    async with anyio.create_task_group() as tg:
        for mode in ("r", "w", "rw"):
            tg.start_soon(access, mode)
        await wait_all_blocked()
        expected = [] if reader_waits else ["r"]
        if not writer_waits:
            expected += ["w", "rw"]
        assert sorted(done) == sorted(expected)
        fence.signal()
    assert sorted(done) == ["r", "rw", "w"]


@pytest.mark.parametrize("mode", ["", "x", "wr", "R"])
async def test_bad_modes(mode: str) -> None:
    resv = Reservation()
    fd = Fence.stub().export_fd()
    try:
        with pytest.raises(InvalidArgument):
            await resv.wait_for_cpu(mode)
        with pytest.raises(InvalidArgument):
            resv.test_for_cpu(mode)
        with pytest.raises(InvalidArgument):
            resv.export_sync_fd(mode)
        with pytest.raises(InvalidArgument):
            resv.import_sync_fd(fd, mode)
        with pytest.raises(TypeError):
            resv.import_sync_fd(fd, None)  # type: ignore[arg-type]
        assert resv.fences() == ()
    finally:
        os.close(fd)


# -- sync fds (DMA_BUF_IOCTL_EXPORT_SYNC_FILE / IMPORT_SYNC_FILE) --------------


def test_export_with_nothing_pending_is_readable() -> None:
    resv = Reservation()
    read_only = Fence()
    resv.add_fence(read_only, Usage.READ)
    fds = [resv.export_sync_fd("r"), Reservation().export_sync_fd("rw")]
    try:
        assert all(readable(fd) for fd in fds)
        assert all(Fence.import_fd(fd).error is None for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)
        read_only.signal()


def test_export_is_a_snapshot() -> None:
    resv = Reservation()
    writer, reader, later = Fence(), Fence(), Fence()
    resv.add_fence(writer, Usage.WRITE)
    resv.add_fence(reader, Usage.READ)
    for_reader, for_writer = resv.export_sync_fd("r"), resv.export_sync_fd("w")
    try:
        resv.add_fence(later, Usage.WRITE)
        assert not readable(for_reader)
        assert not readable(for_writer)
        writer.signal(errno.EIO)
        assert readable(for_reader)  # `later` came after the snapshot
        assert not readable(for_writer)
        reader.signal()
        assert readable(for_writer)
        imported = Fence.import_fd(for_writer)
        error = imported.error
        assert isinstance(error, OSError)
        assert error.errno == errno.EIO
        assert not resv.test_for_cpu("r")
    finally:
        os.close(for_reader)
        os.close(for_writer)
        later.signal()


@pytest.mark.parametrize(
    ("mode", "usage"), [("r", Usage.READ), ("w", Usage.WRITE), ("rw", Usage.WRITE)]
)
def test_import_sync_fd_usage(mode: str, usage: Usage) -> None:
    fence = Fence()
    fd = fence.export_fd()
    resv = Reservation()
    try:
        resv.import_sync_fd(fd, mode)
        assert [u for _, u in resv.fences()] == [usage]
        assert resv.test_for_cpu("r") == (mode == "r")  # "r": readers need not wait
        assert not resv.test_for_cpu("w")
        os.fstat(fd)  # still the caller's
    finally:
        os.close(fd)
    fence.signal()
    assert resv.test_for_cpu("w")


def test_import_sync_fd_bad_fd() -> None:
    resv = Reservation()
    with pytest.raises(BadFileDescriptor):
        resv.import_sync_fd(-1, "r")
    r, w = os.pipe()
    try:
        with pytest.raises(InvalidArgument):
            resv.import_sync_fd(r, "w")
    finally:
        os.close(r)
        os.close(w)
    assert resv.fences() == ()


async def test_sync_fd_round_trip_between_reservations() -> None:
    a, b = Reservation(), Reservation()
    fence = Fence()
    a.add_fence(fence, Usage.WRITE)
    fd = a.export_sync_fd("r")
    b.import_sync_fd(fd, "w")
    os.close(fd)
    done = False

    async def reader() -> None:
        nonlocal done
        await b.wait_for_cpu("r")
        done = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await wait_all_blocked()
        assert not done
        fence.signal()
    assert done


async def test_export_of_several_imported_fences() -> None:
    """A reservation holding fences of other processes still exports one fd."""
    owners = [Fence(), Fence()]
    resv = Reservation()
    for owner in owners:
        fd = owner.export_fd()
        with foreign():
            resv.import_sync_fd(fd, "w")
        os.close(fd)
    assert all(f not in owners for f, _ in resv.fences())
    out = resv.export_sync_fd("r")
    try:
        assert not readable(out)
        owners[0].signal()
        owners[1].signal(errno.ENOMEM)
        with anyio.fail_after(10):
            await anyio.wait_readable(out)
        with anyio.fail_after(10):
            await resv.wait_for_cpu("rw")
    finally:
        os.close(out)


def test_test_notices_every_imported_fence_at_once() -> None:
    """Asking prunes every signalled fence, not just the first one noticed."""
    owners = [Fence(), Fence()]
    resv = Reservation()
    for owner in owners:
        fd = owner.export_fd()
        with foreign():
            resv.import_sync_fd(fd, "w")
        os.close(fd)
    for owner in owners:
        owner.signal()
    assert resv.test(Usage.BOOKKEEP)
    assert resv.fences() == ()


# -- across processes ----------------------------------------------------------

CHILD_WRITER = r"""
import mmap, os, socket, sys
from asyncdmabuf import Fence
control = socket.socket(fileno=int(sys.argv[1]))
memfd = int(sys.argv[2])
fence = Fence()
fd = fence.export_fd()
socket.send_fds(control, [b"f"], [fd])
os.close(fd)
assert control.recv(1) == b"g"
with mmap.mmap(memfd, 4096) as view:
    view[:5] = b"hello"
fence.signal()
control.recv(1)
"""


@pytest.mark.slow
async def test_reader_sees_the_writers_bytes_only_after_its_fence() -> None:
    """A child writes shared memory under a fence; our reader waits for it."""
    memfd = os.memfd_create("asyncdmabuf-test-resv", os.MFD_CLOEXEC)
    ours, theirs = socket.socketpair()
    try:
        os.ftruncate(memfd, 4096)
        process = await anyio.open_process(
            [sys.executable, "-c", CHILD_WRITER, str(theirs.fileno()), str(memfd)],
            pass_fds=[theirs.fileno(), memfd],
        )
        theirs.close()
        async with process:
            await anyio.wait_readable(ours)
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            resv = Reservation()
            resv.import_sync_fd(fds[0], "w")  # the child will write
            os.close(fds[0])
            seen: list[bytes] = []

            async def reader() -> None:
                await resv.wait_for_cpu("r")
                with mmap.mmap(memfd, 4096, prot=mmap.PROT_READ) as view:
                    seen.append(bytes(view[:5]))

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await wait_all_blocked()
                assert seen == []
                assert not resv.test_for_cpu("r")
                ours.sendall(b"g")
            assert seen == [b"hello"]
            ours.sendall(b"q")
        assert await process.wait() == 0
    finally:
        ours.close()
        theirs.close()
        os.close(memfd)
