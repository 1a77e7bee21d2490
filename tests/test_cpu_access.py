"""CPU access: views that outlive their block, and the block's own exceptions.

Regression tests of issue 12, items 9 and 10: a view still exported when the
block ends keeps the access open (no byte written through it is lost, the
buffer stays pinned), and an exception of the block propagates unchanged.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf.exporters import MemfdExporter, SimDevice

pytestmark = pytest.mark.anyio


async def test_a_view_kept_past_exit_keeps_the_access_open() -> None:
    buf = await MemfdExporter().allocate(4096)
    with pytest.raises(BufferError, match="stays open"):
        async with buf.cpu_access("rw") as view:
            kept = np.frombuffer(view, dtype=np.uint8)
    assert buf.cpu_access_modes == ("rw",)
    assert buf.cpu_access_open
    kept[0] = 7  # still the buffer's bytes: nothing written here is lost
    with pytest.raises(BufferError):
        await buf.end_cpu_access("rw")  # the array is still alive
    del kept
    gc.collect()
    await buf.end_cpu_access("rw")
    assert not buf.cpu_access_open
    async with buf.cpu_access("r") as view:
        assert view[0] == 7
    await buf.put()


async def test_the_body_exception_propagates_unchanged() -> None:
    buf = await MemfdExporter().allocate(4096)
    with pytest.raises(ValueError, match="app bug") as info:  # noqa: PT012
        async with buf.cpu_access("w") as view:
            arr = np.frombuffer(view, dtype=np.uint8)
            arr[:] = 1
            raise ValueError("app bug")
    assert any("stays open" in note for note in info.value.__notes__)
    del arr, info
    gc.collect()
    await buf.end_cpu_access("w")
    await buf.put()


async def test_the_body_exception_without_a_live_view_has_no_note() -> None:
    buf = await MemfdExporter().allocate(4096)
    with pytest.raises(KeyError) as info:
        async with buf.cpu_access("w"):
            raise KeyError("x")
    assert not getattr(info.value, "__notes__", ())
    assert not buf.cpu_access_open
    await buf.put()


async def test_the_last_put_ends_an_access_left_open() -> None:
    buf = await MemfdExporter().allocate(4096)
    with pytest.raises(BufferError):
        async with buf.cpu_access("rw") as view:
            kept = np.frombuffer(view, dtype=np.uint8)
    await buf.put()
    assert buf.released
    del kept


async def test_simdev_buffer_stays_resident_while_a_view_lives() -> None:
    sim = SimDevice("sim", memory=1 << 16)
    buf = await sim.allocate(4096)
    with pytest.raises(BufferError):  # noqa: PT012
        async with buf.cpu_access("w") as view:
            kept = np.frombuffer(view, dtype=np.uint8)
            kept[:4] = (1, 2, 3, 4)
    assert sim.statistics().memory_pinned >= 4096
    kept[4] = 5  # lands in memory that is still the buffer's
    del kept
    gc.collect()
    await buf.end_cpu_access("w")
    async with buf.cpu_access("r") as view:
        assert bytes(view[:5]) == b"\x01\x02\x03\x04\x05"
    await buf.put()


async def test_bufinfo_shows_the_open_access() -> None:
    buf = await MemfdExporter().allocate(4096)
    await buf.begin_cpu_access("r")
    (info,) = [i for i in dmabuf.bufinfo() if i.size == 4096]
    assert info.cpu_access == ("r",)
    assert "cpu access: r" in dmabuf.format_bufinfo([info])
    await buf.end_cpu_access("r")
    await buf.put()
