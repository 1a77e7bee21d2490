"""Sharing buffers with another process over a UNIX socket stream.

A share is one message: the buffer's fd (``SCM_RIGHTS``) and, with it, a small
versioned record, all sent by a single ``sendmsg``::

    header  "<4sBBHI"  magic b"ADMB", version 1, flags, reserved 0, body length
    body    "<Q"       size in bytes
            3 x "<H"-length-prefixed UTF-8 strings: name, exporter name, format

The receiver trusts nothing in it: it reads exactly the header and the body the
header announces with its own ``recvmsg`` (``MSG_CMSG_CLOEXEC``), collects every
fd of every control message on the way (credentials a ``SO_PASSCRED`` socket
adds are ignored; control data cut short is refused), checks the record, the fd
(classified once by :func:`classify`: shareable memory, sealed against resizing,
at least as large as the record claims) and the peer's credentials, and closes
every fd it was given. The bytes themselves are never copied: both processes map
the same pages.

A read-only share sends a new open file description of the buffer's file made
with ``O_RDONLY`` (a reopen of ``/proc/self/fd/N``): the peer cannot ``write()``
it, map it writable or ``mprotect`` a mapping of it to writable, while the owner
keeps writing through its own mapping. ``F_SEAL_FUTURE_WRITE`` is not used: a seal
belongs to the file, not to one fd, so it would forbid every later writable
share and every new writable mapping of the owner's too. The reopen drops the
file's group and other write permission bits, so a peer running as another
(unprivileged) uid cannot reopen its fd read-write through ``/proc``; a peer with
the same uid, or root, could, and must be trusted not to.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import stat
import struct
import weakref
from dataclasses import dataclass

import anyio
import anyio.abc
import anyio.lowlevel

from . import _fd
from ._buffer import DmaBuf, get_classified
from ._errors import InvalidArgument, from_oserror
from ._fd import seal_against_resizing
from ._fdkind import FdInfo, FdKind, classify
from ._validate import check_bool, check_name

__all__ = ["ShareInfo", "receive_buffer", "receive_buffer_with_info", "send_buffer"]

MAGIC = b"ADMB"
VERSION = 1
#: The peer may write through its fd.
FLAG_WRITABLE = 0x01
_KNOWN_FLAGS = FLAG_WRITABLE

_HEADER = struct.Struct("<4sBBHI")
_SIZE = struct.Struct("<Q")
_STRLEN = struct.Struct("<H")

#: Longest exporter name sent (longer ones are cut at a character boundary).
MAX_EXPORTER = 64
#: Longest format string a share may carry, in bytes of UTF-8.
MAX_FORMAT = 1024
#: Longest body a receiver accepts; anything longer is not a share.
MAX_BODY = _SIZE.size + 3 * _STRLEN.size + 32 + MAX_EXPORTER + MAX_FORMAT
#: How many fds one receive collects; a message with more than one is refused
#: (the kernel closes any beyond this many when it truncates the control data).
_MAX_FDS = 16

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_FD_SIZE = array.array("i").itemsize
#: Room for the fds of one read and the credentials a SO_PASSCRED socket adds.
_ANCILLARY = socket.CMSG_SPACE(_MAX_FDS * _FD_SIZE) + socket.CMSG_SPACE(_PEERCRED.size)


@dataclass(frozen=True, slots=True)
class ShareInfo:
    """What came with a received buffer: the sender's record and who sent it."""

    size: int
    name: str | None
    """The sender's name for the buffer, or None."""
    exporter: str
    """The name of the sender's exporter (the receiver's is the importer)."""
    format: str | None
    """The format string the sender attached, or None."""
    writable: bool
    """Whether the fd received allows writing (False for a read-only share)."""
    pid: int
    """The peer's pid, uid and gid when the socket was connected (SO_PEERCRED)."""
    uid: int
    gid: int


# -- sending ------------------------------------------------------------------------


