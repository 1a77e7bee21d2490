"""The receiving end of a stream: frames in order, each held until released.

A subscriber reads its messages itself, in :meth:`Subscriber.receive`: there
is no background task. Releases and credits go back with non-blocking sends
(tiny messages, never more in flight than the stream has buffers). A credit
for a frame taken goes back with its release, or before ``receive`` waits.

Everything the publisher sends is checked (see ``_wire``); a buffer's fd is
turned into a buffer with :func:`asyncdmabuf.get`, which refuses what is not
shareable memory. A publisher that breaks the protocol is disconnected and
``receive`` raises :class:`InvalidArgument` once, then ``BrokenResourceError``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import final

import anyio
import anyio.abc
import anyio.lowlevel

from .._backends import native_checkpoint
from .._buffer import DmaBuf, get
from .._errors import Busy, DmaBufError, InvalidArgument
from .._fence import Fence
from .._layout import FrameLayout
from .._resv import Usage
from .._validate import check_int
from . import _wire
from ._frame import Frame
from ._publisher import _check_allowed
from ._transport import Transport
from ._unix import UnixTransport, connect

__all__ = ["Subscriber", "SubscriberStatistics", "subscribe"]

_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, Busy)


@dataclass(frozen=True, slots=True)
class SubscriberStatistics:
    """A subscriber's counters."""

    frames_received: int
    frames_dropped: int
    """Frames the publisher sent before this one that never came (seq gaps)."""
    frames_held: int
    buffers: int
    """Buffers of the stream whose fd has come (each comes once)."""


async def subscribe(
    path_or_stream: str | anyio.abc.UNIXSocketStream,
    *,
    queue: int = 2,
    overflow: str = "block",
    allow_uids: Iterable[int] | None = None,
) -> Subscriber:
    """Subscribe to a stream at a UNIX socket path, or over a connected stream.

    Args:
        path_or_stream: The publisher's path (``"@name"``: abstract), or a
            connected anyio UNIX stream (which becomes the subscriber's).
        queue: How many frames may wait for this subscriber.
        overflow: ``"block"`` (the publisher waits) or ``"drop-oldest"``
            (the publisher drops the oldest waiting frame).
        allow_uids: The uids the publisher may run as (default: this process's).

    Raises:
        TypeError: An argument has the wrong type.
        InvalidArgument: A bad queue or overflow; the publisher runs as
            another uid; its welcome is not valid.
        anyio.BrokenResourceError: The publisher refused or closed the
            connection before welcoming it.
        DmaBufError: Nobody listens at the path.
    """
    check_int(queue, "queue")
    if queue > _wire.MAX_QUEUE:
        raise InvalidArgument(f"queue is at most {_wire.MAX_QUEUE}, not {queue}")
    if overflow not in _wire.OVERFLOWS:
        raise InvalidArgument(f"overflow is 'block' or 'drop-oldest', not {overflow!r}")
    allowed = _check_allowed(allow_uids)
    if isinstance(path_or_stream, anyio.abc.UNIXSocketStream):
        transport = UnixTransport(path_or_stream)
    else:
        transport = await connect(path_or_stream)
    try:
        _check_peer(transport, allowed)
        await transport.send(_wire.Subscribe(queue, overflow).encode())
        try:
            data, fds = await transport.receive()
        except anyio.EndOfStream:
            raise anyio.BrokenResourceError(
                "the publisher closed the connection: refused"
            ) from None
        welcome = _welcome(data, fds)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await transport.aclose()
        raise
    return Subscriber(transport, welcome)


