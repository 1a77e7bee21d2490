"""Scatter tables: what a map hands to a device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, overload

from ._errors import InvalidArgument
from ._types import Direction
from ._validate import check_direction

if TYPE_CHECKING:
    from ._buffer import Attachment

__all__ = ["Direction", "SgEntry", "SgTable"]


class SgEntry(NamedTuple):
    """One contiguous run of a buffer, as the device sees it.

    Attributes:
        dma_address: Where the run starts in the device's address space. For
            memory mapped into this process it is the address of the bytes.
        length: How many bytes the run holds.
        offset: Where the run starts within the buffer.
    """

    dma_address: int
    length: int
    offset: int


def _check_entries(entries: tuple[SgEntry, ...], attachment: Attachment) -> None:
    size = attachment.buffer.size
    device = attachment.device
    if device.contiguous and len(entries) != 1:
        raise InvalidArgument(
            f"device {device.name!r} needs one contiguous entry, got {len(entries)}"
        )
    expected = 0
    for entry in entries:
        if type(entry) is not SgEntry:
            raise TypeError(
                f"table entries must be SgEntry, not {type(entry).__name__}"
            )
        address, length, offset = entry
        if offset != expected:
            raise InvalidArgument(
                f"entry at offset {offset} leaves a gap or overlap at {expected}"
            )
        if not device.reaches(address, length):
            raise InvalidArgument(
                f"entry {entry} breaks the constraints of device {device.name!r}"
            )
        expected += length
    if expected != size:
        raise InvalidArgument(f"table covers {expected} bytes of a {size}-byte buffer")


class SgTable(Sequence[SgEntry]):
    """An immutable scatter table covering a buffer exactly, in buffer order.

    Exporters build one per map; the constructor checks that the entries cover
    ``[0, buffer.size)`` without gaps and meet every constraint of the
    attachment's device, so a table that exists is a table a device can use.
    An exporter that returns the very same ``tuple`` of entries again (a cached
    layout) is not checked twice.

    Args:
        entries: The runs, in buffer order.
        direction: The direction the table was mapped for.
        attachment: The attachment it was mapped for.

    Raises:
        TypeError: An entry is not an :class:`SgEntry`, or the direction is not one.
        InvalidArgument: The entries do not cover the buffer exactly or break a
            device constraint.
    """

    __slots__ = ("__weakref__", "_attachment", "_direction", "_entries", "_valid")

    def __init__(
        self,
        entries: Iterable[SgEntry],
        *,
        direction: Direction,
        attachment: Attachment,
    ) -> None:
        items = entries if type(entries) is tuple else tuple(entries)
        if items is not attachment._checked_entries:
            _check_entries(items, attachment)
            attachment._checked_entries = items
        self._entries: tuple[SgEntry, ...] = items
        self._direction = check_direction(direction)
        self._attachment = attachment
        self._valid = True

    @property
    def entries(self) -> tuple[SgEntry, ...]:
        """The entries as a tuple."""
        return self._entries

    @property
    def direction(self) -> Direction:
        """The direction this table was mapped for."""
        return self._direction

    @property
    def attachment(self) -> Attachment:
        """The attachment this table was mapped for."""
        return self._attachment

    @property
    def nbytes(self) -> int:
        """The number of bytes the table covers: the buffer's size."""
        return self._attachment.buffer.size

    @property
    def valid(self) -> bool:
        """True until the table is unmapped."""
        return self._valid

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> SgEntry: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[SgEntry, ...]: ...
    def __getitem__(self, index: int | slice) -> SgEntry | tuple[SgEntry, ...]:
        return self._entries[index]

    def __iter__(self) -> Iterator[SgEntry]:
        return iter(self._entries)

    def __repr__(self) -> str:
        state = "" if self._valid else ", unmapped"
        return (
            f"<SgTable {len(self._entries)} entries, {self.nbytes} bytes, "
            f"{self._direction.name}{state}>"
        )
