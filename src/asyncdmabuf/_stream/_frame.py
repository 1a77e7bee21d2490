"""A frame: one buffer of a stream, lent to whoever holds the frame until released."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, final

from .._buffer import DmaBuf
from .._errors import InvalidArgument
from .._fence import Fence
from .._layout import FrameLayout

__all__ = ["Frame"]


class _Owner(Protocol):
    def _release_frame(self, frame: Frame, fence: Fence | None) -> None: ...


@final
class Frame:
    """A buffer of a stream with what came with it, until :meth:`release`.

    A publisher's :meth:`~Publisher.loan` gives one to fill and send; a
    subscriber receives them. ``async with frame:`` releases it on exit.
    """

    __slots__ = (
        "_buffer",
        "_layout",
        "_metadata",
        "_owner",
        "_released",
        "_seq",
        "_timestamp",
        "_token",
    )

    def __init__(
        self,
        buffer: DmaBuf,
        layout: FrameLayout | None,
        seq: int,
        timestamp: int,
        metadata: bytes,
        owner: _Owner,
        token: object,
    ) -> None:
        self._buffer = buffer
        self._layout = layout
        self._seq = seq
        self._timestamp = timestamp
        self._metadata = metadata
        self._owner = owner
        self._token = token
        self._released = False

    @property
    def buffer(self) -> DmaBuf:
        """The buffer holding the frame's bytes (the stream's, not the holder's)."""
        return self._buffer

    @property
    def layout(self) -> FrameLayout | None:
        """The stream's layout, or None for a stream of plain bytes."""
        return self._layout

    @property
    def seq(self) -> int:
        """The frame's number in its stream: 0, 1, 2... in send order (-1: not sent)."""
        return self._seq

    @property
    def timestamp(self) -> int:
        """The producer's timestamp in ns (``CLOCK_MONOTONIC`` unless it chose one)."""
        return self._timestamp

    @property
    def metadata(self) -> bytes:
        """The bytes the producer sent with the frame."""
        return self._metadata

    @property
    def released(self) -> bool:
        """True once the frame has been released (or sent, for a loan)."""
        return self._released

    def _mark_released(self) -> None:
        """Count the frame as given back (its owner did it: a send, a close)."""
        self._released = True

    def release(self, fence: Fence | None = None) -> None:
        """Give the frame back; never waits.

        Args:
            fence: A release fence: the holder's device still reads the buffer
                until it signals, and the buffer is not reused before.

        Raises:
            TypeError: ``fence`` is not a :class:`Fence` or None.
            InvalidArgument: The frame has already been released.
        """
        if fence is not None and not isinstance(fence, Fence):
            raise TypeError(f"a release fence is a Fence, not {type(fence).__name__}")
        if self._released:
            raise InvalidArgument(f"{self!r} has already been released")
        self._released = True
        self._owner._release_frame(self, fence)

    async def __aenter__(self) -> Frame:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Like the buffer's own async with: the undo has no checkpoint of its own.
        if not self._released:
            self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<Frame seq={self._seq} {self._buffer.size} bytes, {state}>"
