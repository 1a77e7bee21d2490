"""Functions the multiprocessing children of tests/test_pickle.py run (importable)."""

from __future__ import annotations

import os
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue

import anyio

import asyncdmabuf as dmabuf

MARK = b"child wrote this"


async def _write(buf: dmabuf.DmaBuf, offset: int) -> dict[str, object]:
    facts: dict[str, object] = {
        "pid": os.getpid(),
        "refcount": buf.refcount,
        "exporter": buf.exporter.name,
        "size": buf.size,
    }
    async with buf, buf.cpu_access("rw") as view:
        facts["first"] = bytes(view[:4])
        view[offset : offset + len(MARK)] = MARK
        del view
    return facts


def write_mark(buf: dmabuf.DmaBuf, offset: int = 0) -> dict[str, object]:
    """Write MARK at ``offset`` of ``buf`` and put it; report what the child saw."""
    return anyio.run(_write, buf, offset)


def from_queue(queue: Queue[dmabuf.DmaBuf], replies: Queue[dict[str, object]]) -> None:
    replies.put(write_mark(queue.get(timeout=60)))


def from_pipe(conn: Connection) -> None:
    buf = conn.recv()
    conn.send(write_mark(buf))
    conn.close()


def fds_open() -> int:
    return len(os.listdir("/proc/self/fd"))
