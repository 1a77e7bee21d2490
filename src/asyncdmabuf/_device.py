"""Importing devices and their DMA constraints."""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import InvalidArgument
from ._validate import check_bool, check_int

__all__ = ["Device"]

#: The widest DMA mask: a device that can address all of a 64-bit space.
DMA_MASK_64 = 2**64 - 1
#: A device that can address only the low 4 GiB (32-bit DMA).
DMA_MASK_32 = 2**32 - 1
#: No limit on the length of one scatter-list segment.
UNLIMITED_SEGMENT = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Device:
    """An importer: something that attaches to buffers and maps them for DMA.

    Like the kernel's ``struct device`` with its ``dma_parms``, a device carries
    the constraints every scatter table mapped for it must meet. Devices are
    immutable and hashable; two devices with equal fields are equal.

    Args:
        name: Shown by :func:`asyncdmabuf.bufinfo`.
        dma_mask: The highest bus address the device can reach; every entry
            satisfies ``dma_address + length - 1 <= dma_mask``.
        max_segment_size: The longest single entry the device accepts.
        contiguous: The device needs the whole buffer as one entry.

    Raises:
        TypeError: A field has the wrong type.
        InvalidArgument: ``name`` is empty, or a number is out of range.
    """

    name: str
    dma_mask: int = DMA_MASK_64
    max_segment_size: int = UNLIMITED_SEGMENT
    contiguous: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, not {type(self.name).__name__}")
        if not self.name:
            raise InvalidArgument("a device needs a non-empty name")
        check_int(self.dma_mask, "dma_mask", 0)
        check_int(self.max_segment_size, "max_segment_size", 1)
        check_bool(self.contiguous, "contiguous")

    def reaches(self, dma_address: int, length: int) -> bool:
        """Return whether one segment at ``dma_address`` fits this device."""
        return (
            dma_address >= 0
            and 0 < length <= self.max_segment_size
            and dma_address + length - 1 <= self.dma_mask
        )
