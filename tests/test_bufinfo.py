"""bufinfo() / format_bufinfo(): API.md section 8, and a stream's buffers in it."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf.exporters import MemfdExporter

from .exporters_for_tests import RecordingExporter
from .test_stream import peer, publisher, send, until

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


# -- a publisher's buffers: who holds them now ---------------------------------------


def streams() -> dict[int, dmabuf.StreamInfo]:
    """bufinfo()'s stream records, by the buffer's number in its stream."""
    return {i.stream.buffer: i.stream for i in dmabuf.bufinfo() if i.stream}


async def test_bufinfo_follows_a_stream_buffer_through_its_life() -> None:
    me = os.getpid()
    async with (
        publisher(buffers=2) as (pub, path),
        await dmabuf.subscribe(path, queue=2) as sub,
    ):
        assert {s.state for s in streams().values()} == {"free"}
        loan = await pub.loan()
        (loaned,) = [s for s in streams().values() if s.state == "loaned"]
        assert loaned.holders == ()
        await pub.send(loan)
        sent = streams()[loaned.buffer]
        assert sent.state == "sent"
        assert sent.holders == (dmabuf.HolderInfo(me, os.getuid(), 0, "in-flight"),)

        frame = await sub.receive()
        with pytest.raises(dmabuf.Busy):
            sub.receive_nowait()  # says it took frame 0
        await until(lambda: streams()[loaned.buffer].holders[0].state == "taken")
        text = dmabuf.format_bufinfo()
        assert f"stream buffer {loaned.buffer}: sent" in text
        assert f"subscriber pid {me} uid {os.getuid()}: frame 0 taken" in text

        scanout = dmabuf.Fence()
        frame.release(fence=scanout)  # no holder now, but a fence
        await until(lambda: streams()[loaned.buffer].holders == ())
        info = streams()[loaned.buffer]
        assert (info.state, info.release_fences) == ("sent", 1)
        assert "sent, 1 release fence pending" in dmabuf.format_bufinfo()
        scanout.signal()
        await until(lambda: streams()[loaned.buffer].state == "free")
    assert streams() == {}  # a closed publisher's buffers are gone


async def test_bufinfo_shows_history_and_a_waiting_frame() -> None:
    async with (
        publisher(buffers=3, history=1) as (pub, path),
        await dmabuf.subscribe(path, queue=1, overflow="drop-oldest") as sub,
    ):
        for seq in range(3):  # 0 goes, 1 is dropped for 2, which waits
            await send(pub, seq)
        info = streams()
        waiting = [s for s in info.values() if s.holders and s.holders[0].seq == 2]
        assert [(s.in_history, s.holders[0].state) for s in waiting] == [
            (True, "waiting")
        ]
        assert "in history" in dmabuf.format_bufinfo()
        (await sub.receive()).release()  # room: frame 2 goes
        async with await sub.receive() as frame:
            assert frame.seq == 2


async def test_bufinfo_names_a_subscriber_process_and_forgets_it_killed(
    anyio_backend: Any,
) -> None:
    async with (
        publisher(buffers=3) as (pub, path),
        peer("hold", path, 2, backend=anyio_backend) as holder,
    ):
        assert (await holder.facts())["ready"]
        await send(pub, 0)
        await send(pub, 1)
        assert (await holder.facts())["holding"] == [0, 1]
        held = {
            (h.pid, h.seq)
            for s in streams().values()
            for h in s.holders
            if s.state == "sent"
        }
        assert held == {(holder.proc.pid, 0), (holder.proc.pid, 1)}
        (info,) = pub.subscribers  # the same facts, by subscriber
        assert info.pid == holder.proc.pid
        assert info.buffers == tuple(
            sorted(n for n, s in streams().items() if s.holders)
        )
        holder.proc.send_signal(signal.SIGKILL)
        await until(lambda: all(not s.holders for s in streams().values()))
        await until(lambda: {s.state for s in streams().values()} == {"free"})
