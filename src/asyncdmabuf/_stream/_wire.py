"""The messages of a stream, and their checks.

Every message begins ``"<BB"``: the protocol version and the message kind,
then a fixed record for the kind, then (FRAME, WELCOME) a variable tail. A
message that is not exactly what its kind says, or whose fds are not the ones
its flags announce, is a :class:`ProtocolError`; the receiver closes the fds
and drops the peer.

====  =========  ===============================================  ===============
kind  direction  record                                           fds
====  =========  ===============================================  ===============
1     S -> P     SUBSCRIBE queue u32, overflow u8                 none
2     P -> S     WELCOME buffers u16, history u16, size u64,      none
                 then a layout (or nothing)
3     P -> S     FRAME buffer u16, flags u8, seq u64, ts i64,     buffer? fence?
                 metadata (u16 length + bytes)
4     S -> P     RELEASE buffer u16, flags u8, seq u64,           fence?
                 credits u32
5     S -> P     CREDIT credits u32                               none
====  =========  ===============================================  ===============
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from .._errors import InvalidArgument
from .._layout import MAX_PLANES, FrameLayout, Plane

__all__ = [
    "Credit",
    "FrameMessage",
    "ProtocolError",
    "Release",
    "Subscribe",
    "Welcome",
    "decode",
]

VERSION: Final = 1
SUBSCRIBE, WELCOME, FRAME, RELEASE, CREDIT = 1, 2, 3, 4, 5

#: FRAME flags: the buffer's fd comes with it (its first frame to this
#: subscriber); an acquire fence's fd comes with it (after the buffer's).
HAS_BUFFER: Final = 0x01
HAS_FENCE: Final = 0x02

OVERFLOWS: Final = ("block", "drop-oldest")
MAX_BUFFERS: Final = 256
MAX_QUEUE: Final = 1024
MAX_METADATA: Final = 4096

_HEAD = struct.Struct("<BB")
_SUBSCRIBE = struct.Struct("<BBIB")
_WELCOME = struct.Struct("<BBHHQB")
_LAYOUT = struct.Struct("<IIIQB")
_PLANE = struct.Struct("<QI")
_FRAME = struct.Struct("<BBHBQqH")
_RELEASE = struct.Struct("<BBHBQI")
_CREDIT = struct.Struct("<BBI")


class ProtocolError(InvalidArgument):
    """A peer sent something that is not a valid stream message."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    queue: int
    overflow: str

    def encode(self) -> bytes:
        return _SUBSCRIBE.pack(
            VERSION, SUBSCRIBE, self.queue, OVERFLOWS.index(self.overflow)
        )


@dataclass(frozen=True, slots=True)
class Welcome:
    buffers: int
    history: int
    size: int
    layout: FrameLayout | None

    def encode(self) -> bytes:
        head = _WELCOME.pack(
            VERSION,
            WELCOME,
            self.buffers,
            self.history,
            self.size,
            self.layout is not None,
        )
        if self.layout is None:
            return head
        lay = self.layout
        return b"".join(
            [
                head,
                _LAYOUT.pack(
                    lay.code, lay.width, lay.height, lay.modifier, len(lay.planes)
                ),
                *(_PLANE.pack(p.offset, p.stride) for p in lay.planes),
            ]
        )


@dataclass(frozen=True, slots=True)
class FrameMessage:
    buffer: int
    flags: int
    seq: int
    timestamp: int
    metadata: bytes

    def encode(self) -> bytes:
        return encode_frame(
            self.buffer, self.flags, self.seq, self.timestamp, self.metadata
        )

    @property
    def fds(self) -> int:
        return bool(self.flags & HAS_BUFFER) + bool(self.flags & HAS_FENCE)


@dataclass(frozen=True, slots=True)
class Release:
    buffer: int
    fence: bool
    seq: int
    credits: int

    def encode(self) -> bytes:
        return encode_release(self.buffer, self.fence, self.seq, self.credits)


@dataclass(frozen=True, slots=True)
class Credit:
    credits: int

    def encode(self) -> bytes:
        return _CREDIT.pack(VERSION, CREDIT, self.credits)


Message = Subscribe | Welcome | FrameMessage | Release | Credit


def encode_frame(
    buffer: int, flags: int, seq: int, timestamp: int, metadata: bytes
) -> bytes:
    """Return a FRAME message (what :meth:`FrameMessage.encode` returns)."""
    head = _FRAME.pack(VERSION, FRAME, buffer, flags, seq, timestamp, len(metadata))
    return head + metadata if metadata else head


def decode_frame(data: bytes, nfds: int) -> tuple[int, int, int, int, bytes] | None:
    """Return a FRAME's ``(buffer, flags, seq, timestamp, metadata)``; None if not one.

    The per-frame path: no message object. Checked as :func:`decode` does.

    Raises:
        ProtocolError: A FRAME that is not valid, or not with its fds.
    """
    if len(data) < 2 or data[1] != FRAME or data[0] != VERSION:
        return None
    if len(data) < _FRAME.size:
        raise ProtocolError(f"a FRAME message of {len(data)} bytes")
    _, _, buffer, flags, seq, ts, length = _FRAME.unpack_from(data)
    if flags & ~(HAS_BUFFER | HAS_FENCE) or length > MAX_METADATA:
        raise ProtocolError(f"FRAME flags {flags:#x}, metadata of {length} bytes")
    if len(data) != _FRAME.size + length:
        raise ProtocolError("a FRAME's metadata does not match its length")
    expected = (flags & HAS_BUFFER) + (flags >> 1)
    if nfds != expected:
        raise ProtocolError(f"a message that carries {expected} fds came with {nfds}")
    return buffer, flags, seq, ts, data[_FRAME.size :] if length else b""


