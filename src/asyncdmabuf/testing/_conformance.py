"""The exporter conformance suite: the promises every exporter must keep.

The framework keeps its own promises (locking, FIFO order, bookkeeping); these
tests check the ones only an exporter can keep or break: its tables, its
``try_map``, its cancellation safety, its zeroed memory, its CPU access, and
that the framework's undo calls reach it exactly once and never cancelled.

Only public API is used. Each test instruments the exporter under test (see
:meth:`ExporterConformance.make_exporter`) to count the ops the framework
calls, and steps the awaitables it tests one suspension at a time, cancelling
just before the k-th, for k = 1, 2, ... until the call completes.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any, ClassVar, Generic, TypeVar

import anyio
import anyio.lowlevel
import pytest

from asyncdmabuf import (
    Attachment,
    Busy,
    CpuMode,
    Device,
    Direction,
    DmaBuf,
    DmaBufError,
    Exporter,
    InvalidArgument,
    NoDevice,
    OutOfMemory,
    SgTable,
    bufinfo,
    get,
)
from asyncdmabuf._backends import BACKENDS

__all__ = [
    "DEFAULT_DEVICES",
    "DEFAULT_SIZES",
    "ConformanceError",
    "ExporterConformance",
    "count_suspensions",
]

T = TypeVar("T")

DEFAULT_SIZES: tuple[int, ...] = (1, 4096, 3 * 4096 + 100)
"""Buffer sizes every test runs with: a byte, a page, an odd size of several pages."""

DEFAULT_DEVICES: tuple[Device, ...] = (
    Device("conformance-any"),
    Device("conformance-seg4k", max_segment_size=4096),
    Device("conformance-seg1000", max_segment_size=1000),
    Device("conformance-contiguous", contiguous=True),
    Device("conformance-dma32", dma_mask=2**32 - 1),
    Device("conformance-dma32-contiguous", dma_mask=2**32 - 1, contiguous=True),
)
"""Importers with the constraints exporters meet in practice.

