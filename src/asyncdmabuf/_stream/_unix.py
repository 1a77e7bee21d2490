"""The UNIX-socket transport: length-prefixed messages, fds by ``SCM_RIGHTS``.

Each message is one ``sendmsg``: a ``"<I"`` length, then the message, with its
fds as ancillary data. The kernel never joins the bytes of a ``sendmsg`` that
carries fds with those of a later one in the same read, so the fds that come
with a read belong to the message its last byte is part of. A peer that sends
a longer message than allowed, or more fds than fit, breaks the framing: the
transport reports :class:`InvalidArgument` and closes every fd it got.

On asyncio (and uvloop) the socket is watched by one reader callback for the
transport's life (``loop.add_reader`` once, not once per wait: each
registration costs the loop system calls), which reads what arrives: for
:meth:`UnixTransport.serve` it hands each message to the handler there and
then, with no task to wake; for :meth:`UnixTransport.receive` it wakes the
waiting task. Anywhere else (trio) a task waits with ``anyio.wait_readable``.
Either way a socket is read once per readiness: no read that finds nothing.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence

import anyio
import anyio.abc
import anyio.lowlevel

from .._backends import asyncio_loop, native_checkpoint, native_checkpoint_if_cancelled
from .._errors import Busy, InvalidArgument, from_oserror
from ._transport import MAX_FDS, MAX_MESSAGE, PeerCredentials

__all__ = ["UnixListener", "UnixTransport", "connect", "listen", "socket_address"]

_LENGTH = struct.Struct("<I")
_HEAD = _LENGTH.size
_unpack_length = _LENGTH.unpack_from
_PEERCRED = struct.Struct("3i")
_FD = array.array("i").itemsize
#: Room for this many fds in each read: enough to see a peer sending too many.
_FDS_PER_READ = MAX_FDS + 4
_READ_SIZE = 65536
#: Plain ints of the socket constants used per message: the enum forms cost
#: a Python-level ``__and__`` on every read.
_ANC_SIZE = socket.CMSG_SPACE(_FDS_PER_READ * _FD)
_CTRUNC = int(socket.MSG_CTRUNC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
#: Unsent bytes a transport queues before send_nowait refuses.
MAX_BACKLOG = 1 << 20
#: The most messages handed to a serve() handler at once (then the loop runs);
#: and the most a reader callback reads ahead for receive() before pausing.
_BATCH = 64

#: What serve() hands each message to: (message, fds); it owns the fds.
Handler = Callable[[bytes, list[int]], None]


def socket_address(path: str) -> str:
    """Return the socket address of ``path``: ``"@name"`` is abstract.

    Raises:
        TypeError: ``path`` is not a str.
        InvalidArgument: It is empty or holds a NUL.
    """
    if not isinstance(path, str):
        raise TypeError(f"a socket path is a str, not {type(path).__name__}")
    if not path or path == "@" or "\0" in path:
        raise InvalidArgument(f"{path!r} is not a socket path")
    return "\0" + path[1:] if path.startswith("@") else path


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


class UnixTransport:
    """A :class:`Transport` over a connected anyio UNIX socket stream."""

    __slots__ = (
        "_broken",
        "_buffer",
        "_checkpoint",
        "_closed",
        "_done",
        "_drained",
        "_eof",
        "_error",
        "_fd",
        "_handler",
        "_held",
        "_if_cancelled",
        "_loop",
        "_out",
        "_out_bytes",
        "_peer",
        "_ready",
        "_send_broke",
        "_send_lock",
        "_sock",
        "_stream",
        "_waiter",
        "_watching",
    )

    def __init__(self, stream: anyio.abc.UNIXSocketStream) -> None:
        if not isinstance(stream, anyio.abc.UNIXSocketStream):
            raise TypeError(f"a stream needs a UNIXSocketStream, not {stream!r}")
        self._stream = stream
        self._sock: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        try:
            raw = self._sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size
            )
        except OSError as exc:
            raise from_oserror(exc, "SO_PEERCRED") from None
        self._peer = PeerCredentials(*_PEERCRED.unpack(raw))
        self._buffer = bytearray()
        self._held: list[int] = []  # fds of the message in progress
        self._ready: deque[tuple[bytes, list[int]]] = deque()
        self._out: deque[tuple[memoryview, list[int]]] = deque()
        self._out_bytes = 0
        self._send_lock = anyio.Lock()
        self._eof = False
        self._broken: BaseException | None = None
        self._send_broke = False  # broken by a send only: what came can be read
        self._closed = False
        #: The last read found nothing: a receive() waits before reading again.
        self._drained = False
        #: The backend's own checkpoint, looked up once (the per-message path).
        self._checkpoint = native_checkpoint()
        self._if_cancelled = native_checkpoint_if_cancelled()
        self._fd = self._sock.fileno()
        #: The asyncio loop whose reader callback watches the socket (None:
        #: not asyncio, or a loop without add_reader: anyio.wait_readable).
        self._loop: asyncio.AbstractEventLoop | None = asyncio_loop()
        self._watching = False
        #: The task waiting in receive() (woken by the reader callback).
        self._waiter: asyncio.Future[None] | None = None
        #: serve()'s handler and the future its task waits on (asyncio).
        self._handler: Handler | None = None
        self._done: asyncio.Future[None] | None = None
        #: What the reader callback's read raised, for the next receive().
        self._error: BaseException | None = None

    @property
    def peer(self) -> PeerCredentials:
        """The peer's pid, uid and gid (``SO_PEERCRED``)."""
        return self._peer

    # -- sending ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._broken is not None:
            raise anyio.BrokenResourceError from self._broken

    def _check_readable(self) -> None:
        # A send that broke (the peer died with our credits unread) does not
        # stop us reading what it sent before: its end reads as the end.
        if self._closed:
            raise anyio.ClosedResourceError
        if self._broken is not None and not self._send_broke:
            raise anyio.BrokenResourceError from self._broken

    def send_nowait(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``message`` now, queueing what the socket cannot take yet."""
        if len(message) > MAX_MESSAGE or len(fds) > MAX_FDS:
            raise InvalidArgument(f"a message of {len(message)} bytes is too long")
        self._check_open()
        if self._out_bytes > MAX_BACKLOG:
            raise Busy("the peer is not reading: too many messages wait to be sent")
        framed = _LENGTH.pack(len(message)) + message
        data = memoryview(framed)
        if not self._out:
            sent = self._sendmsg(framed, fds)
            if sent == len(framed):
                return
            data = data[sent:]
            fds = () if sent else fds
        # The queue owns copies of the fds: the caller closes its own.
        copies: list[int] = []
        try:
            copies.extend(os.dup(fd) for fd in fds)
        except OSError as exc:
            _close_all(copies)
            raise from_oserror(exc, "dup") from None
        self._out.append((data, copies))
        self._out_bytes += len(data)

    def _sendmsg(self, data: bytes | memoryview, fds: Sequence[int]) -> int:
        """Send what the socket takes now; return how many bytes went."""
        try:
            if fds:
                anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))]
                return self._sock.sendmsg([data], anc, _DONTWAIT)
            return self._sock.send(data, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._broken = exc
            self._send_broke = True
            raise anyio.BrokenResourceError from exc

    def _flush_nowait(self) -> None:
        while self._out:
            data, fds = self._out[0]
            sent = self._sendmsg(data, fds)
            self._out_bytes -= sent
            if sent:
                _close_all(fds)  # they went with the first byte
            if sent < len(data):
                self._out[0] = (data[sent:], fds)
                return
            self._out.popleft()

    async def send(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``message``, waiting while the socket is full; a checkpoint."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        self.send_nowait(message, fds)
        waited = False
        if self._out:
            async with self._send_lock:
                while self._out:
                    self._check_open()
                    await anyio.wait_writable(self._sock)
                    waited = True
                    self._flush_nowait()
        if not waited:
            await anyio.lowlevel.cancel_shielded_checkpoint()

    # -- receiving ----------------------------------------------------------------

    def poll_nowait(self) -> bool:
        """Read what has arrived; True if :meth:`receive_nowait` would not be Busy.

        Nothing is taken: a whole message waits, or the end or an error is
        there to be raised. Errors of the read itself are raised now.
        """
        while not self._ready:
            if self._closed or self._eof or self._broken or self._error:
                return True
            if not self._read():
                self._drained = True
                return False
        return True

    def receive_nowait(self) -> tuple[bytes, list[int]]:
        """Return the next message if a whole one has arrived."""
        while not self._ready:
            self._raise_error()
            self._check_readable()
            if self._eof:
                self._end()
            if not self._read():
                self._drained = True
                raise Busy("no message has arrived")
        return self._ready.popleft()

    async def receive(self) -> tuple[bytes, list[int]]:
        """Wait for the next whole message; a checkpoint."""
        waited = bool(self._ready)
        if waited:
            await self._checkpoint()  # nothing taken yet: one yield
        else:
            await self._if_cancelled()
        while not self._ready:
            self._raise_error()
            self._check_readable()
            if self._eof:
                self._end()
            # Right after a read that found nothing, wait first: one recvmsg
            # that would fail again is saved.
            if self._drained or not self._read():
                self._drained = False
                if self._loop is None:
                    await anyio.wait_readable(self._sock)
                else:
                    await self._wait_watched()
                waited = True
        if not waited:
            await anyio.lowlevel.cancel_shielded_checkpoint()
            if not self._ready:  # closed meanwhile: what had arrived was dropped
                self._check_readable()
                return await self.receive()
        return self._ready.popleft()

    async def _wait_watched(self) -> None:
        """Wait until the reader callback has read something (asyncio)."""
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._watch()
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None

    async def serve(self, handle: Handler) -> None:
        """Hand every message to ``handle(message, fds)`` as it arrives.

        ``handle`` is a plain function that owns the fds; what it raises ends
        the serving and is raised here. On asyncio it runs in the loop's
        reader callback, as soon as a read brings a message, with no task to
        wake. A checkpoint; it returns only by raising.

        Raises:
            anyio.EndOfStream: The peer closed between messages.
            The errors of :meth:`receive` and of ``handle`` otherwise.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._handler is not None or self._waiter is not None:
            raise anyio.BusyResourceError("receiving from")
        if self._loop is None:
            await self._serve_waiting(handle)
            return
        done = self._done = self._loop.create_future()
        self._handler = handle
        try:
            self._serve_ready()  # what came before
            if not done.done():
                self._watch()
            await done
        finally:
            self._handler = self._done = None
            self._unwatch()

    async def _serve_waiting(self, handle: Handler) -> None:
        """serve() with a task that waits for the socket (trio)."""
        while True:
            count = 0
            while self._ready:
                if count == _BATCH:  # a bounded batch between two checkpoints
                    await self._checkpoint()
                    count = 0
                    continue
                handle(*self._ready.popleft())
                count += 1
            self._check_readable()
            if self._eof:
                self._end()
            await anyio.wait_readable(self._sock)
            self._read()

    def _serve_ready(self) -> None:
        """Hand a batch of what has arrived to serve()'s handler (asyncio)."""
        ready = self._ready
        handle = self._handler
        for _ in range(_BATCH):
            if not ready or self._handler is None:
                break
            assert handle is not None
            handle(*ready.popleft())
        else:
            if ready and self._handler is not None:  # more: let the loop run first
                assert self._loop is not None
                self._unwatch()
                self._loop.call_soon(self._serve_more)
                return
        self._check_readable()
        if self._eof:
            self._end()

    def _serve_more(self) -> None:
        if self._handler is None:
            return
        try:
            self._serve_ready()
            if not self._ready:
                self._watch()
        except Exception as exc:
            self._stop_serving(exc)

    def _stop_serving(self, exc: BaseException) -> None:
        self._unwatch()
        done = self._done
        if done is not None and not done.done():
            done.set_exception(exc)

    def _watch(self) -> None:
        if not self._watching and not self._closed:
            assert self._loop is not None
            self._loop.add_reader(self._fd, self._on_readable)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            assert self._loop is not None
            self._loop.remove_reader(self._fd)

    def _on_readable(self) -> None:
        """The loop saw the socket readable: read once, then hand it on."""
        if self._handler is not None:
            try:
                if self._read():
                    self._serve_ready()
            except Exception as exc:
                self._stop_serving(exc)
            return
        try:
            if not self._read():
                return
        except Exception as exc:  # for the receive() that comes next
            self._error = exc
        if self._eof or self._error or self._broken or len(self._ready) >= _BATCH:
            self._unwatch()  # nothing more to read for now: not at every turn
        if self._ready or self._eof or self._error or self._broken:
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _end(self) -> None:
        if self._buffer or self._held:
            _close_all(self._held)
            self._buffer.clear()
            raise anyio.BrokenResourceError("the peer closed in mid-message")
        raise anyio.EndOfStream

    def _read(self) -> bool:
        """Read what is there; return False if nothing was."""
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(
                _READ_SIZE, _ANC_SIZE, _DONTWAIT
            )
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionResetError:
            # The peer closed with our messages unread (it died, say): the
            # end of the stream, or a break if it was in mid-message.
            self._eof = True
            return True
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ENOTCONN):
                self._broken, self._send_broke = exc, False
                raise anyio.BrokenResourceError from exc
            raise from_oserror(exc, "recvmsg") from None
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % _FD])
                fds.extend(received)
        if not data and not fds:
            self._eof = True
            return True
        try:
            _check_read(data, fds, flags)
            self._split(data, fds)
        except BaseException:
            _close_all(fds)
            self._fail()
            raise
        return True

    def _split(self, data: bytes, fds: list[int]) -> None:
        """Cut whole messages off what came; ``fds`` go with the last one touched."""
        buffer = self._buffer
        if buffer:  # the start of a message came with an earlier read
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        size = len(data)
        pos = 0
        ready = self._ready
        while size - pos >= _HEAD:
            (length,) = _unpack_length(data, pos)
            if length > MAX_MESSAGE:
                raise InvalidArgument(f"a message of {length} bytes is too long")
            start = pos + _HEAD
            end = start + length
            if end > size:
                break
            mine = self._held
            self._held = []
            if end == size:
                mine += fds
                fds = []
            ready.append((data[start:end], mine))
            pos = end
        if pos < size:
            buffer += data[pos:]
        self._held += fds
        if len(self._held) > MAX_FDS:
            raise InvalidArgument("too many fds for one message")

    def _fail(self) -> None:
        _close_all(self._held)
        while self._ready:
            _close_all(self._ready.popleft()[1])
        self._buffer.clear()
        self._broken = InvalidArgument("the peer broke the framing")
        self._send_broke = False

    # -- closing ------------------------------------------------------------------

    def close_nowait(self) -> None:
        """Close the socket and every fd still held, at once."""
        if self._closed:
            return
        self._closed = True
        self._fail()
        while self._out:
            _close_all(self._out.popleft()[1])
        self._out_bytes = 0
        self._unwatch()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # it finds the transport closed
        self._stop_serving(anyio.ClosedResourceError())
        anyio.notify_closing(self._sock)  # wakes a task waiting on it, on any loop
        self._sock.close()

    async def aclose(self) -> None:
        """Close the transport; a checkpoint."""
        self.close_nowait()
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()
        await anyio.lowlevel.checkpoint()