async def send_buffer(
    stream: anyio.abc.UNIXSocketStream,
    buf: DmaBuf,
    *,
    writable: bool = True,
    format: str | None = None,
) -> None:
    """Send ``buf`` to the peer of ``stream``: its fd and its metadata, no bytes.

    The buffer keeps its refcount: the peer's :func:`receive_buffer` takes a
    reference of its own. With ``writable=False`` the peer receives an fd that
    can only read. If the send fails or is cancelled part way, the stream is
    out of step and should be closed.

    Args:
        stream: A connected UNIX socket stream.
        buf: A live buffer whose file holds its bytes (a memfd or a dma-buf).
        writable: Whether the peer may write to the buffer.
        format: A string for the receiver (a pixel format, say), at most
            1024 bytes of UTF-8.

    Raises:
        TypeError: An argument has the wrong type.
        InvalidArgument: The buffer has been released, has no shareable memory
            (its exporter keeps its bytes elsewhere), cannot be sealed against
            resizing or cannot be reopened read-only, or is read-only here and
            ``writable`` is True; or ``format`` is too long.
        anyio.BrokenResourceError: The peer has gone.
    """
    if not isinstance(stream, anyio.abc.UNIXSocketStream):
        raise TypeError(f"send_buffer() needs a UNIXSocketStream, not {_tn(stream)}")
    if not isinstance(buf, DmaBuf):
        raise TypeError(f"send_buffer() needs a DmaBuf, not {_tn(buf)}")
    check_bool(writable, "writable")
    if format is not None and not isinstance(format, str):
        raise TypeError(f"format must be a str or None, not {_tn(format)}")
    format_bytes = _encode(format, "format", MAX_FORMAT)
    if not buf.released and not buf.shared:
        # Its exporter keeps the bytes elsewhere; do not make it an empty file.
        raise InvalidArgument(f"{buf!r} has no shareable memory")
    fd = buf.fd()  # raises InvalidArgument once released
    try:
        info = classify(fd)
        _check_sendable(fd, info, buf)
        if writable and not info.writable:
            raise InvalidArgument(f"{buf!r} is read-only here: share it writable=False")
        if not writable:
            fd = _reopen_read_only(fd, info)
        record = _pack(buf, writable, format_bytes)
        await stream.send_fds(record, [fd])
    finally:
        os.close(fd)


def _check_sendable(fd: int, info: FdInfo, buf: DmaBuf) -> None:
    if not info.memory or info.size < buf.size:
        raise InvalidArgument(
            f"{buf!r} has no shareable memory: its exporter "
            f"{buf.exporter.name!r} does not keep its bytes in its file"
        )
    if info.kind is FdKind.MEMFD:
        seal_against_resizing(fd, info.seals or 0)


