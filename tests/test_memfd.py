"""MemfdExporter: sealed memfd, real addresses, zero-copy CPU access."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncdmabuf as dmabuf
from asyncdmabuf import Direction
from asyncdmabuf.exporters import MemfdExporter
from asyncdmabuf.lowlevel import MAX_TABLE_ENTRIES as MAX_ENTRIES

pytestmark = pytest.mark.anyio


async def test_memfd_is_sealed_against_resizing() -> None:
    buf = await MemfdExporter().allocate(8192)
    fd = buf.fd()
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK
        assert seals & fcntl.F_SEAL_GROW
        assert seals & fcntl.F_SEAL_SEAL
        for size in (0, 4096, 1 << 20):
            with pytest.raises(PermissionError) as info:
                os.ftruncate(fd, size)
            assert info.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == 8192
    finally:
        os.close(fd)
        await buf.put()


async def test_new_buffers_read_as_zeros() -> None:
    heap = MemfdExporter()
    for _ in range(3):
        buf = await heap.allocate(10_000)
        async with buf.cpu_access("rw") as view:
            assert bytes(view) == bytes(10_000)
            view[:] = b"\xff" * 10_000
        await buf.put()


async def test_dma_addresses_are_the_bytes_in_this_process() -> None:
    buf = await MemfdExporter().allocate(3 * 4096)
    dev = dmabuf.Device("cpu-dma", max_segment_size=4096)
    async with buf.cpu_access("w") as view:
        view[:] = bytes(range(256)) * 48
    async with buf.attach(dev) as att, att.map(Direction.TO_DEVICE) as sgt:
        assert [e.length for e in sgt] == [4096] * 3
        for entry in sgt:
            chunk = ctypes.string_at(entry.dma_address, entry.length)
            assert chunk == (bytes(range(256)) * 48)[entry.offset : entry.offset + 4096]
        # Writing through the address is seen by CPU access.
        ctypes.memset(sgt[1].dma_address, 0xAB, 16)
    async with buf.cpu_access("r") as view:
        assert bytes(view[4096 : 4096 + 16]) == b"\xab" * 16
    await buf.put()


async def test_numpy_wraps_the_view_without_copying() -> None:
    buf = await MemfdExporter().allocate(4096)
    async with (
        buf.attach(dmabuf.Device("d")) as att,
        att.map(Direction.BIDIRECTIONAL) as sgt,
    ):
        async with buf.cpu_access("rw") as view:
            arr = np.frombuffer(view, dtype=np.uint8)
            assert arr.ctypes.data == sgt[0].dma_address
            arr[:4] = [1, 2, 3, 4]
            del arr
        assert ctypes.string_at(sgt[0].dma_address, 4) == b"\x01\x02\x03\x04"
    await buf.put()


async def test_read_view_is_read_only() -> None:
    buf = await MemfdExporter().allocate(4096)
    async with buf.cpu_access("r") as view:
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1
    await buf.put()


async def test_cpu_access_modes_and_pairing() -> None:
    buf = await MemfdExporter().allocate(4096)
    with pytest.raises(dmabuf.InvalidArgument):
        buf.cpu_access("x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        buf.cpu_access(1)  # type: ignore[arg-type]
    with pytest.raises(dmabuf.InvalidArgument):
        await buf.end_cpu_access("w")
    await buf.begin_cpu_access("w")
    await buf.begin_cpu_access("w")
    await buf.end_cpu_access("w")
    await buf.end_cpu_access("w")
    with pytest.raises(dmabuf.InvalidArgument):
        await buf.end_cpu_access("w")
    await buf.put()


async def test_allocate_checks_arguments() -> None:
    heap = MemfdExporter()
    with pytest.raises(TypeError):
        await heap.allocate("big")  # type: ignore[arg-type]
    with pytest.raises(dmabuf.InvalidArgument):
        await heap.allocate(0)
    with pytest.raises(dmabuf.InvalidArgument):
        await heap.allocate(10, name="n" * 40)


async def test_allocate_is_a_checkpoint_and_cancellable() -> None:
    heap = MemfdExporter()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await heap.allocate(4096)
    assert scope.cancelled_caught
    assert dmabuf.bufinfo() == []


def _meets(entries: list[dmabuf.SgEntry], size: int, dev: dmabuf.Device) -> bool:
    offset = 0
    for e in entries:
        if e.offset != offset or not dev.reaches(e.dma_address, e.length):
            return False
        offset += e.length
    return offset == size and (not dev.contiguous or len(entries) == 1)


devices = st.builds(
    dmabuf.Device,
    name=st.just("dev"),
    dma_mask=st.sampled_from([2**32 - 1, 2**47 - 1, 2**48 - 1, 2**64 - 1]),
    max_segment_size=st.one_of(
        st.integers(min_value=1, max_value=1 << 22), st.just(2**64 - 1)
    ),
    contiguous=st.booleans(),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(size=st.integers(min_value=1, max_value=1 << 21), dev=devices)
def test_tables_honour_device_constraints(
    anyio_backend: tuple[str, dict[str, object]],
    size: int,
    dev: dmabuf.Device,
) -> None:
    async def check() -> None:
        buf = await MemfdExporter().allocate(size)
        try:
            att = await buf.attach(dev)
        except dmabuf.Busy:
            # Refused: the memory is placed and this device cannot take it.
            address = buf.priv.address
            segments = -(-size // dev.max_segment_size)
            assert (
                address + size - 1 > dev.dma_mask
                or (dev.contiguous and size > dev.max_segment_size)
                or segments > MAX_ENTRIES
            )
        else:
            sgt = att.try_map(Direction.TO_DEVICE)
            assert _meets(list(sgt), size, dev)
            await att.unmap(sgt)
            await att.detach()
        finally:
            await buf.put()

    name, options = anyio_backend
    anyio.run(check, backend=name, backend_options=options)


async def test_memfd_is_registered_as_an_entry_point() -> None:
    from asyncdmabuf.exporters import available, load

    assert "memfd" in available()
    assert load("memfd") is MemfdExporter
    with pytest.raises(dmabuf.InvalidArgument):
        load("no-such-exporter")


def test_memfd_and_dmaheap_exporters_use_only_the_public_api() -> None:
    """They are built as a third party's would be: asyncdmabuf and its lowlevel."""
    import ast
    from pathlib import Path

    root = Path(__file__).parent.parent / "exporters"
    for name in ("_memfd.py", "_dmaheap.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                module = node.module or ""
                if module.startswith("asyncdmabuf"):
                    assert module in ("asyncdmabuf", "asyncdmabuf.lowlevel"), (
                        name,
                        module,
                    )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("asyncdmabuf._"), (name, alias)


async def test_memfd_is_labelled_with_its_exporter() -> None:
    async with await MemfdExporter().allocate(4096, name="frame") as buf:
        fd = buf.fd()
        try:
            assert os.readlink(f"/proc/self/fd/{fd}").startswith(
                "/memfd:asyncdmabuf:memfd:frame"
            )
        finally:
            os.close(fd)


async def test_a_devices_layout_is_worked_out_once_per_buffer() -> None:
    dev = dmabuf.Device("cached", max_segment_size=4096)
    buf = await MemfdExporter().allocate(1 << 16)
    async with buf, buf.attach(dev) as first, buf.attach(dev) as second:
        assert first.priv is None  # an attachment never mapped costs no table
        async with first.map(Direction.TO_DEVICE) as a:
            pass
        b = second.try_map(Direction.TO_DEVICE)
        assert first.priv is second.priv
        assert len(first.priv) == 16
        assert [tuple(e) for e in a] == [tuple(e) for e in b]
        await second.unmap(b)


async def test_devices_attached_in_turn_each_get_their_own_table() -> None:
    buf = await MemfdExporter().allocate(3 * 4096)
    small = dmabuf.Device("small", max_segment_size=4096)
    whole = dmabuf.Device("whole")
    unreachable = dmabuf.Device("low", dma_mask=0xFFFF)
    for dev, entries in ((small, 3), (whole, 1), (small, 3), (whole, 1)):
        att = await buf.attach(dev)
        sgt = att.try_map(Direction.TO_DEVICE)
        assert len(list(sgt)) == entries
        await att.unmap(sgt)
        await att.detach()
    for _ in range(2):  # refused the same way, whether worked out or remembered
        with pytest.raises(dmabuf.Busy, match="dma_mask"):
            await buf.attach(unreachable)
    await buf.put()


async def test_a_read_only_mapping_refuses_writers() -> None:
    from asyncdmabuf.lowlevel import map_fd

    fd = os.memfd_create("ro")
    try:
        os.ftruncate(fd, 4096)
        mapping = map_fd(fd, 4096, writable=False)
        assert not mapping.writable
        with pytest.raises(TypeError):
            memoryview(mapping)[0] = 1
        mapping.unmap()
        writable = map_fd(fd, 4096, writable=True)
        assert writable.writable
        writable.unmap()
    finally:
        os.close(fd)
