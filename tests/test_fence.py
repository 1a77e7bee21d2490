"""Fences: the kernel's dma_fence semantics (st-dma-fence.c), arrays, fds, processes."""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import select
import socket
import sys
import weakref
from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import asyncdmabuf
from asyncdmabuf import (
    DmaBufError,
    Fence,
    FenceContext,
    InvalidArgument,
    _fence,
    _fence_fd,
    _fence_import,
)

from .helpers import checkpoints, no_checkpoints, wait_all_blocked

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_socket_leaks")]


# -- helpers -------------------------------------------------------------------


def is_signaled(fence: Fence) -> bool:
    """``fence.signaled``, without mypy narrowing it for the rest of the test."""
    return fence.signaled


def code(fence: Fence) -> int:
    """The errno a signalled fence carries (0: none)."""
    error = fence.error
    if error is None:
        return 0
    assert isinstance(error, OSError)
    assert error.errno is not None
    return error.errno


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def import_foreign(fd: int) -> _fence_import.ImportedFence:
    """Import ``fd`` as another process would, not knowing this process's fences."""
    known = _fence._by_file
    _fence._by_file = weakref.WeakValueDictionary()
    try:
        imported = Fence.import_fd(fd)
    finally:
        _fence._by_file = known
    assert isinstance(imported, _fence_import.ImportedFence)
    return imported


def waiting(fence: Fence) -> int:
    """How many tasks wait for ``fence`` (its poller included, if imported)."""
    queue = fence._queue
    parked = 0 if queue is None else queue.statistics().tasks_waiting
    return parked + fence._polling


def assert_clean(fence: Fence) -> None:
    """Nothing waits on the fence any more."""
    assert waiting(fence) == 0


# -- signal, status, error (test_signaling, test_status, test_error) -----------


def test_signal_once() -> None:
    fence = Fence()
    assert not is_signaled(fence)
    assert fence.error is None
    fence.signal()
    assert fence.signaled
    assert fence.error is None
    with pytest.raises(InvalidArgument) as info:
        fence.signal()
    assert info.value.errno == errno.EINVAL
    assert isinstance(info.value, ValueError)


def test_signal_with_exception() -> None:
    fence = Fence()
    error = RuntimeError("the GPU hung")
    fence.signal(error)
    assert fence.error is error
    with pytest.raises(InvalidArgument):
        fence.signal()
    assert fence.error is error


def test_signal_with_errno() -> None:
    fence = Fence()
    fence.signal(errno.ETIMEDOUT)
    assert isinstance(fence.error, DmaBufError)
    assert code(fence) == errno.ETIMEDOUT
    other = Fence()
    other.signal(errno.EINVAL)
    assert isinstance(other.error, InvalidArgument)


@pytest.mark.parametrize("bad", [0, -5, 4096])
def test_signal_bad_errno(bad: int) -> None:
    fence = Fence()
    with pytest.raises(InvalidArgument):
        fence.signal(bad)
    assert not is_signaled(fence)


@pytest.mark.parametrize("bad", ["EIO", True, 1.5, KeyboardInterrupt()])
def test_signal_bad_type(bad: object) -> None:
    fence = Fence()
    with pytest.raises(TypeError):
        fence.signal(bad)  # type: ignore[arg-type]
    assert not is_signaled(fence)


def test_repr_shows_state() -> None:
    fence = Fence()
    assert "pending" in repr(fence)
    fence.signal(errno.EIO)
    assert "signalled with" in repr(fence)


# -- wait (test_wait, test_wait_timeout) ---------------------------------------


async def test_wait_on_signaled_returns_and_checkpoints(
    anyio_backend_name: str,
) -> None:
    fence = Fence()
    fence.signal()
    with checkpoints(anyio_backend_name):
        await fence.wait()
    assert_clean(fence)


async def test_wait_pending_checkpoints(anyio_backend_name: str) -> None:
    fence = Fence()
    async with anyio.create_task_group() as tg:
        tg.start_soon(fence.wait)
        await wait_all_blocked()
        fence.signal()
        with checkpoints(anyio_backend_name):
            await fence.wait()


