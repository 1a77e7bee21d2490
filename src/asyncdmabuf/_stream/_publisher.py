"""The publishing end of a stream: a pool of buffers, lent, sent and given back.

The publisher owns ``N`` buffers. :meth:`Publisher.loan` lends a free one;
:meth:`Publisher.send` hands it to every subscriber. A buffer is free again
when nothing holds it (no loan, no place in the history, no subscriber that
has not released it) and every fence of its own ``buf.resv`` has signalled:
the acquire fence (added as ``BOOKKEEP`` at send: explicitly synchronised,
so the producer's own device, or ``cpu_access("w")``, still writes the frame
without waiting for the fence it is to signal) and the release fences (added
as ``READ``). While fences are pending, one task per buffer waits on the
reservation (the gate) and frees the buffer after. A subscriber's release
fence is held as ``Fence.any(fence, cut)``: ``cut`` is the subscriber's own
fence, signalled with ``ECONNRESET`` when it is disconnected, so its pending
release fences count as signalled with an error. Each subscriber grants
``queue`` credits: a frame sent uses one, and one comes back when the
subscriber takes the frame off its queue. Without a credit, ``"block"`` makes
``send`` wait and ``"drop-oldest"`` keeps only the newest frame waiting (at
the publisher, where dropping it frees its buffer at once).

Only :mod:`._transport`'s seam is used to talk to subscribers.
"""

from __future__ import annotations

import errno
import functools
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, final

import anyio
import anyio.abc
import anyio.lowlevel

from .._backends import native_checkpoint, native_checkpoint_if_cancelled
from .._buffer import DmaBuf
from .._errors import Busy, DmaBufError, InvalidArgument
from .._fence import Fence
from .._layout import FrameLayout
from .._types import Usage
from .._validate import check_int
from .._waitqueue import WaitQueue
from . import _wire
from ._frame import Frame
from ._transport import Listener, Transport
from ._unix import UnixTransport, listen

__all__ = ["Publisher", "PublisherStatistics", "SubscriberInfo"]

#: How long a new connection has to say SUBSCRIBE before it is dropped.
HANDSHAKE_TIMEOUT = 10.0

_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError)


class Allocator(Protocol):
    """What a stream's buffers come from: any exporter with ``allocate``."""

    async def allocate(self, size: int, *, name: str | None = None) -> DmaBuf: ...


@dataclass(frozen=True, slots=True)
class SubscriberInfo:
    """One subscriber as its publisher sees it."""

    pid: int
    uid: int
    gid: int
    queue: int
    overflow: str
    queued: int
    """Frames sent or waiting to be sent that it has not taken yet."""
    held: int
    """Frames it has taken and not released yet."""
    dropped: int
    buffers: tuple[int, ...]
    """The ids of the buffers it holds (queued or taken)."""


@dataclass(frozen=True, slots=True)
class PublisherStatistics:
    """A publisher's counters and the state of its buffers."""

    frames_sent: int
    frames_dropped: int
    subscribers: int
    refused: int
    """Connections refused (credentials, handshake) or dropped for a bad message."""
    buffers_total: int
    buffers_free: int
    buffers_loaned: int
    buffers_in_flight: int
    """Buffers sent and not yet back (held by subscribers, history or fences)."""
    fences_cut: int = 0
    """Release fences still pending when their subscriber was disconnected:
    they count as signalled with an error (``ECONNRESET``)."""


class _Slot:
    __slots__ = (
        "buf",
        "fences",
        "free",
        "gate",
        "holders",
        "id",
        "in_history",
        "loaned",
    )

    def __init__(self, id: int, buf: DmaBuf) -> None:
        self.id = id
        self.buf = buf
        self.holders: set[_Peer] = set()
        #: The release fences added to ``buf.resv`` and who gave them (for
        #: bufinfo and the count of cut ones); the resv is what gates reuse.
        self.fences: dict[Fence, _Peer] = {}
        #: The task waiting on ``buf.resv`` before the buffer is free (the gate).
        self.gate: anyio.CancelScope | None = None
        self.loaned = False
        self.in_history = False
        self.free = True

    def busy(self) -> bool:
        return bool(self.loaned or self.in_history or self.holders)

    def pending_fences(self) -> int:
        """Count the release fences still pending (each is asked)."""
        return sum(not fence.signaled for fence in self.fences)