def _check_read(data: bytes, fds: list[int], flags: int) -> None:
    if flags & _CTRUNC or len(fds) > MAX_FDS:
        raise InvalidArgument(f"the peer sent {len(fds)} or more fds at once")
    if not data:
        raise InvalidArgument("fds arrived without a message")


class UnixListener:
    """A :class:`Listener` on a UNIX socket path (``"@name"``: abstract)."""

    __slots__ = ("_listener", "_path")

    def __init__(self, listener: anyio.abc.SocketListener, path: str) -> None:
        self._listener = listener
        self._path = path

    async def accept(self) -> UnixTransport:
        """Wait for the next subscriber to connect."""
        stream = await self._listener.accept()
        assert isinstance(stream, anyio.abc.UNIXSocketStream)
        try:
            return UnixTransport(stream)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise

    async def aclose(self) -> None:
        """Stop listening and remove the socket file (not an abstract name)."""
        with anyio.CancelScope(shield=True):
            await self._listener.aclose()
        if not self._path.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


async def listen(path: str) -> UnixListener:
    """Listen on ``path`` (``"@name"`` for the abstract namespace).

    Raises:
        TypeError, InvalidArgument: A bad path.
        DmaBufError: The socket cannot be bound (``EADDRINUSE``, ``EACCES``...).
    """
    address = socket_address(path)
    try:
        listener = await anyio.create_unix_listener(address)
    except OSError as exc:
        raise from_oserror(exc, f"listening on {path!r}") from None
    return UnixListener(listener, address)


async def connect(path: str) -> UnixTransport:
    """Connect to ``path`` (``"@name"`` for the abstract namespace).

    Raises:
        TypeError, InvalidArgument: A bad path.
        DmaBufError: Nobody listens there (``ECONNREFUSED``, ``ENOENT``...).
    """
    address = socket_address(path)
    try:
        stream = await anyio.connect_unix(address)
    except OSError as exc:
        raise from_oserror(exc, f"connecting to {path!r}") from None
    try:
        return UnixTransport(stream)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