async def test_wait_in_cancelled_scope_raises_even_if_signaled() -> None:
    fence = Fence()
    fence.signal()
    reached = False
    with anyio.CancelScope() as scope:
        scope.cancel()
        await fence.wait()
        reached = True
    assert not reached
    assert scope.cancelled_caught


async def test_wait_blocks_until_signal_then_reads_error() -> None:
    fence = Fence()
    seen: list[tuple[bool, Exception | None]] = []

    async def waiter() -> None:
        await fence.wait()
        seen.append((fence.signaled, fence.error))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(waiter)
        await wait_all_blocked()
        assert seen == []
        assert waiting(fence) == 5
        fence.signal(errno.ENOSPC)
    assert len(seen) == 5
    assert all(signaled and err is fence.error for signaled, err in seen)
    assert code(fence) == errno.ENOSPC
    assert_clean(fence)


async def test_cancelled_wait_leaves_nothing_and_retry_works() -> None:
    fence = Fence()
    cancelled: list[BaseException] = []

    async def waiter(scope: anyio.CancelScope) -> None:
        with scope:
            try:
                await fence.wait()
            except anyio.get_cancelled_exc_class() as exc:
                cancelled.append(exc)
                raise

    async with anyio.create_task_group() as tg:
        scopes = [anyio.CancelScope() for _ in range(3)]
        for scope in scopes:
            tg.start_soon(waiter, scope)
        await wait_all_blocked()
        assert waiting(fence) == 3
        scopes[0].cancel()
        await wait_all_blocked()
        assert waiting(fence) == 2
        for scope in scopes[1:]:
            scope.cancel()
    assert len(cancelled) == 3
    assert not is_signaled(fence)
    assert_clean(fence)
    # A retry works.
    async with anyio.create_task_group() as tg:
        tg.start_soon(fence.wait)
        await wait_all_blocked()
        fence.signal()
    assert_clean(fence)


class TestTimeout:
    """A timeout is the caller's fail_after (virtual time, on trio)."""

    @pytest.fixture
    def anyio_backend(self) -> tuple[str, dict[str, object]]:
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})

    async def test_fail_after(self) -> None:
        fence = Fence()
        start = anyio.current_time()
        with pytest.raises(TimeoutError), anyio.fail_after(5):
            await fence.wait()
        assert anyio.current_time() - start == pytest.approx(5)
        assert_clean(fence)
        assert not is_signaled(fence)

    async def test_signal_before_deadline(self) -> None:
        fence = Fence()
        async with anyio.create_task_group() as tg:

            async def signal_later() -> None:
                await anyio.sleep(2)
                fence.signal()

            tg.start_soon(signal_later)
            with anyio.fail_after(5):
                await fence.wait()
        assert anyio.current_time() == pytest.approx(2)


# -- callbacks (test_add_callback, test_late_add_callback, test_rm_callback, ...


def test_add_callback_runs_once_at_signal() -> None:
    fence = Fence()
    calls: list[tuple[Fence, bool]] = []
    assert fence.add_callback(lambda f: calls.append((f, f.signaled)))
    assert calls == []
    fence.signal()
    assert calls == [(fence, True)]
    with pytest.raises(InvalidArgument):
        fence.signal()
    assert len(calls) == 1


def test_late_add_callback_refused() -> None:
    fence = Fence()
    fence.signal()
    calls: list[Fence] = []
    assert not fence.add_callback(calls.append)
    assert calls == []


def test_rm_callback() -> None:
    fence = Fence()
    calls: list[str] = []

    def first(f: Fence) -> None:
        calls.append("first")

    def second(f: Fence) -> None:
        calls.append("second")

    assert fence.add_callback(first)
    assert fence.add_callback(second)
    assert fence.remove_callback(first)
    assert not fence.remove_callback(first)
    fence.signal()
    assert calls == ["second"]


def test_late_rm_callback() -> None:
    fence = Fence()
    calls: list[Fence] = []
    assert fence.add_callback(calls.append)
    fence.signal()
    assert not fence.remove_callback(calls.append)
    assert calls == [fence]


def test_same_callback_twice_runs_twice_and_removes_one_at_a_time() -> None:
    fence = Fence()
    calls: list[Fence] = []
    fence.add_callback(calls.append)
    fence.add_callback(calls.append)
    fence.add_callback(calls.append)
    assert fence.remove_callback(calls.append)
    fence.signal()
    assert calls == [fence, fence]


