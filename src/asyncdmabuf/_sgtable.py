"""Scatter tables: what a map hands to a device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, final, overload

from ._errors import InvalidArgument
from ._types import Direction
from ._validate import check_direction

if TYPE_CHECKING:
    from ._attachment import Attachment
    from ._device import Device

__all__ = ["Direction", "SgEntry", "SgTable", "check_entries"]


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


def check_entries(entries: tuple[SgEntry, ...], size: int, device: Device) -> None:
    """Check that ``entries`` cover ``[0, size)`` exactly and fit ``device``.

    Raises:
        TypeError: An entry is not an :class:`SgEntry`.
        InvalidArgument: A gap, an overlap, a short or long table, or an entry
            that breaks one of the device's constraints (named in the message).
    """
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


@final
class SgTable(Sequence[SgEntry]):
    """An immutable scatter table: entries in buffer order, a direction, an attachment.

    A plain value: exporters build one per map, and the framework checks it
    when the exporter returns it (coverage of ``[0, size)``, the device's
    constraints; a cached entries tuple returned again is checked once).
    Whether it is mapped is the attachment's to say (:attr:`valid`).

    Args:
        entries: The runs, in buffer order.
        direction: The direction the table was mapped for.
        attachment: The attachment it was mapped for.

    ``direction`` and ``attachment`` may also be passed by position, which
    builds the table faster (Python 3.11 packs keyword arguments of a class
    call into a dict), for an exporter's hot ``map``.

    Raises:
        TypeError: The direction is not one, or ``attachment`` is not an
            :class:`Attachment`.
        InvalidArgument: The direction is an int that names none.
    """

    __slots__ = ("__weakref__", "_attachment", "_direction", "_entries")

    def __init__(
        self,
        entries: Iterable[SgEntry],
        direction: Direction,
        attachment: Attachment,
    ) -> None:
        # Every map builds one: the checks here are the cheapest that hold
        # (Attachment is final, so its exact type is the isinstance test).
        if type(attachment) is not _attachment.Attachment:
            raise TypeError(
                f"an SgTable needs an Attachment, not {type(attachment).__name__}"
            )
        # The entries are checked by the attachment the table is returned to
        # (once per cached layout), not here on every map.
        self._entries: tuple[SgEntry, ...] = (
            entries if type(entries) is tuple else tuple(entries)
        )
        self._direction = (
            direction if type(direction) is Direction else check_direction(direction)
        )
        self._attachment = attachment

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
        """True while the table is mapped: not before its map, nor after unmap."""
        return self._attachment.is_mapped(self)

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
        state = "" if self.valid else ", unmapped"
        return (
            f"<SgTable {len(self._entries)} entries, {self.nbytes} bytes, "
            f"{self._direction.name}{state}>"
        )


from . import _attachment  # noqa: E402  (SgTable checks its argument's type at call time)