def _reopen_read_only(fd: int, info: FdInfo) -> int:
    """Close ``fd`` and return a new ``O_RDONLY`` open file of the same file."""
    try:
        try:
            ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot reopen fd {fd} read-only ({os.strerror(exc.errno or 0)}), "
                "so it cannot be shared read-only"
            ) from None
        if _fd.file_identity(ro)[:2] != info.key:
            os.close(ro)
            raise InvalidArgument(f"reopening fd {fd} read-only gave another file")
        if info.mode & (stat.S_IWGRP | stat.S_IWOTH):
            # Best effort: without these bits another unprivileged uid cannot
            # reopen its read-only fd read-write through /proc.
            with contextlib.suppress(OSError):
                os.fchmod(ro, stat.S_IMODE(info.mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
        return ro
    finally:
        os.close(fd)


def _pack(buf: DmaBuf, writable: bool, format_bytes: bytes | None) -> bytes:
    name = _encode(buf.name, "name", 32)
    exporter = _truncate(buf.exporter.name.encode("utf-8", "replace"), MAX_EXPORTER)
    body = [_SIZE.pack(buf.size)]
    for field in (name, exporter, format_bytes):
        data = b"" if field is None else field
        body += [_STRLEN.pack(len(data)), data]
    # An absent name or format travels as an empty string.
    payload = b"".join(body)
    flags = FLAG_WRITABLE if writable else 0
    return _HEADER.pack(MAGIC, VERSION, flags, 0, len(payload)) + payload


def _encode(text: str | None, what: str, limit: int) -> bytes | None:
    if text is None:
        return None
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} {text!r} is not valid UTF-8") from None
    if len(data) > limit:
        raise InvalidArgument(f"{what} is {len(data)} bytes of UTF-8, at most {limit}")
    return data


def _truncate(data: bytes, limit: int) -> bytes:
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


# -- receiving ----------------------------------------------------------------------


async def receive_buffer(
    stream: anyio.abc.UNIXSocketStream, *, require_same_uid: bool = False
) -> DmaBuf:
    """Receive a buffer sent with :func:`send_buffer`; the caller owns one reference.

    Memory from another process is imported as a new buffer (refcount 1) whose
    bytes are the sender's: nothing is copied. A buffer that already lives in
    this process comes back as the same object, with one more reference.

    Args:
        stream: A connected UNIX socket stream.
        require_same_uid: Refuse a peer whose uid (``SO_PEERCRED``) is not
            this process's effective uid.

    Raises:
        TypeError: ``stream`` is not a UNIX socket stream.
        InvalidArgument: The peer's uid differs when it must not; the message
            is not a share (bad magic, version, flags or lengths, garbage,
            cut short by the peer closing); it carries no fd or more than one;
            the fd is not shareable memory, cannot be kept from resizing, or is
            smaller than claimed. Every fd received is closed, and the stream
            is out of step and should be closed.
        anyio.EndOfStream: The peer closed the stream before a message began.
        anyio.BrokenResourceError: The connection broke.
        anyio.BusyResourceError: Another task is receiving from ``stream``.
    """
    buf, _ = await receive_buffer_with_info(stream, require_same_uid=require_same_uid)
    return buf


async def receive_buffer_with_info(
    stream: anyio.abc.UNIXSocketStream, *, require_same_uid: bool = False
) -> tuple[DmaBuf, ShareInfo]:
    """Like :func:`receive_buffer`, and also return the record that came with it.

    Raises:
        The same as :func:`receive_buffer`.
    """
    if not isinstance(stream, anyio.abc.UNIXSocketStream):
        raise TypeError(f"receive_buffer() needs a UNIXSocketStream, not {_tn(stream)}")
    check_bool(require_same_uid, "require_same_uid")
    peer = _peer_of(stream)
    await anyio.lowlevel.checkpoint()
    if require_same_uid and peer.uid != os.geteuid():
        raise InvalidArgument(
            f"the peer (pid {peer.pid}) runs as uid {peer.uid}, not {os.geteuid()}"
        )
    if peer.receiving:
        raise anyio.BusyResourceError("receiving from")
    peer.receiving = True
    fds: list[int] = []
    try:
        header = await _receive_exactly(peer.sock, _HEADER.size, fds, first=True)
        magic, version, flags, reserved, length = _HEADER.unpack(header)
        if magic != MAGIC:
            raise InvalidArgument(f"not a buffer share: magic {magic!r}")
        if version != VERSION:
            raise InvalidArgument(f"unsupported share version {version}")
        if flags & ~_KNOWN_FLAGS or reserved:
            raise InvalidArgument(f"unknown share flags {flags:#x}/{reserved:#x}")
        if not _SIZE.size + 3 * _STRLEN.size <= length <= MAX_BODY:
            raise InvalidArgument(f"a share record of {length} bytes is malformed")
        body = await _receive_exactly(peer.sock, length, fds, first=False)
        size, name, exporter, fmt = _unpack_body(body)
        if len(fds) != 1:
            raise InvalidArgument(f"a share carries one fd, this one {len(fds)}")
        buf, writable = _import(fds[0], size, bool(flags & FLAG_WRITABLE))
    finally:
        peer.receiving = False
        for fd in fds:
            os.close(fd)
    if buf.size != size:
        with anyio.CancelScope(shield=True):
            await buf.put()
        raise InvalidArgument(
            f"the peer claims {size} bytes, the buffer has {buf.size}"
        )
    if buf.refcount == 1 and buf.name is None and name is not None:
        buf.set_name(name)  # a new import: give it the sender's name
    info = ShareInfo(size, name, exporter, fmt, writable, peer.pid, peer.uid, peer.gid)
    return buf, info


@dataclass(slots=True)
class _Peer:
    sock: socket.socket
    pid: int
    uid: int
    gid: int
    receiving: bool = False
    """A receive is reading from the stream: a second one would interleave."""


#: A stream's socket and its peer's credentials, which never change once
#: connected: looked up once per stream, not once per share.
_peers: weakref.WeakKeyDictionary[anyio.abc.UNIXSocketStream, _Peer] = (
    weakref.WeakKeyDictionary()
)


def _peer_of(stream: anyio.abc.UNIXSocketStream) -> _Peer:
    peer = _peers.get(stream)
    if peer is None:
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        except OSError as exc:
            raise from_oserror(exc, "SO_PEERCRED") from None
        peer = _peers[stream] = _Peer(sock, *_PEERCRED.unpack(raw))
    return peer


async def _receive_some(sock: socket.socket, count: int, fds: list[int]) -> bytes:
    """Read up to ``count`` bytes, waiting until some come (or the peer closes).

    Every fd of every control message is added to ``fds`` before anything is
    checked, so that the caller closes each of them whatever happens next.
    Control messages other than ``SCM_RIGHTS`` (the ``SCM_CREDENTIALS`` a
    ``SO_PASSCRED`` socket gets with every read) carry no fd and are ignored.

    Raises:
        InvalidArgument: The control data was cut short (more fds than a share
            can carry); what did arrive is in ``fds``.
        anyio.ClosedResourceError: This end of the stream is closed.
        anyio.BrokenResourceError: The connection broke.
    """
    while True:
        try:
            data, ancdata, msg_flags, _ = sock.recvmsg(
                count, _ANCILLARY, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        except OSError as exc:
            if sock.fileno() < 0:
                raise anyio.ClosedResourceError from None
            raise anyio.BrokenResourceError from exc
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                fds.extend(received)
        if msg_flags & socket.MSG_CTRUNC:
            raise InvalidArgument("a share came with more fds than one share carries")
        if not data and ancdata:
            raise InvalidArgument("fds arrived without a share record")
        return data


async def _receive_exactly(
    sock: socket.socket, count: int, fds: list[int], *, first: bool
) -> bytes:
    """Read exactly ``count`` bytes, adding every fd that comes with them to ``fds``.

    Raises:
        anyio.EndOfStream: ``first`` and the peer closed before a byte came.
        InvalidArgument: The peer closed in mid-message, or see
            :func:`_receive_some`.
    """
    chunks: list[bytes] = []
    remaining = count
    while remaining:
        data = await _receive_some(sock, remaining, fds)
        if not data:
            if first and remaining == count and not fds:
                raise anyio.EndOfStream
            raise InvalidArgument("the peer closed the stream in mid-message")
        chunks.append(data)
        remaining -= len(data)
    return b"".join(chunks)


def _unpack_body(body: bytes) -> tuple[int, str | None, str, str | None]:
    (size,) = _SIZE.unpack_from(body)
    offset = _SIZE.size
    fields: list[str] = []
    for what, limit in (
        ("name", 32),
        ("exporter", MAX_EXPORTER),
        ("format", MAX_FORMAT),
    ):
        if offset + _STRLEN.size > len(body):
            raise InvalidArgument("a share record is cut short")
        (length,) = _STRLEN.unpack_from(body, offset)
        offset += _STRLEN.size
        if length > limit or offset + length > len(body):
            raise InvalidArgument(f"a share record's {what} has a bad length {length}")
        try:
            fields.append(body[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgument(f"a share record's {what} is not UTF-8") from None
        offset += length
    if offset != len(body):
        raise InvalidArgument(f"a share record has {len(body) - offset} stray bytes")
    if size <= 0:
        raise InvalidArgument("a share record claims an empty buffer")
    name, exporter, fmt = fields
    return size, check_name(name or None), exporter, fmt or None


def _import(fd: int, size: int, writable: bool) -> tuple[DmaBuf, bool]:
    """Check ``fd`` against the record; return its buffer (a new reference).

    Also return whether the fd lets its holder write (not if it is read-only
    or the memfd is sealed against writes).
    """
    info = classify(fd)
    if not info.memory:
        raise InvalidArgument(
            f"the fd received is not shareable memory ({info.kind.value})"
        )
    if size > info.size:
        raise InvalidArgument(
            f"the peer claims {size} bytes, the file it sent holds {info.size}"
        )
    if writable != (info.access == os.O_RDWR):
        raise InvalidArgument(
            "the share's writable flag does not match the fd's access mode"
        )
    try:
        buf = get_classified(fd, info)
    except OSError as exc:
        if isinstance(exc, InvalidArgument):
            raise
        # A file the importer cannot map (ENOMEM, EACCES...) is not a usable share.
        raise InvalidArgument(f"the fd received cannot be imported: {exc}") from None
    return buf, info.writable


def _tn(obj: object) -> str:
    return type(obj).__name__