def test_callbacks_run_in_order_and_see_the_error() -> None:
    fence = Fence()
    seen: list[tuple[int, Exception | None]] = []

    def recorder(i: int) -> Callable[[Fence], None]:
        return lambda f: seen.append((i, f.error))

    for i in range(4):
        fence.add_callback(recorder(i))
    error = OSError(errno.EIO, "bus error")
    fence.signal(error)
    assert seen == [(i, error) for i in range(4)]


def test_callback_adding_callback_during_signal_is_refused() -> None:
    fence = Fence()
    results: list[bool] = []
    fence.add_callback(lambda f: results.append(f.add_callback(print)))
    fence.signal()
    assert results == [False]


def test_failing_callback_does_not_stop_the_signal() -> None:
    fence = Fence()
    calls: list[int] = []

    def bad(f: Fence) -> None:
        raise RuntimeError("first")

    def worse(f: Fence) -> None:
        raise KeyError("second")

    fence.add_callback(bad)
    fence.add_callback(lambda f: calls.append(1))
    fence.add_callback(worse)
    with pytest.raises(RuntimeError, match="first") as info:
        fence.signal()
    assert fence.signaled
    assert calls == [1]
    assert any("KeyError" in note for note in info.value.__notes__)


def test_add_callback_needs_a_callable() -> None:
    with pytest.raises(TypeError):
        Fence().add_callback(42)  # type: ignore[arg-type]


async def test_sync_operations_never_checkpoint(anyio_backend_name: str) -> None:
    ctx = FenceContext()
    with no_checkpoints(anyio_backend_name):
        fence = ctx.fence()
        assert fence.add_callback(print)
        assert fence.remove_callback(print)
        assert not is_signaled(fence)
        fence.signal()
        assert fence.error is None
        joined = Fence.all(Fence.stub(), fence)
        assert Fence.any(joined, Fence()).signaled
        fd = fence.export_fd()
        imported = Fence.import_fd(fd)
        assert imported.signaled
        os.close(fd)


# -- contexts and sequence numbers ---------------------------------------------


def test_context_gives_increasing_seqnos() -> None:
    ctx = FenceContext("ring0", driver="sim")
    fences = [ctx.fence() for _ in range(3)]
    assert [f.seqno for f in fences] == [1, 2, 3]
    assert {f.context for f in fences} == {ctx.id}
    assert ctx.seqno == 3
    assert fences[0].driver == "sim"
    assert fences[0].timeline == "ring0"
    assert fences[2].is_later(fences[1])
    assert not fences[1].is_later(fences[2])
    assert not fences[1].is_later(fences[1])
    explicit = Fence(context=ctx, seqno=10)
    assert explicit.is_later(fences[2])
    assert ctx.fence().seqno == 11
    for fence in [*fences, explicit]:
        if not fence.signaled:
            fence.signal()


def test_unbound_fences_have_contexts_of_their_own() -> None:
    a, b = Fence(), Fence()
    assert a.context != b.context
    assert a.driver == "asyncdmabuf"
    assert a.timeline == "unbound"
    with pytest.raises(InvalidArgument):
        a.is_later(b)
    with pytest.raises(TypeError):
        a.is_later(object())  # type: ignore[arg-type]


def test_signal_later_signals_earlier_first() -> None:
    ctx = FenceContext()
    fences = [ctx.fence() for _ in range(4)]
    order: list[int] = []
    for fence in fences:
        fence.add_callback(lambda f: order.append(f.seqno))
    fences[2].signal(errno.EIO)
    assert order == [1, 2, 3]
    assert [f.signaled for f in fences] == [True, True, True, False]
    assert fences[0].error is None
    assert fences[1].error is None
    assert fences[2].error is not None
    with pytest.raises(InvalidArgument):
        fences[0].signal()
    # Born at or below what has signalled: already signalled.
    assert Fence(context=ctx, seqno=2).signaled
    assert not Fence(context=ctx, seqno=4).signaled
    fences[3].signal()
    assert order == [1, 2, 3, 4]


