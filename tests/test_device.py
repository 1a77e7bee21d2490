from __future__ import annotations

import dataclasses

import pytest

import asyncdmabuf as dmabuf


def test_device_is_immutable_and_hashable() -> None:
    gpu = dmabuf.Device("gpu0", dma_mask=2**32 - 1, max_segment_size=1 << 16)
    assert gpu == dmabuf.Device("gpu0", dma_mask=2**32 - 1, max_segment_size=1 << 16)
    assert len({gpu, dmabuf.Device("gpu0", 2**32 - 1, 1 << 16)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        gpu.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"name": ""}, dmabuf.InvalidArgument),
        ({"name": 3}, TypeError),
        ({"name": "d", "dma_mask": -1}, dmabuf.InvalidArgument),
        ({"name": "d", "dma_mask": 1.5}, TypeError),
        ({"name": "d", "dma_mask": True}, TypeError),
        ({"name": "d", "max_segment_size": 0}, dmabuf.InvalidArgument),
        ({"name": "d", "contiguous": 1}, TypeError),
    ],
)
def test_bad_devices_are_refused(kwargs: dict[str, object], error: type) -> None:
    with pytest.raises(error):
        dmabuf.Device(**kwargs)  # type: ignore[arg-type]


def test_reaches() -> None:
    dev = dmabuf.Device("d", dma_mask=0xFFFF, max_segment_size=0x100)
    assert dev.reaches(0xFF00, 0x100)
    assert not dev.reaches(0xFF01, 0x100)  # ends past the mask
    assert not dev.reaches(0, 0x101)  # segment too long
    assert not dev.reaches(0, 0)