@final
class Subscriber(anyio.abc.ObjectReceiveStream[Frame]):
    """Frames from a publisher, in order; made by :func:`subscribe`.

    ``async for frame in sub`` ends when the publisher closes; frames still
    held stay readable until released, or until the subscriber is closed
    (which releases them and puts the stream's buffers).
    """

    __slots__ = (
        "_buffers",
        "_busy",
        "_checkpoint",
        "_closed",
        "_credits",
        "_dropped",
        "_ended",
        "_failed",
        "_held",
        "_last",
        "_received",
        "_transport",
        "_welcome",
    )

    def __init__(self, transport: Transport, welcome: _wire.Welcome) -> None:
        self._transport = transport
        self._welcome = welcome
        self._buffers: dict[int, DmaBuf] = {}
        self._held: dict[int, Frame] = {}
        self._busy: set[int] = set()
        self._credits = 0
        self._last = -1
        self._received = 0
        self._dropped = 0
        self._closed = False
        self._ended = False
        self._failed = False
        #: The backend's own checkpoint, looked up once (the per-frame path).
        self._checkpoint = native_checkpoint()

    @property
    def layout(self) -> FrameLayout | None:
        """The stream's layout, or None for plain bytes."""
        return self._welcome.layout

    # -- receiving ----------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._failed:
            raise anyio.BrokenResourceError("the publisher broke the protocol")
        if self._ended:
            raise anyio.EndOfStream

    def receive_nowait(self) -> Frame:
        """Return the next frame if it has arrived, without waiting.

        Raises:
            Busy: No frame has arrived (an ``anyio.WouldBlock``).
            The errors of :meth:`receive` otherwise.
        """
        self._check()
        try:
            data, fds = self._transport.receive_nowait()
        except Busy:
            self._flush_credits()
            raise
        except anyio.EndOfStream:
            self._ended = True
            raise
        return self._accept(data, fds)

    async def receive(self) -> Frame:
        """Wait for the next frame; a checkpoint.

        Raises:
            anyio.EndOfStream: The publisher closed the stream (or died).
            anyio.BrokenResourceError: The connection broke mid-message.
            anyio.ClosedResourceError: The subscriber was closed.
            InvalidArgument: The publisher sent something invalid; it is
                disconnected and every fd that came is closed.
        """
        transport = self._transport
        try:
            try:
                self._check()
            except BaseException:
                await anyio.lowlevel.checkpoint_if_cancelled()
                raise
            if transport.poll_nowait():
                # A frame (or the end) is there: the checkpoint comes before
                # anything is taken, so a cancelled receive takes nothing.
                await self._checkpoint()
                self._check()
                if transport.poll_nowait():
                    return self._accept(*transport.receive_nowait())
            # Nothing there: credits go back before waiting (the publisher
            # may be waiting for them), then one wait.
            self._flush_credits()
            data, fds = await transport.receive()
        except anyio.EndOfStream:
            self._ended = True
            raise
        return self._accept(data, fds)

    def _accept(self, data: bytes, fds: list[int]) -> Frame:
        try:
            return self._frame(data, fds)
        except DmaBufError:
            self._failed = True
            self._transport.close_nowait()
            raise
        finally:
            _close_fds(fds)

    def _frame(self, data: bytes, fds: list[int]) -> Frame:
        fields = _wire.decode_frame(data, len(fds))
        if fields is None:  # not a FRAME: decode() says what it is
            message = _wire.decode(data, len(fds))
            raise _wire.ProtocolError(f"the publisher sent {type(message).__name__}")
        ident, flags, seq, timestamp, metadata = fields
        if ident >= self._welcome.buffers:
            raise _wire.ProtocolError(
                f"a frame in buffer {ident} of a stream of {self._welcome.buffers}"
            )
        if seq <= self._last:
            raise _wire.ProtocolError(f"frame {seq} after frame {self._last}")
        if ident in self._busy:
            raise _wire.ProtocolError(f"buffer {ident} sent again before its release")
        buf = self._buffers.get(ident)
        if flags & _wire.HAS_BUFFER:
            if buf is not None:
                raise _wire.ProtocolError(f"buffer {ident}'s fd sent twice")
            buf = self._import(fds[0])
            self._buffers[ident] = buf
        elif buf is None:
            raise _wire.ProtocolError(f"a frame in buffer {ident}, whose fd never came")
        if flags & _wire.HAS_FENCE:
            try:
                fence = Fence.import_fd(fds[-1])
            except DmaBufError as exc:
                raise _wire.ProtocolError(
                    f"a frame's fence is not a fence: {exc}"
                ) from None
            buf.resv.add_fence(fence, Usage.WRITE)
        if self._last >= 0:
            self._dropped += seq - self._last - 1
        self._last = seq
        self._received += 1
        self._credits += 1
        frame = Frame(buf, self._welcome.layout, seq, timestamp, metadata, self, ident)
        self._held[seq] = frame
        self._busy.add(ident)
        return frame

    def _import(self, fd: int) -> DmaBuf:
        size = self._welcome.size
        try:
            st = os.fstat(fd)
        except OSError:
            raise _wire.ProtocolError("a buffer fd that is not open") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size < size:
            raise _wire.ProtocolError(
                f"a buffer fd of {st.st_size} bytes for a stream of {size}"
            )
        try:
            buf = get(fd)  # refuses what is not shareable memory; seals a memfd
        except DmaBufError as exc:
            raise _wire.ProtocolError(
                f"a buffer fd that is not a buffer: {exc}"
            ) from None
        if buf.size < size:  # an fd of a smaller buffer of this very process
            self._buffers[-1 - len(self._buffers)] = buf  # put at close
            raise _wire.ProtocolError(f"a buffer of {buf.size} bytes, not {size}")
        return buf

    # -- giving back --------------------------------------------------------------

    def _send(self, message: bytes, fds: list[int] | tuple[()] = ()) -> None:
        if self._closed or self._failed:
            return
        try:
            self._transport.send_nowait(message, fds)
        except _GONE:  # the publisher has gone: nobody to tell
            return

    def _flush_credits(self) -> None:
        if self._credits:
            credits, self._credits = self._credits, 0
            self._send(_wire.Credit(credits).encode())

    def _release_frame(self, frame: Frame, fence: Fence | None) -> None:
        seq = frame._seq
        self._held.pop(seq, None)
        ident = frame._token
        assert isinstance(ident, int)
        self._busy.discard(ident)
        credits, self._credits = self._credits, 0
        if fence is None or fence.signaled:
            self._send(_wire.encode_release(ident, False, seq, credits))
            return
        fds = [fence.export_fd()]
        try:
            self._send(_wire.encode_release(ident, True, seq, credits), fds)
        finally:
            _close_fds(fds)

    # -- what is going on, closing ----------------------------------------------------

    def statistics(self) -> SubscriberStatistics:
        """Return the subscriber's counters now."""
        return SubscriberStatistics(
            frames_received=self._received,
            frames_dropped=self._dropped,
            frames_held=len(self._held),
            buffers=sum(1 for k in self._buffers if k >= 0),
        )

    async def aclose(self) -> None:
        """Close the subscription: release every frame held, put every buffer.

        Frames still held are released (their buffers can no longer be read).
        """
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        self._closed = True
        for frame in self._held.values():
            frame._mark_released()
        self._held.clear()
        with anyio.CancelScope(shield=True):
            await self._transport.aclose()
            bufs, self._buffers = self._buffers, {}
            for buf in bufs.values():
                await buf.put()
        await anyio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return f"<Subscriber {self._received} frames received, {len(self._held)} held>"


def _check_peer(transport: Transport, allowed: frozenset[int]) -> None:
    peer = transport.peer
    if peer.uid not in allowed:
        raise InvalidArgument(f"the publisher (pid {peer.pid}) runs as uid {peer.uid}")


def _welcome(data: bytes, fds: list[int]) -> _wire.Welcome:
    try:
        welcome = _wire.decode(data, len(fds))
    finally:
        _close_fds(fds)
    if not isinstance(welcome, _wire.Welcome):
        raise _wire.ProtocolError("the publisher did not welcome the subscriber")
    return welcome


def _close_fds(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())