An exporter may refuse any of them with ``Busy``, except the first, which has
no constraint at all.
"""

#: The directions tables are mapped for.
DIRECTIONS: tuple[Direction, ...] = (
    Direction.BIDIRECTIONAL,
    Direction.TO_DEVICE,
    Direction.FROM_DEVICE,
)

#: Give up stepping a call that suspends more often than this.
MAX_SUSPENSIONS = 10_000

_BACKENDS = tuple(
    pytest.param(backend, id=label) for label, backend in BACKENDS.items()
)


class ConformanceError(AssertionError):
    """The exporter under test broke a promise; the message says which."""


def _fail(message: str) -> ConformanceError:
    return ConformanceError(message)


# -- stepping awaitables ------------------------------------------------------------


class _Stepper(Generic[T]):
    """Await ``awaitable``, counting its suspensions; cancel a scope before the k-th.

    A suspension is one yield to the event loop. Every anyio checkpoint is at
    least one, and a cancellation requested just before a suspension is
    delivered there (or at the next cancel point, if that one is shielded).
    """

    __slots__ = ("_awaitable", "_cancel_at", "_scope", "suspensions")

    def __init__(
        self,
        awaitable: Awaitable[T],
        scope: anyio.CancelScope | None = None,
        cancel_at: int = 0,
    ) -> None:
        self._awaitable = awaitable
        self._scope = scope
        self._cancel_at = cancel_at
        self.suspensions = 0

    @property
    def cancel_requested(self) -> bool:
        """Whether the stepper reached the suspension it was to cancel at."""
        return 0 < self._cancel_at <= self.suspensions

    def __await__(self) -> Generator[Any, Any, T]:
        inner = self._awaitable.__await__()
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            try:
                if thrown is not None:
                    exc, thrown = thrown, None
                    signal = inner.throw(exc)
                else:
                    signal = inner.send(sent)
            except StopIteration as stop:
                result: T = stop.value
                return result
            self.suspensions += 1
            if self._scope is not None and self.suspensions == self._cancel_at:
                self._scope.cancel()
            try:
                sent = yield signal
            except GeneratorExit:
                inner.close()
                raise
            except BaseException as exc:  # thrown in by the event loop
                sent, thrown = None, exc


async def count_suspensions(awaitable: Awaitable[T]) -> tuple[T, int]:
    """Await ``awaitable`` and return its result and how often it suspended.

    A suspension is one yield to the event loop: an uncontended anyio
    checkpoint is one; a wait is at least one more.
    """
    stepper = _Stepper(awaitable)
    result = await stepper
    return result, stepper.suspensions


async def _baseline() -> int:
    """How many suspensions one bare checkpoint takes on this backend."""
    _, n = await count_suspensions(anyio.lowlevel.checkpoint())
    return n


# -- instrumenting the exporter ------------------------------------------------------


class _OpLog:
    """What the framework asked of the exporter, and what went wrong."""

    def __init__(self) -> None:
        self.attached: dict[int, Attachment] = {}
        self.detached: dict[int, int] = {}
        self.mapped: dict[int, SgTable] = {}
        self.unmapped: dict[int, int] = {}
        self.released: dict[int, int] = {}
        self.buffers: dict[int, DmaBuf] = {}
        self.problems: list[str] = []
        #: Make every undo op wait, in scopes of its own (see ``_logged``).
        self.awaiting = False

    def check(self) -> None:
        """Raise ConformanceError unless every op was undone exactly once."""
        problems = list(self.problems)
        for key, att in self.attached.items():
            n = self.detached.get(key, 0)
            if n != 1:
                problems.append(f"{att!r} was detached {n} times, not once")
        problems.extend(
            "detach() was called for an attachment never made"
            for key in self.detached
            if key not in self.attached
        )
        for key, sgt in self.mapped.items():
            n = self.unmapped.get(key, 0)
            if n != 1:
                problems.append(f"{sgt!r} was unmapped {n} times, not once")
        problems.extend(
            "unmap() was called for a table never mapped"
            for key in self.unmapped
            if key not in self.mapped
        )
        for key, buf in self.buffers.items():
            n = self.released.get(key, 0)
            if buf.released and n != 1:
                problems.append(f"{buf!r} was released {n} times, not once")
        if problems:
            raise _fail("; ".join(problems))


def _logged(
    result: Any,
    log: _OpLog,
    done: Callable[[Any], None] = lambda _: None,
    shielded: str | None = None,
) -> Any:
    """Pass an op's result on, plain or awaitable, as the op gave it.

    ``done`` runs with the op's value once it is there; ``shielded`` names an
    undo op whose cancellation is a problem. With ``log.awaiting`` set, every
    undo op is made to wait first, in cancel scopes of its own (a sleep with a
    deadline, a ``move_on_after``), as an exporter's op may.
    """
    awaiting = log.awaiting and shielded is not None
    if not awaiting and not inspect.isawaitable(result):
        done(result)
        return result

    async def run() -> Any:
        try:
            if awaiting:
                with anyio.fail_after(60):
                    await anyio.sleep(0.0001)
                with anyio.move_on_after(60):
                    await anyio.lowlevel.checkpoint()
            value = await result if inspect.isawaitable(result) else result
        except anyio.get_cancelled_exc_class():
            if shielded is not None:
                log.problems.append(f"{shielded}() was cancelled; it must be shielded")
            raise
        done(value)
        return value

    return run()


def _instrument(exporter: Exporter, log: _OpLog) -> Callable[[], None]:
    """Swap ``exporter``'s class for a subclass that logs each op; return an undo.

    Each logged op is plain where the exporter's is plain and a coroutine where
    the exporter's is, so the framework sees the exporter as it is.
    """
    cls = type(exporter)

    def attach(self: Exporter, buf: DmaBuf, attachment: Attachment) -> Any:
        def done(_: object) -> None:
            log.attached[id(attachment)] = attachment

        return _logged(cls.attach(self, buf, attachment), log, done)

    def detach(self: Exporter, buf: DmaBuf, attachment: Attachment) -> Any:
        key = id(attachment)
        log.detached[key] = log.detached.get(key, 0) + 1
        return _logged(cls.detach(self, buf, attachment), log, shielded="detach")

    def map_(self: Exporter, attachment: Attachment, direction: Direction) -> Any:
        def done(sgt: Any) -> None:
            log.mapped[id(sgt)] = sgt

        return _logged(cls.map(self, attachment, direction), log, done)

    def try_map(self: Exporter, attachment: Attachment, direction: Direction) -> Any:
        sgt: Any = cls.try_map(self, attachment, direction)
        if inspect.isawaitable(sgt):
            close = getattr(sgt, "close", None)
            if close is not None:
                close()
            log.problems.append("try_map() returned an awaitable: it must not wait")
            raise _fail("try_map() returned an awaitable: it must not wait")
        log.mapped[id(sgt)] = sgt
        return sgt

    def unmap(
        self: Exporter, attachment: Attachment, sgt: SgTable, direction: Direction
    ) -> Any:
        key = id(sgt)
        log.unmapped[key] = log.unmapped.get(key, 0) + 1
        if direction is not sgt.direction:
            log.problems.append(f"unmap() got {direction!r} for {sgt!r}")
        return _logged(
            cls.unmap(self, attachment, sgt, direction), log, shielded="unmap"
        )

    def release(self: Exporter, buf: DmaBuf) -> Any:
        key = id(buf)
        log.buffers[key] = buf
        log.released[key] = log.released.get(key, 0) + 1
        return _logged(cls.release(self, buf), log, shielded="release")

    namespace: dict[str, object] = {
        "__slots__": (),
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "attach": attach,
        "detach": detach,
        "map": map_,
        "try_map": try_map,
        "unmap": unmap,
        "release": release,
    }
    instrumented = type(cls.__name__, (cls,), namespace)
    object.__setattr__(exporter, "__class__", instrumented)

    def restore() -> None:
        object.__setattr__(exporter, "__class__", cls)

    return restore


def _is_released(buf: DmaBuf) -> bool:
    return buf.released  # a call, so that type checkers do not narrow it


def _open_fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory's own fd, closed by now
            continue
    return fds


# -- the suite ---------------------------------------------------------------------


class ExporterConformance:
    """Base class of an exporter's conformance tests; subclass it as ``Test...``.

    Override :meth:`make_exporter` (and :meth:`allocate` if the exporter has
    no ``allocate(size)`` coroutine); pytest collects the subclass and runs
    every test on asyncio, asyncio+uvloop and trio (a backend whose package is
    missing is skipped). Each test gets a fresh exporter, logs the ops the
    framework calls on it, puts every buffer it made, and ends by checking
    that each attach, map and buffer was undone exactly once and that
    :meth:`assert_idle` holds.

    Class attributes tune the suite:

    Attributes:
        sizes: Buffer sizes to test.
        devices: Importers to attach; the first must be accepted, the others
            may be refused with ``Busy``.
        cpu_access: Whether the exporter's buffers have bytes the CPU can
            reach (``vmap``); if False, the zeroing and round-trip tests are
            skipped.
        retry_timeout: Seconds a retried call may take before the test calls
            it a hang.
        leak_cycles: Full lifecycles the leak test runs.
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    sizes: ClassVar[tuple[int, ...]] = DEFAULT_SIZES
    devices: ClassVar[tuple[Device, ...]] = DEFAULT_DEVICES
    cpu_access: ClassVar[bool] = True
    retry_timeout: ClassVar[float] = 10.0
    leak_cycles: ClassVar[int] = 20

    exporter: Exporter
    """The exporter under test (instrumented), fresh for each test."""

    # -- what subclasses provide ---------------------------------------------------

    def make_exporter(self) -> Exporter:
        """Return a new exporter to test; called once per test, outside any loop.

        Raise :class:`~asyncdmabuf.NoDevice` if it cannot work on this machine:
        the tests are then skipped with that reason.
        """
        raise NotImplementedError(f"{type(self).__name__} must define make_exporter()")

    async def allocate(self, exporter: Exporter, size: int) -> DmaBuf:
        """Return a new buffer of ``size`` bytes (refcount 1) from ``exporter``.

        The default awaits ``exporter.allocate(size)``.
        """
        allocate = getattr(exporter, "allocate", None)
        if allocate is None:
            raise NotImplementedError(
                f"{type(exporter).__name__} has no allocate(size): override "
                f"{type(self).__name__}.allocate()"
            )
        buf = await allocate(size)
        if not isinstance(buf, DmaBuf):
            raise _fail(f"allocate() returned {buf!r}, not a DmaBuf")
        return buf

    def assert_idle(self, exporter: Exporter) -> None:
        """Check that ``exporter`` holds nothing once every buffer is released.

        Called at the end of each test. The default checks nothing; override it
        to compare the exporter's accounting (memory in use, say) with zero.
        """

    # -- fixtures ----------------------------------------------------------------

    @pytest.fixture(params=_BACKENDS)
    def anyio_backend(
        self, request: pytest.FixtureRequest
    ) -> tuple[str, dict[str, Any]]:
        """Run every test on asyncio, asyncio+uvloop and trio."""
        backend: tuple[str, dict[str, Any]] = request.param
        name, options = backend
        if options.get("use_uvloop"):
            pytest.importorskip("uvloop")
        if name == "trio":
            pytest.importorskip("trio")
        return backend

    @pytest.fixture(autouse=True)
    def _exporter_under_test(self) -> Iterator[None]:
        try:
            exporter = self.make_exporter()
        except NoDevice as exc:
            pytest.skip(f"the exporter is not available here: {exc}")
        if not isinstance(exporter, Exporter):
            raise _fail(f"make_exporter() returned {exporter!r}, not an Exporter")
        self._log = _OpLog()
        restore = _instrument(exporter, self._log)
        self.exporter = exporter
        self._buffers: list[DmaBuf] = []
        try:
            yield
        finally:
            restore()

    # -- helpers -----------------------------------------------------------------

    async def _new(self, size: int) -> DmaBuf:
        buf = await self.allocate(self.exporter, size)
        self._log.buffers[id(buf)] = buf
        self._buffers.append(buf)
        if buf.size != size or buf.refcount != 1 or buf.released:
            raise _fail(f"allocate({size}) returned {buf!r}")
        if buf.exporter is not self.exporter:
            raise _fail(f"{buf!r} is served by {buf.exporter!r}, not the exporter")
        return buf

    def _finish(self) -> None:
        """End a test: every buffer released, each op undone once, exporter idle."""
        live = [buf for buf in self._buffers if not buf.released]
        if live:
            raise _fail(f"the test left buffers live: {live}")
        self._log.check()
        self.assert_idle(self.exporter)

    async def _attach(self, buf: DmaBuf, device: Device) -> Attachment | None:
        """Attach, or return None if the exporter refuses ``device`` with Busy."""
        before = buf.attachments
        try:
            return await buf.attach(device)
        except Busy:
            if device == self.devices[0]:
                raise _fail(
                    f"the exporter refused {device!r}, which every exporter must accept"
                ) from None
            if buf.attachments != before:
                raise _fail(f"a refused attach of {device!r} was recorded") from None
            return None

    async def _map(self, att: Attachment, direction: Direction) -> SgTable | None:
        """Map, or return None if the exporter refuses the device at map time."""
        try:
            sgt = await att.map(direction)
        except (Busy, OutOfMemory):
            if att.device == self.devices[0]:
                raise
            if att.mappings:
                raise _fail(f"a refused map was recorded on {att!r}") from None
            return None
        except DmaBufError as exc:
            raise _fail(
                f"map() of a {att.buffer.size}-byte buffer for {att.device!r} "
                f"failed: {exc}. An exporter that cannot meet a device's "
                "constraints refuses it with Busy (at attach, or at map)"
            ) from exc
        self._check_table(sgt, att, direction)
        return sgt

    def _check_table(self, sgt: SgTable, att: Attachment, direction: Direction) -> None:
        device, size = att.device, att.buffer.size
        if sgt.attachment is not att or sgt.direction is not direction:
            raise _fail(f"{sgt!r} is not a {direction.name} table of {att!r}")
        if not sgt.valid or sgt not in att.mappings:
            raise _fail(f"{sgt!r} is not recorded as mapped")
        if sgt.nbytes != size or len(sgt) == 0:
            raise _fail(f"{sgt!r} does not cover a {size}-byte buffer")
        if device.contiguous and len(sgt) != 1:
            raise _fail(f"{device!r} needs one entry; {sgt!r} has {len(sgt)}")
        expected = 0
        for entry in sgt:
            if entry.offset != expected:
                raise _fail(f"{sgt!r}: {entry} leaves a gap or overlap at {expected}")
            if entry.length <= 0 or entry.length > device.max_segment_size:
                raise _fail(f"{sgt!r}: {entry} is longer than {device!r} accepts")
            if entry.dma_address < 0 or (
                entry.dma_address + entry.length - 1 > device.dma_mask
            ):
                raise _fail(f"{sgt!r}: {entry} is beyond the reach of {device!r}")
            expected += entry.length
        if expected != size:
            raise _fail(f"{sgt!r} covers {expected} of {size} bytes")

    async def _stepped(
        self,
        what: str,
        make: Callable[[], Awaitable[T]],
        after_cancel: Callable[[], Awaitable[None]],
        undo: Callable[[T], Awaitable[None]],
    ) -> int:
        """Cancel ``make()`` before its 1st, 2nd, ... suspension until it completes.

        After each cancellation, ``after_cancel()`` checks nothing was left
        behind and that a retry works. A result obtained although a cancel
        was requested is undone with ``undo``. Returns how many suspensions
        the uncancelled call took.
        """
        cancelled = anyio.get_cancelled_exc_class()
        for k in range(1, MAX_SUSPENSIONS + 1):
            got: list[T] = []
            with anyio.CancelScope() as scope:
                stepper = _Stepper(make(), scope, k)
                try:
                    got.append(await stepper)
                except cancelled:
                    raise
                except Exception as exc:
                    if stepper.cancel_requested:
                        raise _fail(
                            f"{what} cancelled at suspension {k} raised {exc!r} "
                            "instead of the cancellation"
                        ) from exc
                    raise
            if got:
                with anyio.CancelScope(shield=True):
                    await undo(got[0])
                if not stepper.cancel_requested:
                    return stepper.suspensions
                continue
            if not scope.cancelled_caught:  # pragma: no cover - defensive
                raise _fail(f"{what} neither completed nor was cancelled")
            with anyio.fail_after(self.retry_timeout):
                await after_cancel()
        raise _fail(f"{what} suspended more than {MAX_SUSPENSIONS} times")

    # -- the tests -----------------------------------------------------------------

    async def test_tables_cover_the_buffer_and_meet_device_constraints(self) -> None:
        """Each table covers ``[0, size)`` in order and meets its device's limits."""
        for size in self.sizes:
            buf = await self._new(size)
            for device in self.devices:
                att = await self._attach(buf, device)
                if att is None:
                    continue
                for direction in DIRECTIONS:
                    sgt = await self._map(att, direction)
                    if sgt is not None:
                        await att.unmap(sgt)
                        if sgt.valid or att.mappings:
                            raise _fail(f"{sgt!r} is still mapped after unmap()")
                await att.detach()
            await buf.put()
        self._finish()

    async def test_several_devices_at_once(self) -> None:
        """With every device attached, each one's tables still meet its limits."""
        for size in self.sizes:
            buf = await self._new(size)
            atts = [att for d in self.devices if (att := await self._attach(buf, d))]
            tables = []
            for att in atts:
                sgt = await self._map(att, Direction.BIDIRECTIONAL)
                if sgt is not None:
                    tables.append(sgt)
            for sgt in tables:
                await sgt.attachment.unmap(sgt)
            for att in atts:
                await att.detach()
            await buf.put()
        self._finish()

    async def test_try_map_never_waits(self) -> None:
        """``try_map`` is a plain function that returns a table or raises Busy.

        And whenever ``map()`` would have waited (suspended more than one bare
        checkpoint) in the same state, ``try_map`` raises Busy; when both
        succeed, they return the same entries.
        """
        if inspect.iscoroutinefunction(type(self.exporter).try_map):
            raise _fail("try_map() is a coroutine function; it must never wait")
        baseline = await _baseline()
        for device in self.devices:
            for state in ("first map", "map again"):
                probe, witness = await self._new(4096), await self._new(4096)
                p_att = await self._attach(probe, device)
                w_att = await self._attach(witness, device)
                if p_att is None or w_att is None:
                    for buf in (probe, witness):
                        for att in buf.attachments:
                            await att.detach()
                        await buf.put()
                    continue
                if state == "map again":
                    for att in (p_att, w_att):
                        sgt = await self._map(att, Direction.TO_DEVICE)
                        if sgt is not None:
                            await att.unmap(sgt)
                tried: SgTable | None = None
                try:
                    tried = p_att.try_map(Direction.TO_DEVICE)
                except Busy:
                    if p_att.mappings:
                        raise _fail(
                            "a try_map() that raised Busy was recorded"
                        ) from None
                except OutOfMemory:
                    pass
                if tried is not None:
                    self._check_table(tried, p_att, Direction.TO_DEVICE)
                try:
                    mapped, n = await count_suspensions(w_att.map(Direction.TO_DEVICE))
                except (Busy, OutOfMemory):
                    mapped, n = None, 0
                if tried is not None and n > baseline:
                    raise _fail(
                        f"{state} for {device.name}: try_map() returned a table "
                        f"although map() waited ({n - baseline} suspensions more "
                        "than a bare checkpoint); try_map() must raise Busy "
                        "whenever map() would wait"
                    )
                if (
                    tried is not None
                    and mapped is not None
                    and state == "map again"
                    and [e.length for e in tried] != [e.length for e in mapped]
                ):
                    raise _fail(
                        f"try_map() and map() laid out {device.name}'s table "
                        f"differently: {list(tried)} / {list(mapped)}"
                    )
                for att, sgt in ((p_att, tried), (w_att, mapped)):
                    if sgt is not None:
                        await att.unmap(sgt)
                    await att.detach()
                await probe.put()
                await witness.put()
        self._finish()

    async def test_map_is_cancellation_safe(self) -> None:
        """A map cancelled at any suspension leaves nothing behind; a retry works.

        Both the first map of a buffer (where exporters allocate late) and a
        map again after an unmap are stepped, for every device.
        """
        for device in self.devices:
            for again in (False, True):
                await self._map_steps(device, again)
        self._finish()

    async def _map_steps(self, device: Device, again: bool) -> None:
        size = self.sizes[-1]
        what = f"map() for {device.name} ({'again' if again else 'first'})"
        state: dict[str, Attachment] = {}

        async def setup() -> Attachment | None:
            buf = await self._new(size)
            att = await self._attach(buf, device)
            if att is None:
                await buf.put()
                return None
            if again:
                sgt = await self._map(att, Direction.BIDIRECTIONAL)
                if sgt is None:
                    await att.detach()
                    await buf.put()
                    return None
                await att.unmap(sgt)
            state["att"] = att
            return att

        async def teardown() -> None:
            att = state.pop("att")
            await att.detach()
            await att.buffer.put()

        if await setup() is None:
            return

        def make() -> Awaitable[SgTable]:
            return state["att"].map(Direction.BIDIRECTIONAL)

        async def after_cancel() -> None:
            att = state["att"]
            if att.mappings:
                raise _fail(f"{what}: a cancelled map left {att.mappings} recorded")
            if att not in att.buffer.attachments:
                raise _fail(f"{what}: a cancelled map detached {att!r}")
            sgt = await att.map(Direction.BIDIRECTIONAL)  # the retry
            self._check_table(sgt, att, Direction.BIDIRECTIONAL)
            await att.unmap(sgt)
            # Start the next step from the same state as this one.
            await teardown()
            if await setup() is None:  # pragma: no cover - it worked before
                raise _fail(f"{what}: the set-up stopped working")

        async def undo(sgt: SgTable) -> None:
            await sgt.attachment.unmap(sgt)
            await teardown()
            if await setup() is None:  # pragma: no cover
                raise _fail(f"{what}: the set-up stopped working")

        await self._stepped(what, make, after_cancel, undo)
        await teardown()

    async def test_attach_is_cancellation_safe(self) -> None:
        """An attach cancelled at any suspension records nothing; a retry works."""
        device = self.devices[0]
        bufs = [await self._new(self.sizes[0])]

        async def after_cancel() -> None:
            buf = bufs[-1]
            if buf.attachments:
                raise _fail(f"a cancelled attach left {buf.attachments} recorded")
            att = await buf.attach(device)  # the retry
            await att.detach()
            await buf.put()
            bufs.append(await self._new(self.sizes[0]))  # a fresh start

        async def undo(att: Attachment) -> None:
            await att.detach()
            await att.buffer.put()
            bufs.append(await self._new(self.sizes[0]))

        await self._stepped(
            "attach()", lambda: bufs[-1].attach(device), after_cancel, undo
        )
        await bufs[-1].put()
        self._finish()

    async def test_cpu_access_is_cancellation_safe(self) -> None:
        """``begin_cpu_access`` cancelled at any suspension leaves no access begun.

        Each step starts from a new buffer, so an exporter that gives a buffer
        its memory at the first CPU access is cancelled at each of its waits.
        """
        self._need_cpu()
        mode: CpuMode = "rw"
        bufs = [await self._new(self.sizes[-1])]

        async def after_cancel() -> None:
            buf = bufs[-1]
            with pytest.raises(InvalidArgument):
                await buf.end_cpu_access(mode)  # nothing was begun
            async with buf.cpu_access(mode) as view:  # the retry
                view[0] = 1
                view[0] = 0
            await buf.put()
            bufs.append(await self._new(self.sizes[-1]))

        async def undo(_: None) -> None:
            await bufs[-1].end_cpu_access(mode)
            await bufs[-1].put()
            bufs.append(await self._new(self.sizes[-1]))

        await self._stepped(
            "begin_cpu_access()",
            lambda: bufs[-1].begin_cpu_access(mode),
            after_cancel,
            undo,
        )
        await bufs[-1].put()
        self._finish()

    async def test_undo_ops_complete_in_a_cancelled_scope(self) -> None:
        """``unmap``, ``detach`` and the last ``put`` finish even when cancelled.

        Each reaches the exporter exactly once and never cancelled, then
        raises the pending cancellation at its final checkpoint.
        """
        await self._undo_in_cancelled_scopes()

    async def test_undo_ops_that_await_complete_in_a_cancelled_scope(self) -> None:
        """The same, with every undo op made to wait in cancel scopes of its own.

        An exporter's undo op may sleep, do I/O, or use its own ``fail_after``:
        it must still complete under the caller's cancellation, on every
        backend, with no hang and no cancel-scope error.
        """
        self._log.awaiting = True
        await self._undo_in_cancelled_scopes()

    async def _undo_in_cancelled_scopes(self) -> None:
        device = self.devices[0]
        for size in self.sizes:
            buf = await self._new(size)
            att = await buf.attach(device)
            sgt = await att.map(Direction.BIDIRECTIONAL)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await att.unmap(sgt)
            if not scope.cancelled_caught or sgt.valid:
                raise _fail("unmap() did not complete, then raise the cancellation")
            with anyio.CancelScope() as scope:
                scope.cancel()
                await att.detach()
            if not scope.cancelled_caught or att.attached:
                raise _fail("detach() did not complete, then raise the cancellation")
            with anyio.CancelScope() as scope:
                scope.cancel()
                await buf.put()
            if not scope.cancelled_caught or not _is_released(buf):
                raise _fail("put() did not release, then raise the cancellation")
            # The same with the async-with forms, cancelled in the innermost body.
            buf = await self._new(size)
            with anyio.CancelScope() as scope:
                async with (
                    buf,
                    buf.attach(device) as att,
                    att.map(Direction.TO_DEVICE) as sgt,
                ):
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()
            if not (scope.cancelled_caught and _is_released(buf) and not sgt.valid):
                raise _fail("the async-with forms did not undo everything")
        self._finish()

    async def test_uninterruptible_map_completes_in_a_cancelled_scope(self) -> None:
        """``map(interruptible=False)`` returns a table even in a cancelled scope."""
        buf = await self._new(self.sizes[-1])
        att = await buf.attach(self.devices[0])
        with anyio.CancelScope() as scope:
            scope.cancel()
            sgt = await att.map(Direction.TO_DEVICE, interruptible=False)
            with anyio.CancelScope(shield=True):
                self._check_table(sgt, att, Direction.TO_DEVICE)
                await att.unmap(sgt)
        await att.detach()
        await buf.put()
        self._finish()

    def _need_cpu(self) -> None:
        if not self.cpu_access:
            pytest.skip("the exporter's buffers have no CPU-visible bytes")

    async def test_new_buffers_read_as_zeros(self) -> None:
        """Fresh buffers read as zeros, before and after a map, and when reused."""
        self._need_cpu()
        for size in self.sizes:
            for _ in range(3):
                buf = await self._new(size)
                async with buf.cpu_access("r") as view:
                    if view.nbytes != size or not view.readonly:
                        raise _fail(f"cpu_access('r') gave {view!r} for {buf!r}")
                    if view != bytes(size):
                        raise _fail(f"a new {size}-byte buffer is not all zeros")
                async with (
                    buf.attach(self.devices[0]) as att,
                    att.map(Direction.FROM_DEVICE),
                ):
                    pass
                async with buf.cpu_access("rw") as view:
                    if view != bytes(size):
                        raise _fail("a new buffer is not all zeros after a map")
                    view[:] = b"\xa5" * size  # dirty it for the next round
                await buf.put()
        self._finish()

    async def test_cpu_access_round_trips_bytes(self) -> None:
        """What the CPU writes, it reads back, across maps and re-gets."""
        self._need_cpu()
        rng = random.Random(8)
        for size in self.sizes:
            data = rng.randbytes(size)
            buf = await self._new(size)
            async with buf.cpu_access("w") as view:
                view[:] = data
            async with (
                buf.attach(self.devices[0]) as att,
                att.map(Direction.BIDIRECTIONAL),
            ):
                pass
            fd = buf.fd()
            try:
                again = get(fd)
            finally:
                os.close(fd)
            if again is not buf:
                raise _fail(f"get(buf.fd()) returned {again!r}, not the buffer")
            async with again.cpu_access("rw") as view:
                if view != data:
                    raise _fail(f"{size} bytes written did not read back")
                view[size - 1] ^= 0xFF
            async with buf.cpu_access("r") as view:
                if (
                    view[size - 1] != data[size - 1] ^ 0xFF
                    or view[: size - 1] != (data[: size - 1])
                ):
                    raise _fail("a write through 'rw' did not read back")
            await again.put()
            await buf.put()
        self._finish()

    async def test_try_cpu_access_agrees_with_cpu_access(self) -> None:
        """``try_cpu_access`` gives the same bytes as ``cpu_access``, or Busy.

        On a fresh buffer nothing else holds, Busy is allowed only when the
        exporter's hooks are coroutine functions, and leaves nothing begun.
        """
        self._need_cpu()
        rng = random.Random(9)
        for size in self.sizes:
            data = rng.randbytes(size)
            buf = await self._new(size)
            try:
                with buf.try_cpu_access("w") as view:
                    view[:] = data
            except Busy:
                if buf.cpu_access_modes:
                    raise _fail("a try_cpu_access() that raised Busy began") from None
                hooks = (
                    getattr(type(self.exporter), name)
                    for name in ("begin_cpu_access", "end_cpu_access")
                )
                if not any(inspect.iscoroutinefunction(hook) for hook in hooks):
                    raise _fail(
                        "try_cpu_access() raised Busy on a buffer nothing "
                        "holds, with plain hooks"
                    ) from None
                await buf.put()
                continue
            async with buf.cpu_access("r") as view:
                if view != data:
                    raise _fail(f"{size} bytes written by try_cpu_access() lost")
            with buf.try_cpu_access("r") as view:
                if not view.readonly or view != data:
                    raise _fail("try_cpu_access('r') gave other bytes, or writable")
            await buf.put()
        self._finish()

    async def test_release_exactly_once(self) -> None:
        """Only the last put releases, once; the buffer is unusable afterwards."""
        buf = await self._new(self.sizes[0])
        fd = buf.fd()
        try:
            again = get(fd)
        finally:
            os.close(fd)
        await again.put()
        if _is_released(buf) or self._log.released.get(id(buf)):
            raise _fail("a put that was not the last released the buffer")
        await buf.put()
        if not _is_released(buf) or self._log.released.get(id(buf)) != 1:
            raise _fail("the last put did not release the buffer exactly once")
        with pytest.raises(InvalidArgument):
            await buf.put()
        with pytest.raises(InvalidArgument):
            await buf.attach(self.devices[0])
        self._finish()

    async def test_no_fd_or_buffer_leaks(self) -> None:
        """Whole lifecycles leave the fd table and ``bufinfo()`` as they were."""
        device = self.devices[0]

        async def cycle() -> None:
            for size in self.sizes:
                buf = await self._new(size)
                fd = buf.fd()
                try:
                    again = get(fd)
                finally:
                    os.close(fd)
                async with buf.attach(device) as att:
                    async with att.map(Direction.BIDIRECTIONAL):
                        pass
                    sgt = None
                    with contextlib.suppress(Busy):
                        sgt = att.try_map(Direction.TO_DEVICE)
                    if sgt is not None:
                        await att.unmap(sgt)
                if self.cpu_access:
                    async with buf.cpu_access("rw") as view:
                        view[0] = 1
                await again.put()
                await buf.put()

        await cycle()  # warm up: an exporter may open what it keeps for good
        fds, live = _open_fds(), len(bufinfo())
        for _ in range(self.leak_cycles):
            await cycle()
        stray = {
            fd: target
            for fd, target in _open_fds().items()
            if fd not in fds or fds[fd] != target
        }
        if stray:
            raise _fail(f"{self.leak_cycles} lifecycles left fds open: {stray}")
        if len(bufinfo()) != live:
            raise _fail(f"{len(bufinfo()) - live} buffers left live")
        self._finish()