async def test_waiters_on_earlier_fences_wake_in_order() -> None:
    ctx = FenceContext()
    fences = [ctx.fence() for _ in range(3)]
    woke: list[int] = []

    async def waiter(fence: Fence) -> None:
        await fence.wait()
        woke.append(fence.seqno)

    async with anyio.create_task_group() as tg:
        for fence in fences:
            tg.start_soon(waiter, fence)
        await wait_all_blocked()
        fences[1].signal()
        await wait_all_blocked()
        assert sorted(woke) == [1, 2]
        fences[2].signal()
    assert sorted(woke) == [1, 2, 3]


def test_bad_context_arguments() -> None:
    with pytest.raises(TypeError):
        Fence(context="ring0")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Fence(seqno=1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        FenceContext().fence(-1)
    with pytest.raises(TypeError):
        FenceContext(timeline=3)  # type: ignore[arg-type]


@given(
    seqnos=st.lists(st.integers(0, 20), min_size=1, max_size=12),
    order=st.randoms(use_true_random=False),
)
def test_timeline_signals_in_order(seqnos: list[int], order: object) -> None:
    """Whatever order fences are signalled in, a timeline signals in seqno order."""
    ctx = FenceContext()
    fences = [Fence(context=ctx, seqno=s) for s in seqnos]
    seen: list[int] = []
    for fence in fences:
        fence.add_callback(lambda f: seen.append(f.seqno))
    shuffled = list(fences)
    order.shuffle(shuffled)  # type: ignore[attr-defined]
    highest = -1
    for fence in shuffled:
        if fence.signaled:
            with pytest.raises(InvalidArgument):
                fence.signal()
            continue
        fence.signal()
        highest = max(highest, fence.seqno)
        assert [f.signaled for f in fences] == [f.seqno <= highest for f in fences]
    assert seen == sorted(seen)
    assert len(seen) == len(fences)


# -- the stub (test_stub) ------------------------------------------------------


async def test_stub(anyio_backend_name: str) -> None:
    stub = Fence.stub()
    assert stub is Fence.stub()
    assert stub.signaled
    assert stub.error is None
    assert (stub.context, stub.seqno) == (0, 0)
    assert not stub.add_callback(print)
    with pytest.raises(InvalidArgument):
        stub.signal()
    with checkpoints(anyio_backend_name):
        await stub.wait()


# -- arrays --------------------------------------------------------------------


def test_all_signals_when_every_fence_has() -> None:
    fences = [Fence() for _ in range(3)]
    joined = Fence.all(*fences)
    assert joined.driver == "dma_fence_array"
    calls: list[Fence] = []
    joined.add_callback(calls.append)
    fences[1].signal(errno.EIO)
    fences[0].signal(errno.ENOMEM)
    assert not is_signaled(joined)
    fences[2].signal()
    assert joined.signaled
    assert calls == [joined]
    assert joined.error is fences[1].error
    with pytest.raises(InvalidArgument):
        joined.signal()


def test_all_degenerate_cases() -> None:
    assert Fence.all() is Fence.stub()
    fence = Fence()
    assert Fence.all(fence) is fence
    done = Fence()
    done.signal(errno.EIO)
    joined = Fence.all(Fence.stub(), done)
    assert joined.signaled
    assert joined.error is done.error
    with pytest.raises(TypeError):
        Fence.all(fence, None)  # type: ignore[arg-type]


def test_all_with_some_already_signalled() -> None:
    done, pending = Fence(), Fence()
    done.signal(errno.EBUSY)
    joined = Fence.all(done, pending)
    assert not is_signaled(joined)
    pending.signal(errno.EIO)
    assert joined.error is done.error


def test_any_signals_at_the_first_and_unregisters() -> None:
    fences = [Fence() for _ in range(3)]
    either = Fence.any(*fences)
    assert not is_signaled(either)
    fences[1].signal(errno.ETIMEDOUT)
    assert either.signaled
    assert either.error is fences[1].error
    assert not fences[0]._callbacks
    assert not fences[0]._parents
    assert not fences[2]._callbacks
    assert not fences[2]._parents
    fences[0].signal()
    assert either.error is fences[1].error


def test_any_degenerate_cases() -> None:
    with pytest.raises(InvalidArgument):
        Fence.any()
    fence = Fence()
    assert Fence.any(fence) is fence
    pending = [Fence(), Fence()]
    done = Fence()
    done.signal(errno.EIO)
    either = Fence.any(pending[0], done, pending[1])
    assert either.signaled
    assert either.error is done.error
    assert not pending[0]._callbacks
    assert not pending[0]._parents
    assert not pending[1]._callbacks
    assert not pending[1]._parents
    with pytest.raises(InvalidArgument):
        either.signal()


@given(
    errors=st.lists(st.sampled_from([0, errno.EIO, errno.ENOMEM]), min_size=2),
    order=st.randoms(use_true_random=False),
)
def test_arrays_property(errors: list[int], order: object) -> None:
    """all() signals with the last and the first error; any() with the first."""
    fences = [Fence() for _ in errors]
    every, either = Fence.all(*fences), Fence.any(*fences)
    indices = list(range(len(fences)))
    order.shuffle(indices)  # type: ignore[attr-defined]
    first = indices[0]
    for step, i in enumerate(indices):
        fences[i].signal(errors[i] or None)
        assert either.signaled
        assert every.signaled == (step == len(indices) - 1)
    assert either.error is fences[first].error
    failed = [fences[i].error for i in indices if errors[i]]
    assert every.error is (failed[0] if failed else None)


async def test_wait_on_arrays() -> None:
    a, b = Fence(), Fence()
    every, either = Fence.all(a, b), Fence.any(a, b)
    woke: list[str] = []

    async def waiter(name: str, fence: Fence) -> None:
        await fence.wait()
        woke.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "all", every)
        tg.start_soon(waiter, "any", either)
        await wait_all_blocked()
        b.signal()
        await wait_all_blocked()
        assert woke == ["any"]
        a.signal()
    assert woke == ["any", "all"]