class _Sent:
    __slots__ = ("fence", "metadata", "plain", "seq", "slot", "timestamp")

    def __init__(
        self,
        slot: _Slot,
        seq: int,
        timestamp: int,
        metadata: bytes,
        fence: Fence | None,
    ) -> None:
        self.slot = slot
        self.seq = seq
        self.timestamp = timestamp
        self.metadata = metadata
        self.fence = fence
        #: The FRAME message without fds, encoded once for every subscriber.
        self.plain: bytes | None = None

    def encode(self, flags: int) -> bytes:
        return _wire.encode_frame(
            self.slot.id, flags, self.seq, self.timestamp, self.metadata
        )


class _Peer:
    __slots__ = (
        "credit",
        "cut",
        "dropped",
        "frames",
        "gone",
        "inflight",
        "known",
        "overflow",
        "pending",
        "queue",
        "transport",
    )

    def __init__(self, transport: Transport, queue: int, overflow: str) -> None:
        self.transport = transport
        self.queue = queue
        self.overflow = overflow
        self.inflight = 0  # frames sent and not yet credited
        self.frames: dict[int, _Sent] = {}  # sent and not released, by seq
        self.pending: deque[_Sent] = deque()  # waiting for a credit (drop-oldest)
        self.known: set[int] = set()  # buffer ids whose fd it has
        self.dropped = 0
        #: The send waiting for a credit, woken when one comes.
        self.credit = WaitQueue()
        self.gone = False
        #: Signalled with an error at disconnection: each release fence it
        #: gave is held as ``Fence.any(fence, cut)``.
        self.cut: Fence | None = None


def _check_allowed(allow_uids: Iterable[int] | None) -> frozenset[int]:
    if allow_uids is None:
        return frozenset((os.geteuid(),))
    uids = frozenset(allow_uids)
    for uid in uids:
        check_int(uid, "a uid", 0)
    return uids


