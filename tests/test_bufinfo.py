"""bufinfo() / format_bufinfo(): API.md section 8."""

from __future__ import annotations

import os

import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf.exporters import MemfdExporter

from .exporters_for_tests import RecordingExporter

pytestmark = pytest.mark.anyio


async def test_bufinfo_lists_who_uses_what() -> None:
    heap = MemfdExporter()
    frame = await heap.allocate(1 << 16, name="frame-0")
    other = RecordingExporter().make(100)
    gpu = await frame.attach(dmabuf.Device("gpu0"))
    vpu = await frame.attach(dmabuf.Device("vpu"), move_notify=lambda att: None)
    sgt = await gpu.map(dmabuf.Direction.TO_DEVICE)
    fd = frame.fd()
    again = dmabuf.get(fd)
    os.close(fd)

    infos = {info.name: info for info in dmabuf.bufinfo()}
    info = infos["frame-0"]
    assert (info.size, info.exporter, info.refcount, info.inode) == (
        1 << 16,
        "memfd",
        2,
        frame.inode,
    )
    assert info.attachments == (
        dmabuf.AttachmentInfo("gpu0", False, ("TO_DEVICE",)),
        dmabuf.AttachmentInfo("vpu", True, ()),
    )
    assert infos[None].exporter == "recording"
    assert infos[None].inode is None  # never shared: no file yet

    text = dmabuf.format_bufinfo()
    assert "frame-0" in text
    assert "gpu0: TO_DEVICE" in text
    assert "vpu (dynamic): not mapped" in text
    assert "<none>" in text
    assert f"Total 2 objects, {(1 << 16) + 100} bytes" in text

    await gpu.unmap(sgt)
    await gpu.detach()
    await vpu.detach()
    await again.put()
    await frame.put()
    await other.put()
    assert dmabuf.bufinfo() == []
    assert "Total 0 objects, 0 bytes" in dmabuf.format_bufinfo()
