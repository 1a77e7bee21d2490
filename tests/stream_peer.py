"""The other process of tests/test_stream*.py: ``python stream_peer.py ROLE PATH ...``.

It reports facts to the test as JSON lines on stdout and obeys lines on stdin;
the test asserts on the facts. Frames carry the pattern ``fill(seq)``: every
byte is ``seq % 251``, so a subscriber checks the first and last byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

import asyncdmabuf as dmabuf
from asyncdmabuf.exporters import MemfdExporter


def fill(seq: int) -> int:
    return seq % 251


class Control:
    """JSON lines to and from the test over a socket the peer inherits."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self._reader = BufferedByteReceiveStream(stream)

    async def say(self, **facts: Any) -> None:
        await self.stream.send(json.dumps(facts).encode() + b"\n")

    async def next(self) -> str:
        return (await self._reader.receive_until(b"\n", 4096)).decode().strip()


def fds() -> dict[str, str]:
    """Every open fd and what it is."""
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            targets[name] = os.readlink(f"/proc/self/fd/{name}")
    return targets


async def check(frame: dmabuf.Frame) -> dict[str, Any]:
    async with frame.buffer.cpu_access("r") as view:
        first, last = view[0], view[frame.buffer.size - 1]
        del view
    return {
        "seq": frame.seq,
        "ok": first == last == fill(frame.seq),
        "first": first,
        "meta": frame.metadata.decode(),
    }


async def receive(
    ctl: Control, path: str, count: int, queue: int, overflow: str
) -> None:
    """On "go", receive ``count`` frames, check and release each; then wait for EOF."""
    async with await dmabuf.subscribe(path, queue=queue, overflow=overflow) as sub:
        await ctl.say(ready=True, fds=fds())
        await ctl.next()
        seen = []
        for _ in range(count):
            async with await sub.receive() as frame:
                seen.append(await check(frame))
        stats = sub.statistics()
        await ctl.say(
            frames=seen,
            buffers=stats.buffers,
            dropped=stats.frames_dropped,
            received=stats.frames_received,
        )
        try:
            await sub.receive()
        except anyio.EndOfStream:
            await ctl.say(end=True)
    with contextlib.suppress(anyio.BrokenResourceError):  # the test may be gone
        await ctl.say(closed=True, fds=fds())


async def fences(ctl: Control, path: str) -> None:
    """Show the acquire fence gates reading, then release with a fence of ours."""
    async with await dmabuf.subscribe(path) as sub:
        await ctl.say(ready=True)
        frame = await sub.receive()
        await ctl.say(
            received=True, readable=frame.buffer.resv.test(dmabuf.Usage.WRITE)
        )
        async with frame.buffer.cpu_access("r") as view:
            first = view[0]
            del view
        await ctl.say(first=first)
        done = dmabuf.Fence()
        frame.release(fence=done)
        await ctl.say(released=True)
        await ctl.next()
        done.signal()
        await ctl.say(signalled=True)
        await ctl.next()
    await ctl.say(closed=True)


async def release_unread(ctl: Control, path: str) -> None:
    """Release the first frame at once, unread (before its acquire fence)."""
    async with await dmabuf.subscribe(path, queue=1) as sub:
        await ctl.say(ready=True)
        frame = await sub.receive()
        pending = not frame.buffer.resv.test(dmabuf.Usage.WRITE)
        frame.release()
        await ctl.say(released=True, pending=pending)
        await ctl.next()
    await ctl.say(closed=True)


async def fence_and_leave(ctl: Control, path: str) -> None:
    """Release a frame with a fence of ours, leave the stream, keep the fence."""
    done = dmabuf.Fence()
    async with await dmabuf.subscribe(path) as sub:
        await ctl.say(ready=True)
        frame = await sub.receive()
        frame.release(fence=done)
        await ctl.say(released=True)
        await ctl.next()
    await ctl.say(left=True)  # the publisher sees it gone, the fence pending
    await ctl.next()
    done.signal()
    await ctl.say(closed=True)


async def hold(ctl: Control, path: str, count: int) -> None:
    """Receive ``count`` frames and hold them until killed."""
    async with await dmabuf.subscribe(path, queue=count) as sub:
        await ctl.say(ready=True)
        held = [await sub.receive() for _ in range(count)]
        await ctl.say(holding=[f.seq for f in held])
        await anyio.sleep_forever()


async def publish(ctl: Control, path: str, count: int) -> None:
    """On "go", publish ``count`` frames, then wait to be killed."""
    layout = dmabuf.FrameLayout.for_format("GREY", 64, 64)
    async with await dmabuf.Publisher.bind(
        path, MemfdExporter(), layout, buffers=count + 1
    ) as pub:
        await ctl.say(ready=True)
        await ctl.next()  # the test has subscribed
        for seq in range(count):
            frame = await pub.loan()
            async with frame.buffer.cpu_access("w") as view:
                view[:] = bytes([fill(seq)]) * len(view)
                del view
            await pub.send(frame)
        await ctl.say(sent=count)
        await anyio.sleep_forever()


def become(uid: int) -> None:
    os.setuid(uid)


async def as_uid(ctl: Control, path: str, uid: int) -> None:
    """Subscribe as another uid: the publisher must refuse."""
    become(uid)
    try:
        async with await dmabuf.subscribe(path, allow_uids=[0, uid]):
            await ctl.say(refused=False)
    except anyio.BrokenResourceError:
        await ctl.say(refused=True)


async def main(argv: list[str]) -> None:
    role, ctl_fd, path, *args = argv
    sock = socket.socket(fileno=int(ctl_fd))
    async with await anyio.abc.SocketStream.from_socket(sock) as stream:
        ctl = Control(stream)
        if role == "receive":
            await receive(ctl, path, int(args[0]), int(args[1]), args[2])
        elif role == "fences":
            await fences(ctl, path)
        elif role == "release-unread":
            await release_unread(ctl, path)
        elif role == "fence-and-leave":
            await fence_and_leave(ctl, path)
        elif role == "hold":
            await hold(ctl, path, int(args[0]))
        elif role == "publish":
            await publish(ctl, path, int(args[0]))
        elif role == "as-uid":
            await as_uid(ctl, path, int(args[0]))
        else:
            raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    backend = os.environ.get("PEER_BACKEND", "asyncio")
    anyio.run(
        main,
        sys.argv[1:],
        backend="trio" if backend == "trio" else "asyncio",
        backend_options={"use_uvloop": True} if backend == "uvloop" else {},
    )
