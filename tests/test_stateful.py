"""A model-checked lifecycle: hypothesis drives the API against a reference model.

The machine exports (allocates) buffers, takes and gets fds, puts, attaches,
detaches, maps, try_maps, unmaps (also tables of other attachments), writes and
reads bytes through ``cpu_access``, adds and signals fences, and cancels: a map
in an already-cancelled scope, a map queued behind a held lock, unmaps and puts
in cancelled scopes. A small model predicts refcounts, attachments, mappings,
which errors each call raises, which calls block, and the bytes read back;
after every step the library must agree with it, and its invariants must hold
(no lock held, no waiter queued, SimDevice accounting exact).

Each machine runs on MemfdExporter and on SimDevice, on asyncio, uvloop and trio:
the sync test drives one event loop in a blocking portal
(``anyio.from_thread.start_blocking_portal``) and each rule is one
``portal.call``. An operation that is predicted to block runs beside a watcher
that cancels it once every task is blocked, so a wrong prediction shows as a
disagreement, never as a hang.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.from_thread
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import asyncdmabuf as dmabuf
from asyncdmabuf import (
    Attachment,
    Device,
    Direction,
    DmaBuf,
    Fence,
    InvalidArgument,
    SgTable,
    Usage,
)
from asyncdmabuf.exporters import MemfdExporter, SimDevice

from .helpers import assert_no_checkpoints, wait_all_blocked
from .reliability import (
    BACKENDS,
    PROFILE,
    Backend,
    assert_quiet,
    assert_sim_exact,
    budget,
    run_or_cancel_when_blocked,
)

T = TypeVar("T")

PAGE = 4096
SIM_PAGES = 64
MAX_LIVE = 6
MAX_SIZE = 3 * PAGE + 7

DEVICES = (
    Device("gpu"),
    Device("seg", max_segment_size=PAGE),
    Device("contig", contiguous=True),
    Device("dma32", dma_mask=2**32 - 1),
)

#: Steps run, per machine, and notable outcomes seen (``pytest -s`` shows them).
RUN: dict[str, int] = {}
SEEN: Counter[str] = Counter()


def _seen(what: str) -> None:
    event(what)
    SEEN[what] += 1


picks = st.integers(0, 1 << 16)
#: Names, valid or not: too long, with a NUL, with a lone surrogate (no UTF-8).
NAMES = (
    st.none()
    | st.text(max_size=12)
    | st.text(min_size=9, max_size=40)
    | st.sampled_from(["a\0b", "\ud800", "x\udfff"])
)


def _valid_name(name: str | None) -> bool:
    if name is None:
        return True
    try:
        return len(name.encode()) <= 32 and "\0" not in name
    except UnicodeEncodeError:
        return False


@dataclass(eq=False)
class MFile:
    """A buffer's open file: the bytes it holds (None for an empty memfd)."""

    owner: MBuf | None
    data: bytearray | None


@dataclass(eq=False)
class MBuf:
    real: DmaBuf
    size: int
    data: bytearray
    sim: bool
    refcount: int = 1
    released: bool = False
    file: MFile | None = None
    atts: list[MAtt] = field(default_factory=list)
    fences: list[tuple[Fence, Usage]] = field(default_factory=list)

    def pending(self, usage: Usage) -> bool:
        return any(u <= usage for _, u in self.fences)


@dataclass(eq=False)
class MAtt:
    real: Attachment
    buf: MBuf
    device: Device
    dynamic: bool
    attached: bool = True
    tables: list[SgTable] = field(default_factory=list)
    mapped_once: bool = False


def _cancel_scope_cancelled() -> anyio.CancelScope:
    scope = anyio.CancelScope()
    scope.cancel()
    return scope


class Warned:
    """Catch warnings of one call (the main thread waits on the portal)."""

    def __init__(self) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self.caught: list[warnings.WarningMessage] = []

    def __enter__(self) -> Warned:
        self.caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: object) -> None:
        self._catcher.__exit__(None, None, None)

    @property
    def resource(self) -> int:
        return sum(issubclass(w.category, ResourceWarning) for w in self.caught)


