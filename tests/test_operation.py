"""``att.map(d)`` and ``buf.attach(dev)`` are real coroutines and context managers.

Regression tests of issue 12, item 18: ``tg.start_soon(att.map, d)``,
``asyncio.create_task(att.map(d))`` and ``asyncio.gather`` all work, and the
``async with`` forms still undo on exit.
"""

from __future__ import annotations

import asyncio
import collections.abc
import inspect

import anyio
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf import Direction
from asyncdmabuf._backends import current_backend
from asyncdmabuf.exporters import MemfdExporter

pytestmark = pytest.mark.anyio

TO_DEVICE = Direction.TO_DEVICE


async def test_map_and_attach_are_coroutines() -> None:
    buf = await MemfdExporter().allocate(4096)
    op = buf.attach(dmabuf.Device("d"))
    assert isinstance(op, collections.abc.Coroutine)
    assert asyncio.iscoroutine(op)
    att = await op
    mapping = att.map(TO_DEVICE)
    assert isinstance(mapping, collections.abc.Coroutine)
    sgt = await mapping
    await att.unmap(sgt)
    await att.detach()
    await buf.put()


async def test_start_soon_takes_map_and_attach() -> None:
    buf = await MemfdExporter().allocate(4096)
    async with anyio.create_task_group() as tg:
        tg.start_soon(buf.attach, dmabuf.Device("a"))
        tg.start_soon(buf.attach, dmabuf.Device("b"))
    assert sorted(att.device.name for att in buf.attachments) == ["a", "b"]
    att = buf.attachments[0]
    async with anyio.create_task_group() as tg:
        tg.start_soon(att.map, TO_DEVICE)
    assert len(att.mappings) == 1
    await att.unmap(att.mappings[0])
    for each in buf.attachments:
        await each.detach()
    await buf.put()


async def test_create_task_and_gather_take_map() -> None:
    if current_backend() != "asyncio":
        pytest.skip("asyncio.create_task and gather are asyncio's")
    buf = await MemfdExporter().allocate(4096)
    att = await buf.attach(dmabuf.Device("d"))
    task = asyncio.create_task(att.map(TO_DEVICE))
    first = await task
    second, third = await asyncio.gather(att.map(TO_DEVICE), att.map(TO_DEVICE))
    assert {first, second, third} == set(att.mappings)
    for sgt in (first, second, third):
        await att.unmap(sgt)
    await att.detach()
    await buf.put()


async def test_async_with_still_undoes() -> None:
    buf = await MemfdExporter().allocate(4096)
    async with buf.attach(dmabuf.Device("d")) as att:
        async with att.map(TO_DEVICE) as sgt:
            assert sgt.valid
        assert not sgt.valid
    assert not att.attached
    await buf.put()


async def test_a_dropped_operation_is_an_ordinary_unawaited_coroutine() -> None:
    buf = await MemfdExporter().allocate(4096)
    op = buf.attach(dmabuf.Device("d"))
    op.close()  # as with any coroutine: closing it runs nothing
    assert buf.attachments == ()
    assert inspect.getcoroutinestate(op._coro) == inspect.CORO_CLOSED
    await buf.put()