# -- fds within one process ----------------------------------------------------


def test_export_fd_is_new_cloexec_and_readable_at_signal() -> None:
    fence = Fence()
    fd1, fd2 = fence.export_fd(), fence.export_fd()
    try:
        assert fd1 != fd2
        assert fcntl.fcntl(fd1, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not readable(fd1)
        fence.signal()
        assert readable(fd1)
        assert readable(fd2)
        assert fence._rfd == fence._wfd == -1  # the fence holds no fds any more
    finally:
        os.close(fd1)
        os.close(fd2)


def test_import_in_process_gives_the_same_fence() -> None:
    fence = Fence()
    fd = fence.export_fd()
    try:
        assert Fence.import_fd(fd) is fence
        fence.signal()
        assert os.fstat(fd)  # the caller's fd stays open
    finally:
        os.close(fd)


def test_export_of_signalled_fence_is_readable_with_its_error() -> None:
    fence = Fence()
    fence.signal(errno.ENOSPC)
    fd = fence.export_fd()
    try:
        assert readable(fd)
        imported = Fence.import_fd(fd)
        assert imported is not fence
        assert imported.signaled
        assert code(imported) == errno.ENOSPC
        assert readable(fd)  # peeked, never consumed
        assert Fence.import_fd(fd).error is not None
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (None, None),
        (errno.ETIMEDOUT, errno.ETIMEDOUT),
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (RuntimeError("no errno"), errno.EIO),
    ],
)
async def test_error_crosses_the_fd(
    error: Exception | int | None, expected: int | None
) -> None:
    fence = Fence()
    fd = fence.export_fd()
    try:
        imported = import_foreign(fd)
        assert imported is not fence
        assert not is_signaled(imported)
        async with anyio.create_task_group() as tg:
            tg.start_soon(imported.wait)
            await wait_all_blocked()
            fence.signal(error)
        assert imported.signaled
        assert code(imported) == (expected or 0)
        assert imported._fd == -1  # its own dup closed at signal
    finally:
        os.close(fd)