class LifecycleMachine(RuleBasedStateMachine):
    """The model; subclasses pick the portal (backend) and the exporter."""

    portal: ClassVar[anyio.from_thread.BlockingPortal]
    use_sim: ClassVar[bool]
    name: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.bufs: list[MBuf] = []
        self.atts: list[MAtt] = []
        self.tables: list[tuple[SgTable, MAtt]] = []
        self.fds: list[tuple[int, MFile]] = []
        self.heap = MemfdExporter()
        self.dev = SimDevice("sim", memory=SIM_PAGES * PAGE, page_size=PAGE)
        self.steps = 0

    def call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        return self.portal.call(fn, *args)

    # -- picking ------------------------------------------------------------------

    def live(self) -> list[MBuf]:
        return [b for b in self.bufs if not b.released]

    def attached(self) -> list[MAtt]:
        return [a for a in self.atts if a.attached]

    # -- rules: buffers -----------------------------------------------------------

    @precondition(lambda self: len(self.live()) < MAX_LIVE)
    @rule(size=st.integers(1, MAX_SIZE), name=NAMES)
    def allocate(self, size: int, name: str | None) -> None:
        exporter = self.dev if self.use_sim else self.heap
        real = self.call(exporter.allocate, size)
        self.bufs.append(MBuf(real, size, bytearray(size), self.use_sim))
        assert real.refcount == 1
        if _valid_name(name):
            real.set_name(name)
            assert real.name == name
        else:
            with pytest.raises(InvalidArgument):
                real.set_name(name)
            assert real.name is None

    @precondition(lambda self: self.bufs)
    @rule(i=picks)
    def take_fd(self, i: int) -> None:
        buf = self.bufs[i % len(self.bufs)]
        if buf.released:
            with pytest.raises(InvalidArgument):
                buf.real.fd()
            return
        fd = buf.real.fd()
        if buf.file is None:
            buf.file = MFile(buf, None if buf.sim else buf.data)
        self.fds.append((fd, buf.file))

    @precondition(lambda self: self.fds)
    @rule(j=picks)
    def get_fd(self, j: int) -> None:
        fd, file = self.fds[j % len(self.fds)]
        owner = file.owner
        if owner is not None:
            assert dmabuf.get(fd) is owner.real
            owner.refcount += 1
            return
        if file.data is None:  # an empty memfd: not a buffer's bytes
            with pytest.raises(InvalidArgument):
                dmabuf.get(fd)
            return
        # The buffer is gone but its memfd lives on: imported as a new buffer.
        real = dmabuf.get(fd)
        assert real.exporter.name == "import"
        assert real.size >= len(file.data)
        _seen("re-imported a released buffer's memfd")
        imported = MBuf(real, real.size, file.data, sim=False, file=file)
        assert real.size == len(file.data)
        file.owner = imported
        self.bufs.append(imported)

    @precondition(lambda self: self.fds)
    @rule(j=picks)
    def close_fd(self, j: int) -> None:
        fd, _ = self.fds.pop(j % len(self.fds))
        os.close(fd)

    @precondition(lambda self: self.bufs)
    @rule(i=picks, cancelled=st.booleans())
    def put(self, i: int, cancelled: bool) -> None:
        buf = self.bufs[i % len(self.bufs)]
        if buf.released:
            with pytest.raises(InvalidArgument):
                self.call(buf.real.put)
            return
        with Warned() as w:
            was_cancelled = self.call(self._undo, buf.real.put(), cancelled)
        assert was_cancelled == cancelled
        buf.refcount -= 1
        if buf.refcount:
            assert w.resource == 0
            return
        assert w.resource == (1 if buf.atts else 0)
        _seen(f"released with {len(buf.atts)} attachments left")
        self._release(buf)

    def _release(self, buf: MBuf) -> None:
        buf.released = True
        for att in list(buf.atts):
            self._detached(att)
        if buf.file is not None:
            buf.file.owner = None
        buf.fences.clear()

    async def _undo(self, coro: Coroutine[Any, Any, None], cancelled: bool) -> bool:
        """Run an undo op, in a cancelled scope if asked; return if it raised."""
        with anyio.CancelScope() as scope:
            if cancelled:
                scope.cancel()
            await coro
        return scope.cancelled_caught

    # -- rules: attachments ---------------------------------------------------------

    @precondition(lambda self: self.bufs)
    @rule(i=picks, d=st.integers(0, len(DEVICES) - 1), dynamic=st.booleans())
    def attach(self, i: int, d: int, dynamic: bool) -> None:
        buf = self.bufs[i % len(self.bufs)]
        device = DEVICES[d]
        notify = (lambda att: None) if dynamic else None
        if buf.released:
            with pytest.raises(InvalidArgument):
                buf.real.attach(device, move_notify=notify)
            return
        fits = self._fits(buf, device)
        try:
            real = self.call(self._attach, buf.real, device, notify)
        except dmabuf.Busy:
            _seen("attach refused")
            assert fits is not True, f"{device!r} refused by {buf.real!r}"
            return
        assert fits is not False, f"{device!r} accepted by {buf.real!r}"
        assert real.dynamic == dynamic
        att = MAtt(real, buf, device, dynamic)
        buf.atts.append(att)
        self.atts.append(att)

    async def _attach(
        self, buf: DmaBuf, device: Device, notify: Callable[[Attachment], None] | None
    ) -> Attachment:
        return await buf.attach(device, move_notify=notify)

    def _fits(self, buf: MBuf, device: Device) -> bool | None:
        """Whether the exporter must accept ``device`` (None: it may refuse)."""
        if buf.sim:
            # A contiguous device may find the backing pinned in pieces.
            return None if device.contiguous else True
        address: int = buf.real.priv.address
        return address + buf.size - 1 <= device.dma_mask

    @precondition(lambda self: self.atts)
    @rule(a=picks)
    def detach(self, a: int) -> None:
        att = self.atts[a % len(self.atts)]
        if not att.attached:
            with pytest.raises(InvalidArgument):
                self.call(att.real.detach)
            return
        with Warned() as w:
            self.call(att.real.detach)
        assert w.resource == (1 if att.tables else 0)
        self._detached(att)

    def _detached(self, att: MAtt) -> None:
        for sgt in att.tables:
            assert not sgt.valid
        att.tables.clear()
        att.attached = False
        att.buf.atts.remove(att)

    # -- rules: map -----------------------------------------------------------------

    @precondition(lambda self: self.atts)
    @rule(a=picks, direction=st.sampled_from(Direction), blocking=st.booleans())
    def map(self, a: int, direction: Direction, blocking: bool) -> None:
        att = self.atts[a % len(self.atts)]
        if not att.attached:
            with pytest.raises(InvalidArgument):
                (att.real.map if blocking else att.real.try_map)(direction)
            return
        if blocking:
            blocked, sgt = self.call(
                run_or_cancel_when_blocked, self._map(att.real, direction)
            )
            assert not blocked, "an uncontended map blocked"
        else:
            sgt = att.real.try_map(direction)
        assert isinstance(sgt, SgTable)
        self._check_table(att, sgt, direction)
        att.tables.append(sgt)
        att.mapped_once = True
        self.tables.append((sgt, att))

    async def _map(self, att: Attachment, direction: Direction) -> SgTable:
        return await att.map(direction)

    def _check_table(self, att: MAtt, sgt: SgTable, direction: Direction) -> None:
        assert sgt.valid
        assert sgt.attachment is att.real
        assert sgt.direction is direction
        assert sgt.nbytes == att.buf.size
        offset = 0
        for entry in sgt:
            assert entry.offset == offset
            assert entry.length <= att.device.max_segment_size
            assert entry.dma_address + entry.length - 1 <= att.device.dma_mask
            offset += entry.length
        assert offset == att.buf.size
        if att.device.contiguous:
            assert len(sgt) == 1

    @precondition(lambda self: self.tables)
    @rule(t=picks, cancelled=st.booleans())
    def unmap(self, t: int, cancelled: bool) -> None:
        sgt, att = self.tables[t % len(self.tables)]
        if not sgt.valid:
            with pytest.raises(InvalidArgument):
                self.call(att.real.unmap, sgt)
            self.tables.remove((sgt, att))
            return
        was_cancelled = self.call(self._undo, att.real.unmap(sgt), cancelled)
        assert was_cancelled == cancelled
        assert not sgt.valid
        att.tables.remove(sgt)

    @precondition(lambda self: self.tables and self.atts)
    @rule(t=picks, a=picks)
    def unmap_foreign(self, t: int, a: int) -> None:
        sgt, owner = self.tables[t % len(self.tables)]
        att = self.atts[a % len(self.atts)]
        if att is owner:
            return
        with pytest.raises(InvalidArgument):
            self.call(att.real.unmap, sgt)

    @precondition(lambda self: self.attached())
    @rule(a=picks, direction=st.sampled_from(Direction))
    def map_cancelled_at_once(self, a: int, direction: Direction) -> None:
        att = self.attached()[a % len(self.attached())]
        caught = self.call(self._map_cancelled, att.real, direction)
        assert caught

    async def _map_cancelled(self, att: Attachment, direction: Direction) -> bool:
        with _cancel_scope_cancelled() as scope:
            await att.map(direction)
        return scope.cancelled_caught

    @precondition(lambda self: self.attached())
    @rule(a=picks, direction=st.sampled_from(Direction), n=st.integers(1, 3))
    def map_cancelled_behind_lock(self, a: int, direction: Direction, n: int) -> None:
        att = self.attached()[a % len(self.attached())]
        self.call(self._behind_lock, att.real, direction, n)

    async def _behind_lock(self, att: Attachment, direction: Direction, n: int) -> None:
        """Queue ``n`` maps behind a held lock, check try_map, cancel them all."""
        lock = att.buffer._lock
        assert lock.acquire_nowait()
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(self._map, att, direction)
                await wait_all_blocked()
                assert lock.waiting == n
                with pytest.raises(dmabuf.Busy) as info:
                    att.try_map(direction)
                assert info.value.errno == errno.EBUSY
                tg.cancel_scope.cancel()
        finally:
            lock.release()

    # -- rules: CPU access and fences --------------------------------------------------

    @precondition(lambda self: self.bufs)
    @rule(i=picks, offset=st.integers(0, MAX_SIZE), data=st.binary(min_size=1))
    def write(self, i: int, offset: int, data: bytes) -> None:
        buf = self.bufs[i % len(self.bufs)]
        if buf.released:
            with pytest.raises(InvalidArgument):
                buf.real.cpu_access("w")
            return
        offset %= buf.size
        data = data[: buf.size - offset]
        blocked, _ = self.call(
            run_or_cancel_when_blocked, self._write(buf.real, offset, data)
        )
        assert blocked == buf.pending(Usage.READ)
        _seen(f"write blocked={blocked}")
        if not blocked:
            buf.data[offset : offset + len(data)] = data

    async def _write(self, buf: DmaBuf, offset: int, data: bytes) -> None:
        async with buf.cpu_access("w") as view:
            assert not view.readonly
            view[offset : offset + len(data)] = data

    @precondition(lambda self: self.bufs)
    @rule(i=picks, offset=st.integers(0, MAX_SIZE), data=st.binary(min_size=1))
    def try_write(self, i: int, offset: int, data: bytes) -> None:
        buf = self.bufs[i % len(self.bufs)]
        if buf.released:
            with pytest.raises(InvalidArgument):
                buf.real.try_cpu_access("w")
            return
        offset %= buf.size
        data = data[: buf.size - offset]
        # Busy behind a READ (or stronger) fence, and on SimDevice, whose
        # begin_cpu_access is a coroutine function: never a wait.
        busy = buf.pending(Usage.READ) or buf.sim
        assert self.call(self._try_write, buf.real, offset, data) == (not busy)
        _seen(f"try_write busy={busy}")
        if not busy:
            buf.data[offset : offset + len(data)] = data

    async def _try_write(self, buf: DmaBuf, offset: int, data: bytes) -> bool:
        async with assert_no_checkpoints():
            try:
                with buf.try_cpu_access("w") as view:
                    view[offset : offset + len(data)] = data
            except dmabuf.Busy:
                assert buf.cpu_access_modes == ()
                return False
        return True

    @precondition(lambda self: self.bufs)
    @rule(i=picks)
    def read(self, i: int) -> None:
        buf = self.bufs[i % len(self.bufs)]
        if buf.released:
            with pytest.raises(InvalidArgument):
                buf.real.cpu_access("r")
            return
        blocked, data = self.call(run_or_cancel_when_blocked, self._read(buf.real))
        assert blocked == buf.pending(Usage.WRITE)
        _seen(f"read blocked={blocked}")
        if not blocked:
            assert data == bytes(buf.data)

    async def _read(self, buf: DmaBuf) -> bytes:
        async with buf.cpu_access("r") as view:
            assert view.readonly
            return bytes(view)

    @precondition(lambda self: self.live())
    @rule(i=picks, usage=st.sampled_from(Usage))
    def add_fence(self, i: int, usage: Usage) -> None:
        buf = self.live()[i % len(self.live())]
        fence = Fence()
        buf.real.resv.add_fence(fence, usage)
        buf.fences.append((fence, usage))

    @precondition(lambda self: any(b.fences for b in self.bufs))
    @rule(j=picks, error=st.booleans())
    def signal_fence(self, j: int, error: bool) -> None:
        pending = [(b, f) for b in self.bufs for f in b.fences]
        buf, (fence, usage) = pending[j % len(pending)]
        fence.signal(errno.EIO if error else None)
        buf.fences.remove((fence, usage))
        with pytest.raises(InvalidArgument):
            fence.signal()

    # -- agreement ------------------------------------------------------------------

    @invariant()
    def agrees(self) -> None:
        self.steps += 1
        for buf in self.bufs:
            real = buf.real
            assert real.released == buf.released
            assert_quiet(real)
            if buf.released:
                continue
            assert real.refcount == buf.refcount
            assert real.size == buf.size
            assert real.attachments == tuple(a.real for a in buf.atts)
            for att in buf.atts:
                assert att.real.attached
                assert att.real.mappings == tuple(att.tables)
            for usage in Usage:
                assert real.resv.test(usage) == (not buf.pending(usage))
        for att in self.atts:
            assert att.real.attached == att.attached
        seen = sorted(
            (i.size, i.refcount, tuple(a.device for a in i.attachments))
            for i in dmabuf.bufinfo()
        )
        expected = sorted(
            (b.size, b.refcount, tuple(a.device.name for a in b.atts))
            for b in self.live()
        )
        assert seen == expected
        self._check_sim()

    def _check_sim(self) -> None:
        stats = self.dev.statistics()
        sims = [b for b in self.live() if b.sim]
        assert stats.buffers == len(sims)
        pinned = 0
        for buf in sims:
            if any(
                (a.dynamic and a.tables) or (not a.dynamic and a.mapped_once)
                for a in buf.atts
            ):
                pinned += -(-buf.size // PAGE)
        assert stats.memory_pinned == pinned * PAGE
        assert stats.memory_in_use >= stats.memory_pinned
        assert_sim_exact(self.dev)

    def teardown(self) -> None:
        for fd, _ in self.fds:
            os.close(fd)
        self.fds.clear()
        with Warned():
            for buf in self.live():
                for fence, _ in buf.fences:
                    fence.signal()
                while not buf.real.released:
                    self.call(buf.real.put)
        stats = self.dev.statistics()
        assert (stats.buffers, stats.memory_in_use) == (0, 0)
        RUN[self.name] = RUN.get(self.name, 0) + self.steps


SETTINGS = settings(
    PROFILE,
    max_examples=budget(60, PROFILE.max_examples),
    stateful_step_count=budget(40, PROFILE.stateful_step_count),
)


@pytest.mark.parametrize("use_sim", [False, True], ids=["memfd", "simdev"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lifecycle_agrees_with_the_model(backend: Backend, use_sim: bool) -> None:
    name, options = backend
    with anyio.from_thread.start_blocking_portal(name, options) as portal:
        machine = type(
            "Lifecycle",
            (LifecycleMachine,),
            {"portal": portal, "use_sim": use_sim, "name": f"{name}-{use_sim}"},
        )
        run_state_machine_as_test(machine, settings=SETTINGS)
    print(f"{name}-{'simdev' if use_sim else 'memfd'}: {RUN} steps; {dict(SEEN)}")
