"""What a SimDevice keeps per buffer (``buf.priv``) and per attachment."""

from __future__ import annotations

import contextlib
import mmap
import weakref
from typing import TYPE_CHECKING, final

from .pages import Runs

if TYPE_CHECKING:
    from asyncdmabuf import Attachment, DmaBuf, SgEntry

__all__ = ["SimAttachment", "SimBuffer"]


@final
class SimBuffer:
    """A buffer's state: its pages and bytes while resident, its saved bytes
    while evicted, and what pins it."""

    __slots__ = (
        "busy",
        "cpu_pins",
        "dynamic_maps",
        "frame",
        "generation",
        "mapped_generation",
        "npages",
        "ref",
        "released",
        "runs",
        "saved",
        "size",
        "static_pins",
    )

    def __init__(self, size: int, npages: int) -> None:
        self.size = size
        self.npages = npages
        self.ref: weakref.ref[DmaBuf] | None = None
        #: The pages while resident; None before the first map and when evicted.
        self.runs: Runs | None = None
        #: The bytes while resident.
        self.frame: mmap.mmap | None = None
        #: The bytes while evicted.
        self.saved: bytes | None = None
        self.static_pins = 0
        self.dynamic_maps = 0
        self.cpu_pins = 0
        #: Maps between awaits on the resident buffer (in their map latency).
        self.busy = 0
        #: Bumped whenever the pages change, to invalidate cached tables.
        self.generation = 0
        #: The generation whose backing has been mapped (its latency paid).
        self.mapped_generation = -1
        self.released = False

    @property
    def pinned(self) -> bool:
        """Whether the backing may not move now."""
        return bool(self.static_pins or self.dynamic_maps or self.cpu_pins)

    def attachments(self) -> tuple[Attachment, ...]:
        """The buffer's attachments (none once it is gone)."""
        buf = None if self.ref is None else self.ref()
        return () if buf is None else buf.attachments

    def close_frame(self) -> None:
        """Drop the resident bytes' mapping."""
        frame, self.frame = self.frame, None
        if frame is not None:
            # A stale view (vmap outside a pin) keeps the old mapping alive.
            with contextlib.suppress(BufferError):
                frame.close()


@final
class SimAttachment:
    """An attachment's state: its pin and its cached entries."""

    __slots__ = ("entries", "generation", "maps", "pinned")

    def __init__(self) -> None:
        self.pinned = False
        self.maps = 0
        self.entries: tuple[SgEntry, ...] | None = None
        self.generation = -1