async def test_imported_fence_many_waiters_and_hand_over() -> None:
    fence = Fence()
    fd = fence.export_fd()
    imported = import_foreign(fd)
    os.close(fd)
    woke: list[int] = []
    scopes = [anyio.CancelScope() for _ in range(3)]

    async def waiter(i: int) -> None:
        with scopes[i]:
            await imported.wait()
            woke.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(waiter, i)
        await wait_all_blocked()
        assert imported._polling
        scopes[0].cancel()  # the first waiter watches the fd; another takes over
        await wait_all_blocked()
        assert imported._polling
        fence.signal()
    assert sorted(woke) == [1, 2]
    assert_clean(imported)
    assert not imported._polling


async def test_imported_fence_cancel_leaves_nothing_and_retry_works() -> None:
    fence = Fence()
    fd = fence.export_fd()
    imported = import_foreign(fd)
    os.close(fd)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(imported.wait)
            tg.start_soon(imported.wait)
            await wait_all_blocked()
            scope.cancel()
    assert scope.cancelled_caught
    assert not imported._polling
    assert_clean(imported)
    async with anyio.create_task_group() as tg:
        tg.start_soon(imported.wait)
        await wait_all_blocked()
        fence.signal()
    assert imported.signaled


async def test_imported_callbacks_run_when_noticed() -> None:
    fence = Fence()
    fd = fence.export_fd()
    imported = import_foreign(fd)
    os.close(fd)
    calls: list[Fence] = []
    assert imported.add_callback(calls.append)
    with pytest.raises(InvalidArgument):
        imported.signal()
    fence.signal()
    assert imported.signaled  # noticing it runs the callbacks
    assert calls == [imported]
    await imported.wait()


def test_owner_dropped_unsignalled_reads_as_owner_died() -> None:
    fence = Fence()
    fd = fence.export_fd()
    try:
        imported = import_foreign(fd)
        assert not is_signaled(imported)
        del fence
        gc.collect()
        assert imported.signaled
        assert code(imported) == errno.EOWNERDEAD
    finally:
        os.close(fd)


def test_export_of_imported_fence_is_the_same_socket() -> None:
    fence = Fence()
    fd = fence.export_fd()
    imported = import_foreign(fd)
    again = imported.export_fd()
    try:
        assert os.fstat(again).st_ino == os.fstat(fd).st_ino
        fence.signal()
        assert readable(again)
    finally:
        os.close(fd)
        os.close(again)


def test_import_fd_refuses_what_is_not_a_fence() -> None:
    with pytest.raises(TypeError):
        Fence.import_fd("3")  # type: ignore[arg-type]
    with pytest.raises(asyncdmabuf.BadFileDescriptor):
        Fence.import_fd(-1)
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(asyncdmabuf.BadFileDescriptor):
        Fence.import_fd(w)
    with pytest.raises(InvalidArgument):
        Fence.import_fd(r)
    os.close(r)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(InvalidArgument):
            Fence.import_fd(udp.fileno())
        os.fstat(udp.fileno())  # still the caller's, still open


def test_garbage_record_reads_as_protocol_error() -> None:
    rfd, wfd = _fence_fd.socketpair()  # a fence socket, written by a bad peer
    with socket.socket(fileno=rfd) as a, socket.socket(fileno=wfd) as b:
        b.sendall(b"xy")
        b.shutdown(socket.SHUT_WR)
        imported = Fence.import_fd(a.fileno())
        assert code(imported) == errno.EPROTO


# -- arrays of imported fences (nobody delivers their signal) ------------------


async def test_arrays_of_imported_fences_drive_them() -> None:
    owners = [Fence(), Fence()]
    fds = [f.export_fd() for f in owners]
    imported = [import_foreign(fd) for fd in fds]
    for fd in fds:
        os.close(fd)
    every, either = Fence.all(*imported), Fence.any(*imported)
    woke: list[str] = []
    any_woke = anyio.Event()

    async def waiter(name: str, fence: Fence) -> None:
        await fence.wait()
        woke.append(name)
        if name == "any":
            any_woke.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "all", every)
        tg.start_soon(waiter, "any", either)
        await wait_all_blocked()
        owners[1].signal(errno.EIO)
        await any_woke.wait()  # the fd's readiness, not a task, wakes it
        assert woke == ["any"]
        assert not is_signaled(every)
        assert code(either) == errno.EIO
        owners[0].signal()
    assert woke == ["any", "all"]
    assert code(every) == errno.EIO
    for fence in imported:
        assert not fence._polling
        assert_clean(fence)


