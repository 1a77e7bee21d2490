"""Attacks on BufferPool ownership (issue 12, items 1, 2, 7 and 11).

Each test is one way a careless or hostile owner could make the pool hang,
leak, or hand one owner's bytes to the next. The pool must:

* never hang leaving ``async with pool`` (a body's exception propagates at once);
* never wait on a released buffer's fences (set it aside instead);
* never leave a buffer alive once a close and a racing acquire both finish;
* reuse only what nothing outside the pool can reach, zeroed.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncdmabuf as dmabuf
from asyncdmabuf import (
    BufferPool,
    Busy,
    CpuMode,
    DmaBuf,
    Fence,
    InvalidArgument,
    Usage,
)
from asyncdmabuf.exporters import MemfdExporter

from .helpers import assert_checkpoints, assert_no_checkpoints, wait_all_blocked
from .reliability import PROFILE, Backend, budget, cancel_at
from .test_fence import import_foreign
from .test_pool import _bytes as _read
from .test_pool import _write

SIZE = 2 * 4096
SECRET = b"NEW SECRET!!"
#: A guard against a regression turning into a 120 s test timeout; never a
#: measure of speed (everything here completes without waiting on a clock).
HANG = 10


def _fence_by_fd(buf: DmaBuf) -> Fence:
    """Fence ``buf`` as a GPU's sync_file would: known by an fd, polled.

    Returns the fence on the other side of the fd, for the test to signal.
    """
    fence = Fence()
    fd = fence.export_fd()
    try:
        buf.resv.add_fence(import_foreign(fd), Usage.WRITE)
    finally:
        os.close(fd)
    return fence


class GatedExporter(MemfdExporter):
    """A memfd exporter whose ``allocate`` waits for a gate the test opens."""

    name: ClassVar[str] = "gated-memfd"

    def __init__(self) -> None:
        super().__init__()
        self.started = anyio.Event()
        self.gate = anyio.Event()
        #: When set to an Event, CPU access (the pool's zeroing) waits for it.
        self.cpu_gate: anyio.Event | None = None

    async def allocate(self, size: int, *, name: str | None = None) -> DmaBuf:
        self.started.set()
        await self.gate.wait()
        return await super().allocate(size, name=name)

    async def begin_cpu_access(self, buf: DmaBuf, mode: CpuMode) -> None:
        if self.cpu_gate is not None:
            self.started.set()
            await self.cpu_gate.wait()
        super().begin_cpu_access(buf, mode)


pytestmark = pytest.mark.anyio


async def _acquire_expecting_close(
    pool: BufferPool, errors: list[BaseException]
) -> None:
    try:
        buf = await pool.acquire()
    except InvalidArgument as exc:
        errors.append(exc)
    else:
        pool.release(buf)


# -- leaving the pool never hangs ------------------------------------------------------


async def test_an_exception_in_the_pool_body_propagates_at_once() -> None:
    pool = BufferPool(MemfdExporter(), 4096, max_buffers=2)
    lent: list[DmaBuf] = []

    async def app() -> None:
        async with pool:
            lent.append(await pool.acquire())
            raise RuntimeError("app bug")

    with anyio.fail_after(HANG), pytest.raises(RuntimeError, match="app bug"):
        await app()
    [buf] = lent
    assert pool.closed
    assert not buf.released  # still lent: put when it comes back
    pool.release(buf)
    assert buf.released


async def test_aclose_returns_while_buffers_are_lent() -> None:
    pool = BufferPool(MemfdExporter(), 4096, max_buffers=2)
    lent = await pool.acquire()
    async with pool.buffer() as returned:
        pass
    with anyio.fail_after(HANG):
        await pool.aclose()
    assert returned.released  # the free one is put by the close
    assert not lent.released
    assert pool.statistics().lent == 1
    pool.release(lent)
    assert lent.released
    assert pool.statistics().lent == 0


class SlowReleaseExporter(MemfdExporter):
    """A memfd exporter whose ``release`` suspends (an exporter may await)."""

    name: ClassVar[str] = "slow-release-memfd"

    async def release(self, buf: DmaBuf) -> None:
        await anyio.lowlevel.checkpoint()
        super().release(buf)


async def test_a_release_after_close_that_would_wait_says_so() -> None:
    """A synchronous release cannot await an exporter: it warns, never hangs."""
    pool = BufferPool(SlowReleaseExporter(), 4096, max_buffers=1)
    buf = await pool.acquire()
    await pool.aclose()
    with pytest.warns(ResourceWarning, match="cut short"):
        pool.release(buf)
    assert buf.released
    await anyio.lowlevel.checkpoint()  # the task's scopes are intact


async def test_the_async_exit_after_close_puts_the_buffer() -> None:
    pool = BufferPool(MemfdExporter(), 4096, max_buffers=1)
    async with pool.buffer() as buf:
        await pool.aclose()
    assert buf.released


async def test_an_exception_in_the_buffer_body_releases_it() -> None:
    async with BufferPool(MemfdExporter(), SIZE, max_buffers=1) as pool:
        lent: list[DmaBuf] = []

        async def body() -> None:
            async with pool.buffer() as buf:
                lent.append(buf)
                await _write(buf, SECRET)
                raise RuntimeError("body")

        with pytest.raises(RuntimeError, match="body"):
            await body()
        [buf] = lent
        assert pool.statistics().lent == 0
        again = await pool.acquire()
        assert again is buf
        assert await _read(again) == bytes(SIZE)
        pool.release(again)


async def test_a_cancelled_buffer_body_releases_it_and_stays_cancelled() -> None:
    async with BufferPool(MemfdExporter(), SIZE, max_buffers=1) as pool:
        with anyio.CancelScope() as scope:
            async with pool.buffer() as buf:
                await _write(buf, SECRET)
                scope.cancel()
                await anyio.lowlevel.checkpoint()
        assert scope.cancelled_caught
        assert pool.statistics().lent == 0
        async with pool.buffer() as again:
            assert again is buf
            assert await _read(again) == bytes(SIZE)


# -- cancellation at every checkpoint of acquire --------------------------------------


@pytest.mark.parametrize("state", ["empty", "dirty", "clean"])
async def test_cancel_acquire_at_every_checkpoint(state: str) -> None:
    """Cancelled at its k-th suspension, for every k, acquire leaves no trace."""
    for k in range(1, 50):
        async with BufferPool(MemfdExporter(), SIZE, max_buffers=1) as pool:
            if state == "dirty":
                buf = await pool.acquire()
                await _write(buf, SECRET)
                pool.release(buf)
            elif state == "clean":
                async with pool.buffer() as buf:
                    await _write(buf, SECRET)
            cancelled, _, got = await cancel_at(pool.acquire(), k)
            if got is not None:
                pool.release(got)
            s = pool.statistics()
            assert (s.lent, s.waiters) == (0, 0)
            assert s.free == (0 if state == "empty" and got is None else 1)
            async with pool.buffer() as again:
                assert await _read(again) == bytes(SIZE)
        if not cancelled:
            return
    raise AssertionError("acquire never completed")


async def test_cancel_while_waiting_leaves_the_queue() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        buf = await pool.acquire()
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def waiter() -> None:
                with scope:
                    await pool.acquire()

            tg.start_soon(waiter)
            await wait_all_blocked()
            assert pool.statistics().waiters == 1
            scope.cancel()
        assert scope.cancelled_caught
        assert pool.statistics().waiters == 0
        pool.release(buf)
        assert pool.statistics().free == 1


async def test_cancel_after_hand_over_passes_the_buffer_on() -> None:
    """Handed a buffer, then cancelled before it ran: the next waiter gets it."""
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        buf = await pool.acquire()
        got: list[DmaBuf] = []
        first_scope = anyio.CancelScope()

        async def first() -> None:
            with first_scope:
                got.append(await pool.acquire())

        async def second() -> None:
            got.append(await pool.acquire())

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await wait_all_blocked()
            tg.start_soon(second)
            await wait_all_blocked()
            pool.release(buf)  # handed to first...
            first_scope.cancel()  # ...which is cancelled before it runs (asyncio)
            await wait_all_blocked()
            # Exactly one of them holds the only buffer (trio never cancels a
            # task it has woken: there, first keeps it).
            assert len(got) == 1
            assert got[0] is buf
            pool.release(got.pop())
        for b in got:
            pool.release(b)
        s = pool.statistics()
        assert (s.allocated, s.lent, s.waiters, s.free) == (1, 0, 0, 1)


# -- release of what the pool did not lend ---------------------------------------------


async def test_release_of_a_stranger_is_refused() -> None:
    exporter = MemfdExporter()
    async with (
        BufferPool(exporter, 4096, max_buffers=1) as pool,
        BufferPool(exporter, 4096, max_buffers=1) as other,
    ):
        stranger = await exporter.allocate(4096)
        with pytest.raises(InvalidArgument, match="not lent"):
            pool.release(stranger)
        await stranger.put()
        theirs = await other.acquire()
        with pytest.raises(InvalidArgument, match="not lent"):
            pool.release(theirs)
        other.release(theirs)
        with pytest.raises(TypeError):
            pool.release("a buffer")  # type: ignore[arg-type]
        s = pool.statistics()
        assert (s.allocated, s.lent, s.free) == (0, 0, 0)


async def test_double_release_is_refused_and_changes_nothing() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=2) as pool:
        buf = await pool.acquire()
        pool.release(buf)
        with pytest.raises(InvalidArgument, match="not lent"):
            pool.release(buf)
        s = pool.statistics()
        assert (s.free, s.lent) == (1, 0)
        a, b = await pool.acquire(), await pool.acquire()
        assert a is not b  # the buffer is not in the free list twice
        pool.release(a)
        pool.release(b)


async def test_a_buffer_its_owner_put_leaves_the_pool() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        buf = await pool.acquire()
        await buf.put()
        with pytest.raises(InvalidArgument, match="put by its owner"):
            pool.release(buf)
        async with pool.buffer() as fresh:  # the slot was freed
            assert fresh is not buf


# -- reuse only what nothing outside the pool can reach --------------------------------


async def test_an_exposed_buffer_never_shows_the_next_owner_s_bytes() -> None:
    async with BufferPool(MemfdExporter(), SIZE, max_buffers=1) as pool:
        old = await pool.acquire()
        await _write(old, b"old owner")
        fd = old.fd()  # the old owner keeps an fd...
        view = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ)  # ...and a map
        try:
            pool.release(old)
            async with pool.buffer() as new:  # the pool hands the slot on
                assert new is not old
                assert await _read(new) == bytes(SIZE)
                await _write(new, SECRET)
                assert view.find(SECRET) == -1
                assert os.pread(fd, SIZE, 0).find(SECRET) == -1
            assert old.released
            assert view[:9] == b"old owner"  # its own bytes, nobody else's
            assert pool.statistics().replaced == 1
        finally:
            view.close()
            os.close(fd)


async def test_a_buffer_with_cpu_access_open_is_not_reused() -> None:
    async with BufferPool(MemfdExporter(), SIZE, max_buffers=1) as pool:
        old = await pool.acquire()
        await old.begin_cpu_access("rw")
        pool.release(old)
        async with pool.buffer() as new:
            assert new is not old
            await _write(new, SECRET)
        assert old.released
        assert pool.statistics().replaced == 1


async def test_an_array_kept_after_cpu_access_never_shows_the_next_owner() -> None:
    numpy = pytest.importorskip("numpy")
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        old = await pool.acquire()
        arrays = []
        with pytest.raises(BufferError):
            async with old.cpu_access("rw") as view:
                arrays.append(numpy.frombuffer(view, dtype=numpy.uint8))
        pool.release(old)
        async with pool.buffer() as new:
            await _write(new, SECRET)
            leaked = bytes(arrays[0][: len(SECRET)])
        arrays.clear()
        assert leaked != SECRET


async def test_an_attached_buffer_is_refused_and_stays_lent() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        buf = await pool.acquire()
        att = await buf.attach(dmabuf.Device("dev"))
        with pytest.raises(InvalidArgument, match="attached"):
            pool.release(buf)
        assert pool.statistics().lent == 1
        await att.detach()
        pool.release(buf)
        assert pool.statistics().free == 1


async def test_an_attachment_through_another_reference_is_not_reused() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        buf = await pool.acquire()
        fd = buf.fd()
        other = dmabuf.get(fd)  # someone else's reference, attached
        os.close(fd)
        att = await other.attach(dmabuf.Device("dev"))
        pool.release(buf)
        async with pool.buffer() as new:
            assert new is not buf
        assert not buf.released  # the other owner still holds it
        await att.detach()
        await other.put()
        assert buf.released


@pytest.mark.parametrize("usage", list(Usage))
async def test_a_pending_fence_sets_the_buffer_aside(usage: Usage) -> None:
    async with BufferPool(MemfdExporter(), SIZE, max_buffers=2) as pool:
        fenced = await pool.acquire()
        await _write(fenced, SECRET)
        fence = Fence()
        fenced.resv.add_fence(fence, usage)
        pool.release(fenced)
        assert pool.statistics().set_aside == 1
        with anyio.fail_after(HANG):
            fresh = await pool.acquire()  # never waits on the fence
        assert fresh is not fenced
        assert not fence.signaled
        got: list[DmaBuf] = []
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                got.append(await pool.acquire())

            tg.start_soon(waiter)
            await wait_all_blocked()
            assert not got  # the bound holds: a set-aside buffer counts
            fence.signal()  # the callback frees it, to the waiter
        assert got == [fenced]
        assert await _read(fenced) == bytes(SIZE)
        assert pool.statistics().set_aside == 0
        pool.release(fenced)
        pool.release(fresh)


async def test_a_fence_known_only_by_its_fd_is_noticed_by_the_next_acquire() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=2) as pool:
        buf = await pool.acquire()
        fence = _fence_by_fd(buf)
        pool.release(buf)
        assert pool.statistics().set_aside == 1
        fence.signal()  # seen by whoever polls the imported fence
        async with pool.buffer() as again:
            assert again is buf
        assert pool.statistics().allocated == 1


async def test_a_full_pool_notices_a_fence_known_only_by_its_fd() -> None:
    """Every buffer set aside behind a sync_file: the waiter watches the fds."""
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        buf = await pool.acquire()
        fence = _fence_by_fd(buf)
        pool.release(buf)
        got: list[DmaBuf] = []

        async def waiter() -> None:
            got.append(await pool.acquire())

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_all_blocked()
            assert not got
            with anyio.fail_after(HANG):
                fence.signal()  # only the imported fence's fd says so
                while not got:
                    await wait_all_blocked()
        assert got == [buf]
        pool.release(buf)


async def test_close_puts_set_aside_buffers_without_waiting() -> None:
    pool = BufferPool(MemfdExporter(), 4096, max_buffers=1)
    buf = await pool.acquire()
    fence = Fence()
    buf.resv.add_fence(fence, Usage.WRITE)
    pool.release(buf)
    with anyio.fail_after(HANG):
        await pool.aclose()
    assert buf.released
    fence.signal()  # the pool's callback is gone: nothing happens
    assert pool.statistics().set_aside == 0


async def test_a_dropped_lent_buffer_frees_its_slot_at_gc() -> None:
    """The pool holds lent buffers weakly: dropping one is a put, with a warning."""
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        got: list[DmaBuf] = []
        async with anyio.create_task_group() as tg:
            held = [await pool.acquire()]

            async def waiter() -> None:
                got.append(await pool.acquire())

            tg.start_soon(waiter)
            await wait_all_blocked()
            with pytest.warns(ResourceWarning, match="without its last put"):
                held.clear()  # the only reference: collected at once
        assert len(got) == 1
        assert pool.statistics().lent == 1
        pool.release(got[0])


async def test_an_acquire_racing_close_inside_allocate_leaves_nothing() -> None:
    exporter = GatedExporter()
    pool = BufferPool(exporter, 4096, max_buffers=1)
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_acquire_expecting_close, pool, errors)
        await exporter.started.wait()
        with anyio.fail_after(HANG):
            await pool.aclose()  # does not wait for the allocation
        exporter.gate.set()
    assert len(errors) == 1
    assert "closed" in str(errors[0])
    s = pool.statistics()
    assert (s.allocated, s.lent, s.free) == (1, 0, 0)  # allocated, then put


async def test_an_acquire_racing_close_inside_zeroing_leaves_nothing() -> None:
    exporter = GatedExporter()
    exporter.gate.set()
    pool = BufferPool(exporter, 4096, max_buffers=1)
    buf = await pool.acquire()
    pool.release(buf)  # dirty: the next acquire zeroes it
    exporter.started = anyio.Event()
    exporter.cpu_gate = anyio.Event()
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_acquire_expecting_close, pool, errors)
        await exporter.started.wait()  # inside the zeroing
        with anyio.fail_after(HANG):
            await pool.aclose()
        exporter.cpu_gate.set()
    assert len(errors) == 1
    assert buf.released


# -- validation and checkpoints -------------------------------------------------


class _SyncAllocate:
    def allocate(self, size: int, *, name: str | None = None) -> DmaBuf:
        raise AssertionError("never called")


class _NoName:
    async def allocate(self, size: int) -> DmaBuf:
        raise AssertionError("never called")


@pytest.mark.parametrize("exporter", [object(), None, _SyncAllocate(), _NoName()])
def test_an_exporter_that_cannot_allocate_is_refused(exporter: Any) -> None:
    with pytest.raises(TypeError, match="allocate"):
        BufferPool(exporter, 4096, max_buffers=1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"size": True}, TypeError),
        ({"size": 4096.0}, TypeError),
        ({"size": -1}, InvalidArgument),
        ({"max_buffers": "2"}, TypeError),
        ({"max_buffers": 0}, InvalidArgument),
        ({"name": 5}, TypeError),
        ({"name": "x" * 33}, InvalidArgument),
    ],
)
def test_bad_sizes_counts_and_names(kwargs: dict[str, Any], error: type) -> None:
    args: dict[str, Any] = {"size": 4096, "max_buffers": 1} | kwargs
    with pytest.raises(error):
        BufferPool(MemfdExporter(), **args)


async def test_try_acquire_never_checkpoints_and_raises_busy() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        async with assert_no_checkpoints():
            with pytest.raises(Busy):
                pool.try_acquire()  # nothing allocated yet: only acquire can
        async with pool.buffer():
            pass  # the clean exit zeroes it
        async with assert_no_checkpoints():
            buf = pool.try_acquire()
            with pytest.raises(Busy):
                pool.try_acquire()
        assert await _read(buf) == bytes(4096)
        pool.release(buf)  # dirty now: try_acquire cannot zero it
        with pytest.raises(Busy):
            pool.try_acquire()
    with pytest.raises(InvalidArgument, match="closed"):
        pool.try_acquire()


async def test_acquire_always_checkpoints() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        async with pool.buffer():
            pass  # a zeroed buffer is free: acquire has nothing to wait for
        async with assert_checkpoints():
            buf = await pool.acquire()
        pool.release(buf)


async def test_acquire_of_a_dirty_buffer_checkpoints_and_zeroes_it() -> None:
    # The fast path: the zeroing's CPU access is the acquire's checkpoint.
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        buf = await pool.acquire()
        await _write(buf, SECRET)
        pool.release(buf)
        async with assert_checkpoints():
            again = await pool.acquire()
        assert again is buf
        assert await _read(again) == bytes(4096)
        pool.release(again)


async def test_pooled_buffers_that_never_see_a_fence_get_no_reservation() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=1) as pool:
        for _ in range(2):
            async with pool.buffer() as buf:
                pass
            pool.release(await pool.acquire())
        assert buf.pending_resv() is None


async def test_a_buffer_block_is_entered_once() -> None:
    async with BufferPool(MemfdExporter(), 4096, max_buffers=2) as pool:
        block = pool.buffer()
        async with block:
            with pytest.raises(RuntimeError, match="once"):
                await block.__aenter__()
        assert pool.statistics().lent == 0
        with pytest.raises(RuntimeError, match="once"):
            await block.__aenter__()  # not after it ended either
        assert pool.statistics().lent == 0


# -- no byte of one owner ever reaches the next (property) ----------------------------

OPS = ("acquire", "write", "expose", "fence", "signal", "cpu_open", "release")


@dataclass
class _Owner:
    buf: DmaBuf
    token: bytes
    maps: list[mmap.mmap] = field(default_factory=list)


async def _run_ops(ops: list[tuple[str, int]]) -> None:
    size, max_buffers = 4096, 2
    pool = BufferPool(MemfdExporter(), size, max_buffers=max_buffers)
    owners: list[_Owner] = []
    kept: list[tuple[mmap.mmap, bytes]] = []  # an old owner's map, its own token
    written: list[bytes] = []
    fences: list[Fence] = []
    serial = 0
    try:
        for op, pick in ops:
            s = pool.statistics()
            if op == "acquire":
                if not s.free and s.lent + s.set_aside >= max_buffers:
                    continue  # would wait: the property is about what is served
                buf = await pool.acquire()
                assert await _read(buf) == bytes(size), "a new owner saw old bytes"
                serial += 1
                owners.append(_Owner(buf, b"SECRET-%05d" % serial))
                continue
            if not owners:
                continue
            owner = owners[pick % len(owners)]
            if op == "write":
                if not owner.buf.resv.test(Usage.READ):
                    continue  # a writer would wait for the fence (implicit sync)
                await _write(owner.buf, owner.token, (pick * 97) % (size - 12))
                written.append(owner.token)
            elif op == "expose":
                fd = owner.buf.fd()
                try:
                    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
                finally:
                    os.close(fd)
                owner.maps.append(m)
                kept.append((m, owner.token))
            elif op == "fence":
                fence = Fence()
                owner.buf.resv.add_fence(fence, Usage(pick % len(Usage)))
                fences.append(fence)
            elif op == "signal":
                for fence in fences:
                    if not fence.signaled:
                        fence.signal()
                fences.clear()
            elif op == "cpu_open":
                if owner.buf.resv.test(Usage.WRITE):  # else a reader would wait
                    await owner.buf.begin_cpu_access("r")
            elif op == "release":
                owners.remove(owner)
                pool.release(owner.buf)
            for m, own in kept:
                for token in written:
                    if token != own:
                        assert m.find(token) == -1, "an old map saw another's bytes"
    finally:
        for fence in fences:
            if not fence.signaled:
                fence.signal()
        for owner in owners:
            pool.release(owner.buf)
        await pool.aclose()
        for m, _ in kept:
            m.close()


@settings(
    parent=PROFILE,
    max_examples=budget(200, 2000),
    suppress_health_check=[
        *PROFILE.suppress_health_check,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(OPS), st.integers(min_value=0, max_value=7)),
        max_size=30,
    )
)
def test_no_byte_of_one_owner_reaches_the_next(
    anyio_backend: Backend, ops: list[tuple[str, int]]
) -> None:
    name, options = anyio_backend
    anyio.run(_run_ops, ops, backend=name, backend_options=options)
