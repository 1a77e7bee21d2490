"""The seam between streams and what carries their messages.

Publishers and subscribers speak to a :class:`Transport` only: whole messages,
each with the fds that travel with it, in order, and the credentials of the
peer. The UNIX-socket transport (``_unix.py``) is one; a transport between
hosts would carry the same messages and replace fds with its own handles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Listener", "PeerCredentials", "Transport"]

#: The longest message any transport must carry, in bytes.
MAX_MESSAGE = 8192
#: The most fds that travel with one message.
MAX_FDS = 2


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is at the other end: as ``SO_PEERCRED`` reports it when connected."""

    pid: int
    uid: int
    gid: int


class Transport(Protocol):
    """A connection that carries whole messages, with fds, in order.

    ``receive`` and ``receive_nowait`` return a message and the fds that came
    with it, which the caller then owns; ``send`` and ``send_nowait`` leave
    the fds given the caller's (the transport sends copies).
    """

    @property
    def peer(self) -> PeerCredentials:
        """The peer's credentials."""
        ...

    async def send(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """Send one message; waits while the connection is full (a checkpoint).

        Raises:
            anyio.BrokenResourceError: The peer has gone.
            anyio.ClosedResourceError: The transport was closed.
        """
        ...

    def send_nowait(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """Send one message without waiting (queued if the connection is full).

        Raises:
            Busy: The queue of unsent messages is full.
            anyio.BrokenResourceError: The peer has gone.
            anyio.ClosedResourceError: The transport was closed.
        """
        ...

    async def receive(self) -> tuple[bytes, list[int]]:
        """Receive one message and its fds (a checkpoint).

        Raises:
            anyio.EndOfStream: The peer closed the connection between messages.
            anyio.BrokenResourceError: It broke, or closed in mid-message.
            InvalidArgument: The peer broke the framing (a message too long,
                too many fds); every fd that came is closed.
        """
        ...

    async def serve(self, handle: Callable[[bytes, list[int]], None]) -> None:
        """Hand every message and its fds to ``handle`` as it arrives (a checkpoint).

        ``handle`` is a plain function; it owns the fds. It may run outside
        any task (in the event loop's I/O callback, say), so it must not
        wait. What it raises ends the serving and is raised here. Returns
        only by raising.

        Raises:
            anyio.EndOfStream: The peer closed the connection between messages.
            The errors of :meth:`receive` and of ``handle`` otherwise.
        """
        ...

    def poll_nowait(self) -> bool:
        """Take in what has arrived; True if :meth:`receive_nowait` would now
        return a message or raise (the end, an error) rather than ``Busy``.

        Takes no message. Raises the errors of the read itself, as
        :meth:`receive_nowait` would.
        """
        ...

    def receive_nowait(self) -> tuple[bytes, list[int]]:
        """Return a message already there, without waiting.

        Raises:
            Busy: No whole message is there yet.
            The errors of :meth:`receive` otherwise.
        """
        ...

    def close_nowait(self) -> None:
        """Close the connection and every fd held at once; a task waiting on
        it gets ``anyio.ClosedResourceError``."""
        ...

    async def aclose(self) -> None:
        """Close the connection and every fd the transport still holds."""
        ...


class Listener(Protocol):
    """Where subscribers connect: gives one :class:`Transport` per connection."""

    async def accept(self) -> Transport:
        """Wait for the next connection."""
        ...

    async def aclose(self) -> None:
        """Stop listening."""
        ...