async def test_polling_an_array_of_imported_fences() -> None:
    owner = Fence()
    fd = owner.export_fd()
    imported = import_foreign(fd)
    os.close(fd)
    joined = Fence.all(imported, Fence.stub())
    assert joined is not imported
    assert not is_signaled(joined)
    owner.signal()
    assert joined.signaled


@pytest.mark.parametrize("any_", [False, True])
async def test_export_of_array_of_imported_fences(any_: bool) -> None:
    owners = [Fence(), Fence()]
    fds = [f.export_fd() for f in owners]
    imported = [import_foreign(fd) for fd in fds]
    for fd in fds:
        os.close(fd)
    local = Fence()
    joined = (Fence.any if any_ else Fence.all)(*imported, local)
    out = joined.export_fd()
    try:
        assert not readable(out)
        owners[0].signal(errno.ENOMEM)
        if not any_:
            assert not readable(out)
            owners[1].signal()
            local.signal()
        with anyio.fail_after(10):
            await anyio.wait_readable(out)
        with anyio.fail_after(10):
            await joined.wait()
        result = Fence.import_fd(out)  # joined has let go of its socket by now
        assert result is not joined
        assert code(result) == errno.ENOMEM
    finally:
        os.close(out)
        for fence in [*owners, local]:
            if not fence.signaled:
                fence.signal()


# -- across processes ----------------------------------------------------------

CHILD_WAITS = r"""
import sys, anyio
from asyncdmabuf import Fence
fence = Fence.import_fd(int(sys.argv[1]))
print("pending" if not fence.signaled else "signalled", flush=True)
anyio.run(fence.wait)
print(fence.error.errno if fence.error is not None else 0, flush=True)
"""

CHILD_SIGNALS = r"""
import os, socket, sys
from asyncdmabuf import Fence
control = socket.socket(fileno=int(sys.argv[1]))
fence = Fence()
fd = fence.export_fd()
socket.send_fds(control, [b"f"], [fd])
os.close(fd)
command = control.recv(1)
if command == b"s":
    fence.signal(int(sys.argv[2]) or None)
    control.recv(1)
# b"d": die without signalling
"""


async def _read_line(process: anyio.abc.Process) -> str:
    assert process.stdout is not None
    data = b""
    while not data.endswith(b"\n"):
        data += await process.stdout.receive()
    return data.decode().strip()


@pytest.mark.slow
@pytest.mark.parametrize("error", [0, errno.ECANCELED])
async def test_child_awaits_a_fence_of_ours(error: int) -> None:
    fence = Fence()
    fd = fence.export_fd()
    try:
        async with await anyio.open_process(
            [sys.executable, "-c", CHILD_WAITS, str(fd)], pass_fds=(fd,)
        ) as process:
            assert await _read_line(process) == "pending"
            fence.signal(error or None)
            assert await _read_line(process) == str(error)
            assert await process.wait() == 0
    finally:
        os.close(fd)


async def _receive_fd(sock: socket.socket) -> int:
    await anyio.wait_readable(sock)
    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    return fds[0]


@pytest.mark.slow
@pytest.mark.parametrize(("command", "expected"), [(b"s", 0), (b"s", 5), (b"d", 130)])
async def test_we_await_a_fence_of_a_child(command: bytes, expected: int) -> None:
    """The child sends its fence's fd over SCM_RIGHTS, then signals or dies."""
    ours, theirs = socket.socketpair()
    with ours:
        process = await anyio.open_process(
            [sys.executable, "-c", CHILD_SIGNALS, str(theirs.fileno()), str(expected)],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        async with process:
            fd = await _receive_fd(ours)
            imported = Fence.import_fd(fd)
            os.close(fd)
            assert not is_signaled(imported)
            async with anyio.create_task_group() as tg:
                tg.start_soon(imported.wait)
                await wait_all_blocked()
                assert not is_signaled(imported)
                ours.sendall(command)
            assert imported.signaled
            assert code(imported) == (errno.EOWNERDEAD if command == b"d" else expected)
            if command == b"s":
                ours.sendall(b"q")
        assert await process.wait() == 0