@final
class Publisher:
    """The producing end of a stream of frames; see :meth:`bind` and :meth:`over`.

    Use it as ``async with``: its tasks (accepting subscribers, reading their
    releases) run inside the block, and leaving it closes every connection and
    puts every buffer.
    """

    __slots__ = (
        "_allowed",
        "_changed",
        "_checkpoint",
        "_closed",
        "_cut",
        "_dropped",
        "_free",
        "_history",
        "_history_len",
        "_if_cancelled",
        "_layout",
        "_listener",
        "_peers",
        "_refused",
        "_scopes",
        "_sent",
        "_seq",
        "_size",
        "_slots",
        "_tg",
        "_transport",
    )

    def __init__(
        self,
        bufs: list[DmaBuf],
        size: int,
        layout: FrameLayout | None,
        history: int,
        allowed: frozenset[int],
        listener: Listener | None,
        transport: Transport | None,
    ) -> None:
        self._slots = [_Slot(i, buf) for i, buf in enumerate(bufs)]
        self._free: deque[_Slot] = deque(self._slots)
        self._size = size
        self._layout = layout
        self._history_len = history
        self._history: deque[_Sent] = deque()
        self._allowed = allowed
        self._listener = listener
        self._transport = transport
        self._peers: list[_Peer] = []
        #: The loans waiting for a free buffer.
        self._changed = WaitQueue()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._seq = 0
        self._sent = 0
        self._dropped = 0
        self._refused = 0
        self._cut = 0
        #: One per background task, cancelled by aclose(): the tasks end, the
        #: body of the async with block goes on.
        self._scopes: set[anyio.CancelScope] = set()
        #: The backend's own checkpoint, looked up once (the per-frame path).
        self._checkpoint = native_checkpoint()
        self._if_cancelled = native_checkpoint_if_cancelled()

    # -- making one ---------------------------------------------------------------

    @classmethod
    async def bind(
        cls,
        path: str,
        exporter: Allocator,
        layout_or_size: FrameLayout | int,
        *,
        buffers: int = 4,
        history: int = 0,
        allow_uids: Iterable[int] | None = None,
    ) -> Publisher:
        """Listen on a UNIX socket ``path`` (``"@name"``: abstract) and own ``buffers``.

        Args:
            path: Where subscribers connect.
            exporter: What allocates the buffers (``allocate(size, name=)``).
            layout_or_size: The frames' layout, or a size in bytes.
            buffers: How many buffers the stream owns.
            history: How many of the latest frames a late subscriber receives
                first (they stay held, so fewer than ``buffers``).
            allow_uids: The uids that may subscribe (default: this process's).

        Raises:
            TypeError: An argument has the wrong type.
            InvalidArgument: A bad size, count, history or path.
            DmaBufError: The socket cannot be bound, or allocation failed.
        """
        size, layout, allowed = _check_args(
            layout_or_size, buffers, history, allow_uids
        )
        listener = await listen(path)
        try:
            bufs = await _allocate(exporter, size, buffers)
        except BaseException:
            await listener.aclose()
            raise
        return cls(bufs, size, layout, history, allowed, listener, None)

    @classmethod
    async def over(
        cls,
        stream: anyio.abc.UNIXSocketStream,
        exporter: Allocator,
        layout_or_size: FrameLayout | int,
        *,
        buffers: int = 4,
        history: int = 0,
        allow_uids: Iterable[int] | None = None,
    ) -> Publisher:
        """Publish to the one subscriber at the other end of a connected stream.

        The stream becomes the publisher's (closed by it). Arguments and
        errors as :meth:`bind`'s.
        """
        size, layout, allowed = _check_args(
            layout_or_size, buffers, history, allow_uids
        )
        transport = UnixTransport(stream)
        try:
            bufs = await _allocate(exporter, size, buffers)
        except BaseException:
            await transport.aclose()
            raise
        return cls(bufs, size, layout, history, allowed, None, transport)

    # -- the block's tasks --------------------------------------------------------

    async def __aenter__(self) -> Publisher:
        if self._tg is not None or self._closed:
            raise InvalidArgument(f"{self!r} has already been entered")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        _ENTERED.add(self)  # for bufinfo()
        if self._listener is not None:
            tg.start_soon(self._accept_loop, self._listener)
        if self._transport is not None:
            tg.start_soon(self._serve, self._transport)
            self._transport = None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        try:
            self._shut()
            if tg is not None:
                # The body's own exception propagates as itself, not wrapped in
                # a group: the group reports only what its tasks raised.
                await tg.__aexit__(None, None, None)
            return None
        finally:
            self._tg = None
            _ENTERED.discard(self)
            with anyio.CancelScope(shield=True):
                await self._put_all()

    async def aclose(self) -> None:
        """Close the stream: every connection, the listener, then (after the
        ``async with`` block, if in one) every buffer. A checkpoint."""
        self._shut()
        if self._tg is None:
            with anyio.CancelScope(shield=True):
                await self._put_all()
        await anyio.lowlevel.checkpoint()

    def _shut(self) -> None:
        self._closed = True
        for scope in self._scopes:
            scope.cancel()
        for peer in list(self._peers):
            self._disconnect(peer)
        for slot in self._slots:
            self._cancel_gate(slot)
        self._wake()

    async def _put_all(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.aclose()
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.aclose()
        slots, self._slots = self._slots, []
        self._free.clear()
        self._history.clear()
        for slot in slots:
            self._cancel_gate(slot)
            await slot.buf.put()

    def _task_scope(self) -> anyio.CancelScope:
        scope = anyio.CancelScope()
        if self._closed:
            scope.cancel()
        self._scopes.add(scope)
        return scope

    async def _accept_loop(self, listener: Listener) -> None:
        assert self._tg is not None
        with self._task_scope() as scope:
            while True:
                transport = await listener.accept()
                self._tg.start_soon(self._serve, transport)
        self._scopes.discard(scope)

    async def _serve(self, transport: Transport) -> None:
        scope = self._task_scope()
        try:
            with scope:
                await self._serve_one(transport)
        finally:
            self._scopes.discard(scope)
            with anyio.CancelScope(shield=True):
                await transport.aclose()

    async def _serve_one(self, transport: Transport) -> None:
        peer: _Peer | None = None
        try:
            if transport.peer.uid not in self._allowed:
                self._refused += 1
                return
            received = None
            with anyio.move_on_after(HANDSHAKE_TIMEOUT):
                received = await transport.receive()
            if received is None:
                self._refused += 1
                return
            data, fds = received
            try:
                message = _wire.decode(data, len(fds))
            finally:
                _close_fds(fds)
            if not isinstance(message, _wire.Subscribe) or self._closed:
                raise _wire.ProtocolError("a connection that did not subscribe")
            welcome = _wire.Welcome(
                len(self._slots), self._history_len, self._size, self._layout
            )
            transport.send_nowait(welcome.encode())
            peer = _Peer(transport, message.queue, message.overflow)
            self._peers.append(peer)
            # Every frame of the history, even beyond its queue: the credits
            # are owed all the same, so a "block" send waits until they
            # come back and a "drop-oldest" one keeps its frame waiting.
            for sent in list(self._history):
                self._transmit(peer, sent)
            # Each message is handled as it comes, by a plain function (on
            # asyncio in the loop's reader callback: no task is woken).
            await transport.serve(functools.partial(self._handle_fds, peer))
        except _GONE:
            if peer is None:  # gone before it subscribed
                self._refused += 1
        except DmaBufError:  # a bad message: the peer is dropped
            self._refused += 1
        finally:
            if peer is not None:
                self._disconnect(peer)

    def _handle_fds(self, peer: _Peer, data: bytes, fds: list[int]) -> None:
        """One message from ``peer`` (a RELEASE, most often); closes ``fds``."""
        try:
            release = _wire.decode_release(data, len(fds))
            if release is not None:
                self._release(peer, *release, fds)
                return
            message = _wire.decode(data, len(fds))
            if not isinstance(message, _wire.Credit):
                raise _wire.ProtocolError(f"a subscriber sent {type(message).__name__}")
            self._credit(peer, message.credits)
        finally:
            if fds:
                _close_fds(fds)

    def _release(
        self,
        peer: _Peer,
        buffer: int,
        has_fence: bool,
        seq: int,
        credits: int,
        fds: list[int],
    ) -> None:
        if credits:
            self._credit(peer, credits)
        sent = peer.frames.get(seq)
        if sent is None or sent.slot.id != buffer:
            raise _wire.ProtocolError(
                f"a release of frame {seq} in buffer {buffer},"
                " which the subscriber does not hold"
            )
        # Import the fence first: if it is not one, the frame is still the
        # peer's, and its disconnection gives it back.
        fence = Fence.import_fd(fds[0]) if has_fence else None
        del peer.frames[seq]
        # A frame released before it was credited is credited now.
        if peer.inflight > len(peer.frames):
            peer.inflight = len(peer.frames)
        slot = sent.slot
        if fence is not None and not fence.signaled:
            if peer.cut is None:
                peer.cut = Fence()
            held = Fence.any(fence, peer.cut)
            slot.buf.resv.add_fence(held, Usage.READ)
            slot.fences[held] = peer
        holders = slot.holders
        holders.discard(peer)
        if not holders:
            self._maybe_free(slot)

    def _credit(self, peer: _Peer, credits: int) -> None:
        if credits > peer.inflight:
            raise _wire.ProtocolError(
                f"{credits} credits back for {peer.inflight} frames in flight"
            )
        if not credits:
            return
        peer.inflight -= credits
        while peer.pending and peer.inflight < peer.queue and not peer.gone:
            sent = peer.pending.popleft()
            sent.slot.holders.discard(peer)
            self._transmit(peer, sent)
            self._maybe_free(sent.slot)
        peer.credit.unpark_all()

    async def _gate(self, slot: _Slot, scope: anyio.CancelScope) -> None:
        """Wait for every fence of the buffer's resv, then free it."""
        try:
            with scope:
                await slot.buf.resv.wait(Usage.BOOKKEEP)
        finally:
            if slot.gate is scope:
                slot.gate = None
        self._maybe_free(slot)

    def _cancel_gate(self, slot: _Slot) -> None:
        scope, slot.gate = slot.gate, None
        if scope is not None:
            scope.cancel()

    def _disconnect(self, peer: _Peer) -> None:
        if peer.gone:
            return
        peer.gone = True
        if peer in self._peers:
            self._peers.remove(peer)
        touched = [sent.slot for sent in (*peer.frames.values(), *peer.pending)]
        peer.frames.clear()
        peer.pending.clear()
        cut, peer.cut = peer.cut, None
        if cut is not None:
            # Its pending release fences count as signalled with an error.
            for slot in self._slots:
                for fence, owner in slot.fences.items():
                    if owner is peer and not fence.signaled:
                        self._cut += 1
                        touched.append(slot)
            cut.signal(errno.ECONNRESET)
        for slot in touched:
            slot.holders.discard(peer)
            self._maybe_free(slot)
        peer.transport.close_nowait()
        peer.credit.unpark_all()

    # -- the pool -----------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.unpark_all()

    def _maybe_free(self, slot: _Slot) -> bool:
        """Free ``slot`` if nothing holds it and its resv is clear; or gate it.

        Returns:
            Whether it is free now.
        """
        if slot.free or slot.busy() or slot not in self._slots:
            return slot.free
        if not slot.buf.resv.test(Usage.BOOKKEEP):
            if slot.gate is None and self._tg is not None and not self._closed:
                slot.gate = scope = anyio.CancelScope()
                self._tg.start_soon(self._gate, slot, scope)
            return False
        self._cancel_gate(slot)
        slot.fences.clear()
        slot.free = True
        self._free.append(slot)
        self._wake()
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument(f"{self!r} is closed")
        if self._tg is None:
            raise InvalidArgument(f"use {self!r} in an async with block first")

    def _lend(self, slot: _Slot) -> Frame:
        slot.free = False
        slot.loaned = True
        return Frame(slot.buf, self._layout, -1, 0, b"", self, slot)

    def try_loan(self) -> Frame:
        """Lend a free buffer as a frame to fill, without waiting.

        Raises:
            Busy: No buffer is free.
            InvalidArgument: The publisher is closed or not entered.
        """
        self._check_open()
        if not self._free:
            # A gated buffer whose fences have signalled is free now, even if
            # its gate task has not run yet.
            for slot in self._slots:
                if slot.gate is not None and self._maybe_free(slot):
                    break
            else:
                raise Busy("every buffer of the stream is in use")
        return self._lend(self._free.popleft())

    async def loan(self) -> Frame:
        """Lend a free buffer as a frame to fill, waiting for one (a checkpoint).

        No one else may still read the buffer: every subscriber that had it
        released it and every release fence has signalled.

        Raises:
            InvalidArgument: The publisher is closed or not entered.
        """
        if self._free:
            await self._checkpoint()  # before anything is lent
        else:
            await self._if_cancelled()
        self._check_open()
        while not self._free:
            await self._changed.park()
            self._check_open()
        return self._lend(self._free.popleft())

    def _release_frame(self, frame: Frame, fence: Fence | None) -> None:
        """A loan given back unsent (``frame.release()``)."""
        slot = frame._token
        assert isinstance(slot, _Slot)
        if fence is not None and not fence.signaled:
            # The loaner's own device may still write: a WRITE fence.
            slot.buf.resv.add_fence(fence, Usage.WRITE)
            slot.fences[fence] = _NOBODY
        slot.loaned = False
        self._maybe_free(slot)

    # -- sending ------------------------------------------------------------------

    def _prepare(
        self, frame: object, fence: object, metadata: object, timestamp: object
    ) -> _Sent:
        if not isinstance(frame, Frame):
            raise TypeError(f"send() needs a Frame, not {type(frame).__name__}")
        if fence is not None and not isinstance(fence, Fence):
            raise TypeError(f"an acquire fence is a Fence, not {type(fence).__name__}")
        if type(metadata) is bytes:  # the usual case: no copy to make
            data = metadata
        elif isinstance(metadata, (bytes, bytearray, memoryview)):
            data = bytes(metadata)
        else:
            raise TypeError(f"metadata is bytes, not {type(metadata).__name__}")
        if len(data) > _wire.MAX_METADATA:
            raise InvalidArgument(
                f"metadata of {len(data)} bytes, at most {_wire.MAX_METADATA}"
            )
        if timestamp is None:
            timestamp = time.monotonic_ns()
        else:
            check_int(timestamp, "timestamp", -(2**63), 2**63 - 1)
        self._check_open()
        slot = frame._token
        if frame._owner is not self or not isinstance(slot, _Slot) or frame.released:
            raise InvalidArgument(f"{frame!r} is not a loan of {self!r}")
        frame._mark_released()
        slot.loaned = False
        if fence is not None:
            # The producer's write: the buffer is not reused before it is
            # done. BOOKKEEP: nothing here waits for it implicitly (the
            # producer writes the frame after send, then signals).
            slot.buf.resv.add_fence(fence, Usage.BOOKKEEP)
        seq, self._seq = self._seq, self._seq + 1
        self._sent += 1
        assert isinstance(timestamp, int)
        sent = _Sent(slot, seq, timestamp, data, fence)
        if self._history_len:
            slot.in_history = True
            self._history.append(sent)
            if len(self._history) > self._history_len:
                old = self._history.popleft()
                old.slot.in_history = False
                self._maybe_free(old.slot)
        return sent

    def try_send(
        self,
        frame: Frame,
        *,
        fence: Fence | None = None,
        metadata: bytes = b"",
        timestamp: int | None = None,
    ) -> None:
        """Send a loaned frame to every subscriber, without waiting.

        Raises:
            Busy: A ``"block"`` subscriber has no room; nothing is sent.
            The errors of :meth:`send` otherwise.
        """
        self._check_open()
        for peer in self._peers:
            if peer.overflow == "block" and peer.inflight >= peer.queue:
                raise Busy("a subscriber's queue is full")
        sent = self._prepare(frame, fence, metadata, timestamp)
        for peer in list(self._peers):
            self._offer(peer, sent)
        self._maybe_free(sent.slot)

    async def send(
        self,
        frame: Frame,
        *,
        fence: Fence | None = None,
        metadata: bytes = b"",
        timestamp: int | None = None,
    ) -> None:
        """Send a loaned frame to every subscriber, in order; a checkpoint.

        The frame is the subscribers' now (don't write to its buffer); its
        buffer comes back to the pool once all of them released it.

        Args:
            frame: A frame from :meth:`loan`.
            fence: The acquire fence: the buffer holds the frame once it
                signals. Subscribers wait for it before reading.
            metadata: At most 4096 bytes for the subscribers.
            timestamp: The frame's time in ns (default: ``CLOCK_MONOTONIC`` now).

        Raises:
            TypeError: An argument has the wrong type.
            InvalidArgument: ``frame`` is not a loan of this publisher (or was
                sent already), the metadata is too long, or the publisher is
                closed. Cancelled while waiting for a ``"block"`` subscriber,
                the frame has gone to those before it only.
        """
        # The one checkpoint comes first, before anything is sent: a send
        # cancelled there sends nothing and the frame stays a loan.
        await self._checkpoint()
        sent = self._prepare(frame, fence, metadata, timestamp)
        slot = sent.slot
        slot.holders.add(_NOBODY)  # not free while this send runs
        try:
            for peer in tuple(self._peers):
                if peer.inflight < peer.queue and not peer.gone:
                    self._transmit(peer, sent)  # room: the usual case
                    continue
                while (
                    peer.overflow == "block"
                    and peer.inflight >= peer.queue
                    and not peer.gone
                ):
                    await peer.credit.park()
                self._offer(peer, sent)
        finally:
            slot.holders.discard(_NOBODY)
            self._maybe_free(slot)

    def _offer(self, peer: _Peer, sent: _Sent) -> None:
        if peer.gone:
            return
        if peer.inflight < peer.queue:
            self._transmit(peer, sent)
            return
        # drop-oldest: only the newest frame waits for a credit.
        while peer.pending:
            old = peer.pending.popleft()
            old.slot.holders.discard(peer)
            peer.dropped += 1
            self._dropped += 1
            self._maybe_free(old.slot)
        peer.pending.append(sent)
        sent.slot.holders.add(peer)

    def _transmit(self, peer: _Peer, sent: _Sent) -> None:
        slot = sent.slot
        fence = sent.fence
        try:
            if slot.id in peer.known and (fence is None or fence.signaled):
                # The usual frame: no fds, the same bytes for every subscriber.
                plain = sent.plain
                if plain is None:
                    plain = sent.plain = sent.encode(0)
                peer.transport.send_nowait(plain)
            else:
                self._transmit_fds(peer, sent)
        except (*_GONE, Busy):
            self._disconnect(peer)
            return
        peer.inflight += 1
        peer.frames[sent.seq] = sent
        slot.holders.add(peer)

    def _transmit_fds(self, peer: _Peer, sent: _Sent) -> None:
        """Send a frame with its buffer's fd (the first time) or its fence's."""
        slot = sent.slot
        fds: list[int] = []
        flags = 0
        try:
            if slot.id not in peer.known:
                fds.append(slot.buf.fd())
                flags |= _wire.HAS_BUFFER
            if sent.fence is not None and not sent.fence.signaled:
                fds.append(sent.fence.export_fd())
                flags |= _wire.HAS_FENCE
            peer.transport.send_nowait(sent.encode(flags), fds)
        finally:
            _close_fds(fds)
        peer.known.add(slot.id)

    # -- what is going on ---------------------------------------------------------

    @property
    def layout(self) -> FrameLayout | None:
        """The frames' layout, or None for a stream of plain bytes."""
        return self._layout

    @property
    def subscribers(self) -> tuple[SubscriberInfo, ...]:
        """Every connected subscriber, oldest first."""
        result = []
        for peer in self._peers:
            creds = peer.transport.peer
            queued = peer.inflight + len(peer.pending)
            ids = sorted({s.slot.id for s in (*peer.frames.values(), *peer.pending)})
            result.append(
                SubscriberInfo(
                    creds.pid,
                    creds.uid,
                    creds.gid,
                    peer.queue,
                    peer.overflow,
                    queued,
                    len(peer.frames) - peer.inflight,
                    peer.dropped,
                    tuple(ids),
                )
            )
        return tuple(result)

    def statistics(self) -> PublisherStatistics:
        """Return the publisher's counters and its buffers' state now."""
        loaned = sum(slot.loaned for slot in self._slots)
        free = len(self._free)
        return PublisherStatistics(
            frames_sent=self._sent,
            frames_dropped=self._dropped,
            subscribers=len(self._peers),
            refused=self._refused,
            buffers_total=len(self._slots),
            buffers_free=free,
            buffers_loaned=loaned,
            buffers_in_flight=len(self._slots) - free - loaned,
            fences_cut=self._cut,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._peers)} subscribers"
        return f"<Publisher {len(self._slots)} buffers of {self._size} bytes, {state}>"


