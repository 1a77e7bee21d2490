"""DmaBuf pickles through multiprocessing (spawn, forkserver): Queue, Pipe, Pool."""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Iterator

import anyio
import pytest

import asyncdmabuf as dmabuf
from asyncdmabuf.exporters import MemfdExporter

from . import mp_child
from .helpers import fd_count

pytestmark = pytest.mark.slow

CONTEXTS = ["spawn", "forkserver"]


def _context(method: str) -> multiprocessing.context.SpawnContext:
    # Both have the same API; typeshed types each get_context(name) separately.
    ctx = multiprocessing.get_context(method)
    return ctx  # type: ignore[return-value]


SIZE = 3 * 4096


@pytest.fixture
def buf() -> Iterator[dmabuf.DmaBuf]:
    buf = anyio.run(_filled)
    yield buf
    if not buf.released:
        anyio.run(buf.put)


async def _filled() -> dmabuf.DmaBuf:
    buf = await MemfdExporter().allocate(SIZE, name="pickled")
    async with buf.cpu_access("w") as view:
        view[:4] = b"head"
        del view
    return buf


def _read(buf: dmabuf.DmaBuf, offset: int) -> bytes:
    async def read() -> bytes:
        async with buf.cpu_access("r") as view:
            data = bytes(view[offset : offset + len(mp_child.MARK)])
            del view
        return data

    return anyio.run(read)


def _check(facts: dict[str, object], buf: dmabuf.DmaBuf, offset: int = 0) -> None:
    assert facts["refcount"] == 1
    assert facts["exporter"] == "import"
    assert facts["size"] == SIZE
    assert facts["first"] == b"head"  # the parent's bytes...
    assert _read(buf, offset) == mp_child.MARK  # ...and the parent sees the child's
    assert buf.refcount == 1


@pytest.mark.parametrize("method", CONTEXTS)
def test_through_a_queue(method: str, buf: dmabuf.DmaBuf) -> None:
    ctx = _context(method)
    queue: multiprocessing.Queue[dmabuf.DmaBuf] = ctx.Queue()
    replies: multiprocessing.Queue[dict[str, object]] = ctx.Queue()
    proc = ctx.Process(target=mp_child.from_queue, args=(queue, replies))
    proc.start()
    try:
        queue.put(buf)
        facts = replies.get(timeout=60)
    finally:
        proc.join(60)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    assert proc.exitcode == 0
    _check(facts, buf)
    queue.close()
    replies.close()


@pytest.mark.parametrize("method", CONTEXTS)
def test_through_a_pipe(method: str, buf: dmabuf.DmaBuf) -> None:
    ctx = _context(method)
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=mp_child.from_pipe, args=(theirs,))
    proc.start()
    theirs.close()
    try:
        mine.send(buf)
        assert mine.poll(60)
        facts = mine.recv()
    finally:
        proc.join(60)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        mine.close()
    assert proc.exitcode == 0
    _check(facts, buf)


@pytest.mark.parametrize("method", CONTEXTS)
def test_as_a_pool_argument(method: str, buf: dmabuf.DmaBuf) -> None:
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2) as pool:
        results = pool.starmap(mp_child.write_mark, [(buf, 100), (buf, 200)])
        fds = pool.apply(mp_child.fds_open)
    assert fds > 0
    for facts, offset in zip(results, (100, 200), strict=True):
        _check(facts, buf, offset)


@pytest.mark.parametrize("method", CONTEXTS)
def test_as_a_process_argument(method: str, buf: dmabuf.DmaBuf) -> None:
    ctx = _context(method)
    before = fd_count()
    proc = ctx.Process(target=mp_child.write_mark, args=(buf, 300))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert _read(buf, 300) == mp_child.MARK
    del proc  # the fd kept for the launch goes with the Process
    import gc

    gc.collect()
    assert fd_count() <= before


def test_same_process_is_get() -> None:
    async def main() -> None:
        async with await MemfdExporter().allocate(4096) as buf:
            from multiprocessing.reduction import ForkingPickler

            again = pickle.loads(ForkingPickler.dumps(buf))
            assert again is buf
            assert buf.refcount == 2
            await again.put()

    anyio.run(main)


def test_released_buffer_does_not_pickle() -> None:
    from multiprocessing.reduction import ForkingPickler

    buf = anyio.run(_filled)
    anyio.run(buf.put)
    with pytest.raises(dmabuf.InvalidArgument):
        ForkingPickler.dumps(buf)
