"""Frame layouts: where each plane of an image lies in a buffer, as DRM describes it.

A layout is a pixel format (a fourcc code as in ``drm_fourcc.h``, or V4L2's
for ``GREY``), a width and height in pixels, and for each plane of the format
its offset and stride (bytes from one row to the next) in the buffer. It is
what ``drm_mode_fb_cmd2`` and V4L2's multi-planar format carry, immutable and
checked: planes lie inside ``[0, size)``, do not overlap, and each row holds
the plane's pixels.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ._errors import InvalidArgument
from ._validate import check_int, is_int

if TYPE_CHECKING:  # numpy is optional: imported by arrays() only
    import numpy

__all__ = ["FrameLayout", "Plane", "fourcc_code", "fourcc_name"]

#: Widths and heights are at most this many pixels (what a u16 holds; DRM's
#: own limits are lower).
MAX_DIMENSION: Final = 65535
#: Strides and offsets stay below this, so every plane fits in a u32 stride
#: and a u64 offset on the wire.
MAX_STRIDE: Final = 2**32 - 1
MAX_OFFSET: Final = 2**63 - 1
#: DRM_FORMAT_MOD_LINEAR: rows of pixels one after the other.
MOD_LINEAR: Final = 0
#: The most planes a format has (DRM's is 4).
MAX_PLANES: Final = 4


def fourcc_code(name: str) -> int:
    """Return the u32 code of a fourcc name, as ``drm_fourcc.h``'s ``fourcc_code``.

    Names shorter than four characters are padded with spaces (``"R8"`` is
    ``"R8  "``).

    Raises:
        TypeError: ``name`` is not a str.
        InvalidArgument: It is not one to four printable ASCII characters.
    """
    if not isinstance(name, str):
        raise TypeError(f"a fourcc is a str, not {type(name).__name__}")
    if not 1 <= len(name) <= 4 or not all(" " <= c <= "~" for c in name):
        raise InvalidArgument(f"fourcc {name!r} is not 1-4 printable ASCII characters")
    (code,) = struct.unpack("<I", name.ljust(4).encode("ascii"))
    return int(code)


def fourcc_name(code: int) -> str:
    """Return the four characters of a u32 fourcc code (trailing spaces dropped).

    Raises:
        TypeError: ``code`` is not an int.
        InvalidArgument: It is not a u32 of printable ASCII characters.
    """
    code = check_int(code, "a fourcc code", 0, 0xFFFFFFFF)
    text = struct.pack("<I", code).decode("latin-1")
    if not all(" " <= c <= "~" for c in text):
        raise InvalidArgument(f"fourcc code {code:#010x} is not printable ASCII")
    return text.rstrip(" ")


@dataclass(frozen=True, slots=True)
class _PlaneFormat:
    cpp: int
    """Bytes per pixel of the plane (per sample block horizontally)."""
    channels: int
    """Bytes each pixel spans in the last axis of its array (1: a 2-D array)."""
    hsub: int
    vsub: int


@dataclass(frozen=True, slots=True)
class _Format:
    planes: tuple[_PlaneFormat, ...]
    hsub: int
    """The width must be a multiple of this (chroma subsampling)."""
    vsub: int


_MONO = _PlaneFormat(1, 1, 1, 1)
_CHROMA_420 = _PlaneFormat(1, 1, 2, 2)

#: The formats this module knows, by name, as in ``drm_fourcc.h`` (GREY is V4L2's).
_FORMATS: Final[dict[str, _Format]] = {
    "XR24": _Format((_PlaneFormat(4, 4, 1, 1),), 1, 1),  # XRGB8888
    "AR24": _Format((_PlaneFormat(4, 4, 1, 1),), 1, 1),  # ARGB8888
    "XB24": _Format((_PlaneFormat(4, 4, 1, 1),), 1, 1),  # XBGR8888
    "AB24": _Format((_PlaneFormat(4, 4, 1, 1),), 1, 1),  # ABGR8888
    "RG24": _Format((_PlaneFormat(3, 3, 1, 1),), 1, 1),  # RGB888
    "BG24": _Format((_PlaneFormat(3, 3, 1, 1),), 1, 1),  # BGR888
    "YUYV": _Format((_PlaneFormat(2, 2, 1, 1),), 2, 1),  # packed 4:2:2
    "GREY": _Format((_MONO,), 1, 1),  # V4L2 8-bit greyscale
    "R8": _Format((_MONO,), 1, 1),  # DRM's 8-bit single channel
    "NV12": _Format((_MONO, _PlaneFormat(2, 2, 2, 2)), 2, 2),  # Y, then CbCr
    "NV21": _Format((_MONO, _PlaneFormat(2, 2, 2, 2)), 2, 2),  # Y, then CrCb
    "YU12": _Format((_MONO, _CHROMA_420, _CHROMA_420), 2, 2),  # Y, Cb, Cr
    "YV12": _Format((_MONO, _CHROMA_420, _CHROMA_420), 2, 2),  # Y, Cr, Cb
}
#: Other names for the same codes.
_ALIASES: Final = {"I420": "YU12", "Y800": "GREY"}


def _format_name(fourcc: object) -> str:
    if isinstance(fourcc, int) and is_int(fourcc):  # an int, and not a bool
        name = fourcc_name(fourcc)
    elif isinstance(fourcc, str):
        fourcc_code(fourcc)  # checks the characters
        name = fourcc.rstrip(" ")
    else:
        raise TypeError(f"a fourcc is a str or an int, not {type(fourcc).__name__}")
    name = _ALIASES.get(name, name)
    if name not in _FORMATS:
        known = ", ".join(sorted({*_FORMATS, *_ALIASES}))
        raise InvalidArgument(f"unknown pixel format {name!r} (known: {known})")
    return name


@dataclass(frozen=True, slots=True)
class Plane:
    """One plane of a frame: where it starts in the buffer and its row pitch.

    Args:
        offset: Bytes from the start of the buffer to the plane's first row.
        stride: Bytes from the start of one row to the next (DRM's pitch).

    Raises:
        TypeError: An argument is not an int.
        InvalidArgument: ``offset`` is negative or ``stride`` not positive,
            or either is beyond what a frame can describe.
    """

    offset: int
    stride: int

    def __post_init__(self) -> None:
        check_int(self.offset, "a plane's offset", 0, MAX_OFFSET)
        check_int(self.stride, "a plane's stride", 1, MAX_STRIDE)


@dataclass(frozen=True, slots=True)
class FrameLayout:
    """A frame's pixel format, size in pixels and planes, as DRM describes it.

    Args:
        fourcc: The pixel format, as its four characters (``"NV12"``) or its
            u32 code; ``"I420"`` is ``"YU12"``.
        width: Width in pixels, a multiple of the format's horizontal
            subsampling.
        height: Height in pixels, a multiple of its vertical subsampling.
        planes: One :class:`Plane` per plane of the format, in its order.
        modifier: The DRM format modifier (0, linear, unless tiled).

    Raises:
        TypeError: An argument has the wrong type.
        InvalidArgument: An unknown format, a bad size, the wrong number of
            planes, a stride too short for a row, or planes that overlap.
    """

    fourcc: str
    width: int
    height: int
    planes: tuple[Plane, ...]
    modifier: int = MOD_LINEAR

    def __init__(
        self,
        fourcc: str | int,
        width: int,
        height: int,
        planes: Iterable[Plane],
        modifier: int = MOD_LINEAR,
    ) -> None:
        name = _format_name(fourcc)
        fmt = _FORMATS[name]
        check_int(width, "width", 1, MAX_DIMENSION)
        check_int(height, "height", 1, MAX_DIMENSION)
        check_int(modifier, "modifier", 0, 2**64 - 1)
        if width % fmt.hsub or height % fmt.vsub:
            raise InvalidArgument(
                f"{name} needs a width that is a multiple of {fmt.hsub} and a height"
                f" of {fmt.vsub}, not {width}x{height}"
            )
        given: object = planes
        if isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
            raise TypeError(f"planes must be a sequence of Plane, not {planes!r}")
        plane_tuple = tuple(itertools.islice(planes, MAX_PLANES + 1))
        for plane in plane_tuple:
            if not isinstance(plane, Plane):
                raise TypeError(f"planes must be Plane objects, not {plane!r}")
        if len(plane_tuple) != len(fmt.planes):
            raise InvalidArgument(
                f"{name} has {len(fmt.planes)} planes, not {len(plane_tuple)}"
            )
        extents = []
        for i, (plane, pf) in enumerate(zip(plane_tuple, fmt.planes, strict=True)):
            row = width // pf.hsub * pf.cpp
            if plane.stride < row:
                raise InvalidArgument(
                    f"plane {i} of {name} {width}x{height} needs a stride of at"
                    f" least {row} bytes, not {plane.stride}"
                )
            extents.append(
                (plane.offset, plane.offset + plane.stride * (height // pf.vsub), i)
            )
        extents.sort()
        for (_, end, i), (start, _, j) in itertools.pairwise(extents):
            if start < end:
                raise InvalidArgument(f"planes {i} and {j} of the layout overlap")
        object.__setattr__(self, "fourcc", name)
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "height", height)
        object.__setattr__(self, "planes", plane_tuple)
        object.__setattr__(self, "modifier", modifier)

    @classmethod
    def for_format(
        cls, fourcc: str | int, width: int, height: int, *, align: int = 1
    ) -> FrameLayout:
        """Return the layout of a linear frame, planes one after the other.

        Each plane's stride is its row of pixels rounded up to a multiple of
        ``align`` bytes; each plane starts where the previous one ends.

        Raises:
            TypeError: An argument has the wrong type.
            InvalidArgument: An unknown format, a bad size, or ``align`` not
                a positive int.
        """
        name = _format_name(fourcc)
        fmt = _FORMATS[name]
        check_int(width, "width", 1, MAX_DIMENSION)
        check_int(height, "height", 1, MAX_DIMENSION)
        check_int(align, "align", 1, 1 << 20)
        planes = []
        offset = 0
        for pf in fmt.planes:
            row = width // pf.hsub * pf.cpp
            stride = -(-row // align) * align
            planes.append(Plane(offset, stride))
            offset += stride * (height // pf.vsub)
        return cls(name, width, height, planes)

    @property
    def code(self) -> int:
        """The format's u32 fourcc code, as ``drm_fourcc.h`` defines it."""
        return fourcc_code(self.fourcc)

    @property
    def size(self) -> int:
        """The bytes a buffer needs to hold every plane: the end of the last one."""
        fmt = _FORMATS[self.fourcc]
        return max(
            plane.offset + plane.stride * (self.height // pf.vsub)
            for plane, pf in zip(self.planes, fmt.planes, strict=True)
        )

    def check(self, buf_or_size: object) -> None:
        """Check that the layout fits a size, a buffer (``.size``) or a memoryview.

        Raises:
            TypeError: ``buf_or_size`` is not an int, has no int ``size`` and
                does not support the buffer protocol.
            InvalidArgument: It is smaller than :attr:`size`.
        """
        size = getattr(buf_or_size, "size", buf_or_size)
        if not isinstance(size, int) or isinstance(size, bool):
            try:
                size = memoryview(buf_or_size).nbytes  # type: ignore[arg-type]
            except TypeError:
                raise TypeError(
                    "check() needs a size, a buffer or a memoryview, not"
                    f" {type(buf_or_size).__name__}"
                ) from None
        if size < self.size:
            raise InvalidArgument(
                f"a {self.fourcc} {self.width}x{self.height} frame needs"
                f" {self.size} bytes, the buffer has {size}"
            )

    def arrays(self, view: Any) -> list[numpy.ndarray[Any, numpy.dtype[numpy.uint8]]]:
        """Return one numpy ``uint8`` array per plane, sharing ``view``'s memory.

        A plane of one byte per pixel is a ``(rows, width)`` array; one of
        several bytes per pixel is ``(rows, width, bytes)`` (``XR24`` gives
        ``(height, width, 4)`` in memory order B, G, R, X; ``NV12``'s second
        plane ``(height/2, width/2, 2)``, Cb and Cr). Strides are the plane's
        own, so padding at the end of rows is skipped, never copied. A
        read-only view gives read-only arrays.

        Raises:
            TypeError: ``view`` does not support the buffer protocol.
            InvalidArgument: ``view`` is smaller than :attr:`size`, or the
                layout is not linear (a modifier other than 0).
            ModuleNotFoundError: numpy is not installed.
        """
        import numpy as np

        if self.modifier != MOD_LINEAR:
            raise InvalidArgument(
                f"a layout with modifier {self.modifier:#x} is not linear:"
                " it has no array view"
            )
        try:
            flat = np.frombuffer(view, dtype=np.uint8)
        except TypeError:
            raise TypeError(
                f"arrays() needs a buffer, not {type(view).__name__}"
            ) from None
        self.check(flat.size)
        result = []
        for plane, pf in zip(self.planes, _FORMATS[self.fourcc].planes, strict=True):
            rows, cols = self.height // pf.vsub, self.width // pf.hsub
            shape: tuple[int, ...]
            strides: tuple[int, ...]
            if pf.channels == 1:
                shape, strides = (rows, cols), (plane.stride, 1)
            else:
                shape, strides = (
                    (rows, cols, pf.channels),
                    (plane.stride, pf.channels, 1),
                )
            result.append(
                np.lib.stride_tricks.as_strided(
                    flat[plane.offset :],
                    shape=shape,
                    strides=strides,
                    writeable=flat.flags.writeable,
                )
            )
        return result


def known_formats() -> Sequence[str]:
    """Return the format names :class:`FrameLayout` knows, aliases included."""
    return sorted({*_FORMATS, *_ALIASES})