# -- for bufinfo() -------------------------------------------------------------------

#: The publishers inside their ``async with`` block now.
_ENTERED: set[Publisher] = set()

#: One buffer of a stream: (buffer, id, state, in history, release fences
#: pending, holders); state "free", "loaned" or "sent"; a holder is (pid, uid,
#: seq, "in-flight" sent and not known to be taken, "taken", or "waiting" at
#: the publisher for a credit).
BufferUse = tuple[DmaBuf, int, str, bool, int, tuple[tuple[int, int, int, str], ...]]


def buffer_uses() -> list[BufferUse]:
    """Return every buffer of every entered publisher and who holds it (read-only)."""
    uses: list[BufferUse] = []
    for pub in list(_ENTERED):
        holders: dict[_Slot, list[tuple[int, int, int, str]]] = {}
        for peer in pub._peers:
            creds = peer.transport.peer
            frames = [peer.frames[seq] for seq in sorted(peer.frames)]
            taken = len(frames) - peer.inflight  # frames are taken in order
            states = ["taken"] * taken + ["in-flight"] * peer.inflight
            states += ["waiting"] * len(peer.pending)  # at the publisher
            for sent, how in zip([*frames, *peer.pending], states, strict=True):
                who = (creds.pid, creds.uid, sent.seq, how)
                holders.setdefault(sent.slot, []).append(who)
        for slot in pub._slots:
            state = "loaned" if slot.loaned else "free" if slot.free else "sent"
            fences = slot.pending_fences()
            held = tuple(holders.get(slot, ()))
            uses.append((slot.buf, slot.id, state, slot.in_history, fences, held))
    return uses


