"""A buffer garbage-collected without its last put still gives its memory back.

Regression tests of issue 12, item 6: garbage collection frees what an
explicit put would have (detaches, unmaps, ends CPU access, releases), with a
``ResourceWarning`` like an unclosed file.
"""

from __future__ import annotations

import gc
from typing import ClassVar

import anyio.lowlevel
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf import Attachment, Direction, DmaBuf, Exporter, SgEntry, SgTable

pytestmark = pytest.mark.anyio


class Counting(Exporter):
    """Plain ops that never wait, counting what reaches them."""

    name: ClassVar[str] = "counting"

    def __init__(self) -> None:
        self.ops: list[str] = []
        self.in_use = 0

    def make(self) -> DmaBuf:
        self.in_use += 1
        return dmabuf.export(self, 4096)

    def map(self, attachment: Attachment, direction: Direction) -> SgTable:
        return SgTable(
            [SgEntry(0x1000, 4096, 0)], direction=direction, attachment=attachment
        )

    def unmap(self, attachment: Attachment, sgt: SgTable, direction: Direction) -> None:
        self.ops.append("unmap")

    def detach(self, buf: DmaBuf, attachment: Attachment) -> None:
        self.ops.append("detach")

    def release(self, buf: DmaBuf) -> None:
        self.ops.append("release")
        self.in_use -= 1


class Waiting(Counting):
    """A release that must wait cannot run at garbage collection."""

    async def release(self, buf: DmaBuf) -> None:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        self.in_use -= 1  # pragma: no cover (never reached at gc)


def _warns() -> pytest.WarningsRecorder:
    return pytest.warns(ResourceWarning, match="garbage-collected")


async def test_gc_releases_a_plain_buffer() -> None:
    exp = Counting()
    buf = exp.make()
    with _warns():
        del buf
        gc.collect()
    assert exp.ops == ["release"]
    assert exp.in_use == 0


async def test_gc_unmaps_and_detaches_first() -> None:
    exp = Counting()
    buf = exp.make()
    att = await buf.attach(dmabuf.Device("d"))
    await att.map(Direction.TO_DEVICE)
    with _warns():
        del att, buf
        gc.collect()
    assert exp.ops == ["unmap", "detach", "release"]
    assert exp.in_use == 0
    assert dmabuf.bufinfo() == []


async def test_gc_says_when_a_release_had_to_wait() -> None:
    exp = Waiting()
    buf = exp.make()
    with _warns() as record:
        del buf
        gc.collect()
    assert any("had to wait" in str(w.message) for w in record)
    assert exp.in_use == 1  # documented: an async release cannot run without a loop


async def test_gc_gives_a_simdevice_its_pinned_pages_back() -> None:
    from asyncdmabuf.exporters import SimDevice

    sim = SimDevice("sim", memory=1 << 16)
    buf = await sim.allocate(1 << 16)
    att = await buf.attach(sim.device)
    await att.map(Direction.TO_DEVICE)  # pinned: a static attachment's map
    assert sim.statistics().memory_pinned == 1 << 16
    with _warns():
        del att, buf
        gc.collect()
    stats = sim.statistics()
    assert stats.memory_in_use == stats.memory_pinned == 0
    # and the memory serves the next buffer at once
    again = await sim.allocate(1 << 16)
    async with again.attach(sim.device) as att2:
        sgt = att2.try_map(Direction.TO_DEVICE)
        await att2.unmap(sgt)
    await again.put()


async def test_a_collected_buffer_leaves_no_entry_in_the_file_registry() -> None:
    from asyncdmabuf._buffer import _by_file
    from asyncdmabuf.exporters import MemfdExporter

    before = len(_by_file)
    buf = await MemfdExporter().allocate(4096)
    assert len(_by_file) == before + 1
    with _warns():
        del buf
        gc.collect()
    assert len(_by_file) == before
    assert all(ref() is not None for ref in _by_file.values())


async def test_a_collected_buffer_in_a_cycle_leaves_no_entry_either() -> None:
    # Collected as part of a cycle, its weak reference is dead before its
    # finalizer runs: the finalizer still takes the entry out.
    import os

    from asyncdmabuf._buffer import _by_file

    before = len(_by_file)
    buf = Counting().make()
    os.close(buf.fd())  # it has a file now, so an entry
    assert len(_by_file) == before + 1
    buf.priv = [buf]
    with _warns():
        del buf
        gc.collect()
    assert len(_by_file) == before
