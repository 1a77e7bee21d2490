"""FrameLayout and Plane: DRM fourccs, for_format, validation, numpy plane views."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncdmabuf import InvalidArgument
from asyncdmabuf._layout import (
    FrameLayout,
    Plane,
    fourcc_code,
    fourcc_name,
    known_formats,
)

#: Codes straight from drm_fourcc.h (and videodev2.h for GREY).
DRM_CODES = {
    "XR24": 0x34325258,
    "AR24": 0x34325241,
    "RG24": 0x34324752,
    "NV12": 0x3231564E,
    "YU12": 0x32315559,
    "YUYV": 0x56595559,
    "GREY": 0x59455247,
}


@pytest.mark.parametrize(("name", "code"), DRM_CODES.items())
def test_fourcc_codes_are_drms(name: str, code: int) -> None:
    assert fourcc_code(name) == code
    assert fourcc_name(code) == name
    assert FrameLayout.for_format(name, 16, 16).code == code
    assert FrameLayout.for_format(code, 16, 16).fourcc == name


def test_i420_is_yu12() -> None:
    assert FrameLayout.for_format("I420", 8, 4) == FrameLayout.for_format("YU12", 8, 4)


def test_nv12_1080p() -> None:
    layout = FrameLayout.for_format("NV12", 1920, 1080)
    assert layout.planes == (Plane(0, 1920), Plane(1920 * 1080, 1920))
    assert layout.size == 1920 * 1080 * 3 // 2


def test_yu12_planes() -> None:
    layout = FrameLayout.for_format("YU12", 640, 480)
    assert layout.planes == (
        Plane(0, 640),
        Plane(640 * 480, 320),
        Plane(640 * 480 + 320 * 240, 320),
    )
    assert layout.size == 640 * 480 * 3 // 2


@pytest.mark.parametrize(
    ("name", "bpp"), [("XR24", 4), ("AR24", 4), ("RG24", 3), ("YUYV", 2), ("GREY", 1)]
)
def test_packed_strides_are_aligned(name: str, bpp: int) -> None:
    layout = FrameLayout.for_format(name, 30, 7, align=64)
    (plane,) = layout.planes
    assert plane.stride == 64 * -(-30 * bpp // 64)
    assert layout.size == plane.stride * 7


def test_frozen_and_hashable() -> None:
    layout = FrameLayout.for_format("XR24", 4, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.width = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.planes[0].stride = 1  # type: ignore[misc]
    assert hash(layout) == hash(FrameLayout("XR24", 4, 4, [Plane(0, 16)]))
    assert not hasattr(layout, "__dict__")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("NOPE", 4, 4, [Plane(0, 16)]), InvalidArgument),
        (("XR24\x00", 4, 4, [Plane(0, 16)]), InvalidArgument),
        ((b"XR24", 4, 4, [Plane(0, 16)]), TypeError),
        ((1.5, 4, 4, [Plane(0, 16)]), TypeError),
        ((0xFFFFFFFFFF, 4, 4, [Plane(0, 16)]), InvalidArgument),
        (("XR24", 0, 4, [Plane(0, 16)]), InvalidArgument),
        (("XR24", 4, 70000, [Plane(0, 16)]), InvalidArgument),
        (("XR24", 4.0, 4, [Plane(0, 16)]), TypeError),
        (("XR24", True, 4, [Plane(0, 16)]), TypeError),
        (("XR24", 4, 4, [Plane(0, 15)]), InvalidArgument),
        (("XR24", 4, 4, []), InvalidArgument),
        (("XR24", 4, 4, [Plane(0, 16), Plane(64, 16)]), InvalidArgument),
        (("XR24", 4, 4, [(0, 16)]), TypeError),
        (("XR24", 4, 4, "planes"), TypeError),
        (("XR24", 4, 4, None), TypeError),
        (("NV12", 3, 4, [Plane(0, 4), Plane(16, 4)]), InvalidArgument),
        (("NV12", 4, 3, [Plane(0, 4), Plane(16, 4)]), InvalidArgument),
        (("NV12", 4, 4, [Plane(0, 4), Plane(8, 4)]), InvalidArgument),  # overlap
        (("YUYV", 3, 4, [Plane(0, 8)]), InvalidArgument),
    ],
)
def test_bad_layouts(args: tuple[object, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        FrameLayout(*args)  # type: ignore[arg-type]


def test_bad_modifier() -> None:
    with pytest.raises(InvalidArgument):
        FrameLayout("XR24", 4, 4, [Plane(0, 16)], modifier=-1)
    with pytest.raises(TypeError):
        FrameLayout("XR24", 4, 4, [Plane(0, 16)], modifier="linear")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1, 4), InvalidArgument),
        ((0, 0), InvalidArgument),
        ((0, 2**32), InvalidArgument),
        ((2**63, 4), InvalidArgument),
        (("0", 4), TypeError),
        ((0, None), TypeError),
    ],
)
def test_bad_planes(args: tuple[object, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        Plane(*args)  # type: ignore[arg-type]


def test_bad_for_format() -> None:
    with pytest.raises(InvalidArgument):
        FrameLayout.for_format("XR24", 4, 4, align=0)
    with pytest.raises(TypeError):
        FrameLayout.for_format("XR24", 4, 4, align=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        FrameLayout.for_format("ZZZZ", 4, 4)


def test_check() -> None:
    layout = FrameLayout.for_format("NV12", 64, 32)
    layout.check(layout.size)
    layout.check(bytearray(layout.size + 1))
    with pytest.raises(InvalidArgument):
        layout.check(memoryview(bytearray(layout.size - 1)))
    with pytest.raises(InvalidArgument):
        layout.check(layout.size - 1)
    with pytest.raises(TypeError):
        layout.check("big")
    with pytest.raises(TypeError):
        layout.check(True)


class _Sized:
    size = 10


def test_check_buffer_like() -> None:
    FrameLayout.for_format("GREY", 5, 2).check(_Sized())
    with pytest.raises(InvalidArgument):
        FrameLayout.for_format("GREY", 5, 3).check(_Sized())


def test_arrays_nv12_zero_copy() -> None:
    layout = FrameLayout.for_format("NV12", 8, 4, align=16)
    memory = bytearray(layout.size)
    y, uv = layout.arrays(memoryview(memory))
    assert y.shape == (4, 8)
    assert y.strides == (16, 1)
    assert uv.shape == (2, 4, 2)
    assert uv.strides == (16, 2, 1)
    y[1, 2] = 7
    uv[1, 3, 1] = 9
    assert memory[16 + 2] == 7
    assert memory[layout.planes[1].offset + 16 + 3 * 2 + 1] == 9


def test_arrays_xr24_and_read_only() -> None:
    layout = FrameLayout.for_format("XR24", 3, 2, align=64)
    memory = bytes(range(128))
    (pixels,) = layout.arrays(memoryview(memory))
    assert pixels.shape == (2, 3, 4)
    assert not pixels.flags.writeable
    assert pixels[1, 2, 3] == 64 + 8 + 3


def test_arrays_errors() -> None:
    layout = FrameLayout.for_format("GREY", 4, 4)
    with pytest.raises(InvalidArgument):
        layout.arrays(bytearray(15))
    with pytest.raises(TypeError):
        layout.arrays(42)
    tiled = FrameLayout("GREY", 4, 4, [Plane(0, 4)], modifier=1 << 56 | 1)
    with pytest.raises(InvalidArgument):
        tiled.arrays(bytearray(16))


def test_bad_fourcc_helpers() -> None:
    with pytest.raises(TypeError):
        fourcc_code(5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        fourcc_code("")
    with pytest.raises(TypeError):
        fourcc_name("XR24")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        fourcc_name(0x01020304)


# -- properties -----------------------------------------------------------------------

formats = st.sampled_from(known_formats())
dims = st.integers(1, 300).map(lambda n: 2 * n)
aligns = st.sampled_from([1, 2, 3, 4, 16, 64, 256])


@given(formats, dims, dims, aligns)
def test_for_format_properties(name: str, width: int, height: int, align: int) -> None:
    layout = FrameLayout.for_format(name, width, height, align=align)
    assert all(plane.stride % align == 0 for plane in layout.planes)
    # The layout rebuilds from its own fields, and fits exactly its size.
    assert FrameLayout(layout.code, width, height, layout.planes) == layout
    layout.check(layout.size)
    with pytest.raises(InvalidArgument):
        layout.check(layout.size - 1)
    memory = bytearray(layout.size)
    arrays = layout.arrays(memoryview(memory))
    assert len(arrays) == len(layout.planes)
    total = 0
    for i, (array, plane) in enumerate(zip(arrays, layout.planes, strict=True)):
        assert array.base is not None  # a view, not a copy
        assert array.strides[0] == plane.stride
        array[...] = i + 1
        total += array.size
        # The plane's last byte is the last pixel of its last row.
        last = plane.offset + plane.stride * (array.shape[0] - 1)
        last += array.shape[1] * (array.shape[2] if array.ndim == 3 else 1) - 1
        assert memory[last] == i + 1
    # Every pixel landed in its own byte: planes do not overlap.
    assert sum(1 for b in memory if b) == total


@given(
    st.integers(0, 64),
    st.integers(1, 64),
    st.integers(0, 64),
    st.integers(1, 64),
)
def test_overlap_is_refused(off1: int, stride1: int, off2: int, stride2: int) -> None:
    planes = [Plane(0, 4), Plane(16 + off1, stride1 + 3), Plane(16 + off2, stride2 + 3)]
    ranges = [
        (p.offset, p.offset + p.stride * (4 if i == 0 else 2))
        for i, p in enumerate(planes)
    ]
    overlap = any(
        a[0] < b[1] and b[0] < a[1]
        for i, a in enumerate(ranges)
        for b in ranges[i + 1 :]
    )
    if overlap:
        with pytest.raises(InvalidArgument):
            FrameLayout("YU12", 4, 4, planes)
    else:
        assert FrameLayout("YU12", 4, 4, planes).planes == tuple(planes)


def test_numpy_not_imported_by_module() -> None:
    import subprocess
    import sys

    code = "import asyncdmabuf._layout, sys; print('numpy' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    assert np.__version__  # numpy is installed for the rest of these tests