class _Nobody:
    """A holder that is no subscriber: a send in progress, a loan's fence."""

    __slots__ = ()


_NOBODY: _Peer = _Nobody()  # type: ignore[assignment]


def _check_args(
    layout_or_size: object, buffers: object, history: object, allow_uids: object
) -> tuple[int, FrameLayout | None, frozenset[int]]:
    layout = None
    if isinstance(layout_or_size, FrameLayout):
        layout = layout_or_size
        size = layout.size
    else:
        size = check_int(layout_or_size, "a stream's frame size")
    check_int(buffers, "buffers")
    check_int(history, "history", 0)
    assert isinstance(buffers, int)
    assert isinstance(history, int)
    if buffers > _wire.MAX_BUFFERS:
        raise InvalidArgument(f"a stream has at most {_wire.MAX_BUFFERS} buffers")
    if history >= buffers:
        raise InvalidArgument(
            f"history {history} would hold all {buffers} buffers: loan() could never"
            " lend one"
        )
    if allow_uids is not None and not isinstance(allow_uids, Iterable):
        raise TypeError(f"allow_uids is a collection of ints, not {allow_uids!r}")
    return size, layout, _check_allowed(allow_uids)


async def _allocate(exporter: Allocator, size: int, count: int) -> list[DmaBuf]:
    if not callable(getattr(exporter, "allocate", None)):
        raise TypeError(f"a stream's exporter needs allocate(), not {exporter!r}")
    bufs: list[DmaBuf] = []
    try:
        for i in range(count):
            buf = await exporter.allocate(size, name=f"stream-{i}")
            bufs.append(buf)
            _check_allocated(exporter, buf, size)
    except BaseException:
        with anyio.CancelScope(shield=True):
            for buf in bufs:
                if isinstance(buf, DmaBuf):
                    await buf.put()
        raise
    return bufs


def _check_allocated(exporter: Allocator, buf: object, size: int) -> None:
    if not isinstance(buf, DmaBuf) or buf.size < size:
        raise InvalidArgument(f"{exporter!r} allocated {buf!r}, not {size} bytes")
    if not buf.shared:
        # As send_buffer: its exporter keeps the bytes elsewhere (a device's
        # memory), so it would travel as an empty file no subscriber accepts.
        raise InvalidArgument(
            f"{exporter!r} allocated {buf!r}, which has no shareable memory: "
            "a stream needs an exporter that keeps its bytes in a file (memfd, "
            "dmaheap)"
        )


def _close_fds(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())
