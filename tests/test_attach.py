"""attach / detach: API.md section 3."""

from __future__ import annotations

import anyio
import pytest

import asyncdmabuf as dmabuf

from .exporters_for_tests import RecordingExporter
from .helpers import assert_checkpoints, wait_all_blocked

pytestmark = pytest.mark.anyio

GPU = dmabuf.Device("gpu0")


async def test_attach_and_detach_call_the_hooks() -> None:
    exp = RecordingExporter()
    buf = exp.make()
    async with assert_checkpoints():
        att = await buf.attach(GPU)
    assert (att.buffer, att.device, att.dynamic, att.attached) == (
        buf,
        GPU,
        False,
        True,
    )
    assert buf.attachments == (att,)
    async with assert_checkpoints():
        await att.detach()
    assert not att.attached
    assert buf.attachments == ()
    assert exp.calls == ["attach gpu0", "detach gpu0"]
    await buf.put()


async def test_a_refused_attach_records_nothing() -> None:
    exp = RecordingExporter()
    exp.refuse_attach = True
    buf = exp.make()
    with pytest.raises(dmabuf.Busy):
        await buf.attach(GPU)
    assert buf.attachments == ()
    assert dmabuf.bufinfo()[0].attachments == ()
    await buf.put()
    assert exp.calls == ["attach gpu0", "release"]


async def test_async_with_detaches_even_if_detached_inside() -> None:
    exp = RecordingExporter()
    buf = exp.make()
    async with buf.attach(GPU) as att:
        assert buf.attachments == (att,)
    assert not att.attached
    async with buf.attach(GPU) as att2:
        await att2.detach()
    assert exp.calls.count("detach gpu0") == 2
    await buf.put()


async def test_dynamic_attachment_and_move_notify() -> None:
    buf = RecordingExporter().make()
    moved: list[dmabuf.Attachment] = []
    att = await buf.attach(GPU, move_notify=moved.append)
    assert att.dynamic
    att.move_notify()
    assert moved == [att]
    static = await buf.attach(GPU)
    static.move_notify()  # a static attachment is never told
    assert moved == [att]
    await att.detach()
    await static.detach()
    await buf.put()


async def test_bad_attach_arguments() -> None:
    buf = RecordingExporter().make()
    with pytest.raises(TypeError):
        buf.attach("gpu0")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        buf.attach(GPU, move_notify=3)  # type: ignore[arg-type]
    await buf.put()


async def test_detach_twice_is_einval() -> None:
    buf = RecordingExporter().make()
    att = await buf.attach(GPU)
    await att.detach()
    with pytest.raises(dmabuf.InvalidArgument):
        await att.detach()
    await buf.put()


async def test_detach_unmaps_leftovers_with_a_warning() -> None:
    exp = RecordingExporter()
    buf = exp.make()
    att = await buf.attach(GPU)
    sgt = await att.map(dmabuf.Direction.TO_DEVICE)
    with pytest.warns(ResourceWarning, match="1 table"):
        await att.detach()
    assert not sgt.valid
    assert att.mappings == ()
    assert exp.calls == ["attach gpu0", "map gpu0", "unmap gpu0", "detach gpu0"]
    await buf.put()


async def test_detach_completes_in_a_cancelled_scope() -> None:
    exp = RecordingExporter()
    buf = exp.make()
    att = await buf.attach(GPU)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await att.detach()
    assert scope.cancelled_caught  # delivered at detach's final checkpoint
    assert not att.attached  # after detach had finished its work
    assert exp.calls[-1] == "detach gpu0"
    await buf.put()


async def test_attach_cancelled_while_waiting_for_the_lock_records_nothing() -> None:
    exp = RecordingExporter()
    exp.gate = anyio.Event()
    buf = exp.make()
    holder = await buf.attach(dmabuf.Device("holder"))
    tables: list[dmabuf.SgTable] = []

    async def hold() -> None:
        tables.append(await holder.map(dmabuf.Direction.TO_DEVICE))

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await exp.map_started.wait()
        with anyio.CancelScope() as scope:
            tg.start_soon(_cancel_when_blocked, scope)
            await buf.attach(GPU)
        assert scope.cancelled_caught
        assert buf.attachments == (holder,)
        exp.gate.set()
    async with buf.attach(GPU) as att:  # a retry works
        assert att.attached
    await holder.unmap(tables[0])
    await holder.detach()
    await buf.put()


async def _cancel_when_blocked(scope: anyio.CancelScope) -> None:
    await wait_all_blocked()
    scope.cancel()
