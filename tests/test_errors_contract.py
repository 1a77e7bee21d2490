"""Errors the contract names, for inputs that used to escape as something else.

Regression tests of issue 12, items 13, 14 and 17.
"""

from __future__ import annotations

import anyio
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf import Direction, SgEntry, SgTable
from asyncdmabuf.exporters import MemfdExporter

pytestmark = pytest.mark.anyio


def test_busy_is_an_anyio_would_block() -> None:
    assert issubclass(dmabuf.Busy, anyio.WouldBlock)
    assert issubclass(dmabuf.Busy, OSError)
    with pytest.raises(anyio.WouldBlock):
        raise dmabuf.Busy("x")


async def test_try_map_busy_is_caught_as_would_block() -> None:
    buf = await MemfdExporter().allocate(4096)
    att = await buf.attach(dmabuf.Device("d"))
    assert buf._lock.acquire_nowait()
    with pytest.raises(anyio.WouldBlock):
        att.try_map(Direction.TO_DEVICE)
    buf._lock.release()
    await att.detach()
    await buf.put()


async def test_unmapping_a_table_that_was_never_mapped() -> None:
    buf = await MemfdExporter().allocate(4096)
    att = await buf.attach(dmabuf.Device("d"))
    sgt = SgTable([SgEntry(0, 4096, 0)], direction=Direction.TO_DEVICE, attachment=att)
    with pytest.raises(dmabuf.InvalidArgument, match="not mapped"):
        await att.unmap(sgt)
    assert att.mappings == ()
    assert not sgt.valid
    assert not buf._lock.locked()
    await att.detach()
    await buf.put()


def test_sgtable_needs_an_attachment() -> None:
    with pytest.raises(TypeError, match="Attachment"):
        SgTable([], direction=Direction.TO_DEVICE, attachment="nope")  # type: ignore[arg-type]


def test_format_bufinfo_needs_records() -> None:
    with pytest.raises(TypeError):
        dmabuf.format_bufinfo("x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dmabuf.format_bufinfo([1])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("device", "named"),
    [
        (
            dmabuf.Device("c", contiguous=True, max_segment_size=4096),
            "max_segment_size",
        ),
        (dmabuf.Device("m", dma_mask=0xFFF), "dma_mask"),
        (dmabuf.Device("s", max_segment_size=1), "entries"),
    ],
    ids=["contiguous", "mask", "too-many-entries"],
)
async def test_busy_at_attach_names_the_constraint(
    device: dmabuf.Device, named: str
) -> None:
    buf = await MemfdExporter().allocate(1 << 20)
    with pytest.raises(dmabuf.Busy, match=named):
        await buf.attach(device)
    assert buf.attachments == ()
    await buf.put()