def encode_release(buffer: int, fence: bool, seq: int, credits: int) -> bytes:
    """Return a RELEASE message (what :meth:`Release.encode` returns)."""
    flags = HAS_FENCE if fence else 0
    return _RELEASE.pack(VERSION, RELEASE, buffer, flags, seq, credits)


def decode_release(data: bytes, nfds: int) -> tuple[int, bool, int, int] | None:
    """Return a RELEASE's ``(buffer, fence, seq, credits)``; None if not one.

    The per-frame path: no message object. Checked as :func:`decode` does.

    Raises:
        ProtocolError: A RELEASE that is not valid, or not with its fds.
    """
    if len(data) != _RELEASE.size or data[1] != RELEASE:
        return None
    version, _, buffer, flags, seq, credits = _RELEASE.unpack(data)
    if version != VERSION:
        return None  # decode() says why
    if flags & ~HAS_FENCE:
        raise ProtocolError(f"RELEASE flags {flags:#x}")
    expected = 1 if flags else 0
    if nfds != expected:
        raise ProtocolError(f"a message that carries {expected} fds came with {nfds}")
    return buffer, bool(flags), seq, credits


def _exact(data: bytes, record: struct.Struct, what: str) -> tuple[int, ...]:
    if len(data) != record.size:
        raise ProtocolError(f"a {what} message of {len(data)} bytes, not {record.size}")
    return record.unpack(data)


def decode(data: bytes, nfds: int) -> Message:
    """Return the message in ``data``, which came with ``nfds`` fds.

    Raises:
        ProtocolError: Not a valid message of this version, or not the fds
            it announces.
    """
    if len(data) < _HEAD.size:
        raise ProtocolError(f"a message of {len(data)} bytes")
    version, kind = _HEAD.unpack_from(data)
    if version != VERSION:
        raise ProtocolError(f"stream protocol version {version}, not {VERSION}")
    message: Message
    expected = 0
    if kind == SUBSCRIBE:
        _, _, queue, overflow = _exact(data, _SUBSCRIBE, "SUBSCRIBE")
        if not 1 <= queue <= MAX_QUEUE or overflow >= len(OVERFLOWS):
            raise ProtocolError(f"SUBSCRIBE with queue {queue}, overflow {overflow}")
        message = Subscribe(queue, OVERFLOWS[overflow])
    elif kind == WELCOME:
        message = _decode_welcome(data)
    elif kind == FRAME:
        frame = decode_frame(data, nfds)
        assert frame is not None
        return FrameMessage(*frame)
    elif kind == RELEASE:
        _exact(data, _RELEASE, "RELEASE")
        release = decode_release(data, nfds)
        assert release is not None
        return Release(*release)
    elif kind == CREDIT:
        (_, _, credits) = _exact(data, _CREDIT, "CREDIT")
        message = Credit(credits)
    else:
        raise ProtocolError(f"unknown message kind {kind}")
    if nfds != expected:
        raise ProtocolError(f"a message that carries {expected} fds came with {nfds}")
    return message


def _decode_welcome(data: bytes) -> Welcome:
    if len(data) < _WELCOME.size:
        raise ProtocolError(f"a WELCOME message of {len(data)} bytes")
    _, _, buffers, history, size, has_layout = _WELCOME.unpack_from(data)
    if not 1 <= buffers <= MAX_BUFFERS or history >= buffers or size < 1:
        raise ProtocolError(f"WELCOME for {buffers} buffers, history {history}")
    if has_layout not in (0, 1):
        raise ProtocolError("a bad WELCOME layout flag")
    layout = None
    if has_layout:
        tail = data[_WELCOME.size :]
        if len(tail) < _LAYOUT.size:
            raise ProtocolError("a WELCOME layout cut short")
        code, width, height, modifier, nplanes = _LAYOUT.unpack_from(tail)
        if nplanes > MAX_PLANES or len(tail) != _LAYOUT.size + nplanes * _PLANE.size:
            raise ProtocolError(f"a WELCOME layout of {nplanes} planes is malformed")
        planes = [
            _PLANE.unpack_from(tail, _LAYOUT.size + i * _PLANE.size)
            for i in range(nplanes)
        ]
        try:
            layout = FrameLayout(
                code, width, height, [Plane(o, s) for o, s in planes], modifier
            )
        except (TypeError, InvalidArgument) as exc:
            raise ProtocolError(f"a WELCOME layout is not valid: {exc}") from None
        if layout.size > size:
            raise ProtocolError(
                f"the layout needs {layout.size} bytes, the buffers have {size}"
            )
    elif len(data) != _WELCOME.size:
        raise ProtocolError("a WELCOME without a layout has a tail")
    return Welcome(buffers, history, size, layout)
